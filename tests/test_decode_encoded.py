"""check_encoded / decode_encoded: an EncodedTensor checked and decoded in memory exactly as a reader checks and
decodes it once written to a file (the calibration pipeline relies on this to load any codec's results)."""

from __future__ import annotations

import pytest
import torch

from nwcfmt import NwcReader, NwcWriter
from nwcfmt.codecs import registry
from nwcfmt.codecs.base import Codec, EncodedTensor
from nwcfmt.codecs.gptq import GptqCodec
from nwcfmt.constants import DTYPE_NAMES, SHARED_PREFIX
from nwcfmt.container.writer import check_encoded, decode_encoded, encode_tensor
from nwcfmt.errors import EncodeError, FormatError

ROWS, COLS = 48, 96


def _gptq(tensor: torch.Tensor) -> tuple[Codec, EncodedTensor]:
    """gptq's packed record (3 bits, act order) against the Hessian of random inputs."""
    x = torch.randn(256, COLS, generator=torch.Generator().manual_seed(1))
    codec = GptqCodec(bits=3, group_size=32, act_order=True)
    return codec, codec.quantize_with_hessian(tensor.float(), 2 / 256 * x.T @ x).encoded


ENCODE = {
    "raw": lambda t: encode_tensor("w", t, "raw"),
    "rtn": lambda t: encode_tensor("w", t, "rtn", bits=3, group_size=32),
    "rtn-zstd": lambda t: encode_tensor("w", t, "rtn", bits=4, group_size=0, entropy="zstd"),
    "gptq": _gptq,
    "ecsq": lambda t: encode_tensor("w", t, "ecsq", bits=3.0),
}


@pytest.fixture(scope="module")
def tensor() -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


@pytest.mark.parametrize("case", sorted(ENCODE))
def test_in_memory_decode_equals_the_file_read_back(tensor, tmp_path, case):
    codec, encoded = ENCODE[case](tensor)
    path = tmp_path / "w.safetensors"
    with NwcWriter(path) as writer:
        writer.append("w", tensor, codec, encoded)
    record = check_encoded("w", codec, encoded, tensor.shape, tensor.dtype)
    decoded = decode_encoded("w", codec, encoded, tensor.shape, tensor.dtype)
    with NwcReader(path) as reader:
        assert reader.record("w") == record  # name, codec and version, dtype, shape, params, segments and CRCs
        from_file = reader.decode("w")
    assert decoded.dtype == tensor.dtype and tuple(decoded.shape) == (ROWS, COLS)
    assert torch.equal(decoded.view(torch.int16), from_file.view(torch.int16))
    if case != "raw":  # lossy decoders round once from fp32: an fp32 decode rounded equals the bf16 decode
        wide = decode_encoded("w", codec, encoded, tensor.shape, torch.float32)
        assert wide.dtype == torch.float32 and torch.equal(wide.to(torch.bfloat16), from_file)


def test_refusals_are_the_codecs(tensor):
    codec, encoded = encode_tensor("w", tensor, "rtn", bits=3, group_size=32)
    with pytest.raises(FormatError, match=r"segment .scale. is F16\[48, 3\], expected F16\[24, 3\]"):  # validate
        decode_encoded("w", codec, encoded, (ROWS // 2, COLS), tensor.dtype)
    zero_scale = torch.zeros_like(encoded.segments["scale"])
    bad_scale = EncodedTensor({**encoded.segments, "scale": zero_scale}, encoded.params)
    with pytest.raises(FormatError, match="scales must be positive"):  # check: the contents
        check_encoded("w", codec, bad_scale, tensor.shape, tensor.dtype)
    odd = EncodedTensor({**encoded.segments, "data": encoded.segments["data"].to(torch.complex64)}, encoded.params)
    with pytest.raises(EncodeError, match="which no file can hold"):
        check_encoded("w", codec, odd, tensor.shape, tensor.dtype)
    with pytest.raises(EncodeError, match="reserved"):
        check_encoded("w::x", codec, encoded, tensor.shape, tensor.dtype)


class TableCodec(Codec):
    """``table[codes]``, the table a segment shared by the file's records (format-v1.md 6.2). Test only."""

    codec_id = "test-shared-table"
    segment_names = ("data", "table")

    def encode(self, tensor: torch.Tensor, ctx=None) -> EncodedTensor:
        codes = (tensor.sign() + 1).to(torch.uint8)
        return EncodedTensor({"data": codes, "table": torch.tensor([-0.5, 0.0, 0.5])}, {"n": 3}, {"table": "tbl.v1"})

    @classmethod
    def decode(cls, record, segments, device) -> torch.Tensor:
        return segments["table"][segments["data"].long()].to(device, DTYPE_NAMES[record.dtype])


def test_shared_segments_as_the_file_names_them(tensor, tmp_path, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, TableCodec.codec_id, TableCodec)  # the reader looks codecs up
    codec, path = TableCodec(), tmp_path / "t.safetensors"
    encoded = {name: codec.encode(tensor[i::2]) for i, name in enumerate(("a", "b"))}
    with NwcWriter(path) as writer:
        for name, enc in encoded.items():
            writer.append(name, tensor[::2], codec, enc)
    with NwcReader(path) as reader:
        for name, enc in encoded.items():
            record = check_encoded(name, codec, enc, (ROWS // 2, COLS), tensor.dtype)
            assert record == reader.record(name) and record.segments["table"].tensor == f"{SHARED_PREFIX}tbl.v1"
            decoded = decode_encoded(name, codec, enc, (ROWS // 2, COLS), tensor.dtype)
            assert torch.equal(decoded, reader.decode(name))
