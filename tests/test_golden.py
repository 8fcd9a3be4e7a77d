"""Golden test vectors for NWC container format v1 and the ``raw``, ``lossless`` and quantized (``rtn``) codecs.

The files under ``spec/golden/`` were written by ``spec/golden/make_golden.py``. These tests check that

* nwcfmt decodes every golden file bit for bit to its ``*.expected.safetensors`` twin;
* every golden file obeys the container rules of ``spec/format-v1.md`` (layout, alignment, naming, CRCs);
* an independent decoder written from the spec alone (section "Spec-only decoder" below: struct, json,
  zlib, numpy and zstandard, nothing from nwcfmt) decodes them identically, which shows the spec is complete;
* the golden files exercise what they claim to (fallback k, raw planes, full tables, partial chunks, every
  code width, partial groups, rounding ties, subnormal and infinite results, several zstd chunks, ...);
* the current writer still produces the same files, so a format change cannot slip in unnoticed;
* nwcfmt applies the reader rules of the spec (versions, features, checksums, invalid chunk headers, invalid
  quantization params, segments, scales, zeros and zstd frames).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import math
import re
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import zstandard
from safetensors.torch import load, load_file

import nwcfmt
from nwcfmt.errors import (
    ChecksumError,
    FormatError,
    UnknownCodecError,
    UnknownFeatureError,
    UnsupportedVersionError,
)

GOLDEN = Path(__file__).resolve().parents[1] / "spec" / "golden"
LISTING = json.loads((GOLDEN / "golden.json").read_text())

# golden unit -> (NWC files, expected-values file)
UNITS = {
    "raw_dtypes": (["raw_dtypes.safetensors"], "raw_dtypes.expected.safetensors"),
    "lossless_bf16": (["lossless_bf16.safetensors"], "lossless_bf16.expected.safetensors"),
    "lossless_fp16": (["lossless_fp16.safetensors"], "lossless_fp16.expected.safetensors"),
    "lossless_fp32": (["lossless_fp32.safetensors"], "lossless_fp32.expected.safetensors"),
    "sharded": (
        ["sharded/model-00001-of-00002.safetensors", "sharded/model-00002-of-00002.safetensors"],
        "sharded.expected.safetensors",
    ),
    "quant_layout": (["quant_layout.safetensors"], "quant_layout.expected.safetensors"),
    "quant_ids": (["quant_ids.safetensors"], "quant_ids.expected.safetensors"),
    "rtn": (["rtn.safetensors"], "rtn.expected.safetensors"),
    # megabytes of decoded values (packed codes above 2^20 bytes): the expected file is stored zstd-compressed
    "rtn_zstd_chunks": (["rtn_zstd_chunks.safetensors"], "rtn_zstd_chunks.expected.safetensors.zst"),
    "latent": (["latent.safetensors"], "latent.expected.safetensors"),
    "sparse": (["sparse.safetensors"], "sparse.expected.safetensors"),
}
NWC_FILES = [f for files, _ in UNITS.values() for f in files]


def as_bits(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype, shape, raw little-endian bytes) of a tensor: the bit-for-bit identity of its values."""
    t = t.contiguous()
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def load_expected(path: Path) -> dict[str, torch.Tensor]:
    """An expected-values file: plain safetensors, zstd-compressed when its name ends in .zst."""
    if path.suffix == ".zst":
        return load(zstandard.ZstdDecompressor().decompress(path.read_bytes()))
    return load_file(path)


def expected_bits(unit: str) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {k: as_bits(v) for k, v in load_expected(GOLDEN / UNITS[unit][1]).items()}


# ======================================================================================= spec-only decoder
# Written from spec/format-v1.md, spec/codecs/raw.md, spec/codecs/lossless.md, spec/codecs/quant.md,
# spec/entropy.md and spec/codecs/latent.md only.

# safetensors dtype -> (manifest dtype, bytes per element)        [format-v1.md, "Element types"]
SPEC_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "U16": ("uint16", 2),
    "U32": ("uint32", 4),
    "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
MANIFEST_DTYPES = {m: (st, size) for st, (m, size) in SPEC_DTYPES.items()}

# lossless layouts: dtype -> (W word bits, E exponent bits, M mantissa bits, allowed k, P tail planes)
SPEC_LAYOUTS = {
    "bfloat16": (16, 8, 7, (2, 1, 0), 1),
    "float16": (16, 5, 10, (3,), 1),
    "float32": (32, 8, 23, (2, 1, 0), 3),
}


class SpecError(Exception):
    pass


def spec_check(cond: bool, msg: str) -> None:
    if not cond:
        raise SpecError(msg)


def spec_read(path: Path) -> tuple[dict, dict, int, bytes]:
    """Parse a safetensors file: (tensor entries with absolute offsets, __metadata__, data start, file bytes)."""
    blob = path.read_bytes()
    spec_check(len(blob) >= 8, "shorter than 8 bytes")
    (n,) = struct.unpack_from("<Q", blob, 0)
    spec_check(n <= 100 * 1024 * 1024 and 8 + n <= len(blob), "bad header length")
    header = json.loads(blob[8 : 8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", {})
    start = 8 + n
    entries = {}
    for name, e in header.items():
        st_dtype = e["dtype"]
        shape = tuple(e["shape"])
        begin, end = e["data_offsets"]
        spec_check(end - begin == math.prod(shape) * SPEC_DTYPES[st_dtype][1], f"{name}: size mismatch")
        entries[name] = {"dtype": st_dtype, "shape": shape, "start": start + begin, "end": start + end}
    cursor = start
    for e in sorted(entries.values(), key=lambda e: (e["start"], e["end"])):
        spec_check(e["start"] == cursor, "data section has a hole or an overlap")
        cursor = e["end"]
    spec_check(cursor == len(blob), "data section does not end at the end of the file")
    return entries, metadata, start, blob


def spec_decode_file(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Decode every tensor of an NWC file to (dtype, shape, little-endian bytes)."""
    entries, metadata, _, blob = spec_read(path)
    manifest = json.loads(metadata["nwc"])
    spec_check(manifest["format"] == "nwc", "not an NWC manifest")
    spec_check(manifest["format_version"].split(".")[0] == "1", "unsupported major version")
    spec_check(set(manifest["required_features"]) <= {"shared_segments"}, "unknown required feature")
    sharing = "shared_segments" in manifest["required_features"]
    alignment = manifest["alignment"]
    claimed = set()
    out = {}
    for rec in manifest["tensors"]:
        segments = {}
        for seg_name, ref in rec["segments"].items():
            e = entries[ref["tensor"]]
            shared = sharing and ref["tensor"].startswith("__nwc_shared__.")
            spec_check(shared or ref["tensor"] not in claimed, "segment tensor claimed twice")
            claimed.add(ref["tensor"])
            spec_check(e["start"] % alignment == 0 or e["start"] == e["end"], "misaligned segment")
            data = blob[e["start"] : e["end"]]
            spec_check(re.fullmatch(r"[0-9a-f]{8}", ref["crc32"]) is not None, "bad crc32 spelling")
            spec_check(zlib.crc32(data) == int(ref["crc32"], 16), "checksum mismatch")
            segments[seg_name] = (e, data)
        out[rec["name"]] = (rec["dtype"], tuple(rec["shape"]), spec_decode_record(rec, segments))
    for name, e in entries.items():
        spec_check(name in claimed or (name.startswith("__nwc_pad__.") and e["dtype"] == "U8"), f"stray {name}")
    return out


def spec_decode_record(rec: dict, segments: dict) -> bytes:
    """One record's decoded bytes (little-endian, row-major) from its segments ``{name: (entry, bytes)}``."""
    shape = tuple(rec["shape"])
    spec_check(rec["codec_version"] in SPEC_VERSIONS.get(rec["codec"], (1,)), "unknown codec version")
    if rec["codec"] == "raw":
        spec_check(set(segments) == {"data"}, "raw has one segment, data")
        e, data = segments["data"]
        spec_check(e["dtype"] == MANIFEST_DTYPES[rec["dtype"]][0] and tuple(e["shape"]) == shape, "raw: dtype/shape")
        return data
    if rec["codec"] == "lossless":
        spec_check(set(segments) == {"data", "index"}, "lossless has two segments, data and index")
        chunk_elems = rec["params"]["chunk_elems"]
        data, index = segments["data"][1], segments["index"][1]
        return spec_decode_lossless(rec["dtype"], math.prod(shape), chunk_elems, data, index)
    if rec["codec"] in QUANT_CODECS:
        return spec_decode_quant(rec, segments)
    if rec["codec"] == "ecsq":
        return spec_decode_ecsq(rec, segments)
    if rec["codec"] == "neural":
        return spec_decode_neural(rec, segments)
    if rec["codec"] == "sparse":
        return spec_decode_sparse(rec, segments)
    raise SpecError(f"unknown codec {rec['codec']}")


def spec_lossless_chunks(dtype: str, n: int, chunk_elems: int, data: bytes, index: bytes):
    """Yield (chunk number, element count, k, table, raw_mask, stream lengths, planes) of a lossless tensor."""
    _, E, _, allowed_k, P = SPEC_LAYOUTS[dtype]
    spec_check(256 <= chunk_elems <= 1 << 24, "chunk_elems out of range")
    n_chunks = -(-n // chunk_elems)
    spec_check(len(index) == n_chunks * (2 + P) * 4, "index size")
    rows = np.frombuffer(index, dtype="<u4").reshape(n_chunks, 2 + P)
    pos = 0
    for c in range(n_chunks):
        m = min(chunk_elems, n - c * chunk_elems)
        info = int(rows[c, 0])
        k, n_sym, raw_mask = info & 0xFF, ((info >> 8) & 0xFF) + 1, info >> 16
        valid = k in allowed_k and raw_mask < 1 << (1 + P) and n_sym <= m
        spec_check(valid, f"chunk {c}: invalid info word {info:#010x} (k={k}, n_sym={n_sym}, {m} values)")
        table = np.frombuffer(data, dtype="<u2", count=n_sym, offset=pos).astype(np.uint64)
        spec_check(bool(np.all(np.diff(table) > 0)) and int(table[-1]) < 1 << (E + k), "invalid table")
        pos += 2 * n_sym
        planes = []
        lengths = [int(x) for x in rows[c, 1:]]
        for i, length in enumerate(lengths):
            stream = data[pos : pos + length]
            spec_check(len(stream) == length, "stream runs past the data segment")
            pos += length
            if raw_mask >> i & 1:
                spec_check(length == m, "raw stream of the wrong size")
                plane = stream
            else:
                spec_check(zstandard.frame_content_size(stream) == m, "frame content size")
                plane = zstandard.ZstdDecompressor().decompress(stream, max_output_size=m, allow_extra_data=False)
                spec_check(len(plane) == m, "frame decoded to the wrong size")
            planes.append(np.frombuffer(plane, dtype=np.uint8))
        yield c, m, k, table, raw_mask, lengths, planes
    spec_check(pos == len(data), "chunks do not tile the data segment")


def spec_decode_lossless(dtype: str, n: int, chunk_elems: int, data: bytes, index: bytes) -> bytes:
    W, _, M, _, _ = SPEC_LAYOUTS[dtype]
    words = np.zeros(n, dtype=np.uint64)
    for c, m, k, table, _, _, planes in spec_lossless_chunks(dtype, n, chunk_elems, data, index):
        t = M - k
        symbols = planes[0]
        spec_check(int(symbols.max()) < len(table), "symbol outside the table")
        tail = np.zeros(m, dtype=np.uint64)
        for i, plane in enumerate(planes[1:]):
            tail |= plane.astype(np.uint64) << np.uint64(8 * i)
        prefix = table[symbols]
        sign = (tail >> np.uint64(t)) & np.uint64(1)
        low = tail & np.uint64((1 << t) - 1)
        words[c * chunk_elems : c * chunk_elems + m] = (sign << np.uint64(W - 1)) | (prefix << np.uint64(t)) | low
    return words.astype("<u2" if W == 16 else "<u4").tobytes()


# ---------------------------------------------------------------------------------- quantized layout (quant.md)

QUANT_CODECS = {"rtn", "gptq", "flexround", "lrq"}  # codec ids of the integer-code layout     [quant.md 1]
QUANT_DTYPES = ("float32", "float16", "bfloat16")
# scale_dtype -> (safetensors dtype, largest valid bit pattern: the largest finite positive value)   [quant.md 4.2]
QUANT_SCALES = {"float16": ("F16", 0x7BFF), "bfloat16": ("BF16", 0x7F7F)}
QUANT_CHUNK_BYTES = 1 << 20  # packed bytes per zstd frame, in whole rows                        [quant.md 4.4]


class QuantView(NamedTuple):
    """The geometry of a quantized record (quant.md sections 2 and 3)."""

    bits: int
    symmetric: bool
    scale_dtype: str
    entropy: str
    rows: int
    cols: int
    scale_rows: int
    n_groups: int
    group_len: int  # G: element (r, c) belongs to group c // G of scale row r (or of row 0 per tensor)
    row_bytes: int
    rows_per_chunk: int
    n_chunks: int


def spec_int_param(params: dict, key: str, lo: int, hi: int) -> int:
    value = params.get(key)
    ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    spec_check(ok, f"param {key} must be an integer in [{lo}, {hi}]")
    return value


def spec_quant_view(rec: dict) -> QuantView:
    params = rec["params"]
    bits = spec_int_param(params, "bits", 1, 8)
    group_size = spec_int_param(params, "group_size", -1, 1 << 31)
    symmetric = params.get("symmetric")
    spec_check(isinstance(symmetric, bool), "param symmetric must be a boolean")
    spec_check(params.get("scale_dtype") in QUANT_SCALES, "param scale_dtype")
    entropy = params.get("entropy", "none")
    spec_check(entropy in ("none", "zstd"), "param entropy")
    spec_check(rec["dtype"] in QUANT_DTYPES, "quantized tensors are float32, float16 or bfloat16")
    shape = rec["shape"]
    spec_check(len(shape) >= 1 and math.prod(shape) >= 1, "quantized tensors have rank >= 1 and elements")
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows
    if group_size == -1:  # per tensor
        scale_rows, n_groups, group_len = 1, 1, cols
    elif group_size == 0 or group_size >= cols:  # per channel
        scale_rows, n_groups, group_len = rows, 1, cols
    else:
        scale_rows, n_groups, group_len = rows, -(-cols // group_size), group_size
    row_bytes = -(-cols * bits // 8)
    rows_per_chunk = max(1, QUANT_CHUNK_BYTES // row_bytes)
    n_chunks = -(-rows // rows_per_chunk)
    return QuantView(
        bits, symmetric, params["scale_dtype"], entropy, rows, cols, scale_rows, n_groups, group_len, row_bytes,
        rows_per_chunk, n_chunks,
    )  # fmt: skip


def spec_quant_check_segments(view: QuantView, segments: dict) -> None:
    """Segment names, dtypes, shapes and sizes (quant.md section 4), before any payload is read."""
    names = {"data", "scale"} | ({"zero"} if not view.symmetric else set())
    names |= {"index"} if view.entropy == "zstd" else set()
    spec_check(set(segments) == names, f"quantized record: segments {sorted(segments)}, expected {sorted(names)}")
    groups = (view.scale_rows, view.n_groups)
    scale_st = QUANT_SCALES[view.scale_dtype][0]
    spec_check(segments["scale"][0]["dtype"] == scale_st and segments["scale"][0]["shape"] == groups, "scale")
    if not view.symmetric:
        spec_check(segments["zero"][0]["dtype"] == "U8" and segments["zero"][0]["shape"] == groups, "zero")
    data = segments["data"][0]
    spec_check(data["dtype"] == "U8" and len(data["shape"]) == 1, "data is 1-D U8")
    if view.entropy == "zstd":
        index = segments["index"][0]
        spec_check(index["dtype"] == "U32" and index["shape"] == (view.n_chunks,), "index is U32 [n_chunks]")
    else:
        spec_check(data["shape"] == (view.rows * view.row_bytes,), "data holds rows * row_bytes bytes")


def spec_quant_packed(view: QuantView, data: bytes, index: bytes | None) -> bytes:
    """The packed codes, rows * row_bytes bytes, with the zstd entropy stage undone (quant.md 4.4)."""
    if view.entropy == "none":
        return data
    lengths = [int(x) for x in np.frombuffer(index, dtype="<u4")]
    spec_check(sum(lengths) == len(data), "the frames do not tile the data segment")
    out, pos = [], 0
    for i, length in enumerate(lengths):
        n = (min(view.rows, (i + 1) * view.rows_per_chunk) - i * view.rows_per_chunk) * view.row_bytes
        frame = data[pos : pos + length]
        pos += length
        try:
            declared = zstandard.frame_content_size(frame)
            spec_check(declared == n, f"chunk {i}: frame declares {declared} bytes, expected {n}")
            plain = zstandard.ZstdDecompressor().decompress(frame, max_output_size=n, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise SpecError(f"chunk {i}: not a valid zstd frame ({exc})") from None
        spec_check(len(plain) == n, f"chunk {i}: frame decoded to {len(plain)} bytes, expected {n}")
        out.append(plain)
    return b"".join(out)


def spec_quant_exact(rec: dict, segments: dict) -> np.ndarray:
    """(code - zero) * scale for every element, [rows, cols] float64 (exact: at most 19 significant bits)."""
    view = spec_quant_view(rec)
    spec_quant_check_segments(view, segments)
    index = segments["index"][1] if view.entropy == "zstd" else None
    packed = spec_quant_packed(view, segments["data"][1], index)
    # codes: each row an LSB-first bit stream; code c is stream bits [c * bits, (c + 1) * bits), low bit first
    stream = np.unpackbits(np.frombuffer(packed, dtype=np.uint8).reshape(view.rows, view.row_bytes), axis=1,
                           bitorder="little")  # fmt: skip
    bits = stream[:, : view.cols * view.bits].reshape(view.rows, view.cols, view.bits)
    codes = np.zeros((view.rows, view.cols), dtype=np.int64)
    for k in range(view.bits):
        codes |= bits[:, :, k].astype(np.int64) << k
    # scales: positive finite float16 / bfloat16 bit patterns, widened exactly
    words = np.frombuffer(segments["scale"][1], dtype="<u2").reshape(view.scale_rows, view.n_groups)
    spec_check(bool(np.all((words >= 1) & (words <= QUANT_SCALES[view.scale_dtype][1]))), "scale not > 0 and finite")
    if view.scale_dtype == "float16":
        scale = words.view("<f2").astype(np.float64)
    else:
        scale = (words.astype(np.uint32) << 16).view("<f4").astype(np.float64)
    if view.symmetric:
        zero = np.full((view.scale_rows, view.n_groups), 1 << (view.bits - 1), dtype=np.int64)
    else:
        zero = np.frombuffer(segments["zero"][1], dtype=np.uint8).reshape(view.scale_rows, view.n_groups)
        spec_check(int(zero.max()) <= (1 << view.bits) - 1, "zero point above 2^bits - 1")
        zero = zero.astype(np.int64)
    g_row = np.arange(view.rows) if view.scale_rows == view.rows else np.zeros(view.rows, dtype=np.int64)
    g_col = np.arange(view.cols) // view.group_len
    return (codes - zero[g_row[:, None], g_col[None, :]]) * scale[g_row[:, None], g_col[None, :]]


def spec_round(exact: np.ndarray, dtype: str) -> np.ndarray:
    """Round to nearest, ties to even, into ``dtype`` (overflow to +-inf), as float64 values."""
    with np.errstate(over="ignore"):
        f32 = exact.astype(np.float32)  # exact, or +-inf (every product fits 24 bits)
        if dtype == "float32":
            return f32.astype(np.float64)
        if dtype == "float16":
            return exact.astype(np.float16).astype(np.float64)
    u = f32.view(np.uint32).astype(np.uint64)
    bf16_words = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)
    return (bf16_words << 16).view(np.float32).astype(np.float64)


def spec_decode_quant(rec: dict, segments: dict) -> bytes:
    values = spec_round(spec_quant_exact(rec, segments), rec["dtype"])
    if rec["dtype"] == "bfloat16":
        return (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return values.astype("<f4" if rec["dtype"] == "float32" else "<f2").tobytes()


# ------------------------------------------------------------------------- latent layout (entropy.md, latent.md)
SPEC_M, SPEC_LOW = 1 << 15, 1 << 16


def spec_array(segments: dict, name: str, st_dtype: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    e, data = segments[name]
    spec_check(e["dtype"] == st_dtype and (shape is None or e["shape"] == shape), f"segment {name}: dtype/shape")
    np_dtype = {"U8": "<u1", "U16": "<u2", "U32": "<u4", "F32": "<f4", "F16": "<f2"}.get(st_dtype)
    if st_dtype == "BF16":
        return (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(e["shape"])
    return np.frombuffer(data, np_dtype).reshape(e["shape"])


def spec_rans_symbols(n: int, lane: int, words: np.ndarray, lanes: np.ndarray, freqs: np.ndarray, table_of) -> list:
    """entropy.md section 3, one lane after another, with Python integers."""
    n_lanes = -(-n // lane)
    spec_check(lanes.shape == (n_lanes, 2), "lanes: one (state, words) pair per lane")
    spec_check(all(int(t.sum()) == SPEC_M for t in freqs.astype(np.int64)), "a table does not sum to 2^15")
    spec_check(int(lanes[:, 1].astype(np.int64).sum()) == words.size, "lane word counts vs data")
    cum = [[int(v) for v in np.concatenate([[0], np.cumsum(t.astype(np.int64))])] for t in freqs]
    out, first = [], 0
    for j in range(n_lanes):
        x, count = int(lanes[j, 0]), int(lanes[j, 1])
        lane_words = [int(w) for w in words[first : first + count]]
        first += count
        p = 0
        spec_check(x >= SPEC_LOW, "start state below 2^16")
        for i in range(j * lane, min(n, (j + 1) * lane)):
            t = table_of(i)
            slot = x % SPEC_M
            k = next(k for k in range(len(cum[t]) - 1) if cum[t][k] <= slot < cum[t][k + 1])
            x = int(freqs[t][k]) * (x // SPEC_M) + slot - cum[t][k]
            if x < SPEC_LOW:
                spec_check(p < count, "lane ran out of words")
                x = x * 65536 + lane_words[p]
                p += 1
            out.append(k)
        spec_check(x == SPEC_LOW and p == count, "lane does not end in state 2^16 with its words consumed")
    return out


def spec_to_dtype(values: np.ndarray, dtype: str) -> bytes:
    """Round binary32 values to ``dtype`` (nearest, ties to even) and return their little-endian bytes."""
    values = values.astype(np.float32)
    if dtype == "float32":
        return values.astype("<f4").tobytes()
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return values.astype("<f2").tobytes()
    u = values.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").tobytes()


SPEC_VERSIONS = {"ecsq": (1, 2), "neural": (1, 2)}  # codec versions this decoder reads (others: 1)


def spec_levels(rec: dict, segments: dict, cols: int, n_levels: int) -> np.ndarray:
    """latent.md section 3: the column levels (2 bits a column from version 2, a byte a column in version 1)."""
    if n_levels == 1:
        return np.zeros(cols, np.uint8)
    if rec["codec_version"] == 1:
        levels = spec_array(segments, "levels", "U8", (cols,))
    else:
        packed = spec_array(segments, "levels", "U8", ((cols + 3) // 4,))
        levels = np.array([(int(packed[c // 4]) >> (2 * (c % 4))) & 3 for c in range(cols)], np.uint8)
        spec_check(cols % 4 == 0 or int(packed[-1]) >> (2 * (cols % 4)) == 0, "levels padding bits not 0")
    spec_check(int(levels.max()) < n_levels, "level out of range")
    return levels


def spec_decode_ecsq(rec: dict, segments: dict) -> bytes:
    shape, params = rec["shape"], rec["params"]
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows
    n_levels, lane = params["levels"], params["lane_symbols"]
    spec_check(1 <= n_levels <= 4 and 1024 <= lane <= 1 << 24, "ecsq params")
    spec_check(rec["dtype"] in ("float32", "float16", "bfloat16"), "ecsq dtype")
    expected = {"data", "lanes", "tables", "scale", "recon"} | ({"levels"} if n_levels > 1 else set())
    spec_check(set(segments) == expected, "ecsq segments")
    freqs = spec_array(segments, "tables", "U16")
    spec_check(freqs.shape[0] == n_levels, "one table per level")
    recon = spec_array(segments, "recon", "F32", (n_levels, freqs.shape[1]))
    scale_st = {"float16": "F16", "bfloat16": "BF16"}[params["scale_dtype"]]
    scale = spec_array(segments, "scale", scale_st, (rows,)).astype(np.float32)
    levels = spec_levels(rec, segments, cols, n_levels)
    spec_check(bool(np.isfinite(recon).all()) and bool(np.isfinite(scale).all()), "non-finite side information")
    symbols = spec_rans_symbols(
        rows * cols,
        lane,
        spec_array(segments, "data", "U16"),
        spec_array(segments, "lanes", "U32"),
        freqs,
        lambda i: int(levels[i % cols]),
    )
    sym = np.array(symbols, dtype=np.int64).reshape(rows, cols)
    products = recon[levels[None, :].astype(np.int64), sym] * scale[:, None]  # float32 x float32 -> float32
    return spec_to_dtype(products, rec["dtype"])


SPEC_NET = {  # latent.md section 5: decoder tensor -> shape (H = 64)
    "dec.emb": (4, 8),
    "dec.l0.weight": (64, 25),
    "dec.l0.bias": (64,),
    "dec.l1.weight": (64, 64),
    "dec.l1.bias": (64,),
    "dec.l2.weight": (16, 64),
    "dec.l2.bias": (16,),
}


def spec_decoder_hash(net: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(net):
        for field in (name.encode(), b"float32"):
            h.update(struct.pack("<I", len(field)) + field)
        h.update(struct.pack("<I", net[name].ndim) + struct.pack(f"<{net[name].ndim}Q", *net[name].shape))
        h.update(net[name].astype("<f4").tobytes())
    return h.hexdigest()


def spec_decode_neural(rec: dict, segments: dict) -> bytes:
    shape, params = rec["shape"], rec["params"]
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows
    blocks = -(-rows // 16)
    n_levels, lane, channels = params["levels"], params["lane_symbols"], params["channels"]
    spec_check(params["arch"] == "nwc-mlp-1" and channels in (1, 16) and lane % channels == 0, "neural params")
    net = {k: spec_array(segments, "net." + k, "F32", v) for k, v in SPEC_NET.items()}
    spec_check(spec_decoder_hash(net) == params["decoder_sha256"], "decoder weights do not match their hash")
    freqs = spec_array(segments, "tables", "U16")
    spec_check(freqs.shape[0] == n_levels * channels, "tables per level and channel")
    scale_st = {"float16": "F16", "bfloat16": "BF16"}[params["scale_dtype"]]
    scale = spec_array(segments, "scale", scale_st, (rows,)).astype(np.float32)
    levels = spec_levels(rec, segments, cols, n_levels)
    n = blocks * 16 * cols
    symbols = spec_rans_symbols(
        n,
        lane,
        spec_array(segments, "data", "U16"),
        spec_array(segments, "lanes", "U32"),
        freqs,
        lambda i: i % channels + channels * int(levels[(i // 16) % cols]),
    )
    q = (np.array(symbols, dtype=np.int64) + params["latent_min"]).astype(np.float32).reshape(blocks * cols, 16)
    step = np.float32(params["step"])
    chunk_levels = np.tile(levels.astype(np.int64), blocks)
    u = np.concatenate([q * step, np.full((q.shape[0], 1), np.log2(step), np.float32), net["dec.emb"][chunk_levels]], 1)
    h = np.maximum(u @ net["dec.l0.weight"].T + net["dec.l0.bias"], 0)
    h = np.maximum(h @ net["dec.l1.weight"].T + net["dec.l1.bias"], 0)
    x_hat = step * (q + (h @ net["dec.l2.weight"].T + net["dec.l2.bias"]))
    matrix = x_hat.reshape(blocks, cols, 16).transpose(0, 2, 1).reshape(blocks * 16, cols)[:rows]
    return spec_to_dtype((matrix * scale[:, None]).astype(np.float32), rec["dtype"])


def spec_nm_sets(n: int, m: int) -> list[list[int]]:
    """sparse.md section 3: the kept sets of an N:M group as 0/1 lists, in increasing order of their bitmask."""
    masks = sorted(sum(1 << j for j in kept) for kept in itertools.combinations(range(m), n))
    return [[(b >> j) & 1 for j in range(m)] for b in masks]


def spec_decode_sparse(rec: dict, segments: dict) -> bytes:
    shape, params = tuple(rec["shape"]), rec["params"]
    spec_check(rec["dtype"] in QUANT_DTYPES and len(shape) >= 1 and math.prod(shape) > 0, "sparse dtype/shape")
    rows = shape[0] if len(shape) >= 2 else 1
    cols = math.prod(shape) // rows
    if params["pattern"] == "unstructured":
        n = m = 0
        positions, alphabet = cols, 2
    else:
        match = re.fullmatch(r"(\d+):(\d+)", params["pattern"])
        spec_check(match is not None, "pattern")
        n, m = int(match.group(1)), int(match.group(2))
        spec_check(1 <= n < m <= 8 and cols % m == 0, "N:M pattern")
        positions, alphabet = cols // m, math.comb(m, n)
    nnz = params["nnz"]
    spec_check(isinstance(nnz, int) and 0 <= nnz <= rows * cols, "nnz")
    spec_check(m == 0 or nnz == rows * cols // m * n, "N:M nnz")
    mask_segments = {k for k in segments if not k.startswith("values.")}
    if params["mask_coding"] == "bits":
        spec_check(mask_segments == {"data"}, "bits mask segments")
        packed = spec_array(segments, "data", "U8", (-(-rows * cols // 8),))
        bits = [(int(packed[i // 8]) >> (i % 8)) & 1 for i in range(8 * packed.size)]
        spec_check(not any(bits[rows * cols :]), "mask padding bits not 0")
        keep = bits[: rows * cols]
        for g in range(rows * cols // m if m else 0):
            spec_check(sum(keep[g * m : (g + 1) * m]) == n, "an N:M group keeps another count")
    else:
        spec_check(params["mask_coding"] == "rans", "mask coding")
        lane, levels_n = params["mask_lane_symbols"], params["mask_levels"]
        spec_check(1024 <= lane <= 1 << 24 and 1 <= levels_n <= 16, "mask stream params")
        names = {"data", "mask_lanes", "mask_tables"} | ({"mask_levels"} if levels_n > 1 else set())
        spec_check(mask_segments == names, "rans mask segments")
        freqs = spec_array(segments, "mask_tables", "U16", (levels_n, alphabet))
        levels = spec_array(segments, "mask_levels", "U8", (positions,)) if levels_n > 1 else np.zeros(positions)
        spec_check(int(levels.max(initial=0)) < levels_n, "mask level out of range")
        symbols = spec_rans_symbols(
            rows * positions,
            lane,
            spec_array(segments, "data", "U16"),
            spec_array(segments, "mask_lanes", "U32"),
            freqs,
            lambda i: int(levels[i % positions]),
        )
        sets = spec_nm_sets(n, m) if m else None
        keep = list(symbols) if sets is None else [b for s in symbols for b in sets[s]]
    spec_check(sum(keep) == nnz, "the mask does not keep nnz elements")
    spec_check(params["values_codec"] != "sparse", "values codec")
    width = max(1, -(-nnz // rows))
    inner = {
        "codec": params["values_codec"],
        "codec_version": params["values_codec_version"],
        "dtype": rec["dtype"],
        "shape": [-(-nnz // width), width],
        "params": params["values_params"],
    }
    values = spec_decode_record(inner, {k[len("values.") :]: v for k, v in segments.items() if k.startswith("values.")})
    size = MANIFEST_DTYPES[rec["dtype"]][1]
    out, k = bytearray(rows * cols * size), 0
    for i, kept in enumerate(keep):
        if kept:
            out[i * size : (i + 1) * size] = values[k * size : (k + 1) * size]
            k += 1
    return bytes(out)


# ============================================================================================== the tests


def alignment_of(metadata: dict) -> int:
    return json.loads(metadata["nwc"])["alignment"]


def assert_spec_decoded(decoded: dict, expected: dict) -> None:
    """Bit for bit, except ``neural`` records: latent.md 5 lets the network's sums run in any order, so those
    agree to a tolerance (the latents themselves are exact or the spec decoder's checks fail)."""
    network = {k for k in expected if k.startswith("neural.")}
    assert {k: v for k, v in decoded.items() if k not in network} == {
        k: v for k, v in expected.items() if k not in network
    }
    for name in network:
        dtype, shape, raw = expected[name]
        assert decoded[name][:2] == (dtype, shape)
        want, got = (_values(dtype, b) for b in (raw, decoded[name][2]))
        rms = float(np.sqrt(np.mean(want**2)))
        assert np.abs(got - want).max() <= 1e-2 * rms, name  # bf16 outputs: one ulp is 0.4% of a value


def _values(dtype: str, raw: bytes) -> np.ndarray:
    if dtype == "bfloat16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.frombuffer(raw, {"float32": "<f4", "float16": "<f2"}[dtype]).astype(np.float64)


def test_listing_matches_committed_files():
    present = sorted(
        p.relative_to(GOLDEN).as_posix()
        for p in GOLDEN.rglob("*")
        if p.is_file() and p.name.endswith((".safetensors", ".safetensors.zst", ".json"))
    )
    assert sorted([*LISTING["files"], "golden.json"]) == present
    for rel, info in LISTING["files"].items():
        blob = (GOLDEN / rel).read_bytes()
        assert len(blob) == info["bytes"] and hashlib.sha256(blob).hexdigest() == info["sha256"], rel
    assert sum(info["bytes"] for info in LISTING["files"].values()) < 300 * 1024
    assert all(info["bytes"] < 64 * 1024 for info in LISTING["files"].values())


@pytest.mark.parametrize("unit", UNITS)
def test_nwcfmt_decodes_golden_bit_for_bit(unit):
    decoded = {}
    for rel in UNITS[unit][0]:
        with nwcfmt.open(GOLDEN / rel) as reader:
            for name in reader.names:
                assert name not in decoded
                decoded[name] = as_bits(reader.decode(name))
    assert decoded == expected_bits(unit)


@pytest.mark.parametrize("unit", UNITS)
def test_spec_only_decoder_matches(unit):
    decoded = {}
    for rel in UNITS[unit][0]:
        decoded.update(spec_decode_file(GOLDEN / rel))
    assert_spec_decoded(decoded, expected_bits(unit))


@pytest.mark.parametrize("rel", NWC_FILES)
def test_container_rules(rel):
    """The container rules of spec/format-v1.md, checked on the raw bytes."""
    path = GOLDEN / rel
    entries, metadata, data_start, blob = spec_read(path)
    (n,) = struct.unpack_from("<Q", blob, 0)
    header_text = blob[8 : 8 + n].decode("ascii")  # the reference writer escapes non-ASCII characters
    assert header_text.startswith("{") and header_text.rstrip(" ").endswith("}")  # padded with spaces only
    assert len(header_text) - len(header_text.rstrip(" ")) < alignment_of(metadata)
    assert set(metadata) >= {"format", "nwc"} and metadata["format"] == "pt"

    manifest = json.loads(metadata["nwc"])
    assert list(manifest) == [
        "format",
        "format_version",
        "required_features",
        "optional_features",
        "producer",
        "alignment",
        "shard",
        "tensors",
    ]
    shared = any(k.startswith("__nwc_shared__.") for k in entries)  # format-v1.md 5.3 and 6.2
    assert manifest["format"] == "nwc" and manifest["format_version"] == ("1.1" if shared else "1.0")
    assert manifest["required_features"] == (["shared_segments"] if shared else [])
    assert manifest["optional_features"] == []
    assert manifest["producer"]["name"] == "nwcfmt" and isinstance(manifest["producer"]["version"], str)
    alignment = manifest["alignment"]
    assert alignment == 64
    assert data_start % alignment == 0
    match = re.fullmatch(r"sharded/model-(\d{5})-of-(\d{5})\.safetensors", rel)
    index, count = (int(match[1]), int(match[2])) if match else (1, 1)
    assert manifest["shard"] == {"index": index, "count": count}

    # segments: naming, alignment, CRC-32, file order = manifest order
    order = []
    for rec in manifest["tensors"]:
        assert list(rec) == ["name", "codec", "codec_version", "dtype", "shape", "params", "segments"]
        assert rec["dtype"] in MANIFEST_DTYPES and rec["codec_version"] in SPEC_VERSIONS.get(rec["codec"], (1,))
        assert not rec["name"].startswith("__") and "::" not in rec["name"]
        for seg_name, ref in rec["segments"].items():
            assert list(ref) == ["tensor", "crc32"]
            if ref["tensor"].startswith("__nwc_shared__."):  # stored once, at its first use
                assert shared and ref["tensor"].endswith(seg_name.removeprefix("net."))
            else:
                assert ref["tensor"] == (rec["name"] if seg_name == "data" else f"{rec['name']}::{seg_name}")
            assert re.fullmatch(r"[0-9a-f]{8}", ref["crc32"])
            e = entries[ref["tensor"]]
            assert e["start"] % alignment == 0
            assert f"{zlib.crc32(blob[e['start'] : e['end']]):08x}" == ref["crc32"]
            if ref["tensor"] not in order:
                order.append(ref["tensor"])
    # the header lists tensors in data order; padding tensors fill the gaps, numbered 0, 1, 2, ...
    names = list(entries)
    assert names == sorted(names, key=lambda k: (entries[k]["start"], entries[k]["end"]))
    assert [k for k in names if not k.startswith("__nwc_pad__.")] == order
    pads = [k for k in names if k.startswith("__nwc_pad__.")]
    assert pads == [f"__nwc_pad__.{i}" for i in range(len(pads))]
    for k in pads:
        e = entries[k]
        assert e["dtype"] == "U8" and 1 <= e["end"] - e["start"] < alignment
        assert blob[e["start"] : e["end"]] == bytes(e["end"] - e["start"])
        assert (e["end"]) % alignment == 0


def test_sharded_index():
    index = json.loads((GOLDEN / "sharded" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["format"] == "nwc"
    weight_map = {}
    for rel in UNITS["sharded"][0]:
        _, metadata, _, _ = spec_read(GOLDEN / rel)
        for rec in json.loads(metadata["nwc"])["tensors"]:
            for ref in rec["segments"].values():
                weight_map[ref["tensor"]] = Path(rel).name
    assert index["weight_map"] == weight_map
    assert index["metadata"]["total_size"] == sum((GOLDEN / rel).stat().st_size for rel in UNITS["sharded"][0])


def test_golden_files_cover_the_spec():
    """The golden set exercises every corner of the lossless layout it claims to."""
    seen = set()
    for rel in NWC_FILES:
        entries, metadata, _, blob = spec_read(GOLDEN / rel)
        for rec in json.loads(metadata["nwc"])["tensors"]:
            seen.add(("codec", rec["codec"], rec["dtype"]))
            if rec["codec"] != "lossless":
                continue
            P = SPEC_LAYOUTS[rec["dtype"]][4]
            n = math.prod(rec["shape"])
            seg = {
                s: blob[entries[r["tensor"]]["start"] : entries[r["tensor"]]["end"]] for s, r in rec["segments"].items()
            }
            chunks = list(
                spec_lossless_chunks(rec["dtype"], n, rec["params"]["chunk_elems"], seg["data"], seg["index"])
            )
            if not chunks:
                seen.add("zero chunks")
            for _, m, k, table, raw_mask, _, _ in chunks:
                seen.add(("k", rec["dtype"], k))
                seen.add(("raw_mask", "all" if raw_mask == (1 << (1 + P)) - 1 else "none" if not raw_mask else "mixed"))
                seen.add(("n_sym", len(table) if len(table) in (1, 256) else "other"))
                if 2 < len(table) < m:
                    gaps = int(table[-1]) - int(table[0]) + 1 > len(table)
                    seen.add(("table", "with gaps" if gaps else "consecutive"))
                if m < rec["params"]["chunk_elems"] and m < n:
                    seen.add("partial last chunk")
                if m == 1:
                    seen.add("one-element chunk")
    wanted = {
        ("codec", "lossless", "bfloat16"),
        ("codec", "lossless", "float16"),
        ("codec", "lossless", "float32"),
        ("codec", "raw", "bfloat16"),
        ("k", "bfloat16", 2),
        ("k", "bfloat16", 1),
        ("k", "bfloat16", 0),
        ("k", "float16", 3),
        ("k", "float32", 2),
        ("k", "float32", 1),
        ("k", "float32", 0),
        ("raw_mask", "all"),
        ("raw_mask", "none"),
        ("raw_mask", "mixed"),
        ("n_sym", 1),
        ("n_sym", 256),
        ("table", "with gaps"),
        ("table", "consecutive"),
        "zero chunks",
        "partial last chunk",
        "one-element chunk",
    }
    assert wanted <= seen, wanted - seen


def test_worked_example_bytes():
    """The bf16 example of spec/codecs/lossless.md, byte for byte."""
    entries, _, _, blob = spec_read(GOLDEN / "lossless_bf16.safetensors")
    data = entries["model.layers.0.scalar"]
    index = entries["model.layers.0.scalar::index"]
    assert blob[data["start"] : data["end"]].hex(" ") == "05 02 00 33"
    assert blob[index["start"] : index["end"]].hex(" ") == "02 00 03 00 01 00 00 00 01 00 00 00"
    words = spec_decode_lossless(
        "bfloat16", 1, 131072, bytes.fromhex("05020033"), bytes.fromhex("020003000100000001000000")
    )
    assert words == bytes.fromhex("b3c0")  # 0xC0B3 = -5.59375, little-endian
    assert f"{zlib.crc32(bytes.fromhex('05020033')):08x}" == "aace9a56"
    assert f"{zlib.crc32(bytes.fromhex('020003000100000001000000')):08x}" == "08cf8408"
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value quoted in format-v1.md


def _records(rel: str):
    """(record, {segment: (safetensors entry, bytes)}) for every record of a golden file."""
    entries, metadata, _, blob = spec_read(GOLDEN / rel)
    for rec in json.loads(metadata["nwc"])["tensors"]:
        segments = {}
        for seg, ref in rec["segments"].items():
            e = entries[ref["tensor"]]
            segments[seg] = (e, blob[e["start"] : e["end"]])
        yield rec, segments


SMALLEST_NORMAL = {"float32": 2.0**-126, "float16": 2.0**-14, "bfloat16": 2.0**-126}


def test_quant_golden_files_cover_the_spec():
    """The quantized golden files exercise every param, width, grouping, chunking and arithmetic corner."""
    seen = set()
    for unit in ("quant_layout", "quant_ids", "rtn", "rtn_zstd_chunks"):
        for rel in UNITS[unit][0]:
            for rec, seg in _records(rel):
                assert rec["codec"] in QUANT_CODECS
                seen.add(("codec", rec["codec"]))
                view = spec_quant_view(rec)
                group_size = rec["params"]["group_size"]
                seen |= {
                    ("bits", view.bits),
                    ("symmetric", view.symmetric),
                    ("scale", view.scale_dtype),
                    ("dtype", rec["dtype"]),
                    ("rank", len(rec["shape"])),
                    ("entropy", view.entropy),
                    ("encoder", "rtn" if rec["codec"] == "rtn" and "clip_search" in rec["params"] else "hand-built"),
                }
                if rec["params"].get("clip_search"):
                    seen.add("clip search")
                if group_size == -1:
                    seen.add(("group", "per tensor" if view.rows > 1 else "per tensor, one row"))
                elif group_size == 0:
                    seen.add(("group", "per channel"))
                elif group_size >= view.cols:
                    seen.add(("group", "group_size >= cols"))
                else:
                    seen.add(("group", "partial last group" if view.cols % group_size else "groups tile the row"))
                    if group_size == 1:
                        seen.add(("group", "group_size 1"))
                if (view.cols * view.bits) % 8:
                    seen.add("padding bits")
                if view.entropy == "zstd":
                    seen.add(("zstd chunks", "one" if view.n_chunks == 1 else "several"))
                    if view.n_chunks > 1 and view.rows_per_chunk == 1:
                        seen.add(("zstd chunks", "one row each, rows over 1 MiB"))
                    if view.n_chunks > 1 and view.rows % view.rows_per_chunk:
                        seen.add(("zstd chunks", "partial last chunk"))
                words = np.frombuffer(seg["scale"][1], dtype="<u2")
                if view.scale_dtype == "float16" and int(words.min()) < 0x0400:
                    seen.add(("scale", "float16 subnormal"))
                if view.scale_dtype == "bfloat16" and int(words.min()) < 0x0080:
                    seen.add(("scale", "bfloat16 subnormal"))
                if not view.symmetric:
                    zero = np.frombuffer(seg["zero"][1], dtype=np.uint8)
                    if int(zero.min()) == 0:
                        seen.add(("zero", "0"))
                    if int(zero.max()) == (1 << view.bits) - 1:
                        seen.add(("zero", "2^bits - 1"))
                # the arithmetic of quant.md 5.1, seen through the exact products
                exact = spec_quant_exact(rec, seg)
                out = spec_round(exact, rec["dtype"])
                finite = np.isfinite(out)
                other = 2 * exact - out  # the other neighbour when the exact value is a tie
                tie = finite & (out != exact) & (spec_round(other, rec["dtype"]) == other)
                kinds = {
                    "rounded": finite & (out != exact),
                    "tie": tie,
                    "tie rounded up in magnitude": tie & (np.abs(out) > np.abs(exact)),
                    "tie rounded down in magnitude": tie & (np.abs(out) < np.abs(exact)),
                    "subnormal": (out != 0) & (np.abs(out) < SMALLEST_NORMAL[rec["dtype"]]),
                    "+inf": out == np.inf,
                    "-inf": out == -np.inf,
                    "-0 by underflow": (out == 0) & np.signbit(out),
                }
                seen |= {("arith", rec["dtype"], kind) for kind, mask in kinds.items() if mask.any()}
    wanted = {("bits", b) for b in range(1, 9)} | {("codec", c) for c in QUANT_CODECS}
    wanted |= {("symmetric", True), ("symmetric", False), ("scale", "float16"), ("scale", "bfloat16")}
    wanted |= {("dtype", d) for d in QUANT_DTYPES} | {("rank", 1), ("rank", 2), ("rank", 3)}
    wanted |= {("entropy", "none"), ("entropy", "zstd"), ("encoder", "rtn"), ("encoder", "hand-built")}
    wanted |= {"clip search", "padding bits", ("zero", "0"), ("zero", "2^bits - 1")}
    wanted |= {("scale", "float16 subnormal"), ("scale", "bfloat16 subnormal")}
    wanted |= {
        ("group", g)
        for g in (
            "per tensor",
            "per tensor, one row",
            "per channel",
            "group_size >= cols",
            "partial last group",
            "groups tile the row",
            "group_size 1",
        )
    }
    wanted |= {("zstd chunks", c) for c in ("one", "several", "one row each, rows over 1 MiB", "partial last chunk")}
    for dtype in QUANT_DTYPES:
        wanted |= {("arith", dtype, k) for k in ("subnormal", "+inf", "-inf")}
    for dtype in ("float16", "bfloat16"):
        ties = ("rounded", "tie rounded up in magnitude", "tie rounded down in magnitude")
        wanted |= {("arith", dtype, k) for k in ties}
    wanted.add(("arith", "float16", "-0 by underflow"))
    assert wanted <= seen, wanted - seen


def test_sparse_golden_covers_the_spec():
    """sparse.safetensors holds what codecs/sparse.md describes: both mask codings, mask levels and several lanes,
    N:M symbols, ragged and per-row values matrices, several values codecs, nnz = 0 and nothing pruned."""
    found = list(_records("sparse.safetensors"))
    records = {r["name"]: r for r, _ in found}
    params = [r["params"] for r in records.values()]
    assert {p["mask_coding"] for p in params} == {"bits", "rans"}
    assert any(p.get("mask_levels", 1) > 1 for p in params)
    assert {p["pattern"] for p in params} >= {"unstructured", "2:4", "4:8", "1:3"}
    assert {p["values_codec"] for p in params} >= {"raw", "lossless", "rtn", "ecsq"}
    assert any(p["nnz"] == 0 for p in params)
    assert any(p["nnz"] == math.prod(r["shape"]) for r in records.values() for p in [r["params"]])
    lanes = [segments["mask_lanes"][0]["shape"][0] for _, segments in found if "mask_lanes" in segments]
    assert max(lanes) > 1
    rows_of = {n: (r["shape"][0] if len(r["shape"]) >= 2 else 1) for n, r in records.items()}
    ragged = [n for n, r in records.items() if r["params"]["nnz"] % rows_of[n]]
    assert ragged, "no values matrix whose rows straddle the tensor's rows"
    assert any(len(r["shape"]) == 1 for r in records.values()) and any(len(r["shape"]) == 3 for r in records.values())


def test_quant_worked_examples():
    """The examples of spec/codecs/quant.md section 7, byte for byte."""
    records = dict((rec["name"], (rec, seg)) for rec, seg in _records("quant_layout.safetensors"))

    def hexes(name: str) -> dict[str, str]:
        return {s: b.hex(" ") for s, (_, b) in records[name][1].items()}

    assert hexes("example.w4") == {
        "data": "c3 f0 97 ef 21 88",
        "scale": "00 34 00 38 66 2e 00 3e",
        "zero": "08 03 01 0f",
    }
    crcs = {s: r["crc32"] for s, r in records["example.w4"][0]["segments"].items()}
    assert crcs == {"data": "835fcd95", "scale": "45a073f1", "zero": "6f12657a"}
    words = np.frombuffer(spec_decode_quant(*records["example.w4"]), "<u2")
    expected = "BD00 3C00 C000 3F00 4000 4200 3D99 3D33 0000 2E66 C940 C940"
    assert " ".join(f"{w:04X}" for w in words) == expected

    assert hexes("example.w3") == {"data": "c5 15 8f", "scale": "00 3e"}
    data = records["example.w3"][1]["data"][1]
    assert int.from_bytes(data, "little") == sum(c << (3 * i) for i, c in enumerate([5, 0, 7, 2, 1, 6, 3, 4]))
    words = np.frombuffer(spec_decode_quant(*records["example.w3"]), "<u2")
    floats = (words.astype(np.uint32) << 16).view(np.float32).tolist()
    assert floats == [0.125, -0.5, 0.375, -0.25, -0.375, 0.25, -0.125, 0.0]

    assert hexes("example.w5") == {"data": "3f 40 c0 47", "scale": "80 3e 80 3f", "zero": "10 00"}
    values = np.frombuffer(spec_decode_quant(*records["example.w5"]), "<f4")
    assert values.tolist() == [3.75, -3.75, 0.0, 0.0, 30.0, 17.0]


def test_rtn_worked_example():
    """The example of spec/codecs/rtn.md section 4 (the encoder, informative)."""
    from nwcfmt.container.writer import encode_tensor

    _, encoded = encode_tensor("x", torch.tensor([-0.3, 0.05, 0.2, 0.7]), "rtn", bits=2, group_size=-1)
    assert encoded.params == {
        "bits": 2,
        "group_size": -1,
        "symmetric": False,
        "scale_dtype": "float16",
        "clip_search": False,
        "entropy": "none",
    }
    assert encoded.segments["data"].tolist() == [0xE4]
    assert encoded.segments["scale"].view(torch.int16).tolist() == [[0x3555]]
    assert encoded.segments["zero"].tolist() == [[1]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("unit", ["quant_layout", "rtn", "rtn_zstd_chunks", "latent", "sparse"])
def test_nwcfmt_decodes_quant_golden_on_cuda(unit):
    """quant.md 5.1 and latent.md 4 (the Triton rANS decoder, then the fp32 product): the same bits on the GPU;
    latent.md 5: ``neural`` values within the spec's tolerance (its latents are exact or decoding fails)."""
    decoded = {}
    for rel in UNITS[unit][0]:
        with nwcfmt.open(GOLDEN / rel) as reader:
            for name in reader.names:
                decoded[name] = as_bits(reader.decode(name, device="cuda").cpu())
    assert_spec_decoded(decoded, expected_bits(unit))


# ------------------------------------------------------------------------------ the writer reproduces them


def _generator():
    spec = importlib.util.spec_from_file_location("nwc_make_golden", GOLDEN / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    gen = _generator()
    out = tmp_path_factory.mktemp("golden")
    gen.build(out)
    return gen, out


def _logical(path: Path) -> dict:
    """Everything a golden NWC file says except what legitimately varies: the producer, and the zstd bytes
    (replaced by the planes they decode to, with stream lengths, CRCs and offsets that depend on them)."""
    entries, metadata, _, blob = spec_read(path)
    manifest = json.loads(metadata["nwc"])
    manifest.pop("producer")
    records = manifest.pop("tensors")
    out = {"__metadata__": {k: v for k, v in metadata.items() if k != "nwc"}, "__manifest__": manifest}
    for rec in records:
        seg = {s: blob[entries[r["tensor"]]["start"] : entries[r["tensor"]]["end"]] for s, r in rec["segments"].items()}
        item = {k: v for k, v in rec.items() if k != "segments"}
        item["segments"] = {s: r["tensor"] for s, r in rec["segments"].items()}
        if rec["codec"] == "lossless":
            n = math.prod(rec["shape"])
            chunks = spec_lossless_chunks(rec["dtype"], n, rec["params"]["chunk_elems"], seg["data"], seg["index"])
            item["chunks"] = [
                (m, k, table.tolist(), [p.tobytes() for p in planes]) for _, m, k, table, _, _, planes in chunks
            ]
        elif rec["codec"] in QUANT_CODECS:
            view = spec_quant_view(rec)
            item["packed"] = spec_quant_packed(view, seg["data"], seg.get("index"))  # zstd stage undone
            item["frames"] = len(seg["index"]) // 4 if "index" in seg else 0
            item["bytes"] = {s: b for s, b in seg.items() if s not in ("data", "index")}
        else:
            item["bytes"] = seg["data"]
        out[rec["name"]] = item
    return out


REGENERATE = "if the writer changed on purpose and the format did not, rerun spec/golden/make_golden.py"


@pytest.mark.parametrize("unit", UNITS)
def test_writer_output_decodes(regenerated, unit):
    """What the current writer produces from the golden inputs is readable and exact (nwcfmt and spec-only)."""
    _, out = regenerated
    expected = {k: as_bits(v) for k, v in load_expected(out / UNITS[unit][1]).items()}
    decoded, spec_decoded = {}, {}
    for rel in UNITS[unit][0]:
        with nwcfmt.open(out / rel) as reader:
            for name in reader.names:
                try:
                    decoded[name] = as_bits(reader.decode(name))
                except FormatError as exc:
                    pytest.fail(f"the writer wrote {rel}:{name} but the reader rejects it: {exc}")
        try:
            spec_decoded.update(spec_decode_file(out / rel))
        except SpecError as exc:
            pytest.fail(f"the writer wrote {rel}, which breaks a rule of the spec: {exc}")
    assert decoded == expected
    assert_spec_decoded(spec_decoded, expected)


def test_writer_reproduces_golden_content(regenerated):
    """Always checked: the same records, params, segment names, chunking, k, tables and planes."""
    gen, out = regenerated
    assert gen.golden_paths(out) == sorted(LISTING["files"])
    for rel in NWC_FILES:
        try:
            new = _logical(out / rel)
        except SpecError as exc:
            pytest.fail(f"the writer now writes {rel} against the spec: {exc}")
        old = _logical(GOLDEN / rel)
        assert list(new) == list(old), f"{rel}: different tensors; {REGENERATE}"
        for name in old:
            if new[name] != old[name]:
                diff = {k for k in set(new[name]) | set(old[name]) if new[name].get(k) != old[name].get(k)}
                pytest.fail(f"{rel}: {name}: the writer now writes different {sorted(diff)}; {REGENERATE}")
    for unit, (_, expected) in UNITS.items():
        assert {k: as_bits(v) for k, v in load_expected(out / expected).items()} == expected_bits(unit)


def test_writer_reproduces_golden_bytes(regenerated):
    """Byte-identical files, checked when producer and libzstd are those recorded in golden.json."""
    gen, out = regenerated
    from nwcfmt.container.writer import producer_info

    if producer_info() != LISTING["producer"] or gen.zstd_version() != LISTING["zstd_version"]:
        pytest.skip(
            f"golden files were written by {LISTING['producer']} with libzstd {LISTING['zstd_version']}; "
            f"this is {producer_info()} with libzstd {gen.zstd_version()} (content is still compared)"
        )
    for rel in [*NWC_FILES, "sharded/model.safetensors.index.json"]:
        assert (out / rel).read_bytes() == (GOLDEN / rel).read_bytes(), f"{rel}: {REGENERATE}"


# ---------------------------------------------------------------------------- reader rules on edited copies


def _rewrite(src: Path, dst: Path, edit_manifest=None, edit_data=None) -> Path:
    """Copy a golden file, editing its manifest (a dict) and/or its bytes; keeps the 64-byte alignment."""
    entries, metadata, data_start, blob = spec_read(src)
    (n,) = struct.unpack_from("<Q", blob, 0)
    header = json.loads(blob[8 : 8 + n])
    data = bytearray(blob[data_start:])
    manifest = json.loads(metadata["nwc"])
    if edit_manifest:
        edit_manifest(manifest)
    if edit_data:
        edit_data(manifest, {k: (e["start"] - data_start, e["end"] - data_start) for k, e in entries.items()}, data)
    header["__metadata__"]["nwc"] = json.dumps(manifest, separators=(",", ":"))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data))
    return dst


def _decode_all(path: Path) -> dict:
    with nwcfmt.open(path) as reader:
        return {name: as_bits(t) for name, t in reader.items()}


def _set(key, value):
    def edit(m):
        m[key] = value

    return edit


def _set_record(name, key, value):
    def edit(m):
        next(r for r in m["tensors"] if r["name"] == name)[key] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [_set("format_version", "1.7"), _set("optional_features", ["some-future-hint"]), _set("future_field", {"x": 1})],
    ids=["higher-minor", "optional-feature", "unknown-field"],
)
def test_reader_accepts_compatible_changes(tmp_path, edit):
    src = GOLDEN / "lossless_bf16.safetensors"
    path = _rewrite(src, tmp_path / "x.safetensors", edit)
    assert _decode_all(path) == _decode_all(src) == spec_decode_file(path)


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (_set("format_version", "2.0"), UnsupportedVersionError),
        (_set("format_version", "1"), FormatError),
        (_set("required_features", ["some-future-feature"]), UnknownFeatureError),
        (_set("alignment", 48), FormatError),
        (_set("shard", {"index": 3, "count": 2}), FormatError),
        (_set_record("model.layers.0.scalar", "codec_version", 2), UnsupportedVersionError),
        (_set_record("model.layers.0.scalar", "codec", "future-codec"), UnknownCodecError),
        (_set_record("model.layers.0.scalar", "params", {"chunk_elems": 255}), FormatError),
        (_set_record("model.layers.0.tiny", "shape", [2]), FormatError),
    ],
    ids=[
        "major",
        "not-major-minor",
        "required-feature",
        "alignment",
        "shard",
        "codec-version",
        "codec",
        "chunk",
        "raw-shape",
    ],
)
def test_reader_rejects_at_open(tmp_path, edit, error):
    path = _rewrite(GOLDEN / "lossless_bf16.safetensors", tmp_path / "x.safetensors", edit)
    with pytest.raises(error):
        nwcfmt.open(path)


def test_reader_rejects_uppercase_crc(tmp_path):
    def edit(m):
        ref = m["tensors"][0]["segments"]["data"]
        ref["crc32"] = ref["crc32"].upper() if ref["crc32"].upper() != ref["crc32"] else "ABCDEF01"

    with pytest.raises(FormatError):
        nwcfmt.open(_rewrite(GOLDEN / "lossless_bf16.safetensors", tmp_path / "x.safetensors", edit))


def test_checksum_mismatch(tmp_path):
    def flip(manifest, offsets, data):
        start, _ = offsets["model.layers.0.mlp.weight"]
        data[start + 10] ^= 0x01

    path = _rewrite(GOLDEN / "lossless_bf16.safetensors", tmp_path / "x.safetensors", edit_data=flip)
    with nwcfmt.open(path) as reader:
        reader.decode("model.layers.0.scalar")  # other tensors are unaffected
        with pytest.raises(ChecksumError):
            reader.decode("model.layers.0.mlp.weight")
    with pytest.raises(SpecError):
        spec_decode_file(path)


@pytest.mark.parametrize(
    "info", [0x00030003, 0x00070002, 0x01030002, 0x00030102], ids=["bad-k", "raw-mask", "high-bits", "n_sym>n"]
)
def test_invalid_info_word(tmp_path, info):
    """The index row of the one-element chunk of model.layers.0.scalar, with a bad info word (CRC fixed up)."""

    def patch(manifest, offsets, data):
        start, end = offsets["model.layers.0.scalar::index"]
        data[start : start + 4] = struct.pack("<I", info)
        rec = next(r for r in manifest["tensors"] if r["name"] == "model.layers.0.scalar")
        rec["segments"]["index"]["crc32"] = f"{zlib.crc32(bytes(data[start:end])):08x}"

    path = _rewrite(GOLDEN / "lossless_bf16.safetensors", tmp_path / "x.safetensors", edit_data=patch)
    with nwcfmt.open(path) as reader, pytest.raises(FormatError):
        reader.decode("model.layers.0.scalar")
    with pytest.raises(SpecError):
        spec_decode_file(path)


# ------------------------------------------------------------------- quantized records: reader rules on edits


def _rebuild(src: Path, dst: Path, edit) -> Path:
    """Copy a golden file through ``edit(manifest, tensors)``, where ``tensors`` maps every safetensors tensor
    name to ``[dtype, shape, bytes]`` (sizes may change); lays the data out again, 64-byte aligned with padding
    tensors, and recomputes the CRC-32 of every segment."""
    entries, metadata, _, blob = spec_read(src)
    manifest = json.loads(metadata["nwc"])
    tensors = {
        k: [e["dtype"], list(e["shape"]), blob[e["start"] : e["end"]]]
        for k, e in entries.items()
        if not k.startswith("__nwc_pad__.")
    }
    edit(manifest, tensors)
    header: dict = {}
    data = bytearray()
    for rec in manifest["tensors"]:
        for ref in rec["segments"].values():
            dtype, shape, payload = tensors[ref["tensor"]]
            ref["crc32"] = f"{zlib.crc32(payload):08x}"
            if len(data) % 64:
                pad = 64 - len(data) % 64
                header[f"__nwc_pad__.{len(header)}"] = {
                    "dtype": "U8",
                    "shape": [pad],
                    "data_offsets": [len(data), len(data) + pad],
                }
                data += bytes(pad)
            header[ref["tensor"]] = {
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [len(data), len(data) + len(payload)],
            }
            data += payload
    header = {"__metadata__": {**metadata, "nwc": json.dumps(manifest, separators=(",", ":"))}, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 64)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data))
    return dst


QUANT_EDIT_SOURCES = {
    "example.w3": "quant_layout.safetensors",
    "example.w4": "quant_layout.safetensors",
    "example.w5": "quant_layout.safetensors",
    "rtn.zstd.b4.g32": "rtn.safetensors",
}


def _only(name: str, edit):
    """Keep only record ``name`` of its golden file (so that a test decodes one tensor), then apply ``edit``."""

    def run(manifest, tensors):
        manifest["tensors"] = [r for r in manifest["tensors"] if r["name"] == name]
        rec = manifest["tensors"][0]
        keep = {ref["tensor"] for ref in rec["segments"].values()}
        for k in set(tensors) - keep:
            del tensors[k]
        edit(rec, tensors)

    return run


def _param(key, value):
    def edit(rec, tensors):
        if value is None:
            del rec["params"][key]
        else:
            rec["params"][key] = value

    return edit


def _field(key, value):
    def edit(rec, tensors):
        rec[key] = value

    return edit


def _segment(seg, fn):
    """Replace segment ``seg`` ([dtype, shape, bytes]) by ``fn(rec, dtype, shape, bytes)``."""

    def edit(rec, tensors):
        name = rec["segments"][seg]["tensor"]
        tensors[name] = list(fn(rec, *tensors[name]))

    return edit


def _scale_word(word):
    return _segment("scale", lambda rec, d, s, b: (d, s, struct.pack("<H", word) + b[2:]))


def _zstd_data(make_frame, index_delta=0):
    """Replace the one frame of the zstd record by ``make_frame(packed codes)``, index fixed up (+ delta)."""

    def edit(rec, tensors):
        data, index = rec["segments"]["data"]["tensor"], rec["segments"]["index"]["tensor"]
        packed = zstandard.ZstdDecompressor().decompress(tensors[data][2])
        frame = make_frame(packed)
        tensors[data] = ["U8", [len(frame)], frame]
        tensors[index] = ["U32", [1], struct.pack("<I", len(frame) + index_delta)]

    return edit


def _frame(content: bytes, size: bool = True) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=size).compress(content)


BAD_QUANT = {
    # params, dtype, shape
    "bits-0": ("example.w4", _param("bits", 0)),
    "bits-9": ("example.w4", _param("bits", 9)),
    "bits-bool": ("example.w4", _param("bits", True)),
    "bits-string": ("example.w4", _param("bits", "4")),
    "bits-missing": ("example.w4", _param("bits", None)),
    "group-size-minus-2": ("example.w4", _param("group_size", -2)),
    "group-size-too-big": ("example.w4", _param("group_size", (1 << 31) + 1)),
    "group-size-changes-groups": ("example.w4", _param("group_size", 2)),  # 3 groups: scale shape differs
    "symmetric-string": ("example.w4", _param("symmetric", "false")),
    "symmetric-with-zero": ("example.w4", _param("symmetric", True)),  # a zero segment it must not have
    "scale-dtype": ("example.w4", _param("scale_dtype", "float32")),
    "scale-dtype-other": ("example.w4", _param("scale_dtype", "bfloat16")),  # F16 scale segment
    "entropy-unknown": ("example.w4", _param("entropy", "lz4")),
    "entropy-without-index": ("example.w4", _param("entropy", "zstd")),
    "dtype-int8": ("example.w4", _field("dtype", "int8")),
    "dtype-float64": ("example.w4", _field("dtype", "float64")),
    "shape-0d": ("example.w3", _field("shape", [])),
    "shape-more-columns": ("example.w4", _field("shape", [2, 7])),  # row_bytes 4: data is too short
    # segments
    "data-short": ("example.w4", _segment("data", lambda rec, d, s, b: (d, [len(b) - 1], b[:-1]))),
    "data-2d": ("example.w4", _segment("data", lambda rec, d, s, b: (d, [2, 3], b))),
    "scale-1d": ("example.w4", _segment("scale", lambda rec, d, s, b: (d, [4], b))),
    "zero-i8": ("example.w4", _segment("zero", lambda rec, d, s, b: ("I8", s, b))),
    # values
    "zero-above-range": ("example.w4", _segment("zero", lambda rec, d, s, b: (d, s, b"\x10" + b[1:]))),
    "scale-zero": ("example.w4", _scale_word(0x0000)),
    "scale-negative-zero": ("example.w4", _scale_word(0x8000)),
    "scale-negative": ("example.w4", _scale_word(0xBC00)),
    "scale-inf": ("example.w4", _scale_word(0x7C00)),
    "scale-nan": ("example.w4", _scale_word(0x7E00)),
    "scale-bf16-inf": ("example.w3", _scale_word(0x7F80)),
    # the zstd stage
    "index-sum": ("rtn.zstd.b4.g32", _zstd_data(_frame, index_delta=1)),
    "index-2-chunks": ("rtn.zstd.b4.g32", _segment("index", lambda rec, d, s, b: (d, [2], b + bytes(4)))),
    "frame-declares-more": ("rtn.zstd.b4.g32", _zstd_data(lambda p: _frame(p + b"\0"))),
    "frame-declares-less": ("rtn.zstd.b4.g32", _zstd_data(lambda p: _frame(p[:-1]))),
    "frame-without-size": ("rtn.zstd.b4.g32", _zstd_data(lambda p: _frame(p, size=False))),
    "frame-trailing-bytes": ("rtn.zstd.b4.g32", _zstd_data(lambda p: _frame(p) + b"\0")),
    "not-a-frame": ("rtn.zstd.b4.g32", _zstd_data(lambda p: p)),
}
# quant.md section 9: the reference decoder accepts these (it applies the formula)
QUANT_KNOWN_DEVIATIONS: set[str] = set()


def _bad_quant_file(tmp_path: Path, case: str) -> Path:
    name, edit = BAD_QUANT[case]
    return _rebuild(GOLDEN / QUANT_EDIT_SOURCES[name], tmp_path / "x.safetensors", _only(name, edit))


@pytest.mark.parametrize("case", BAD_QUANT)
def test_quant_invalid_spec_decoder_rejects(tmp_path, case):
    with pytest.raises(SpecError):
        spec_decode_file(_bad_quant_file(tmp_path, case))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason="quant.md section 9: known deviation"))
        if c in QUANT_KNOWN_DEVIATIONS
        else c
        for c in BAD_QUANT
    ],
)
def test_quant_invalid_nwcfmt_rejects(tmp_path, case):
    path = _bad_quant_file(tmp_path, case)
    with pytest.raises(FormatError):  # LimitError (frame-declares-more) is a FormatError
        _decode_all(path)


@pytest.mark.parametrize(
    ("name", "edit"),
    [
        ("example.w4", _param("future_hint", {"x": 1})),  # unknown params are ignored
        ("example.w4", _param("entropy", None)),  # absent means "none"
        ("example.w5", _param("group_size", 3)),  # group_size >= cols is per channel
        ("example.w5", _param("group_size", 1000)),
        ("example.w3", _param("group_size", 0)),  # one row: per channel is per tensor
        ("example.w3", _param("group_size", 1 << 31)),
        ("rtn.zstd.b4.g32", _zstd_data(lambda p: zstandard.ZstdCompressor(write_checksum=True).compress(p))),
    ],
    ids=["unknown-param", "no-entropy", "group-size-cols", "group-size-above-cols", "one-row", "max", "checksum"],
)
def test_quant_valid_variants(tmp_path, name, edit):
    """Edits that keep a record valid: nwcfmt and the spec-only decoder agree on the result."""
    path = _rebuild(GOLDEN / QUANT_EDIT_SOURCES[name], tmp_path / "x.safetensors", _only(name, edit))
    decoded = _decode_all(path)
    assert decoded == spec_decode_file(path)
    assert decoded[name] == expected_bits("quant_layout" if name.startswith("example") else "rtn")[name]
