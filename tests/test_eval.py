"""The quality harness (``nwcfmt.eval``, ``nwc eval``): protocol mechanics on a tiny random Llama, the
SmolLM2 perplexity yardstick and the MiniLM embedding cosine on real weights and text."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_nwc
from nwcfmt import data
from nwcfmt.errors import InputError
from nwcfmt.eval import (
    fake_quantize,
    fake_quantize_linear_weights,
    load_for_eval,
    perplexity,
    quantizable_linears,
    split_sentences,
)
from nwcfmt.eval.report import EVAL_FILE

SEQLEN = 64  # tiny Llama: max_position_embeddings 256


def byte_tokenizer(folder: Path) -> None:
    """Save a byte-level tokenizer (256 tokens, one per UTF-8 byte, no merges, no special tokens) in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=256).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_dirs(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(plain bf16 folder with a byte tokenizer, the same encoded by ``nwc encode --codec lossless``)."""
    root = tmp_path_factory.mktemp("eval")
    plain = root / "tiny-plain"
    shutil.copytree(tiny_llama_dir, plain)
    byte_tokenizer(plain)
    nwc = root / "tiny-nwc"
    run_nwc("encode", plain, "-o", nwc, "--codec", "lossless", "-q")
    return plain, nwc


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Real English text (the start of the evaluation text): 4000 bytes, so 62 windows of 64 byte tokens."""
    path = tmp_path_factory.mktemp("text") / "speech.txt"
    path.write_text(data.eval_text()[:4000], encoding="utf-8")
    return path


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# ------------------------------------------------------------------------------------ protocol mechanics


def test_protocol_windows_tokens_and_nll(tiny_dirs, text_file):
    plain, _ = tiny_dirs
    loaded = load_for_eval(plain)
    assert loaded.kind == "causal-lm" and not loaded.is_nwc
    assert next(loaded.model.parameters()).dtype == torch.float32 and not loaded.model.training
    text = text_file.read_text()
    result = perplexity(loaded.model, loaded.tokenizer, text, windows=3, seqlen=SEQLEN)
    assert result.windows == 3 and result.seqlen == SEQLEN and result.stride == SEQLEN
    assert result.tokens_scored == 3 * (SEQLEN - 1) and result.tokens_used == 3 * SEQLEN
    assert result.text_tokens == len(text.encode())  # one byte token per byte, no BOS/EOS added
    # independent check: transformers' own shifted loss (mean over tokens 1..seqlen-1) of each window
    ids = torch.tensor(list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"]))
    with torch.no_grad():
        losses = [
            float(loaded.model(input_ids=w[None], labels=w[None]).loss)
            for w in (ids[i * SEQLEN : (i + 1) * SEQLEN] for i in range(3))
        ]
    assert result.window_nll == pytest.approx(losses, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
    batched = perplexity(loaded.model, loaded.tokenizer, text, windows=3, seqlen=SEQLEN, batch=2)
    assert batched.perplexity == pytest.approx(result.perplexity, rel=1e-5)
    # stride > seqlen leaves gaps: window 1 starts at token 2 * SEQLEN
    gapped = perplexity(loaded.model, None, ids, windows=2, seqlen=SEQLEN, stride=2 * SEQLEN)
    assert gapped.window_nll[1] == pytest.approx(result.window_nll[2], rel=1e-6)
    full = perplexity(loaded.model, None, ids, windows=None, seqlen=SEQLEN)
    assert full.windows == len(ids) // SEQLEN
    with pytest.raises(InputError, match="fewer than"):
        perplexity(loaded.model, None, ids, windows=full.windows + 1, seqlen=SEQLEN)
    with pytest.raises(InputError, match="overlap"):
        perplexity(loaded.model, None, ids, windows=1, seqlen=SEQLEN, stride=SEQLEN - 1)
    with pytest.raises(InputError, match="max_position_embeddings"):
        perplexity(loaded.model, None, ids, windows=1, seqlen=512)


def test_plain_and_nwc_folders_give_identical_perplexity(tiny_dirs, text_file):
    plain, nwc = tiny_dirs
    before = folder_state(nwc)
    a, b = load_for_eval(plain), load_for_eval(nwc)
    assert b.is_nwc and not a.is_nwc
    assert folder_state(nwc) == before  # loading never writes into the folder
    text = text_file.read_text()
    pa = perplexity(a.model, a.tokenizer, text, windows=4, seqlen=SEQLEN)
    pb = perplexity(b.model, b.tokenizer, text, windows=4, seqlen=SEQLEN)
    assert pa.perplexity == pb.perplexity and pa.window_nll == pb.window_nll


def test_tied_lm_head_is_filled_and_mismatches_are_errors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    reference = LlamaForCausalLM(config).eval()
    folder = tmp_path / "tied"
    reference.save_pretrained(folder)
    byte_tokenizer(folder)
    stored = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in stored  # stored once, under the embedding's name
    loaded = load_for_eval(folder)
    model = loaded.model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, reference.model.embed_tokens.weight)
    ids = torch.arange(40)[None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    # the reference quantizer leaves the tied lm_head alone, like the yardstick
    assert "lm_head" not in quantizable_linears(model) and len(quantizable_linears(model)) == 2 * 7
    del stored["model.norm.weight"]
    stored["extra.weight"] = torch.zeros(2)
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"missing 1 tensor\(s\): model\.norm\.weight; unexpected 1"):
        load_for_eval(folder)
    assert load_for_eval(folder, strict=False).model is not None


# -------------------------------------------------------------------------------------- fake quantization


def brute_force_rtn(w: torch.Tensor, bits: int, group: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """The yardstick's rule written out group by group with Python scalars."""
    qmax = 2**bits - 1
    out = torch.empty_like(w)
    for r in range(w.shape[0]):
        for c in range(0, w.shape[1], group):
            g = w[r, c : c + group]
            lo, hi = float(g.min()), float(g.max())
            scale = float(torch.tensor((hi - lo) / qmax, dtype=torch.float32).to(scale_dtype))
            zero = min(max(round(-lo / scale), 0), qmax)
            codes = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
            out[r, c : c + group] = (codes - zero) * scale
    return out


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16])
def test_fake_quantize_matches_the_rule(scale_dtype):
    torch.manual_seed(0)
    w = torch.randn(6, 200) * 0.05  # 200 = one group of 128 and a shorter last group of 72
    for bits in (3, 4):
        got = fake_quantize(w, bits, 128, scale_dtype=scale_dtype)
        want = brute_force_rtn(w, bits, 128, scale_dtype)
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
        for c in (slice(0, 128), slice(128, 200)):
            assert all(len(torch.unique(got[r, c])) <= 2**bits for r in range(6))
        assert (got - w).abs().max() <= 0.6 * (w.max() - w.min()) / (2**bits - 1)
    constant = torch.full((2, 128), 0.37)
    assert torch.allclose(fake_quantize(constant, 4, 128, scale_dtype=torch.float32), constant)
    assert torch.equal(fake_quantize(torch.zeros(2, 128), 4, 128), torch.zeros(2, 128))
    sym = fake_quantize(w, 4, None, symmetric=True, scale_dtype=torch.float32)
    assert all(len(torch.unique(sym[r])) <= 16 for r in range(6))


def test_fake_quantization_changes_perplexity(tiny_dirs, text_file):
    plain, _ = tiny_dirs
    loaded = load_for_eval(plain)
    text = text_file.read_text()
    before = perplexity(loaded.model, loaded.tokenizer, text, windows=2, seqlen=SEQLEN).perplexity
    head = loaded.model.lm_head.weight.clone()
    names = fake_quantize_linear_weights(loaded.model, bits=2, group_size=32, scale_dtype=torch.float32)
    assert len(names) == 3 * 7 and "lm_head" not in names  # every decoder Linear; the output head stays
    assert torch.equal(loaded.model.lm_head.weight, head)
    after = perplexity(loaded.model, loaded.tokenizer, text, windows=2, seqlen=SEQLEN).perplexity
    assert after != before


def test_split_sentences_is_deterministic():
    text = 'Mr. Speaker, thank you all.\n\nWe met in Washington, D.C. last week! Yes.  Is it "good?" It is.'
    assert split_sentences(text) == ["Mr. Speaker, thank you all.", "We met in Washington, D.C. last week!"]
    real = split_sentences(data.eval_text(), 50)
    assert len(real) == 50 and real[0].startswith("Mr. Speaker, Mr. Vice President")
    assert all(len(s.split()) >= 4 for s in real)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_eval_json_and_saved_results(tiny_dirs, text_file):
    plain, nwc = tiny_dirs
    args = ("--text", text_file, "--windows", "3", "--seqlen", str(SEQLEN), "--json", "-q")
    doc = json.loads(run_nwc("eval", nwc, *args).stdout)
    loaded = load_for_eval(plain)
    direct = perplexity(loaded.model, loaded.tokenizer, text_file.read_text(), windows=3, seqlen=SEQLEN)
    assert doc["metric"] == "perplexity" and doc["kind"] == "causal-lm" and doc["is_nwc"]
    assert doc["value"] == pytest.approx(direct.perplexity, rel=1e-6)
    assert doc["details"]["windows"] == 3 and doc["details"]["tokens_scored"] == 3 * (SEQLEN - 1)
    assert doc["details"]["protocol"] == "nwc-ppl-v1" and doc["text"]["name"] == str(text_file)
    assert 8 < doc["bits_per_weight"]["all"] < 16 and 8 < doc["bits_per_weight"]["linear"] < 16  # lossless bf16
    saved = json.loads((nwc / EVAL_FILE).read_text())
    assert saved["schema"] == "nwc-eval/1"
    (entry,) = saved["evaluations"].values()
    assert entry["value"] == doc["value"] and entry["date"].endswith("+00:00") and "folder" not in entry
    # a plain folder is never written to
    plain_doc = json.loads(run_nwc("eval", plain, *args).stdout)
    assert plain_doc["value"] == doc["value"] and plain_doc["bits_per_weight"] == {"all": 16.0, "linear": 16.0}
    assert not (plain / EVAL_FILE).exists()


def invoke(*args) -> tuple[int, str, str]:
    """Run ``nwc`` in-process (the real click command; no subprocess start-up): (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from nwcfmt.cli.main import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_cli_eval_compare_table_and_plot(tiny_dirs, text_file, tmp_path):
    plain, nwc = tiny_dirs
    png = tmp_path / "ppl.png"
    code, out, _ = invoke(
        "eval", "--compare", plain, nwc, "--text", text_file, "--windows", "2", "--seqlen", SEQLEN,
        "--plot", png, "--no-save", "-q",
    )  # fmt: skip
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["model", "kind", "bits/w"]
    assert len(lines) == 3 and str(plain) in lines[1] and str(nwc) in lines[2]
    assert "1.0000x" in lines[2]  # lossless: same perplexity as the first row
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cli_eval_errors_are_one_line(tiny_dirs, tmp_path):
    plain, nwc = tiny_dirs
    cases = [
        (("eval", plain, nwc), "use --compare"),
        (("eval", tmp_path / "nope"), "no such model folder"),
        (("eval", plain, "--reference", nwc), "--reference is used only for encoders"),
        (("eval", plain, "--text", tmp_path / "none.txt"), "no such text file"),
        (("eval", plain, "--seqlen", "512", "--windows", "1", "--text", __file__), "max_position_embeddings"),
    ]
    for args, message in cases:
        code, _, err = invoke(*args, "-q")
        assert code == 1, (args, err)
        assert err.startswith("nwc: error: ") and err.strip().count("\n") == 0 and message in err, err
    proc = run_nwc("eval", plain, nwc, check=False)  # the installed entry point: same one-line error
    assert proc.returncode == 1 and proc.stderr.startswith("nwc: error: ") and proc.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------- real models (slow)


@pytest.mark.slow
def test_smollm2_perplexity_protocol():
    """SmolLM2-135M fp32 on the evaluation text: the protocol's first window equals a plain causal-LM loss on
    the first 2048 tokens. The full yardstick (8 windows: 21.74, shared/DATA.md) costs 3 minutes on 2 cores:
    ``NWC_LONG_TESTS=1`` runs it, and every ``bench_nwc.py smollm2`` run measures it again."""
    loaded = load_for_eval(data.smollm2_dir("float32"))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    text = data.eval_text()
    long = os.environ.get("NWC_LONG_TESTS") == "1"
    result = perplexity(loaded.model, loaded.tokenizer, text, windows=8 if long else 1)
    assert result.text_tokens == 185_833
    if long:
        assert result.windows == 8 and result.tokens_scored == 8 * 2047
        assert result.perplexity == pytest.approx(21.74, rel=1e-3)
        return
    assert result.windows == 1 and result.tokens_scored == 2047
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, :2048]
    with torch.no_grad():
        loss = loaded.model(ids, labels=ids).loss  # mean over the 2047 predicted tokens
    assert result.perplexity == pytest.approx(math.exp(float(loss)), rel=1e-4)


@pytest.mark.slow
def test_minilm_embedding_cosine(tmp_path):
    """all-MiniLM-L6-v2: cosine 1.0 against itself, > 0.999 for a bf16 cast; encoders need --reference."""
    original = data.minilm_dir()
    bf16 = tmp_path / "minilm-bf16"
    shutil.copytree(original, bf16)
    tensors = load_file(original / "model.safetensors")
    cast = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(cast, bf16 / "model.safetensors", metadata={"format": "pt"})

    from nwcfmt.eval import embedding_similarity
    from nwcfmt.eval.similarity import max_seq_length

    model = load_for_eval(original)
    assert model.kind == "encoder" and max_seq_length(original) == 256
    sentences = split_sentences(data.eval_text(), 64)
    same = embedding_similarity(model.model, model.model, model.tokenizer, sentences)
    assert same.sentences == 64 and same.mean_cosine == pytest.approx(1.0, abs=1e-12)

    doc = json.loads(run_nwc("eval", bf16, "--reference", original, "--json", "-q").stdout)
    assert doc["kind"] == "encoder" and doc["metric"] == "mean_cosine" and doc["details"]["sentences"] == 256
    assert 0.999 < doc["value"] < 1.0 and doc["details"]["min_cosine"] > 0.99
    assert doc["bits_per_weight"]["linear"] == 16.0
    code, _, err = invoke("eval", bf16, "-q")
    assert code == 1 and "pass --reference" in err
