"""Low-level safetensors I/O: a bounded header parser and a streaming, aligned, atomic writer.

safetensors layout: ``u64 little-endian N`` | ``N bytes of UTF-8 JSON`` (may end in spaces) | data.
Every tensor's ``data_offsets`` are relative to the start of the data section; together they must tile the
data section exactly (no holes, no overlaps).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from nwcfmt.constants import (
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_TENSOR_ELEMENTS,
    PAD_PREFIX,
    ST_TO_TORCH,
    TORCH_TO_ST,
)
from nwcfmt.errors import FormatError, LimitError


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header. Offsets are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed and validated safetensors header."""

    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]
    data_start: int
    file_size: int


def _bad(path: str | os.PathLike, msg: str) -> FormatError:
    return FormatError(f"{os.fspath(path)}: {msg}")


def short_repr(value: object, limit: int = 60) -> str:
    """``repr`` of a value read from a file, cut short for error messages (containers by type only: a deeply
    nested one would overflow ``repr``)."""
    text = repr(value) if value is None or isinstance(value, (str, int, float)) else f"a JSON {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_shape(path, name: str, raw) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_DIMS:
        raise _bad(path, f"tensor {name!r}: shape must be a list of at most {MAX_DIMS} integers")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw):
        raise _bad(path, f"tensor {name!r}: shape entries must be non-negative integers")
    shape = tuple(raw)
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise LimitError(f"{os.fspath(path)}: tensor {name!r} declares {math.prod(shape)} elements")
    return shape


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {short_repr(key)}")
            seen.add(key)
    return obj


def _no_constants(token: str) -> None:
    raise ValueError(f"{token} is not valid JSON")


def strict_json_loads(text: str | bytes):
    """``json.loads`` that rejects what JSON (RFC 8259) leaves ambiguous or forbids: duplicate keys, NaN,
    Infinity. Raises ``ValueError`` (including ``JSONDecodeError`` and the int-digits limit) or ``RecursionError``.
    """
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constants)


def _json_problem(exc: BaseException) -> str:
    msg = str(exc) if isinstance(exc, ValueError) else exc.__class__.__name__
    return msg if len(msg) <= 120 else msg[:117] + "..."


def read_header(f: BinaryIO, path: str | os.PathLike = "<file>") -> Header:
    """Read and validate a safetensors header; touches no tensor data."""
    f.seek(0, os.SEEK_END)
    file_size = f.tell()
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise _bad(path, "truncated: shorter than the 8-byte header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise LimitError(f"{os.fspath(path)}: header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if header_len > file_size - 8:
        raise _bad(path, f"truncated: header length {header_len} but only {file_size - 8} bytes follow")
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise _bad(path, f"truncated: header length {header_len} but only {len(raw)} bytes could be read")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(path, f"header is not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = strict_json_loads(text)
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"header is not valid JSON: {_json_problem(exc)}") from None
    if not isinstance(obj, dict):
        raise _bad(path, "header must be a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_len = file_size - data_start
    entries: list[TensorInfo] = []
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise _bad(path, f"tensor {name!r}: entry must be an object")
        dtype = info.get("dtype")
        if not isinstance(dtype, str) or dtype not in ST_TO_TORCH:
            raise _bad(path, f"tensor {name!r}: unsupported dtype {short_repr(dtype)}")
        shape = _parse_shape(path, name, info.get("shape"))
        offs = info.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise _bad(path, f"tensor {name!r}: data_offsets must be two integers")
        start, end = offs
        if not 0 <= start <= end <= data_len:
            raise _bad(path, f"tensor {name!r}: data_offsets {offs} outside the data section ({data_len} bytes)")
        if end - start != math.prod(shape) * ST_TO_TORCH[dtype].itemsize:
            raise _bad(path, f"tensor {name!r}: {end - start} bytes do not match dtype {dtype} and shape {list(shape)}")
        entries.append(TensorInfo(name, dtype, shape, data_start + start, data_start + end))
    entries.sort(key=lambda t: (t.start, t.end))
    cursor = data_start
    for t in entries:
        if t.start != cursor:
            kind = "overlap" if t.start < cursor else "hole"
            raise _bad(path, f"tensor {t.name!r}: data offsets {kind} at byte {t.start - data_start}")
        cursor = t.end
    if cursor != file_size:
        raise _bad(path, f"data section is {data_len} bytes but tensors cover {cursor - data_start}")
    return Header({t.name: t for t in entries}, metadata, data_start, file_size)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (made contiguous, on CPU)."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class StreamingWriter:
    """Writes a safetensors file one tensor at a time; peak memory is one tensor.

    Payloads go to a temporary data file beside the target; :meth:`finish` writes header + data into a
    second temporary file and renames it over the target, so the target is either absent or complete.
    With ``alignment`` set, every tensor starts at a file offset that is a multiple of it: the header is
    padded with spaces and explicit U8 padding tensors fill the gaps.
    """

    def __init__(self, path: str | os.PathLike, alignment: int | None = None) -> None:
        self.path = Path(path)
        self.alignment = alignment
        self._entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self._names: set[str] = set()
        self._n_pad = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data.tmp", dir=self.path.parent)
        self._data_path = Path(tmp)
        self._data = os.fdopen(fd, "w+b")
        self._offset = 0
        self._closed = False

    @property
    def offset(self) -> int:
        return self._offset

    def _pad_to_alignment(self) -> None:
        if not self.alignment or self._offset % self.alignment == 0:
            return
        n = self.alignment - self._offset % self.alignment
        self._append(f"{PAD_PREFIX}{self._n_pad}", "U8", (n,), bytes(n))
        self._n_pad += 1

    def _append(self, name: str, dtype: str, shape: tuple[int, ...], data) -> None:
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        self._names.add(name)
        start = self._offset
        self._data.write(data)
        self._offset += memoryview(data).nbytes
        self._entries.append((name, dtype, shape, start, self._offset))

    def add(self, name: str, data: torch.Tensor | np.ndarray) -> int:
        """Append a tensor (torch or numpy); returns its offset relative to the data section."""
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(np.ascontiguousarray(data))
        if data.dtype not in TORCH_TO_ST:
            raise ValueError(f"dtype {data.dtype} cannot be stored in safetensors")
        self._pad_to_alignment()
        start = self._offset
        self._append(name, TORCH_TO_ST[data.dtype], tuple(data.shape), tensor_bytes(data))
        return start

    def _header_bytes(self, metadata: Mapping[str, str] | None) -> bytes:
        header: dict = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        for name, dtype, shape, start, end in self._entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        align = max(self.alignment or 8, 8)  # safetensors writers pad headers to 8 bytes
        raw += b" " * ((-(8 + len(raw))) % align)
        return struct.pack("<Q", len(raw)) + raw

    def finish(self, metadata: Mapping[str, str] | None = None, path: str | os.PathLike | None = None) -> Path:
        """Write the header, then the data, to a temp file and atomically rename it to the target.

        ``path`` overrides the target given at construction (same folder or another on the same disk).
        """
        if path is not None:
            self.path = Path(path)
        header = self._header_bytes(metadata)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(header)
                self._data.flush()
                self._data.seek(0)
                shutil.copyfileobj(self._data, out, length=16 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            self.abort()
            raise
        self._cleanup()
        return self.path

    def _cleanup(self) -> None:
        if not self._closed:
            self._closed = True
            self._data.close()
            self._data_path.unlink(missing_ok=True)

    def abort(self) -> None:
        """Discard everything written so far; the target path is untouched."""
        self._cleanup()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
