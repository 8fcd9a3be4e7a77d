"""``lossless``: bit-exact compression of bf16 / fp16 / fp32 tensors.

Each chunk of ``chunk_elems`` values is split into

* a *symbol plane*: the exponent plus the top ``k`` mantissa bits of every value, mapped through a per-chunk
  table of at most 256 prefixes so that each symbol is one byte. This is where weights carry
  little information (exponents cluster; the top mantissa bits are skewed within each binade);
* *tail planes*: the remaining mantissa bits with the sign on top, little-endian bytes.

Every plane is entropy-coded as one zstd frame, tuned so that zstd acts as a Huffman coder (no useful LZ
matches exist in these planes), or stored raw when that is not smaller. Chunks decode independently, in
parallel threads on the CPU. The bit-level layout is specified in ``spec/codecs/lossless.md``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nwcfmt.codecs.base import PRIMARY_SEGMENT, Codec, EncodeContext, EncodedTensor
from nwcfmt.codecs.entropy import check_stream, huffman_compressor, unpack_stream
from nwcfmt.codecs.registry import register_codec
from nwcfmt.constants import DTYPE_NAMES, MAX_CHUNK_ELEMENTS
from nwcfmt.container.manifest import TensorRecord
from nwcfmt.container.safetensors_io import TensorInfo
from nwcfmt.errors import EncodeError, FormatError, LimitError
from nwcfmt.parallel import parallel_map

try:  # optional compiled kernel (setup.py builds it where a C compiler exists); numpy is the reference
    from nwcfmt.codecs import _lossless_native
except ImportError:  # pragma: no cover - exercised on installs without a compiler
    _lossless_native = None

INDEX_SEGMENT = "index"
# Encoder profiles (the stored format is the same): the most mantissa bits folded into the symbol.
# "compact" captures the skew of the top mantissa bits (smaller files); "fast" leaves sign + mantissa as one
# raw byte plane for bf16 (only the exponent is entropy-decoded: faster loads, ~0.5% larger files).
PROFILES = {"compact": 3, "fast": 0}
DEFAULT_PROFILE = "compact"
DEFAULT_CHUNK_ELEMS = 1 << 18  # measured on MiniLM (2^16..2^21): decode speed peaks here, ratio within 0.0002
MIN_CHUNK_ELEMS = 256
TABLE_SLOTS = 256
ZSTD_BLOCK = 1 << 17  # the largest zstd block; each block costs at least a 3-byte header + 1 byte


@dataclass(frozen=True)
class FloatLayout:
    """Bit layout of a float format and the symbol widths the codec may use for it."""

    word_bits: int
    exponent_bits: int
    mantissa_bits: int
    symbol_ks: tuple[int, ...]  # allowed mantissa bits in the symbol, tried in order
    tail_planes: int

    @property
    def word(self) -> type[np.unsignedinteger]:
        return np.uint16 if self.word_bits == 16 else np.uint32


LAYOUTS: dict[str, FloatLayout] = {
    "bfloat16": FloatLayout(16, 8, 7, (2, 1, 0), 1),
    "float16": FloatLayout(16, 5, 10, (3,), 1),
    "float32": FloatLayout(32, 8, 23, (2, 1, 0), 3),
}

# Index row: [info, len(symbol stream), len(tail plane 0), ...] as little-endian uint32.
# info = k | (n_symbols - 1) << 8 | raw_mask << 16; raw_mask bit 0: symbol plane raw, bit 1 + i: tail plane i raw.


def native_enabled() -> bool:
    """Whether the compiled merge kernel is used (it is built; ``NWC_NATIVE=0`` forces the numpy path)."""
    return _lossless_native is not None and os.environ.get("NWC_NATIVE", "1") != "0"


# ----------------------------------------------------------------------------------------------- encode


def _pack_stream(plane: np.ndarray) -> tuple[bytes, bool]:
    """zstd frame of the plane, or the plane itself when compression does not pay. Returns (bytes, raw)."""
    raw = plane.tobytes()
    packed = huffman_compressor().compress(raw)
    return (raw, True) if len(packed) >= len(raw) else (packed, False)


def _choose_symbols(u: np.ndarray, lay: FloatLayout) -> tuple[int, np.ndarray, np.ndarray]:
    """Largest allowed k whose prefixes fit the 256-entry table; returns (k, table, symbols).

    When the prefixes present span fewer than 256 values, the table is that whole consecutive range
    (``symbol = prefix - first``): same entropy, and the decoder replaces a table gather by an addition.
    """
    for k in lay.symbol_ks:
        width = lay.exponent_bits + k
        prefix = (u >> (lay.mantissa_bits - k)) & ((1 << width) - 1)
        present = np.flatnonzero(np.bincount(prefix, minlength=1 << width))
        first, last = int(present[0]), int(present[-1])
        if last - first < min(TABLE_SLOTS, len(u)):  # a table never has more entries than the chunk
            table = np.arange(first, last + 1, dtype="<u2")
            return k, table, (prefix - first).astype(np.uint8)
        if len(present) <= TABLE_SLOTS:
            lut = np.zeros(1 << width, dtype=np.uint8)
            lut[present] = np.arange(len(present), dtype=np.uint8)
            return k, present.astype("<u2"), lut[prefix]
    raise AssertionError("the smallest k always fits")  # k=0 prefixes are <= 8 bits


def _encode_chunk(u: np.ndarray, lay: FloatLayout) -> tuple[list[int], bytes]:
    k, table, symbols = _choose_symbols(u, lay)
    t = lay.mantissa_bits - k
    tail = ((u >> (lay.word_bits - 1)) << t) | (u & ((1 << t) - 1))
    planes = [symbols] + [((tail >> (8 * i)) & 0xFF).astype(np.uint8) for i in range(lay.tail_planes)]
    streams, raw_mask = [], 0
    for i, plane in enumerate(planes):
        data, raw = _pack_stream(plane)
        streams.append(data)
        raw_mask |= int(raw) << i
    row = [k | (len(table) - 1) << 8 | raw_mask << 16] + [len(s) for s in streams]
    return row, table.tobytes() + b"".join(streams)


# ----------------------------------------------------------------------------------------------- decode


def _chunk_header(row: np.ndarray, lay: FloatLayout, n: int, where: str) -> tuple[int, int, int]:
    """(k, n_sym, raw_mask) of an index row, validated."""
    info = int(row[0])
    k, n_sym, raw_mask = info & 0xFF, ((info >> 8) & 0xFF) + 1, info >> 16
    if k not in lay.symbol_ks or raw_mask >> (1 + lay.tail_planes) or n_sym > n:
        raise FormatError(f"{where}: invalid chunk header {info:#010x}")
    return k, n_sym, raw_mask


def _check_chunk(data: memoryview, row: np.ndarray, lay: FloatLayout, n: int, where: str) -> None:
    """Validate a chunk's header and every plane's declared size before any output is allocated."""
    _, n_sym, raw_mask = _chunk_header(row, lay, n, where)
    pos = 2 * n_sym
    for i, length in enumerate(row[1:]):
        check_stream(data[pos : pos + int(length)], bool(raw_mask >> i & 1), n, where)
        pos += int(length)


def _decode_chunk(out: np.ndarray, data: memoryview, row: np.ndarray, lay: FloatLayout, where: str) -> None:
    n = out.size
    k, n_sym, raw_mask = _chunk_header(row, lay, n, where)
    table = np.frombuffer(data[: 2 * n_sym], dtype="<u2")
    t = lay.mantissa_bits - k
    if len(table) != n_sym or int(table[-1]) >> (lay.exponent_bits + k) or not bool(np.all(np.diff(table) > 0)):
        raise FormatError(f"{where}: symbol table is truncated, out of range or not strictly increasing")
    pos = 2 * n_sym
    planes = []
    for i, length in enumerate(row[1:]):
        planes.append(unpack_stream(data[pos : pos + int(length)], bool(raw_mask >> i & 1), n, where))
        pos += int(length)
    symbols = planes[0]
    if native_enabled():
        shifted = np.zeros(TABLE_SLOTS, dtype=lay.word)
        shifted[:n_sym] = table
        shifted <<= lay.word(t)
        tails = [*planes[1:], b"", b""][:3]
        first = int(table[0]) if int(table[-1]) - int(table[0]) == n_sym - 1 else -1  # consecutive table
        if _lossless_native.merge(out, symbols, shifted, *tails, t, lay.word_bits, first) >= n_sym:
            raise FormatError(f"{where}: symbol outside the {n_sym}-entry table")
        return
    if n and int(symbols.max()) >= n_sym:
        raise FormatError(f"{where}: symbol outside the {n_sym}-entry table")
    first = int(table[0])
    if int(table[-1]) - first == n_sym - 1:  # strictly increasing, so consecutive
        np.copyto(out, symbols)  # consecutive prefixes: value = symbol + first
        out += lay.word(first)
    else:
        np.take(table.astype(lay.word), symbols, out=out)
    out <<= lay.word(t)
    _merge_tail(out, planes[1:], t, lay)


def _merge_tail(out: np.ndarray, planes: list[np.ndarray], t: int, lay: FloatLayout) -> None:
    """OR the low mantissa bits and the sign (bit t of the tail word) into ``out``."""
    if len(planes) == 1:  # the tail fits one byte: stay in uint8 as long as possible
        plane = planes[0]
        np.bitwise_or(out, plane & np.uint8((1 << t) - 1), out=out)
        sign = (plane >> np.uint8(t)).astype(lay.word)
    else:
        tail = planes[0].astype(lay.word)
        for i, plane in enumerate(planes[1:], start=1):
            tail |= plane.astype(lay.word) << lay.word(8 * i)
        np.bitwise_or(out, tail & lay.word((1 << t) - 1), out=out)
        sign = tail >> lay.word(t)
    sign <<= lay.word(lay.word_bits - 1)
    np.bitwise_or(out, sign, out=out)


def _min_chunk_bytes(n: int, lay: FloatLayout) -> int:
    """Fewest bytes a chunk of ``n`` values can occupy: its table plus each plane at its most compressed."""
    return 2 + (1 + lay.tail_planes) * min(n, 4 * math.ceil(n / ZSTD_BLOCK))


def _chunk_bounds(numel: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, numel)) for s in range(0, numel, chunk)]


@register_codec
class LosslessCodec(Codec):
    """Bit-exact entropy coding of float weights. Config: ``chunk_elems`` (values per independent chunk)."""

    codec_id = "lossless"
    version = 1
    exact = True
    segment_names = (PRIMARY_SEGMENT, INDEX_SEGMENT)

    def __init__(self, chunk_elems: int = DEFAULT_CHUNK_ELEMS, profile: str = DEFAULT_PROFILE) -> None:
        if not MIN_CHUNK_ELEMS <= chunk_elems <= MAX_CHUNK_ELEMENTS:
            raise EncodeError(f"chunk_elems must be in [{MIN_CHUNK_ELEMS}, {MAX_CHUNK_ELEMENTS}]")
        if profile not in PROFILES:
            raise EncodeError(f"lossless profile must be one of {', '.join(PROFILES)}, not {profile!r}")
        self.chunk_elems = int(chunk_elems)
        self.profile = profile

    def get_config(self) -> dict[str, Any]:
        return {"chunk_elems": self.chunk_elems}

    def supports(self, tensor: torch.Tensor) -> bool:
        from nwcfmt.constants import dtype_name

        return dtype_name(tensor.dtype) in LAYOUTS

    def encode(self, tensor: torch.Tensor, ctx: EncodeContext | None = None) -> EncodedTensor:
        from nwcfmt.constants import dtype_name

        lay = LAYOUTS.get(dtype_name(tensor.dtype))
        if lay is None:
            raise EncodeError(f"lossless supports {', '.join(LAYOUTS)}, not {tensor.dtype}")
        words = tensor.detach().cpu().contiguous().reshape(-1).view(torch.int16 if lay.word_bits == 16 else torch.int32)
        u = words.numpy().view(lay.word)
        max_k = PROFILES[self.profile]
        ks = tuple(k for k in lay.symbol_ks if k <= max_k) or (min(lay.symbol_ks),)
        lay = dataclasses.replace(lay, symbol_ks=ks)
        bounds = _chunk_bounds(u.size, self.chunk_elems)
        results = parallel_map(lambda b: _encode_chunk(u[b[0] : b[1]], lay), bounds)
        index = np.array([row for row, _ in results], dtype="<u4").reshape(len(bounds), 2 + lay.tail_planes)
        data = np.frombuffer(b"".join(blob for _, blob in results), dtype=np.uint8)
        return EncodedTensor(
            {  # index first: a front-to-back reader knows the chunk layout before the data arrives
                INDEX_SEGMENT: torch.from_numpy(index.view(np.uint8).reshape(-1).copy()),
                PRIMARY_SEGMENT: torch.from_numpy(data.copy()),
            },
            self.get_config(),
        )

    @classmethod
    def _chunk_elems(cls, record: TensorRecord) -> int:
        chunk = record.params.get("chunk_elems")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or not MIN_CHUNK_ELEMS <= chunk <= MAX_CHUNK_ELEMENTS:
            raise FormatError(
                f"tensor {record.name!r}: lossless chunk_elems must be an integer in "
                f"[{MIN_CHUNK_ELEMS}, {MAX_CHUNK_ELEMENTS}]"
            )
        return chunk

    @classmethod
    def validate(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> None:
        super().validate(record, segments)
        lay = LAYOUTS.get(record.dtype)
        if lay is None:
            raise FormatError(f"tensor {record.name!r}: lossless cannot hold dtype {record.dtype}")
        chunk = cls._chunk_elems(record)
        for name, info in segments.items():
            if info.dtype != "U8" or len(info.shape) != 1:
                raise FormatError(f"tensor {record.name!r}: segment {name!r} must be 1-D U8")
        n_chunks = math.ceil(record.numel / chunk)
        expected = n_chunks * (2 + lay.tail_planes) * 4
        if segments[INDEX_SEGMENT].nbytes != expected:
            raise FormatError(
                f"tensor {record.name!r}: index has {segments[INDEX_SEGMENT].nbytes} bytes, "
                f"expected {expected} for {n_chunks} chunks"
            )
        # A plane needs at least 4 bytes per 128 KiB it decodes to (a zstd block header), so a record cannot
        # declare more values than its data could hold: decompression bombs stop here, before any decoding.
        full, last = divmod(record.numel, chunk)
        minimum = full * _min_chunk_bytes(chunk, lay) + (_min_chunk_bytes(last, lay) if last else 0)
        if segments[PRIMARY_SEGMENT].nbytes < minimum:
            raise LimitError(
                f"tensor {record.name!r}: {segments[PRIMARY_SEGMENT].nbytes} data bytes cannot hold "
                f"{record.numel} values (shape {list(record.shape)})"
            )

    @classmethod
    def decode(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        lay = LAYOUTS[record.dtype]
        chunk = cls._chunk_elems(record)
        data = memoryview(segments[PRIMARY_SEGMENT].numpy())
        index = segments[INDEX_SEGMENT].numpy().view("<u4").reshape(-1, 2 + lay.tail_planes).astype(np.int64)
        bounds = _chunk_bounds(record.numel, chunk)
        n_sym = ((index[:, 0] >> 8) & 0xFF) + 1
        sizes = 2 * n_sym + index[:, 1:].sum(axis=1)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        if offsets[-1] != len(data):
            raise FormatError(f"tensor {record.name!r}: chunks cover {offsets[-1]} bytes, data has {len(data)}")
        for i, (s, e) in enumerate(bounds):  # headers only: a lying index fails here, before the allocation
            _check_chunk(data[offsets[i] : offsets[i + 1]], index[i], lay, e - s, f"tensor {record.name!r} chunk {i}")
        out = np.empty(record.numel, dtype=lay.word)

        def run(i: int) -> None:
            s, e = bounds[i]
            where = f"tensor {record.name!r} chunk {i}"
            _decode_chunk(out[s:e], data[offsets[i] : offsets[i + 1]], index[i], lay, where)

        parallel_map(run, range(len(bounds)))
        words = torch.from_numpy(out.view(np.int16 if lay.word_bits == 16 else np.int32))
        tensor = words.view(DTYPE_NAMES[record.dtype]).reshape(record.shape)
        return tensor if device.type == "cpu" else tensor.to(device)
