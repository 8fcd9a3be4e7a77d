"""rtn: round-to-nearest into the shared integer-code layout, checked against an independent formula."""

from __future__ import annotations

import json
import math

import pytest
import torch

import nwcfmt
from conftest import run_nwc
from nwcfmt.codecs.quant import layout_of
from nwcfmt.codecs.rtn import RtnCodec


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype=torch.float16):
    """Independent RTN (written from the docs, not the codec): groups along rows of the [rows, cols] view."""
    shape, dtype = w.shape, w.dtype
    rows = shape[0] if w.dim() >= 2 else 1
    x = w.float().reshape(rows, -1)
    if group_size == -1:
        x = x.reshape(1, -1)
    cols = x.shape[1]
    g = cols if group_size in (0, -1) or group_size >= cols else group_size
    out = torch.empty_like(x)
    qmax = 2**bits - 1
    for start in range(0, cols, g):
        blk = x[:, start : start + g]
        if symmetric:
            s = (blk.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)).to(scale_dtype).float()
            s = torch.where(s > 0, s, torch.tensor(torch.finfo(scale_dtype).tiny))
            z = torch.full_like(s, 2 ** (bits - 1))
        else:
            lo, hi = blk.amin(1, keepdim=True).clamp(max=0), blk.amax(1, keepdim=True).clamp(min=0)
            s = ((hi - lo) / qmax).to(scale_dtype).float()
            s = torch.where(s > 0, s, torch.tensor(torch.finfo(scale_dtype).tiny))
            z = torch.clamp(torch.round(-lo / s), 0, qmax)
        q = torch.clamp(torch.round(blk / s) + z, 0, qmax)
        out[:, start : start + g] = (q - z) * s
    return out.reshape(shape).to(dtype)


def roundtrip(tmp_path, w: torch.Tensor, **config) -> tuple[torch.Tensor, nwcfmt.NwcReader]:
    path = tmp_path / "q.safetensors"
    with nwcfmt.NwcWriter(path) as writer:
        writer.write("w", w, "rtn", **config)
    reader = nwcfmt.open(path)
    return reader.decode("w"), reader


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 100, 0, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_independent_fake_quantization(tmp_path, bits, group_size, symmetric):
    g = torch.Generator().manual_seed(bits * 100 + group_size)
    w = (torch.randn(37, 250, generator=g) * 0.05).to(torch.bfloat16)  # 250 % 32 != 0: partial last group
    out, reader = roundtrip(tmp_path, w, bits=bits, group_size=group_size, symmetric=symmetric)
    expected = fake_quantize(w, bits, group_size, symmetric)
    assert out.dtype == w.dtype and out.shape == w.shape
    assert torch.equal(bits_of(out), bits_of(expected))
    reader.close()


@pytest.mark.parametrize("shape", [(1000,), (6, 5, 40), (3, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ranks_and_dtypes(tmp_path, shape, dtype):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    for scale_dtype, torch_scale in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        out, reader = roundtrip(tmp_path, w, bits=4, group_size=64, scale_dtype=scale_dtype)
        assert torch.equal(bits_of(out), bits_of(fake_quantize(w, 4, 64, False, torch_scale)))
        reader.close()


def test_error_falls_with_bits_and_clip_search_never_hurts(tmp_path):
    w = torch.distributions.Laplace(0.0, 0.02).sample((128, 512))  # heavy tails: clipping pays off
    errors = {}
    for bits in (2, 3, 4, 8):
        for clip in (None, "mse", "weighted"):
            config = {"clip_search": True, "clip_metric": clip} if clip else {}
            out, reader = roundtrip(tmp_path, w, bits=bits, group_size=128, **config)
            errors[bits, clip, "mse"] = ((out - w) ** 2).sum().item()
            errors[bits, clip, "weighted"] = (w**2 * (out - w) ** 2).sum().item()
            reader.close()
    assert errors[2, None, "mse"] > errors[3, None, "mse"] > errors[4, None, "mse"] > errors[8, None, "mse"]
    for bits in (2, 3, 4, 8):  # each criterion never increases the error it minimises
        for metric in ("mse", "weighted"):
            assert errors[bits, metric, metric] <= errors[bits, None, metric] * (1 + 1e-6)
    assert errors[2, "mse", "mse"] < 0.9 * errors[2, None, "mse"]


@pytest.mark.parametrize("metric", ["weighted", "mse"])
def test_clip_search_is_per_group_optimal_over_its_grid(metric):
    codec = RtnCodec(bits=3, group_size=64, clip_search=True, clip_steps=10, clip_metric=metric)
    w = torch.randn(8, 256) * 0.02
    layout = codec.layout(w)
    codes, scale, zero = codec.quantize(w, layout)
    from nwcfmt.codecs.rtn import group_error, grouped_view, quantize_groups

    grouped, mask = grouped_view(w, layout)
    chosen = group_error(grouped, mask, grouped_view(codes.float(), layout)[0], scale, zero.float(), metric)
    lo, hi = grouped.amin(-1).clamp(max=0), grouped.amax(-1).clamp(min=0)
    for ratio in torch.linspace(1.0, 0.5, 11).tolist():
        c, s, z = quantize_groups(grouped, lo * ratio, hi * ratio, 3, False, "float16")
        assert (chosen <= group_error(grouped, mask, c, s, z, metric) + 1e-12).all()


def test_entropy_stage_is_lossless_and_reported(tmp_path):
    w = (torch.randn(512, 1024) * 0.02).bfloat16()
    plain, r1 = roundtrip(tmp_path / "a", w, bits=4, group_size=128)
    (tmp_path / "b").mkdir()
    coded, r2 = roundtrip(tmp_path / "b", w, bits=4, group_size=128, entropy="zstd")
    assert torch.equal(bits_of(plain), bits_of(coded))
    assert r2.record("w").params["entropy"] == "zstd" and r2.stored_bytes("w") < r1.stored_bytes("w")
    n_chunks = len(r2.segments("w")["index"])
    assert n_chunks == math.ceil(512 / layout_of(r2.record("w")).rows_per_chunk())
    r1.close()
    r2.close()


def test_bits_per_weight_counts_scale_and_zero(tmp_path):
    w = torch.randn(256, 1024).bfloat16()
    _, reader = roundtrip(tmp_path, w, bits=4, group_size=128)
    bpw = 8 * reader.stored_bytes("w") / w.numel()
    assert bpw == pytest.approx(4 + 16 / 128 + 8 / 128)  # codes + fp16 scale + uint8 zero per 128
    reader.close()


def test_cli_encodes_a_model_and_info_shows_the_cost(tiny_llama_dir, tmp_path):
    enc = tmp_path / "enc"
    run_nwc("encode", tiny_llama_dir, "-o", enc, "--codec", "rtn", "--bits", "4", "--group-size", "128", "-q")
    doc = json.loads(run_nwc("info", enc, "--json").stdout)
    by_name = {t["name"]: t for t in doc["tensors"]}
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert q["codec"] == "rtn" and q["bits_per_weight"] == pytest.approx(4.1875)
    assert q["details"] == {
        "bits": 4,
        "group": "g128",
        "symmetric": False,
        "packed_bytes": 128 * 64,
        "entropy_saved_bytes": 0,
    }
    assert by_name["model.embed_tokens.weight"]["codec"] == "lossless"  # kept exactly, and smaller than raw
    assert by_name["lm_head.weight"]["codec"] == "lossless"
    assert by_name["model.norm.weight"]["codec"] == "raw"
    quantized = [t for t in doc["tensors"] if t["codec"] == "rtn"]
    assert 8 * sum(t["stored_bytes"] for t in quantized) / sum(t["numel"] for t in quantized) == pytest.approx(4.1875)
    run_nwc("verify", enc)
    run_nwc("decode", enc, "-o", tmp_path / "dec", "-q")
    decoded = nwcfmt.load(tmp_path / "dec")
    for name, tensor in nwcfmt.load(enc).items():
        assert torch.equal(
            bits_of(decoded[name]) if tensor.is_floating_point() else decoded[name],
            bits_of(tensor) if tensor.is_floating_point() else tensor,
        )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "minilm"])
def test_real_models_encode_with_rtn(tmp_path, model):
    from nwcfmt import data

    src = data.smollm2_dir("bfloat16") if model == "smollm2" else data.minilm_dir()
    enc = tmp_path / "enc"
    run_nwc("encode", src, "-o", enc, "--codec", "rtn", "--bits", "4", "--group-size", "128", "-q")
    run_nwc("verify", enc, "-q")
    doc = json.loads(run_nwc("info", enc, "--json").stdout)
    encoded = [t for t in doc["tensors"] if t["codec"] == "rtn"]
    # codes + fp16 scale + uint8 zero per group; SmolLM2's 576 columns end in a partial group of 64
    expected_bytes = sum(
        t["shape"][0]
        * (math.ceil(t["numel"] // t["shape"][0] * 4 / 8) + 3 * math.ceil(t["numel"] // t["shape"][0] / 128))
        for t in encoded
    )
    assert sum(t["stored_bytes"] for t in encoded) == expected_bytes
    assert 4.18 < 8 * expected_bytes / sum(t["numel"] for t in encoded) < 4.21
    original = nwcfmt.load(src)
    decoded = nwcfmt.load(enc)
    name = "model.layers.3.mlp.down_proj.weight" if model == "smollm2" else "encoder.layer.2.intermediate.dense.weight"
    expected = fake_quantize(original[name], 4, 128, False)
    assert torch.equal(bits_of(decoded[name]), bits_of(expected))


def test_encoder_refuses_what_it_cannot_represent(tmp_path):
    from nwcfmt.errors import EncodeError

    with nwcfmt.NwcWriter(tmp_path / "q.safetensors") as writer:
        with pytest.raises(EncodeError, match="inf or NaN"):
            writer.write("w", torch.tensor([[1.0, float("nan")]]), "rtn")
        with pytest.raises(EncodeError, match="bfloat16"):
            writer.write("w", torch.tensor([[-1e6, 1e6]]), "rtn", bits=4, group_size=2)
        writer.write("w", torch.tensor([[-1e6, 1e6]]), "rtn", bits=4, group_size=2, scale_dtype="bfloat16")
