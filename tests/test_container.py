"""Container and codec round trips through the small API (save / load / open)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

import nwcfmt
from nwcfmt.codecs.base import Codec, EncodedTensor
from nwcfmt.container.manifest import Manifest
from nwcfmt.errors import EncodeError, UnknownCodecError


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def special_values(dtype: torch.dtype) -> torch.Tensor:
    finfo = torch.finfo(dtype)
    vals = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), finfo.tiny, finfo.tiny / 4, finfo.max, -finfo.max]
    return torch.tensor(vals, dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dist", ["gauss", "laplace", "special", "wide"])
def test_lossless_is_bit_exact(tmp_path, dtype, dist):
    g = torch.Generator().manual_seed(1)
    if dist == "gauss":
        t = torch.randn(300, 257, generator=g) * 0.02
    elif dist == "laplace":
        t = torch.distributions.Laplace(0.0, 0.01).sample((70_001,))
    elif dist == "special":
        t = torch.cat([special_values(dtype).float(), torch.randn(5000, generator=g)])
    else:  # every exponent: forces the codec's fallback to fewer mantissa bits in the symbol
        t = torch.randn(40_000, generator=g) * torch.exp2(torch.randint(-60, 60, (40_000,), generator=g).float())
    t = t.to(dtype)
    if dist == "special":  # a NaN with a payload, as bits
        raw = t.view(torch.int16 if dtype != torch.float32 else torch.int32)
        raw[0] = 0x7FC1 if dtype != torch.float32 else 0x7FC00123
    path = tmp_path / "t.safetensors"
    with nwcfmt.NwcWriter(path) as w:
        w.write("t", t, "lossless", chunk_elems=4096, raw_if_larger=False)
    with nwcfmt.open(path) as r:
        assert r.record("t").codec == "lossless"
        back = r.decode("t")
    assert back.dtype == dtype and back.shape == t.shape
    assert bits(back) == bits(t)


def test_save_load_all_dtypes_and_shapes(tmp_path):
    tensors = {
        "w": torch.randn(64, 96).to(torch.bfloat16),
        "h": torch.randn(3, 5, 7).half(),
        "f": torch.randn(10),
        "i": torch.arange(-5, 5, dtype=torch.int64),
        "b": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "u8": torch.arange(7, dtype=torch.uint8),
    }
    path = tmp_path / "m.safetensors"
    nwcfmt.save(tensors, path, metadata={"note": "hello"})
    back = nwcfmt.load(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert bits(back[name]) == bits(t), name
    with nwcfmt.open(path) as r:
        assert r.metadata == {"format": "pt", "note": "hello"}


def test_file_is_valid_safetensors_with_aligned_payloads(tmp_path):
    path = tmp_path / "m.safetensors"
    nwcfmt.save({"a": torch.randn(100, 33).bfloat16(), "b": torch.randn(7), "c": torch.randn(50, 50)}, path)
    with safe_open(path, "pt") as f:  # the reference implementation accepts the file
        keys = list(f.keys())
        meta = f.metadata()
    assert "a" in keys and "a::index" in keys
    manifest = Manifest.from_json(meta["nwc"])
    assert manifest.format_version == (1, 0) and manifest.alignment == 64
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 64 == 0
    for record in manifest.tensors:
        for ref in record.segments.values():
            start = header[ref.tensor]["data_offsets"][0]
            assert (8 + n + start) % 64 == 0


def test_payloads_follow_write_order(tmp_path):
    path = tmp_path / "m.safetensors"
    names = [f"layers.{i}.w" for i in range(5)]
    with nwcfmt.NwcWriter(path) as w:
        for name in names:
            w.write(name, torch.randn(40, 40).bfloat16(), "lossless")
    with nwcfmt.open(path) as r:
        starts = [r.header.tensors[r.record(n).segments["data"].tensor].start for n in names]
        assert r.names == names
    assert starts == sorted(starts)


def test_tiny_tensors_fall_back_to_raw(tmp_path):
    path = tmp_path / "m.safetensors"
    nwcfmt.save({"bias": torch.randn(5).bfloat16()}, path, codec="lossless")
    with nwcfmt.open(path) as r:
        assert r.record("bias").codec == "raw"


def test_lossless_compresses_continuous_bf16(tmp_path):
    t = (torch.randn(512, 512) * 0.02).bfloat16()
    path = tmp_path / "m.safetensors"
    nwcfmt.save({"w": t}, path)
    with nwcfmt.open(path) as r:
        ratio = r.stored_bytes("w") / (t.numel() * 2)
    assert ratio < 0.70  # Gaussian bf16: ~10.6 of 16 bits carry information


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(RuntimeError), nwcfmt.NwcWriter(path) as w:
        w.write("a", torch.randn(10, 10))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_unknown_codec_and_bad_names(tmp_path):
    with nwcfmt.NwcWriter(tmp_path / "m.safetensors") as w:
        with pytest.raises(UnknownCodecError):
            w.write("a", torch.randn(3), "no-such-codec")
        with pytest.raises(EncodeError):
            w.write("a::index", torch.randn(3))
        with pytest.raises(EncodeError):
            w.write("b", torch.arange(3), "lossless", raw_if_larger=False)


def test_registry_accepts_new_codecs(tmp_path):
    class NegateCodec(Codec):  # a toy codec, registered the way third-party codecs would be
        codec_id = "test-negate"

        def encode(self, tensor, ctx=None):
            return EncodedTensor({"data": -tensor}, {"sign": -1})

        @classmethod
        def decode(cls, record, segments, device):
            return (segments["data"] * record.params["sign"]).to(device)

    nwcfmt.register_codec(NegateCodec)
    assert "test-negate" in nwcfmt.available_codecs()
    t = torch.randn(4, 4)
    with nwcfmt.NwcWriter(tmp_path / "m.safetensors") as w:
        w.write("t", t, "test-negate")
    assert torch.equal(nwcfmt.load(tmp_path / "m.safetensors")["t"], t)


def test_decode_to_dtype(tmp_path):
    t = torch.randn(32, 32).bfloat16()
    nwcfmt.save({"t": t}, tmp_path / "m.safetensors")
    out = nwcfmt.load(tmp_path / "m.safetensors", dtype=torch.float32)["t"]
    assert out.dtype == torch.float32 and torch.equal(out, t.float())


def test_lossless_threads_do_not_change_output(tmp_path, monkeypatch):
    t = torch.randn(300_000).bfloat16()
    outs = []
    for threads in ("1", "2"):
        monkeypatch.setenv("NWC_THREADS", threads)
        path = tmp_path / f"m{threads}.safetensors"
        nwcfmt.save({"t": t}, path)
        outs.append(path.read_bytes())
    assert outs[0] == outs[1]
    assert np.array_equal(
        nwcfmt.load(tmp_path / "m1.safetensors")["t"].view(torch.int16).numpy(), t.view(torch.int16).numpy()
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lossless_profiles(tmp_path, dtype):
    """Both encoder profiles write the same format; 'fast' leaves the bf16 sign+mantissa byte raw."""
    t = (torch.randn(600, 500, generator=torch.Generator().manual_seed(3)) * 0.02).to(dtype)
    sizes = {}
    for profile in ("compact", "fast"):
        path = tmp_path / f"{profile}.safetensors"
        with nwcfmt.NwcWriter(path) as w:
            w.write("t", t, "lossless", profile=profile)
        with nwcfmt.open(path) as r:
            assert bits(r.decode("t")) == bits(t)
            sizes[profile] = r.stored_bytes("t")
            index = r.segments("t")["index"].numpy().view("<u4").reshape(-1, 2 + (3 if dtype == torch.float32 else 1))
        ks = set((index[:, 0] & 0xFF).tolist())
        if profile == "fast" and dtype != torch.float16:
            assert ks == {0} and set((index[:, 0] >> 17 & 1).tolist()) == {1}  # tail plane 0 stored raw
    if dtype == torch.float16:
        assert sizes["compact"] == sizes["fast"]  # fp16's only layout already has a raw-width tail
    else:
        assert sizes["compact"] < sizes["fast"]


def test_reader_cap_on_decoded_size(tmp_path):
    path = tmp_path / "m.safetensors"
    nwcfmt.save({"small": torch.randn(10), "big": torch.randn(100, 100)}, path)
    with nwcfmt.NwcReader(path, max_tensor_bytes=1000) as r:
        assert r.decode("small").numel() == 10
        with pytest.raises(nwcfmt.LimitError, match="big"):
            r.decode("big")


def test_bool_payload_must_be_zero_or_one(tmp_path):
    path = tmp_path / "m.safetensors"
    nwcfmt.save({"mask": torch.tensor([True, False, True])}, path)
    raw = bytearray(path.read_bytes())
    with nwcfmt.open(path) as r:
        start = r.header.tensors["mask"].start
    raw[start] = 2
    path.write_bytes(bytes(raw))
    with nwcfmt.open(path) as r, pytest.raises(nwcfmt.FormatError, match="bool"):
        r.decode("mask", verify=False)


@pytest.mark.skipif(
    not __import__("nwcfmt.codecs.lossless").codecs.lossless.native_enabled(),
    reason="native kernel not built (no C compiler at install)",
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("profile", ["compact", "fast"])
def test_native_kernel_matches_numpy_reference(tmp_path, monkeypatch, dtype, profile):
    """The compiled merge kernel and the numpy path decode every layout to the same bits."""
    g = torch.Generator().manual_seed(5)
    t = torch.cat(
        [
            torch.randn(300_000, generator=g) * 0.02,  # consecutive tables
            torch.randn(70_000, generator=g) * torch.exp2(torch.randint(-40, 40, (70_000,), generator=g).float()),
            special_values(dtype).float(),
        ]
    ).to(dtype)
    path = tmp_path / "t.safetensors"
    with nwcfmt.NwcWriter(path) as w:
        w.write("t", t, "lossless", chunk_elems=8192, profile=profile, raw_if_larger=False)
    decoded = {}
    for native in ("1", "0"):
        monkeypatch.setenv("NWC_NATIVE", native)
        with nwcfmt.open(path) as r:
            decoded[native] = bits(r.decode("t"))
    assert decoded["1"] == decoded["0"] == bits(t)


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 3 * 4096 + 7, 100_000])
def test_parallel_crc_equals_zlib(monkeypatch, n):
    import zlib

    from nwcfmt.container.checksum import crc32_parallel

    monkeypatch.setenv("NWC_THREADS", "2")
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    assert crc32_parallel(memoryview(data), piece=4096) == zlib.crc32(data)


@pytest.mark.parametrize(
    ("codec", "config"),
    [("raw", {}), ("lossless", {}), ("rtn", {"bits": 4}), ("ecsq", {"bits": 3.137, "calibrate": False})],
)
def test_record_overhead_bounds_the_header_bytes(tmp_path, codec, config):
    """The planner's --target-size counts each record's data plus record_overhead, and HEADER_ALLOWANCE per file:
    that bounds the real file, without being loose by more than the padding it allows for."""
    from nwcfmt.container.writer import HEADER_ALLOWANCE, NwcWriter, encode_tensor, encoded_nbytes, record_overhead

    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    data = bound = segments = 0
    with NwcWriter(path, loader_notice=True) as w:
        for i, shape in enumerate([(64, 160), (160, 64), (32, 576), (48, 256)]):
            name = f"model.layers.{i}.mlp.down_proj.weight"
            tensor = torch.randn(shape, dtype=torch.bfloat16)
            c, encoded = encode_tensor(name, tensor, codec, **config)
            data += encoded_nbytes(encoded)
            bound += record_overhead(name, c, encoded, tensor.shape, tensor.dtype)
            segments += len(encoded.segments)
            w.append(name, tensor, c, encoded)
    size = path.stat().st_size
    assert size <= data + bound + HEADER_ALLOWANCE
    assert data + bound - size < segments * 200  # padding bound (63 bytes) and the wide offsets (2 x 16 digits)
