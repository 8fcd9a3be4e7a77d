"""The NWC manifest: a versioned JSON document stored under ``__metadata__["nwc"]``.

See ``spec/format-v1.md`` for the normative description of every field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from nwcfmt.constants import (
    ALIGNMENT,
    DTYPE_NAMES,
    FORMAT_NAME,
    FORMAT_VERSION,
    KNOWN_FEATURES,
    MAX_DIMS,
    MAX_TENSOR_ELEMENTS,
)
from nwcfmt.container.safetensors_io import short_repr, strict_json_loads
from nwcfmt.errors import FormatError, LimitError, UnknownFeatureError, UnsupportedVersionError

JsonScalar = str | int | float | bool | None


@dataclass(frozen=True)
class SegmentRef:
    """Where one encoded segment lives: a safetensors tensor, and the CRC-32 of its bytes."""

    tensor: str
    crc32: int

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "crc32": f"{self.crc32:08x}"}


@dataclass(frozen=True)
class TensorRecord:
    """Manifest entry of one encoded tensor."""

    name: str
    codec: str
    codec_version: int
    dtype: str  # torch spelling, e.g. "bfloat16"
    shape: tuple[int, ...]
    params: dict[str, Any]
    segments: dict[str, SegmentRef]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_NAMES[self.dtype].itemsize

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "codec": self.codec,
            "codec_version": self.codec_version,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "params": self.params,
            "segments": {k: v.to_json() for k, v in self.segments.items()},
        }


@dataclass
class Manifest:
    """The whole manifest of one file (one shard)."""

    tensors: list[TensorRecord] = field(default_factory=list)
    format_version: tuple[int, int] = FORMAT_VERSION
    required_features: list[str] = field(default_factory=list)
    optional_features: list[str] = field(default_factory=list)
    producer: dict[str, str] = field(default_factory=dict)
    alignment: int = ALIGNMENT
    shard: tuple[int, int] = (1, 1)  # (index, count), 1-based

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_NAME,
            "format_version": f"{self.format_version[0]}.{self.format_version[1]}",
            "required_features": self.required_features,
            "optional_features": self.optional_features,
            "producer": self.producer,
            "alignment": self.alignment,
            "shard": {"index": self.shard[0], "count": self.shard[1]},
            "tensors": [t.to_json() for t in self.tensors],
        }
        return json.dumps(doc, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: str = "<manifest>") -> Manifest:
        return _parse_manifest(text, source)


def _fail(source: str, msg: str) -> FormatError:
    return FormatError(f"{source}: manifest: {msg}")


def _get(obj: dict, key: str, kind: type | tuple[type, ...], source: str, where: str = ""):
    if key not in obj:
        raise _fail(source, f"{where}missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(source, f"{where}field {key!r} has the wrong type")
    return value


def _check_params(value: Any, source: str, where: str, depth: int = 0) -> None:
    """Codec params are JSON scalars, arrays of them, or flat objects of them (no deep nesting)."""
    if depth > 3:
        raise _fail(source, f"{where}params nest too deeply")
    if isinstance(value, dict):
        for _k, v in value.items():
            _check_params(v, source, where, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_params(v, source, where, depth + 1)
    elif not isinstance(value, (str, int, float, bool)) and value is not None:
        raise _fail(source, f"{where}params hold a non-JSON value")


def parse_version(text: str, source: str) -> tuple[int, int]:
    parts = text.split(".") if isinstance(text, str) else []
    # isdigit() alone accepts non-ASCII digits such as "²" that int() rejects
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts):
        raise _fail(source, f"format_version {short_repr(text)} is not MAJOR.MINOR")
    return int(parts[0]), int(parts[1])


def _parse_segments(raw: Any, source: str, where: str) -> dict[str, SegmentRef]:
    if not isinstance(raw, dict) or not raw:
        raise _fail(source, f"{where}segments must be a non-empty object")
    segments = {}
    for seg_name, ref in raw.items():
        if not isinstance(ref, dict):
            raise _fail(source, f"{where}segment {seg_name!r} must be an object")
        tensor = _get(ref, "tensor", str, source, where)
        crc = _get(ref, "crc32", str, source, where)
        if len(crc) != 8 or any(c not in "0123456789abcdef" for c in crc):
            raise _fail(source, f"{where}segment {seg_name!r}: crc32 must be 8 lowercase hex digits")
        segments[seg_name] = SegmentRef(tensor, int(crc, 16))
    return segments


def _parse_record(raw: Any, source: str) -> TensorRecord:
    if not isinstance(raw, dict):
        raise _fail(source, "tensor records must be objects")
    name = _get(raw, "name", str, source)
    where = f"tensor {name!r}: "
    dtype = _get(raw, "dtype", str, source, where)
    if dtype not in DTYPE_NAMES:
        raise _fail(source, f"{where}unknown dtype {dtype!r}")
    shape = _get(raw, "shape", list, source, where)
    if len(shape) > MAX_DIMS or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _fail(source, f"{where}shape must be at most {MAX_DIMS} non-negative integers")
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise LimitError(f"{source}: {where}declares {math.prod(shape)} elements")
    version = _get(raw, "codec_version", int, source, where)
    params = _get(raw, "params", dict, source, where)
    _check_params(params, source, where)
    return TensorRecord(
        name=name,
        codec=_get(raw, "codec", str, source, where),
        codec_version=version,
        dtype=dtype,
        shape=tuple(shape),
        params=params,
        segments=_parse_segments(raw.get("segments"), source, where),
    )


def _parse_manifest(text: str, source: str) -> Manifest:
    try:
        doc = strict_json_loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also duplicate keys, NaN, over-long integers
        detail = str(exc)[:120] if isinstance(exc, ValueError) else exc.__class__.__name__
        raise _fail(source, f"not valid JSON: {detail}") from None
    if not isinstance(doc, dict):
        raise _fail(source, "must be a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise _fail(source, f"format must be {FORMAT_NAME!r}")
    version = parse_version(_get(doc, "format_version", str, source), source)
    if version[0] != FORMAT_VERSION[0]:
        raise UnsupportedVersionError(
            f"{source}: format version {version[0]}.{version[1]} is not supported "
            f"(this nwcfmt reads {FORMAT_VERSION[0]}.x); upgrade nwcfmt"
        )
    required = _get(doc, "required_features", list, source)
    optional = _get(doc, "optional_features", list, source)
    if not all(isinstance(f, str) for f in required + optional):
        raise _fail(source, "features must be strings")
    unknown = sorted(set(required) - KNOWN_FEATURES)
    if unknown:
        raise UnknownFeatureError(f"{source}: requires unsupported feature(s) {', '.join(unknown)}; upgrade nwcfmt")
    producer = doc.get("producer", {})
    if not isinstance(producer, dict):
        raise _fail(source, "producer must be an object")
    alignment = _get(doc, "alignment", int, source)
    if alignment < 1 or alignment > 1 << 20 or alignment & (alignment - 1):
        raise _fail(source, "alignment must be a power of two up to 1 MiB")
    shard = doc.get("shard", {"index": 1, "count": 1})
    if not isinstance(shard, dict):
        raise _fail(source, "shard must be an object")
    index, count = _get(shard, "index", int, source), _get(shard, "count", int, source)
    if not 1 <= index <= count:
        raise _fail(source, "shard index out of range")
    records = [_parse_record(r, source) for r in _get(doc, "tensors", list, source)]
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise _fail(source, "duplicate tensor names")
    return Manifest(records, version, required, optional, producer, alignment, (index, count))
