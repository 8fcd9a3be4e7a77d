"""The ``nwc`` CLI on real transformers checkpoints: encode, info, verify, decode, errors, atomicity."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_nwc


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every tensor's bytes (with dtype and shape) across all safetensors files of a folder."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, t in load_file(file).items():
            blob = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            out[name] = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode() + blob).hexdigest()
    return out


def flip_bit(path: Path, tensor_name: str, byte: int = 0, bit: int = 3) -> None:
    """Flip one bit inside the payload of ``tensor_name`` (a safetensors tensor of an NWC file)."""
    raw = bytearray(path.read_bytes())
    (n,) = __import__("struct").unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    start = 8 + n + header[tensor_name]["data_offsets"][0]
    raw[start + byte] ^= 1 << bit
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("codec", ["lossless", "raw"])
def test_round_trip_is_byte_identical(tiny_llama_dir, tmp_path, codec):
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    real = codec == "lossless"  # one round trip through the installed entry point, in a subprocess
    run_nwc("encode", tiny_llama_dir, "-o", enc, "--codec", codec, "-q", real=real)
    config = json.loads((enc / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "nwc"
    assert config["quantization_config"]["format_version"] == "1.0"
    assert (enc / "tokenizer_config.json").is_file() and (enc / "generation_config.json").is_file()
    assert run_nwc("verify", enc, real=real).stdout.startswith("ok:")
    (enc / "nwc_eval.json").write_text("{}")  # results of the NWC folder do not describe the decoded one
    run_nwc("decode", enc, "-o", dec, "-q", real=real)
    assert "quantization_config" not in json.loads((dec / "config.json").read_text())
    assert not (dec / "nwc_eval.json").exists()
    assert tensor_hashes(dec) == tensor_hashes(tiny_llama_dir)


def test_policy_keeps_norms_raw_and_honours_exclude(tiny_llama_dir, tmp_path):
    enc = tmp_path / "enc"
    run_nwc("encode", tiny_llama_dir, "-o", enc, "--exclude", "*embed_tokens*", "-q")
    info = json.loads(run_nwc("info", enc, "--json").stdout)
    codecs = {t["name"]: t["codec"] for t in info["tensors"]}
    assert codecs["model.embed_tokens.weight"] == "raw"
    assert codecs["model.norm.weight"] == "raw"
    assert codecs["model.layers.0.input_layernorm.weight"] == "raw"
    assert codecs["model.layers.0.self_attn.q_proj.weight"] == "lossless"


def test_kept_tensors_are_stored_exactly_and_smaller(tiny_llama_dir, tmp_path):
    """Lossy codecs keep embeddings and lm_head exact: lossless by default (smaller than raw, bit for bit), raw
    with ``keep_exact: raw``; an inexact keep_exact is refused."""
    import nwcfmt

    enc = tmp_path / "enc"
    run_nwc("encode", tiny_llama_dir, "-o", enc, "--codec", "rtn", "--bits", "4", "-q")
    info = {t["name"]: t for t in json.loads(run_nwc("info", enc, "--json").stdout)["tensors"]}
    embed = info["model.embed_tokens.weight"]
    assert embed["codec"] == "lossless" and embed["stored_bytes"] < 0.8 * embed["numel"] * 2
    original = load_file(str(tiny_llama_dir / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(nwcfmt.load(enc / "model.safetensors")["model.embed_tokens.weight"], original)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"codec": "rtn", "keep_exact": "raw"}))
    run_nwc("encode", tiny_llama_dir, "-o", tmp_path / "raw", "--policy", policy, "--bits", "4", "-q")
    info = {t["name"]: t["codec"] for t in json.loads(run_nwc("info", tmp_path / "raw", "--json").stdout)["tensors"]}
    assert info["model.embed_tokens.weight"] == "raw" and info["lm_head.weight"] == "raw"
    policy.write_text(json.dumps({"codec": "rtn", "keep_exact": "rtn"}))
    proc = run_nwc("encode", tiny_llama_dir, "-o", tmp_path / "bad", "--policy", policy, check=False)
    assert proc.returncode != 0 and "exact codec" in proc.stderr and "Traceback" not in proc.stderr


def test_policy_file(tiny_llama_dir, tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"codec": "lossless", "rules": [{"match": "*mlp*", "codec": "raw"}]}))
    enc = tmp_path / "enc"
    run_nwc("encode", tiny_llama_dir, "-o", enc, "--policy", policy, "-q")
    info = json.loads(run_nwc("info", enc, "--json").stdout)
    codecs = {t["name"]: t["codec"] for t in info["tensors"]}
    assert codecs["model.layers.1.mlp.up_proj.weight"] == "raw"
    assert codecs["model.layers.1.self_attn.k_proj.weight"] == "lossless"


def test_sharding_and_model_order(tiny_llama_dir, tmp_path):
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    run_nwc("encode", tiny_llama_dir, "-o", enc, "--max-shard-size", "100KB", "-q")
    shards = sorted(enc.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (enc / "model.safetensors").exists()
    index = json.loads((enc / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    from nwcfmt.container.reader import NwcReader
    from nwcfmt.sources import model_order_key

    names = []
    for i, shard in enumerate(shards, start=1):
        with NwcReader(shard) as r:
            assert r.manifest.shard == (i, len(shards))
            names += r.names
    assert names == sorted(names, key=model_order_key)
    assert names.index("model.layers.2.mlp.up_proj.weight") < names.index("model.norm.weight")
    run_nwc("verify", enc)
    run_nwc("decode", enc, "-o", dec, "-q")
    assert tensor_hashes(dec) == tensor_hashes(tiny_llama_dir)


def test_single_file_and_pytorch_bin_inputs(tiny_llama_dir, tmp_path):
    state = load_file(tiny_llama_dir / "model.safetensors")
    src = tmp_path / "weights.safetensors"
    save_file(state, src)
    run_nwc("encode", src, "-o", tmp_path / "w.nwc.safetensors", "-q")
    run_nwc("decode", tmp_path / "w.nwc.safetensors", "-o", tmp_path / "w.out.safetensors", "-q")
    back = load_file(tmp_path / "w.out.safetensors")
    assert all(torch.equal(back[k].view(torch.int16), state[k].view(torch.int16)) for k in state)
    expected = ["w.nwc.safetensors", "w.out.safetensors", "weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected  # no stray temp files beside the output

    bin_dir = tmp_path / "bin-model"
    bin_dir.mkdir()
    torch.save(state, bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    run_nwc("encode", bin_dir, "-o", tmp_path / "from-bin", "-q")
    run_nwc("decode", tmp_path / "from-bin", "-o", tmp_path / "from-bin-dec", "-q")
    assert tensor_hashes(tmp_path / "from-bin-dec") == tensor_hashes(tiny_llama_dir)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))

    bin_dir = tmp_path / "evil"
    bin_dir.mkdir()
    torch.save({"w": torch.zeros(2), "x": Evil()}, bin_dir / "pytorch_model.bin")
    proc = run_nwc("encode", bin_dir, "-o", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "weights_only" in proc.stderr
    assert not (tmp_path / "pwned.txt").exists() and not Path("pwned.txt").exists()


def test_info_reports_bits_per_weight(tiny_llama_dir, tmp_path):
    enc = tmp_path / "enc"
    run_nwc("encode", tiny_llama_dir, "-o", enc, "-q")
    text = run_nwc("info", enc).stdout
    assert "bits/w" in text and "model.layers.0.mlp.down_proj.weight" in text and "bits/weight" in text
    doc = json.loads(run_nwc("info", enc, "--json").stdout)
    totals = doc["totals"]
    assert totals["stored_bytes"] == sum(t["stored_bytes"] for t in doc["tensors"])
    assert totals["bits_per_weight"] == pytest.approx(8 * totals["stored_bytes"] / totals["numel"], abs=1e-3)
    assert 8 < totals["bits_per_weight"] < 16  # bf16 model, lossless
    assert totals["file_bytes"] == sum(p.stat().st_size for p in enc.glob("*.safetensors"))


def test_verify_names_the_corrupt_tensor(tiny_llama_dir, tmp_path):
    enc = tmp_path / "enc"
    run_nwc("encode", tiny_llama_dir, "-o", enc, "-q")
    flip_bit(enc / "model.safetensors", "model.layers.1.self_attn.v_proj.weight", byte=100)
    proc = run_nwc("verify", enc, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("nwc: error:") and "model.layers.1.self_attn.v_proj.weight" in lines[-1]
    assert "checksum" in lines[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["encode", "does-not-exist", "-o", "x"], "no such file or folder"),
        (["info", "does-not-exist"], "no such file or folder"),
        (["encode", ".", "-o", "x", "--max-shard-size", "lots"], "is not a size"),
    ],
)
def test_errors_are_one_line(tmp_path, args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "nwcfmt.cli.main", *args], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode != 0
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_existing_output_needs_overwrite(tiny_llama_dir, tmp_path):
    enc = tmp_path / "enc"
    run_nwc("encode", tiny_llama_dir, "-o", enc, "-q")
    proc = run_nwc("encode", tiny_llama_dir, "-o", enc, "-q", check=False)
    assert proc.returncode == 1 and "--overwrite" in proc.stderr
    run_nwc("encode", tiny_llama_dir, "-o", enc, "-q", "--overwrite", "--codec", "raw")
    assert json.loads(run_nwc("info", enc, "--json").stdout)["totals"]["ratio"] == 1.0


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    for command in ("info", "verify"):
        proc = run_nwc(command, bad, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "not valid JSON" in proc.stderr


def test_sigkill_mid_write_leaves_no_output(tmp_path):
    src = tmp_path / "big"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {f"layers.{i}.weight": torch.randn(2048, 4096, generator=g).bfloat16() for i in range(12)},
        src / "model.safetensors",
    )
    dst = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nwcfmt.cli.main", "encode", str(src), "-o", str(dst), "-q"],
        env={**os.environ, "NWC_THREADS": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until payload bytes are being written
        partial = [p for p in tmp_path.rglob("*.data.tmp") if p.stat().st_size > 1 << 20]
        if partial or proc.poll() is not None:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "encode finished before it could be interrupted; make the model larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not dst.exists()
    run_nwc("encode", src, "-o", dst, "-q")  # leftovers of the killed run do not get in the way
    run_nwc("verify", dst, "-q")
