"""The reader on bad input: one focused test per fault, each on a real file surgically modified.

Every file is written by ``nwcfmt.save`` / ``NwcWriter`` into ``tmp_path``, then edited: the header is parsed, its
JSON (or the manifest inside ``__metadata__["nwc"]``) or the bytes are changed, and the file is re-written with a
correct length prefix and the writer's alignment, so that each test exercises exactly one fault. A fault must give
a typed :class:`nwcfmt.NwcError` subclass that names the file (and the tensor, when there is one).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
import zstandard
from safetensors.torch import save_file

import nwcfmt
from nwcfmt import (
    ChecksumError,
    FormatError,
    InputError,
    LimitError,
    NwcError,
    NwcReader,
    NwcWriter,
    UnknownCodecError,
    UnknownFeatureError,
    UnsupportedVersionError,
)
from nwcfmt.constants import MAX_CHUNK_ELEMENTS, MAX_HEADER_BYTES, PAD_PREFIX
from nwcfmt.container.safetensors_io import read_header

ALIGN = 64


# ---------------------------------------------------------------------------------------------- file surgery
def split_file(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_file(header: dict | str, body: bytes, align: int = ALIGN) -> bytes:
    """Header JSON (a dict, or text written as is) + body, with a correct length prefix and aligned data."""
    text = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    raw = text.encode("utf-8")
    raw += b" " * ((-(8 + len(raw))) % align)
    return struct.pack("<Q", len(raw)) + raw + body


def manifest_of(header: dict) -> dict:
    return json.loads(header["__metadata__"]["nwc"])


def with_manifest(header: dict, manifest: dict | str) -> dict:
    text = manifest if isinstance(manifest, str) else json.dumps(manifest, separators=(",", ":"))
    return {**header, "__metadata__": {**header["__metadata__"], "nwc": text}}


def record(manifest: dict, name: str) -> dict:
    return next(r for r in manifest["tensors"] if r["name"] == name)


def crc_hex(data: bytes) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def relayout(header: dict, body: bytes, blobs: dict[str, bytes], *, shift: dict[str, int] | None = None) -> bytes:
    """Rebuild a file with some tensors' bytes replaced (stored 1-D U8 when the size changes), aligned like the
    writer; ``shift[name]`` extra padding bytes go before tensor ``name`` (to misalign it on purpose)."""
    shift = shift or {}
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__" and not k.startswith(PAD_PREFIX)),
        key=lambda kv: tuple(kv[1]["data_offsets"]),
    )
    out_header: dict = {"__metadata__": header["__metadata__"]}
    out = bytearray()

    def pad(n: int) -> None:
        out_header[f"{PAD_PREFIX}{len(out_header)}"] = {
            "dtype": "U8",
            "shape": [n],
            "data_offsets": [len(out), len(out) + n],
        }
        out.extend(bytes(n))

    for name, info in entries:
        start, end = info["data_offsets"]
        blob = blobs.get(name, body[start:end])
        if len(out) % ALIGN and blob:
            pad(ALIGN - len(out) % ALIGN)
        if shift.get(name):
            pad(shift[name])
        same = len(blob) == end - start
        out_header[name] = {
            "dtype": info["dtype"] if same else "U8",
            "shape": info["shape"] if same else [len(blob)],
            "data_offsets": [len(out), len(out) + len(blob)],
        }
        out += blob
    return join_file(out_header, bytes(out))


def tensor_bytes(header: dict, body: bytes, name: str) -> bytes:
    start, end = header[name]["data_offsets"]
    return body[start:end]


def index_rows(rec: dict, header: dict, body: bytes) -> list[list[int]]:
    raw = tensor_bytes(header, body, rec["segments"]["index"]["tensor"])
    ncol = 5 if rec["dtype"] == "float32" else 3
    words = struct.unpack(f"<{len(raw) // 4}I", raw)
    return [list(words[i : i + ncol]) for i in range(0, len(words), ncol)]


def pack_rows(rows: list[list[int]]) -> bytes:
    return b"".join(struct.pack(f"<{len(r)}I", *r) for r in rows)


def open_all(path: Path, *, verify: bool = True, allow_plain: bool = False) -> dict[str, torch.Tensor]:
    with NwcReader(path, allow_plain=allow_plain) as r:
        return {n: r.decode(n, verify=verify) for n in r.names}


def bits(t: torch.Tensor) -> bytes:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": (torch.randn(600, generator=g) * 0.02).bfloat16(),  # lossless, 3 chunks of 256
        "f": torch.randn(4, 8, generator=g),  # raw float32
        "i": torch.arange(5, dtype=torch.int32),  # raw int32
    }


@pytest.fixture
def nwc(tmp_path, tensors) -> Path:
    path = tmp_path / "model.safetensors"
    with NwcWriter(path) as w:
        w.write("w", tensors["w"], "lossless", chunk_elems=256, raw_if_larger=False)
        w.write("f", tensors["f"])
        w.write("i", tensors["i"])
    return path


@pytest.fixture
def parts(nwc) -> tuple[dict, bytes]:
    return split_file(nwc.read_bytes())


def rewrite(path: Path, data: bytes) -> Path:
    out = path.with_name("bad.safetensors")
    out.write_bytes(data)
    return out


@contextlib.contextmanager
def raises_naming(exc_type, path: Path, *names: str):
    """``pytest.raises`` that also checks that the message names the file and the given tensors."""
    with pytest.raises(exc_type) as info:
        yield info
    msg = str(info.value)
    assert str(path) in msg, f"message does not name the file: {msg}"
    for name in names:
        assert repr(name) in msg, f"message does not name tensor {name!r}: {msg}"


def test_surgery_helpers_keep_a_valid_file_valid(nwc, parts, tensors):
    header, body = parts
    for data in (relayout(header, body, {}), join_file(header, body)):
        got = open_all(rewrite(nwc, data))
        assert {k: bits(v) for k, v in got.items()} == {k: bits(v) for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------- truncation, length
def test_truncated_at_every_byte(tmp_path):
    """Every cut point (inside the length prefix, the header, the data) is a FormatError at open."""
    path = tmp_path / "small.safetensors"
    with NwcWriter(path) as w:
        w.write("w", torch.randn(300).bfloat16(), "lossless", chunk_elems=256, raw_if_larger=False)
        w.write("i", torch.arange(3, dtype=torch.int16))
    data = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    cut_path = tmp_path / "cut.safetensors"
    regions = set()
    for cut in range(len(data)):
        cut_path.write_bytes(data[:cut])
        with pytest.raises(FormatError) as info:
            NwcReader(cut_path)
        assert str(cut_path) in str(info.value)
        regions.add("prefix" if cut < 8 else "header" if cut < header_end else "data")
    assert regions == {"prefix", "header", "data"}


@pytest.mark.parametrize("where", ["prefix", "header", "data", "last-byte"])
def test_truncated_file(nwc, where):
    data = nwc.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    cut = {"prefix": 5, "header": header_end // 2, "data": (header_end + len(data)) // 2, "last-byte": len(data) - 1}
    bad = rewrite(nwc, data[: cut[where]])
    with raises_naming(FormatError, bad) as info:
        NwcReader(bad)
    assert "truncated" in str(info.value) or "data section" in str(info.value)


def test_header_length_larger_than_file(nwc):
    data = nwc.read_bytes()
    bad = rewrite(nwc, struct.pack("<Q", len(data)) + data[8:])
    with raises_naming(FormatError, bad) as info:
        NwcReader(bad)
    assert not isinstance(info.value, LimitError) and "truncated" in str(info.value)


class _SpyFile(io.BytesIO):
    """A file object that records how many bytes each read asked for."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.requests: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        self.requests.append(-1 if size is None else size)
        return super().read(size)


@pytest.mark.parametrize("length", [MAX_HEADER_BYTES + 1, 2**40, 2**64 - 1])
def test_oversized_header_length_is_limit_error_without_allocating(nwc, length):
    data = struct.pack("<Q", length) + nwc.read_bytes()[8:]
    spy = _SpyFile(data)
    with pytest.raises(LimitError, match="header length"):
        read_header(spy, "spy.safetensors")
    assert spy.requests == [8]  # only the prefix was read: nothing sized by the file was allocated
    bad = rewrite(nwc, data)
    with raises_naming(LimitError, bad):
        NwcReader(bad)


def test_header_length_at_the_limit_is_bounded_by_the_file(nwc):
    spy = _SpyFile(struct.pack("<Q", MAX_HEADER_BYTES) + b"{}")
    with pytest.raises(FormatError, match="truncated"):
        read_header(spy, "spy.safetensors")
    assert spy.requests == [8]


# ---------------------------------------------------------------------------------------- header JSON itself
@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b'{"a": "\xff\xfe"}', id="not-utf8"),
        pytest.param(b"\xc3", id="truncated-utf8"),
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b"", id="empty"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b"42", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"a": NaN}', id="nan"),
        pytest.param(b'{"a": 1, "a": 2}', id="duplicate-key"),
        pytest.param(b'{"a": ' + b"9" * 5000 + b"}", id="integer-too-long"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nesting-too-deep"),
        pytest.param(b'{"__metadata__": [], "x": 1}', id="metadata-not-object"),
        pytest.param(b'{"__metadata__": {"nwc": 5}}', id="metadata-value-not-string"),
    ],
)
def test_malformed_header_json(tmp_path, text):
    raw = text + b" " * ((-(8 + len(text))) % 8)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with raises_naming(FormatError, bad):
        NwcReader(bad)


# ------------------------------------------------------------------------------------ safetensors entries
def _edit_entry(nwc: Path, parts, name: str, field: str, value) -> Path:
    header, body = parts
    header[name][field] = value
    return rewrite(nwc, join_file(header, body))


@pytest.mark.parametrize("dtype", ["F128", "f32", "", 5, None, ["F32"], {"F32": 1}], ids=repr)
def test_bad_dtype(nwc, parts, dtype):
    bad = _edit_entry(nwc, parts, "f", "dtype", dtype)
    with raises_naming(FormatError, bad, "f") as info:
        NwcReader(bad)
    assert "dtype" in str(info.value)


def test_missing_dtype(nwc, parts):
    header, body = parts
    del header["i"]["dtype"]
    bad = rewrite(nwc, join_file(header, body))
    with raises_naming(FormatError, bad, "i"):
        NwcReader(bad)


@pytest.mark.parametrize(
    "shape",
    [[-4, -8], [4, -8], [True, 32], [4.0, 8.0], ["4", 8], [[4], 8], [None], "4,8", 32, None, [1] * 9, {"0": 4}],
    ids=repr,
)
def test_bad_shape(nwc, parts, shape):
    bad = _edit_entry(nwc, parts, "f", "shape", shape)
    with raises_naming(FormatError, bad, "f") as info:
        NwcReader(bad)
    assert "shape" in str(info.value)


def test_shape_with_too_many_elements_is_limit_error(nwc, parts):
    bad = _edit_entry(nwc, parts, "f", "shape", [2**40, 2**40])
    with raises_naming(LimitError, bad, "f"):
        NwcReader(bad)


@pytest.mark.parametrize("shape", [[4, 7], [33], [], [0], [4, 8, 2]], ids=repr)
def test_shape_disagrees_with_offsets(nwc, parts, shape):
    bad = _edit_entry(nwc, parts, "f", "shape", shape)
    with raises_naming(FormatError, bad, "f") as info:
        NwcReader(bad)
    assert "do not match" in str(info.value)


def test_dtype_size_disagrees_with_offsets(nwc, parts):
    bad = _edit_entry(nwc, parts, "f", "dtype", "F64")
    with raises_naming(FormatError, bad, "f") as info:
        NwcReader(bad)
    assert "do not match" in str(info.value)


@pytest.mark.parametrize(
    "offsets",
    [[0], [0, 1, 2], "0-128", None, [0.0, 128.0], [False, True], ["0", "128"], [-128, 0], [128, 0]],
    ids=repr,
)
def test_malformed_data_offsets(nwc, parts, offsets):
    bad = _edit_entry(nwc, parts, "i", "data_offsets", offsets)
    with raises_naming(FormatError, bad, "i"):
        NwcReader(bad)


def test_out_of_range_offsets(nwc, parts):
    header, body = parts
    start, end = header["i"]["data_offsets"]
    header["i"]["data_offsets"] = [start + len(body), end + len(body)]
    bad = rewrite(nwc, join_file(header, body))
    with raises_naming(FormatError, bad, "i") as info:
        NwcReader(bad)
    assert "outside the data section" in str(info.value)


def test_overlapping_offsets(nwc, parts):
    header, body = parts
    f_start, _ = header["f"]["data_offsets"]
    header["i"]["data_offsets"] = [f_start, f_start + 20]  # i now overlaps f; its own bytes become a hole
    bad = rewrite(nwc, join_file(header, body))
    with raises_naming(FormatError, bad) as info:
        NwcReader(bad)
    assert "overlap" in str(info.value)


def test_hole_between_tensors(nwc, parts):
    header, body = parts
    start, end = header["i"]["data_offsets"]
    body = body[:start] + bytes(ALIGN) + body[start:]  # i moves ALIGN bytes later, leaving a hole
    header["i"]["data_offsets"] = [start + ALIGN, end + ALIGN]
    bad = rewrite(nwc, join_file(header, body))
    with raises_naming(FormatError, bad, "i") as info:
        NwcReader(bad)
    assert "hole" in str(info.value)


def test_trailing_bytes_after_the_last_tensor(nwc):
    bad = rewrite(nwc, nwc.read_bytes() + b"\0" * 16)
    with raises_naming(FormatError, bad) as info:
        NwcReader(bad)
    assert "data section" in str(info.value)


def test_entry_not_an_object(nwc, parts):
    header, body = parts
    header["i"] = ["I32", [5], header["i"]["data_offsets"]]
    bad = rewrite(nwc, join_file(header, body))
    with raises_naming(FormatError, bad, "i"):
        NwcReader(bad)


# ------------------------------------------------------------------------------------------ manifest level
def _edit_manifest(nwc: Path, parts, edit) -> Path:
    header, body = parts
    manifest = manifest_of(header)
    manifest = edit(manifest) or manifest
    return rewrite(nwc, join_file(with_manifest(header, manifest), body))


@pytest.mark.parametrize(
    "text",
    ["{", "[]", '"nwc"', '{"format": "nwc", "format": "nwc"}', '{"a": NaN}', "1" * 5000, "[" * 100_000],
    ids=["truncated", "array", "string", "duplicate-key", "nan", "long-int", "deep"],
)
def test_manifest_not_a_json_object(nwc, parts, text):
    header, body = parts
    bad = rewrite(nwc, join_file(with_manifest(header, text), body))
    with raises_naming(FormatError, bad) as info:
        NwcReader(bad)
    assert "manifest" in str(info.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("format", "gguf"),
        ("format_version", "1"),
        ("format_version", "1.0.0"),
        ("format_version", "\u00b2.0"),  # isdigit() but not int()-able
        ("format_version", "\u0661.0"),  # a non-ASCII digit
        ("format_version", 1.0),
        ("required_features", "none"),
        ("required_features", [1]),
        ("alignment", 48),
        ("alignment", 0),
        ("alignment", True),
        ("shard", {"index": 2, "count": 1}),
        ("shard", {"index": 0, "count": 1}),
        ("tensors", {}),
        ("tensors", [5]),
    ],
    ids=repr,
)
def test_malformed_manifest_field(nwc, parts, key, value):
    bad = _edit_manifest(nwc, parts, lambda m: m.update({key: value}))
    with raises_naming(FormatError, bad):
        NwcReader(bad)


@pytest.mark.parametrize("key", ["format", "format_version", "required_features", "alignment", "tensors"])
def test_manifest_missing_field(nwc, parts, key):
    bad = _edit_manifest(nwc, parts, lambda m: m.pop(key))
    with raises_naming(FormatError, bad):
        NwcReader(bad)


@pytest.mark.parametrize("version", ["2.0", "0.9", "17.3"])
def test_unknown_major_version(nwc, parts, version):
    bad = _edit_manifest(nwc, parts, lambda m: m.update(format_version=version))
    with raises_naming(UnsupportedVersionError, bad) as info:
        NwcReader(bad)
    assert version in str(info.value)


def test_higher_minor_version_still_reads(nwc, parts, tensors):
    newer = _edit_manifest(nwc, parts, lambda m: m.update(format_version="1.7", some_future_field={"x": [1]}))
    with NwcReader(newer) as r:
        assert r.manifest.format_version == (1, 7)
        assert bits(r.decode("w")) == bits(tensors["w"])


def test_unknown_required_feature(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: m.update(required_features=["sparse-v9"]))
    with raises_naming(UnknownFeatureError, bad) as info:
        NwcReader(bad)
    assert "sparse-v9" in str(info.value)


def test_unknown_optional_feature_is_fine(nwc, parts, tensors):
    ok = _edit_manifest(nwc, parts, lambda m: m.update(optional_features=["sparse-v9", "whatever"]))
    assert bits(open_all(ok)["i"]) == bits(tensors["i"])


def test_unknown_codec(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "f").update(codec="quantum-v1"))
    with raises_naming(UnknownCodecError, bad, "f") as info:
        NwcReader(bad)
    assert "quantum-v1" in str(info.value)


def test_codec_version_newer_than_implemented(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "w").update(codec_version=2))
    with raises_naming(UnsupportedVersionError, bad, "w"):
        NwcReader(bad)


@pytest.mark.parametrize("version", [0, -1, "1", 1.0, True, None])
def test_codec_version_malformed(nwc, parts, version):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "w").update(codec_version=version))
    with raises_naming(FormatError, bad, "w"):
        NwcReader(bad)


@pytest.mark.parametrize(
    "field, value",
    [("dtype", "float128"), ("dtype", 5), ("shape", [-1]), ("shape", [1.5]), ("shape", "600"), ("params", [])],
    ids=repr,
)
def test_malformed_record_field(nwc, parts, field, value):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "w").update({field: value}))
    with raises_naming(FormatError, bad, "w"):
        NwcReader(bad)


def test_duplicate_record_names(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: m["tensors"].append(dict(record(m, "i"))))
    with raises_naming(FormatError, bad) as info:
        NwcReader(bad)
    assert "duplicate" in str(info.value)


def test_record_points_at_missing_tensor(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "f")["segments"]["data"].update(tensor="ghost"))
    with raises_naming(FormatError, bad, "f", "ghost") as info:
        NwcReader(bad)
    assert "missing" in str(info.value)


def test_stray_tensor_not_described_by_the_manifest(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: m["tensors"].remove(record(m, "i")))
    with raises_naming(FormatError, bad, "i") as info:
        NwcReader(bad)
    assert "not described by the manifest" in str(info.value)


def test_padding_tensor_must_be_u8(nwc, parts):
    header, body = parts
    pad = next(k for k in header if k.startswith(PAD_PREFIX))
    header[pad]["dtype"] = "I8"  # same size, but only U8 padding may go undescribed
    bad = rewrite(nwc, join_file(header, body))
    with raises_naming(FormatError, bad, pad):
        NwcReader(bad)


def test_segment_claimed_by_two_records(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "i")["segments"]["data"].update(tensor="f"))
    with raises_naming(FormatError, bad, "f") as info:
        NwcReader(bad)
    assert "claimed twice" in str(info.value)


def test_segment_claimed_twice_by_one_record(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "w")["segments"]["index"].update(tensor="w"))
    with raises_naming(FormatError, bad, "w") as info:
        NwcReader(bad)
    assert "claimed twice" in str(info.value)


def test_misaligned_segment(nwc, parts):
    header, body = parts
    bad = rewrite(nwc, relayout(header, body, {}, shift={"f": 4}))  # 4 padding bytes move f off its 64-byte slot
    with raises_naming(FormatError, bad, "f") as info:
        NwcReader(bad)
    assert "aligned" in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [{"dtype": "int32"}, {"shape": [8, 4]}, {"shape": [32]}, {"dtype": "bfloat16", "shape": [4, 16]}],
    ids=repr,
)
def test_raw_segment_disagrees_with_record(nwc, parts, edit):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "f").update(edit))
    with raises_naming(FormatError, bad, "f") as info:
        NwcReader(bad)
    assert "raw segment" in str(info.value)


@pytest.mark.parametrize("segments", [{}, {"data": None}, {"extra": 1}, []], ids=repr)
def test_wrong_segment_set(nwc, parts, segments):
    def edit(m):
        rec = record(m, "w")
        if segments == {"extra": 1}:
            rec["segments"]["extra"] = {"tensor": "i", "crc32": "00000000"}
        else:
            rec["segments"] = segments

    bad = _edit_manifest(nwc, parts, edit)
    with raises_naming(FormatError, bad, "w"):
        NwcReader(bad)


@pytest.mark.parametrize("crc", ["1234567", "123456789", "ABCDEF01", "xyzxyzxy", 12345678, None])
def test_malformed_crc(nwc, parts, crc):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "i")["segments"]["data"].update(crc32=crc))
    with raises_naming(FormatError, bad, "i"):
        NwcReader(bad)


# -------------------------------------------------------------------------------------------- lossless layout
@pytest.mark.parametrize("delta", [-12, -1, 4, 12])
def test_lossless_index_of_the_wrong_size(nwc, parts, delta):
    header, body = parts
    rec = record(manifest_of(header), "w")
    index = tensor_bytes(header, body, rec["segments"]["index"]["tensor"])
    new = index[:delta] if delta < 0 else index + bytes(delta)
    manifest = manifest_of(header)
    record(manifest, "w")["segments"]["index"]["crc32"] = crc_hex(new)
    bad = rewrite(nwc, relayout(with_manifest(header, manifest), body, {rec["segments"]["index"]["tensor"]: new}))
    with raises_naming(FormatError, bad, "w") as info:
        NwcReader(bad)
    assert "index" in str(info.value)


@pytest.mark.parametrize(
    "chunk", [0, -1, 255, MAX_CHUNK_ELEMENTS + 1, 2**40, "256", 256.0, True, None, [256]], ids=repr
)
def test_lossless_chunk_elems_out_of_range(nwc, parts, chunk):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "w")["params"].update(chunk_elems=chunk))
    with raises_naming(FormatError, bad, "w") as info:
        NwcReader(bad)
    assert "chunk_elems" in str(info.value)


def test_lossless_chunk_elems_missing(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "w")["params"].clear())
    with raises_naming(FormatError, bad, "w"):
        NwcReader(bad)


def test_lossless_segment_of_the_wrong_dtype(nwc, parts):
    header, body = parts
    index_name = record(manifest_of(header), "w")["segments"]["index"]["tensor"]
    n = header[index_name]["shape"][0]
    header[index_name]["dtype"], header[index_name]["shape"] = "I32", [n // 4]
    bad = rewrite(nwc, join_file(header, body))
    with raises_naming(FormatError, bad, "w") as info:
        NwcReader(bad)
    assert "1-D U8" in str(info.value)


def test_lossless_record_with_an_unsupported_dtype(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "w").update(dtype="int16"))
    with raises_naming(FormatError, bad, "w"):
        NwcReader(bad)


def _lossless_edit(nwc: Path, parts, edit_rows, edit_data=None, *, fix_crc: bool = True) -> Path:
    """Edit the index rows (and optionally the data) of tensor ``w``; CRCs fixed so the codec must catch it."""
    header, body = parts
    manifest = manifest_of(header)
    rec = record(manifest, "w")
    rows = index_rows(rec, header, body)
    data = bytearray(tensor_bytes(header, body, rec["segments"]["data"]["tensor"]))
    edit_rows(rows)
    if edit_data is not None:
        data = edit_data(rows, data)
    blobs = {rec["segments"]["index"]["tensor"]: pack_rows(rows), rec["segments"]["data"]["tensor"]: bytes(data)}
    if fix_crc:
        for seg in rec["segments"].values():
            seg["crc32"] = crc_hex(blobs[seg["tensor"]])
    return rewrite(nwc, relayout(with_manifest(header, manifest), body, blobs))


def test_lossless_chunk_lengths_not_covering_the_data(nwc, parts):
    bad = _lossless_edit(nwc, parts, lambda rows: rows[1].__setitem__(1, rows[1][1] + 1))
    with NwcReader(bad) as r, raises_naming(FormatError, bad, "w") as info:
        r.decode("w")
    assert "cover" in str(info.value)


@pytest.mark.parametrize("bit", [3, 8 + 7, 16 + 2, 24])
def test_lossless_invalid_chunk_header(nwc, parts, bit):
    """k outside the allowed set, more symbols than values, raw bits for planes that do not exist."""

    old_table = []

    def edit(rows):
        old_table.append(2 * (((rows[2][0] >> 8) & 0xFF) + 1))
        rows[2][0] |= 1 << bit

    def grow_table(rows, data):  # n_symbols > the 88 values of the last chunk: keep the byte count consistent
        new_table = 2 * (((rows[2][0] >> 8) & 0xFF) + 1)
        start = len(data) - sum(rows[2][1:]) - old_table[0]
        return data[: start + old_table[0]] + bytes(new_table - old_table[0]) + data[start + old_table[0] :]

    bad = _lossless_edit(nwc, parts, edit, grow_table)
    with NwcReader(bad) as r, pytest.raises(FormatError) as info:
        r.decode("w")
    assert str(bad) in str(info.value) and "'w'" in str(info.value) and "invalid chunk header" in str(info.value)


def test_lossless_lengths_moved_between_planes(nwc, parts):
    """Chunk sizes still add up, but each plane is cut in the wrong place."""

    def edit(rows):
        rows[0][1] += 3
        rows[0][2] -= 3

    bad = _lossless_edit(nwc, parts, edit)
    with NwcReader(bad) as r, raises_naming(FormatError, bad, "w"):
        r.decode("w")


# ----------------------------------------------------------------------------------------------- checksums
def _every_bit_flip_is_detected(path: Path, tensor: str, segment_tensor: str, tmp_path: Path) -> int:
    data = path.read_bytes()
    header, body = split_file(data)
    start, end = header[segment_tensor]["data_offsets"]
    data_start = len(data) - len(body)
    flipped = tmp_path / "flipped.safetensors"
    n = 0
    for byte in range(data_start + start, data_start + end):
        for bit in range(8):
            b = bytearray(data)
            b[byte] ^= 1 << bit
            flipped.write_bytes(b)
            with NwcReader(flipped) as r, pytest.raises(ChecksumError) as info:
                r.decode(tensor)
            assert str(flipped) in str(info.value) and repr(tensor) in str(info.value)
            n += 1
    return n


def test_every_flipped_bit_of_a_raw_segment_is_a_checksum_error(nwc, tmp_path):
    assert _every_bit_flip_is_detected(nwc, "i", "i", tmp_path) == 5 * 4 * 8


def test_every_flipped_bit_of_a_lossless_index_is_a_checksum_error(nwc, tmp_path):
    assert _every_bit_flip_is_detected(nwc, "w", "w::index", tmp_path) == 3 * 3 * 4 * 8


def test_every_flipped_bit_of_a_lossless_data_segment_is_a_checksum_error(tmp_path):
    path = tmp_path / "small.safetensors"
    with NwcWriter(path) as w:
        w.write("z", torch.zeros(300, dtype=torch.bfloat16), "lossless", chunk_elems=256, raw_if_larger=False)
    assert _every_bit_flip_is_detected(path, "z", "z", tmp_path) > 0


def test_flipped_payload_bit_reaches_the_codec_without_verify(nwc, parts, tensors):
    """With verify=False the CRC is skipped: the lossless decoder itself must reject (or survive) the damage."""
    header, body = parts
    start, _ = header["w"]["data_offsets"]
    data = bytearray(nwc.read_bytes())
    data[len(data) - len(body) + start] ^= 0xFF  # first table entry of chunk 0
    bad = rewrite(nwc, bytes(data))
    with NwcReader(bad) as r:
        with raises_naming(ChecksumError, bad, "w"):
            r.decode("w")
        with contextlib.suppress(NwcError):  # whatever the damage decodes to, it must not be another exception
            r.decode("w", verify=False)
        assert bits(r.decode("i", verify=False)) == bits(tensors["i"])


# ------------------------------------------------------------------------------------- decompression bombs
def test_bomb_declared_shape_far_larger_than_the_index(nwc, parts):
    """A shape of 2**34 values with the index of 600: rejected by validation, before any payload is read."""
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "w").update(shape=[2**34]))
    with raises_naming(FormatError, bad, "w") as info:
        NwcReader(bad)  # the constructor reads only the header: nothing was decoded or allocated
    assert "index" in str(info.value)


def test_bomb_declared_shape_beyond_the_element_limit(nwc, parts):
    bad = _edit_manifest(nwc, parts, lambda m: record(m, "w").update(shape=[2**30, 2**30]))
    with raises_naming(LimitError, bad, "w"):
        NwcReader(bad)


def _bomb_file(nwc: Path, parts, plane_bytes: int = 1) -> Path:
    """``w`` declared as 2**34 bf16 values (32 GiB) in 1024 chunks of 2**24, with a self-consistent index whose
    chunks hold a 2-byte table and two raw planes of ``plane_bytes`` each (the default: a 4 KiB payload)."""
    header, body = parts
    manifest = manifest_of(header)
    rec = record(manifest, "w")
    rec["shape"], rec["params"]["chunk_elems"] = [2**34], MAX_CHUNK_ELEMENTS
    rows = [[0 | 0 << 8 | 0b11 << 16, plane_bytes, plane_bytes] for _ in range(2**34 // MAX_CHUNK_ELEMENTS)]
    blobs = {
        rec["segments"]["index"]["tensor"]: pack_rows(rows),
        rec["segments"]["data"]["tensor"]: bytes((2 + 2 * plane_bytes) * len(rows)),
    }
    for seg in rec["segments"].values():
        seg["crc32"] = crc_hex(blobs[seg["tensor"]])
    return rewrite(nwc, relayout(with_manifest(header, manifest), body, blobs))


BOMB_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import nwcfmt
    vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more, no more
    try:
        with nwcfmt.open(sys.argv[1]) as r:
            r.decode("w")
    except nwcfmt.NwcError as exc:
        print("NwcError", type(exc).__name__, exc)
    except BaseException as exc:
        print("OTHER", type(exc).__name__, exc)
    else:
        print("DECODED")
    """
)


def test_bomb_too_little_data_for_its_shape_is_rejected_on_open(nwc, parts):
    bad = _bomb_file(nwc, parts)  # 4 KiB of data cannot hold 2**34 values: validation says so before decoding
    with pytest.raises(LimitError, match="cannot hold"):
        NwcReader(bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_AS")
def test_bomb_self_consistent_index_is_rejected_before_allocating(nwc, parts):
    # 512-byte planes pass the size bound (a zstd frame could hold 2**24 values in 512 bytes); the chunk
    # headers are checked against their planes before the 32 GiB output would be allocated
    bad = _bomb_file(nwc, parts, plane_bytes=512)
    with NwcReader(bad) as r:
        assert r.record("w").numel == 2**34
    env = {**os.environ, "NWC_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, str(bad)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("NwcError"), proc.stdout


def _craft_frame(frame: bytes, content_size: int) -> bytes:
    """Rewrite a zstd frame header to declare ``content_size`` (8-byte field, single segment), same blocks."""
    fhd = frame[4]
    single, fcs_flag, did_flag = fhd >> 5 & 1, fhd >> 6, fhd & 3
    fcs_len = [1 if single else 0, 2, 4, 8][fcs_flag]
    header_len = 5 + (0 if single else 1) + [0, 1, 2, 4][did_flag] + fcs_len
    new_fhd = 3 << 6 | 1 << 5 | (fhd & 0b100)  # 8-byte content size, single segment, keep the checksum flag
    return frame[:4] + bytes([new_fhd]) + struct.pack("<Q", content_size) + frame[header_len:]


def _with_symbol_plane(tmp_path: Path, plane: bytes) -> Path:
    """A one-chunk lossless tensor of 600 zeros whose symbol plane is replaced by ``plane`` (marked as a zstd
    stream), index and CRCs fixed up, so that only the codec can object."""
    path = tmp_path / "one-chunk.safetensors"
    with NwcWriter(path) as w:
        w.write("w", torch.zeros(600, dtype=torch.bfloat16), "lossless", chunk_elems=1024, raw_if_larger=False)
    header, body = split_file(path.read_bytes())
    manifest = manifest_of(header)
    rec = record(manifest, "w")
    rows = index_rows(rec, header, body)
    data = bytearray(tensor_bytes(header, body, "w"))
    table = 2 * (((rows[0][0] >> 8) & 0xFF) + 1)
    data[table : table + rows[0][1]] = plane
    rows[0][1] = len(plane)
    rows[0][0] &= ~(1 << 16)  # the symbol plane is a zstd frame, not raw
    blobs = {"w": bytes(data), "w::index": pack_rows(rows)}
    for seg in rec["segments"].values():
        seg["crc32"] = crc_hex(blobs[seg["tensor"]])
    return rewrite(path, relayout(with_manifest(header, manifest), body, blobs))


def _frame(size: int, *, content_size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=content_size).compress(bytes(size))


def test_symbol_plane_helper_keeps_a_valid_plane_valid(tmp_path):
    assert open_all(_with_symbol_plane(tmp_path, _frame(600)))["w"].count_nonzero() == 0


@pytest.mark.parametrize("declared", [601, 2**20, 2**40, 2**63], ids=lambda d: f"declares-{d}")
def test_zstd_frame_declaring_more_than_its_chunk(tmp_path, declared):
    """A valid zstd frame whose header declares more bytes than the chunk holds (CRCs fixed): the codec, not the
    checksum, must refuse it before decompressing."""
    frame = _craft_frame(_frame(600), declared)
    assert zstandard.frame_content_size(frame) == declared
    bad = _with_symbol_plane(tmp_path, frame)
    with NwcReader(bad) as r, raises_naming(LimitError, bad, "w") as info:
        r.decode("w")  # verify=True: the checksums match
    assert str(declared) in str(info.value)


@pytest.mark.parametrize(
    "plane",
    [
        pytest.param(_frame(600, content_size=False), id="no-content-size"),
        pytest.param(_frame(600)[:-2], id="truncated-frame"),
        pytest.param(b"\x28\xb5\x2f\xfd" + bytes(range(40)), id="garbage"),
        pytest.param(_frame(300) * 2, id="two-half-frames"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x50\x2a\x4d\x18\x04\x00\x00\x00abcd", id="skippable-frame"),
    ],
)
def test_bad_zstd_plane(tmp_path, plane):
    bad = _with_symbol_plane(tmp_path, plane)
    with NwcReader(bad) as r, raises_naming(FormatError, bad, "w"):
        r.decode("w")


@pytest.mark.parametrize("extra", [b"junk", _frame(600)], ids=["junk", "second-frame"])
def test_zstd_plane_with_bytes_after_the_frame(tmp_path, extra):
    """spec/codecs/lossless.md 6.1 item 4: no bytes may follow the frame."""
    bad = _with_symbol_plane(tmp_path, _frame(600) + extra)
    with NwcReader(bad) as r, raises_naming(FormatError, bad, "w"):
        r.decode("w")


# --------------------------------------------------------------------------------------- plain files, paths
def test_plain_safetensors_needs_allow_plain(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.ones(3)}, str(path))
    with raises_naming(FormatError, path) as info:
        NwcReader(path)
    assert "not an NWC file" in str(info.value)
    with nwcfmt.open(path, allow_plain=True) as r:
        assert r.decode("a").tolist() == [1.0, 1.0, 1.0]


def test_load_missing_path_is_input_error(tmp_path):
    with pytest.raises(InputError):
        nwcfmt.load(tmp_path / "nope.safetensors")
    with pytest.raises(InputError):
        nwcfmt.load(tmp_path / "no-such-folder")


def test_reader_on_missing_path_or_folder_is_input_error(tmp_path):
    with raises_naming(InputError, tmp_path / "nope.safetensors"):
        NwcReader(tmp_path / "nope.safetensors")
    with raises_naming(InputError, tmp_path):
        NwcReader(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_file_shrunk_after_open_is_a_format_error(nwc, keep):
    with NwcReader(nwc) as r:
        with open(nwc, "r+b") as f:
            f.truncate(int(os.path.getsize(nwc) * keep))
        with raises_naming(FormatError, nwc) as info:
            r.decode("w")
    assert "changed size" in str(info.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_named_pipe_is_input_error_not_a_hang(tmp_path):
    import threading

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def attempt() -> None:
        try:
            NwcReader(fifo)
        except BaseException as exc:
            result.append(exc)
        else:
            result.append(None)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the reader before failing
        with open(fifo, "wb"):
            pass
        pytest.fail("NwcReader blocked on a named pipe")
    assert isinstance(result[0], InputError) and "not a regular file" in str(result[0])
