"""``neural``: the NWC transform in the latent layout, with its decoder network stored once per file.

Rate control meets the target (the network's share included), decoding is the spec's chunk formula, the
decoder weights are shared segments checked against their hash, and bad records are refused."""

from __future__ import annotations

import math

import pytest
import torch

import nwcfmt
from conftest import rewrite_nwc
from nwcfmt import NwcReader, NwcWriter
from nwcfmt.codecs.neural import NET_PREFIX, NeuralCodec, chunk_view, net_bytes, unchunk
from nwcfmt.constants import SHARED_PREFIX, SHARED_SEGMENTS
from nwcfmt.errors import EncodeError, FormatError, NwcError
from nwcfmt.neural import arch


def write(path, tensors: dict, **config):
    with NwcWriter(path) as w:
        for name, t in tensors.items():
            w.write(name, t, "neural", **config)
    return path


def test_chunks_round_trip():
    m = torch.arange(37 * 5, dtype=torch.float32).view(37, 5)
    chunks = chunk_view(m)
    assert chunks.shape == (3 * 5, 16)
    assert torch.equal(chunks[1], torch.zeros(16).index_copy(0, torch.arange(16), m[:16, 1]))
    assert torch.equal(unchunk(chunks, 37, 5), m)


@pytest.mark.parametrize("bits", [2.5, 4.0])
def test_bits_target_met_with_the_network_counted(tmp_path, bits):
    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(256, 320, generator=g) * 0.02 for i in range(2)}
    path = write(tmp_path / "n.safetensors", tensors, bits=bits, net_share=2)
    reader = NwcReader(path)
    total = sum(reader.stored_bytes(k) for k in tensors)
    assert abs(total - sum(reader.stored_bytes(k) for k in tensors)) == 0
    numel = sum(t.numel() for t in tensors.values())
    assert bits - 0.05 <= 8 * total / numel <= bits
    shared = [n for n in reader.header.tensors if n.startswith(SHARED_PREFIX)]
    assert len(shared) == len(arch.DECODER_TENSORS)  # stored once for both records
    assert reader.manifest.required_features == [SHARED_SEGMENTS] and reader.manifest.format_version == (1, 1)


def test_gaussian_quality_near_ecsq(tmp_path):
    """The learned transform must not lose to ECSQ by more than a few hundredths of a bit (the decoder network's
    bytes, amortised over a whole model's tensors in practice, are left out of this one-tensor comparison)."""
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1))
    gaps = {}
    for codec in ("neural", "ecsq"):
        path = tmp_path / f"{codec}.safetensors"
        with NwcWriter(path) as wr:
            wr.write("w", w, codec, bits=4.0, **({"net_share": 1 << 20} if codec == "neural" else {}))
        parts = NwcReader(path).segment_bytes("w")
        rate = 8 * sum(v for k, v in parts.items() if not k.startswith(NET_PREFIX)) / w.numel()
        mse = float(((nwcfmt.load(path)["w"] - w) ** 2).mean())
        gaps[codec] = 0.5 * math.log2(1 / mse) - rate
    assert gaps["neural"] > gaps["ecsq"] - 0.03, gaps


def test_decode_is_the_spec_formula(tmp_path):
    w = (torch.randn(40, 50, generator=torch.Generator().manual_seed(2)) * 0.1).bfloat16()
    path = write(tmp_path / "n.safetensors", {"w": w}, bits=3.0, lane_symbols=1024, net_share=1000)
    reader = NwcReader(path)
    rec, seg = reader.record("w"), reader.segments("w")
    q = NeuralCodec.decode_symbols(rec, seg) + rec.params["latent_min"]
    q = q.view(-1, 16).float()
    net = {k.removeprefix(NET_PREFIX): v for k, v in seg.items() if k.startswith(NET_PREFIX)}
    step = torch.tensor(rec.params["step"], dtype=torch.float32)
    u = torch.cat([q * step, torch.log2(step).expand(q.shape[0], 1), net["dec.emb"][torch.zeros(q.shape[0]).long()]], 1)
    h = torch.relu(u @ net["dec.l0.weight"].T + net["dec.l0.bias"])
    h = torch.relu(h @ net["dec.l1.weight"].T + net["dec.l1.bias"])
    x_hat = step * (q + h @ net["dec.l2.weight"].T + net["dec.l2.bias"])
    expected = (unchunk(x_hat, 40, 50) * seg["scale"].float()[:, None]).bfloat16().float()
    got = reader.decode("w").float()
    assert torch.allclose(got, expected, rtol=1e-2, atol=1e-6)  # bf16 output: a last-bit tie may differ


def test_same_input_same_bytes(tmp_path):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    a = write(tmp_path / "a.safetensors", {"w": w}, bits=3.5).read_bytes()
    b = write(tmp_path / "b.safetensors", {"w": w}, bits=3.5).read_bytes()
    assert a == b


@pytest.mark.parametrize(
    "config, match",
    [({"channels": 3}, "channels"), ({"net_share": 0}, "net_share"), ({"lane_symbols": 1030}, "lane_symbols"),
     ({"bits": -2}, "bits")],
)  # fmt: skip
def test_bad_config(config, match):
    with pytest.raises(EncodeError, match=match):
        NeuralCodec(**config)


def _net_edit(manifest, tensors):
    name = next(k for k in tensors if k.startswith(SHARED_PREFIX) and k.endswith("l2.bias"))
    tensors[name] = tensors[name] + 1.0  # CRC fixed below: only the hash can tell


def _no_feature(manifest, tensors):
    manifest["required_features"] = []


def _param(key, value):
    def edit(manifest, tensors):
        manifest["tensors"][0]["params"][key] = value

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_net_edit, "hash"),
        (_no_feature, "claimed twice"),
        (_param("arch", "nwc-mlp-9"), "architecture"),
        (_param("step", 0.1), "float32"),
        (_param("step", -1.0), "step"),
        (_param("channels", 4), "channels"),
        (_param("latent_min", 1.5), "latent_min"),
        (_param("decoder_sha256", "00"), "decoder_sha256"),
    ],
)
def test_bad_records_raise(tmp_path, edit, match):
    g = torch.Generator().manual_seed(4)
    path = write(tmp_path / "n.safetensors", {"a": torch.randn(32, 64, generator=g), "b": torch.randn(16, 80,
                 generator=g)}, bits=3, lane_symbols=1024, net_share=1000)  # fmt: skip
    bad = rewrite_nwc(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(NwcError, match=match) as info, NwcReader(bad) as reader:
        for name in reader.names:
            reader.decode(name)
    assert isinstance(info.value, FormatError)


def test_network_bytes_constant_matches_the_architecture():
    assert net_bytes() == 4 * sum(math.prod(s) for s in arch.DECODER_TENSORS.values())
