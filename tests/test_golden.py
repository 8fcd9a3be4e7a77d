"""Golden test vectors for NWC container format v1 and the ``raw`` and ``lossless`` codecs.

The files under ``spec/golden/`` were written by ``spec/golden/make_golden.py``. These tests check that

* nwcfmt decodes every golden file bit for bit to its ``*.expected.safetensors`` twin;
* every golden file obeys the container rules of ``spec/format-v1.md`` (layout, alignment, naming, CRCs);
* an independent decoder written from the spec alone (section "Spec-only decoder" below: struct, json,
  zlib, numpy and zstandard, nothing from nwcfmt) decodes them identically, which shows the spec is complete;
* the golden files exercise what they claim to (fallback k, raw planes, full tables, partial chunks, ...);
* the current writer still produces the same files, so a format change cannot slip in unnoticed;
* nwcfmt applies the reader rules of the spec (versions, features, checksums, invalid chunk headers).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard
from safetensors.torch import load_file

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
}
NWC_FILES = [f for files, _ in UNITS.values() for f in files]


def as_bits(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype, shape, raw little-endian bytes) of a tensor: the bit-for-bit identity of its values."""
    t = t.contiguous()
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def expected_bits(unit: str) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {k: as_bits(v) for k, v in load_file(GOLDEN / UNITS[unit][1]).items()}


# ======================================================================================= spec-only decoder
# Written from spec/format-v1.md, spec/codecs/raw.md and spec/codecs/lossless.md only.

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
    spec_check(not manifest["required_features"], "unknown required feature")
    alignment = manifest["alignment"]
    claimed = set()
    out = {}
    for rec in manifest["tensors"]:
        segments = {}
        for seg_name, ref in rec["segments"].items():
            e = entries[ref["tensor"]]
            spec_check(ref["tensor"] not in claimed, "segment tensor claimed twice")
            claimed.add(ref["tensor"])
            spec_check(e["start"] % alignment == 0 or e["start"] == e["end"], "misaligned segment")
            data = blob[e["start"] : e["end"]]
            spec_check(re.fullmatch(r"[0-9a-f]{8}", ref["crc32"]) is not None, "bad crc32 spelling")
            spec_check(zlib.crc32(data) == int(ref["crc32"], 16), "checksum mismatch")
            segments[seg_name] = (e, data)
        shape = tuple(rec["shape"])
        spec_check(rec["codec_version"] == 1, "unknown codec version")
        if rec["codec"] == "raw":
            spec_check(set(segments) == {"data"}, "raw has one segment, data")
            e, data = segments["data"]
            spec_check(e["dtype"] == MANIFEST_DTYPES[rec["dtype"]][0] and e["shape"] == shape, "raw: dtype/shape")
            out[rec["name"]] = (rec["dtype"], shape, data)
        elif rec["codec"] == "lossless":
            spec_check(set(segments) == {"data", "index"}, "lossless has two segments, data and index")
            chunk_elems = rec["params"]["chunk_elems"]
            words = spec_decode_lossless(
                rec["dtype"], math.prod(shape), chunk_elems, segments["data"][1], segments["index"][1]
            )
            out[rec["name"]] = (rec["dtype"], shape, words)
        else:
            raise SpecError(f"unknown codec {rec['codec']}")
    for name, e in entries.items():
        spec_check(name in claimed or (name.startswith("__nwc_pad__.") and e["dtype"] == "U8"), f"stray {name}")
    return out


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


# ============================================================================================== the tests


def alignment_of(metadata: dict) -> int:
    return json.loads(metadata["nwc"])["alignment"]


def test_listing_matches_committed_files():
    present = sorted(
        p.relative_to(GOLDEN).as_posix()
        for p in GOLDEN.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".json")
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
    assert decoded == expected_bits(unit)


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
    assert manifest["format"] == "nwc" and manifest["format_version"] == "1.0"
    assert manifest["required_features"] == [] and manifest["optional_features"] == []
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
        assert rec["dtype"] in MANIFEST_DTYPES and rec["codec_version"] == 1
        assert not rec["name"].startswith("__") and "::" not in rec["name"]
        for seg_name, ref in rec["segments"].items():
            assert list(ref) == ["tensor", "crc32"]
            assert ref["tensor"] == (rec["name"] if seg_name == "data" else f"{rec['name']}::{seg_name}")
            assert re.fullmatch(r"[0-9a-f]{8}", ref["crc32"])
            e = entries[ref["tensor"]]
            assert e["start"] % alignment == 0
            assert f"{zlib.crc32(blob[e['start'] : e['end']]):08x}" == ref["crc32"]
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
        else:
            item["bytes"] = seg["data"]
        out[rec["name"]] = item
    return out


REGENERATE = "if the writer changed on purpose and the format did not, rerun spec/golden/make_golden.py"


@pytest.mark.parametrize("unit", UNITS)
def test_writer_output_decodes(regenerated, unit):
    """What the current writer produces from the golden inputs is readable and exact (nwcfmt and spec-only)."""
    _, out = regenerated
    expected = {k: as_bits(v) for k, v in load_file(out / UNITS[unit][1]).items()}
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
    assert spec_decoded == expected


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
        assert {k: as_bits(v) for k, v in load_file(out / expected).items()} == expected_bits(unit)


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
