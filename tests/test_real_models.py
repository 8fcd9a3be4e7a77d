"""Real checkpoints (SmolLM2, all-MiniLM-L6-v2) round-trip through NWC with every tensor byte-identical."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import flip_bit, tensor_hashes

from conftest import run_nwc
from nwcfmt import data


@pytest.fixture(scope="module")
def minilm_bf16_dir(tmp_path_factory):
    """MiniLM with its fp32 weights cast to bf16: continuous weights in the dtype LLMs ship in."""
    src = data.minilm_dir()
    dst = tmp_path_factory.mktemp("minilm-bf16")
    shutil.copytree(src, dst, dirs_exist_ok=True)
    state = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()
    }
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


MODELS = {
    "smollm2-bf16": lambda request: data.smollm2_dir("bfloat16"),
    "minilm-fp32": lambda request: data.minilm_dir(),
    "minilm-bf16": lambda request: request.getfixturevalue("minilm_bf16_dir"),
}


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["lossless", "raw"])
@pytest.mark.parametrize("model", list(MODELS))
def test_real_model_round_trip(request, tmp_path, model, codec):
    src = MODELS[model](request)
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    run_nwc("encode", src, "-o", enc, "--codec", codec, "-q")
    run_nwc("verify", enc, "-q")
    run_nwc("decode", enc, "-o", dec, "-q")
    assert tensor_hashes(dec) == tensor_hashes(src)
    stored = sum(p.stat().st_size for p in enc.glob("*.safetensors"))
    original = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    if codec == "lossless" and model.endswith("bf16"):
        assert stored < 0.70 * original  # bf16 weights: sign + ~2.6 exponent bits + 7 mantissa bits
    if codec == "raw":
        assert abs(stored - original) < 0.01 * original + 1e6  # headers, manifest and 64-byte padding only


@pytest.mark.slow
def test_flipped_payload_bit_fails_verify(minilm_bf16_dir, tmp_path):
    enc = tmp_path / "enc"
    run_nwc("encode", minilm_bf16_dir, "-o", enc, "-q")
    flip_bit(enc / "model.safetensors", "encoder.layer.3.attention.self.query.weight", byte=12345, bit=6)
    proc = run_nwc("verify", enc, check=False)
    assert proc.returncode == 1 and "encoder.layer.3.attention.self.query.weight" in proc.stderr
