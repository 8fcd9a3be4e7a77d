"""The mask of a sparse record (``spec/codecs/sparse.md`` section 3): which elements of ``[rows, cols]`` are kept.

A mask is a sequence of **symbols**, row-major: one per element (``1`` kept, ``0`` pruned) for an unstructured
pattern, one per group of ``M`` consecutive elements of a row for an ``N:M`` pattern (the index of the group's
kept set among the ``C(M, N)`` sets in increasing order of their bitmask, element ``j`` of the group in bit
``j``). It is stored either as

* ``bits``: the plain bitmask (``ceil(rows * cols / 8)`` bytes, element ``i`` in bit ``i mod 8`` of byte
  ``i div 8``), whatever the pattern; or
* ``rans``: the symbols coded by the project's rANS stream (``spec/entropy.md``), with a table per **mask level**:
  each symbol position within a row (a column, or a group of columns) has a level (``mask_levels`` segment),
  so columns that are kept in most rows and columns that are pruned in most rows get tables of their own.

The encoder stores whichever is smaller. Decoders rebuild a bool ``[rows, cols]`` mask on the target device and
check that it keeps exactly ``nnz`` elements (and ``N`` of every ``M`` for ``N:M``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from nwcfmt.codecs.base import PRIMARY_SEGMENT
from nwcfmt.container.safetensors_io import TensorInfo
from nwcfmt.entropy import rans
from nwcfmt.entropy.rans import Context, RansStream
from nwcfmt.entropy.tables import check_tables
from nwcfmt.errors import EncodeError, FormatError

MASK_BITS, MASK_RANS = "bits", "rans"
LANES_SEGMENT, TABLES_SEGMENT, LEVELS_SEGMENT = "mask_lanes", "mask_tables", "mask_levels"
MAX_M = 8  # N:M groups of at most 8 elements (C(8, 4) = 70 symbols)
LEVEL_CHOICES = (1, 2, 4, 8, 16)  # mask levels an encoder tries for unstructured masks
MAX_MASK_LEVELS = 16


@dataclass(frozen=True)
class Pattern:
    """``unstructured`` (``n = m = 0``) or ``N:M``: exactly ``n`` kept in every group of ``m`` consecutive elements
    of a row."""

    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> Pattern:
        text = str(text).strip().lower()
        if text in ("unstructured", ""):
            return cls()
        n, sep, m = text.partition(":")
        if not (sep and n.isdigit() and m.isdigit()):
            raise ValueError(f"sparsity pattern {text!r}: expected 'unstructured' or N:M such as 2:4")
        n_, m_ = int(n), int(m)
        if not (1 <= n_ < m_ <= MAX_M):
            raise ValueError(f"sparsity pattern {text!r}: N:M needs 1 <= N < M <= {MAX_M}")
        return cls(n_, m_)

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def alphabet(self) -> int:
        return math.comb(self.m, self.n) if self.structured else 2

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    def positions(self, cols: int) -> int:
        """Symbols per row."""
        return cols // self.m if self.structured else cols


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``[rows, cols]`` view of a tensor: ``rows = shape[0]`` from 2-D up, one row for 1-D (as the quant layout)."""
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (math.prod(shape) // rows if rows else 0)


@cache
def nm_sets(n: int, m: int) -> np.ndarray:
    """``uint8 [C(m, n), m]``: the kept sets of an N:M group, in increasing order of their bitmask."""
    masks = sorted(sum(1 << j for j in kept) for kept in itertools.combinations(range(m), n))
    return np.array([[(b >> j) & 1 for j in range(m)] for b in masks], dtype=np.uint8)


@cache
def _nm_index(n: int, m: int) -> np.ndarray:
    """Bitmask of a group -> its symbol (``-1`` for a group that does not keep exactly ``n``)."""
    lut = np.full(1 << m, -1, dtype=np.int32)
    weights = 1 << np.arange(m)
    for index, kept in enumerate(nm_sets(n, m)):
        lut[int((kept * weights).sum())] = index
    return lut


def symbols_of(keep: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Row-major mask symbols (int64) of a bool ``[rows, cols]`` mask; EncodeError if it breaks the pattern."""
    if not pattern.structured:
        return keep.reshape(-1).astype(np.int64)
    rows, cols = keep.shape
    if cols % pattern.m:
        raise EncodeError(f"an {pattern} mask needs a multiple of {pattern.m} columns, not {cols}")
    groups = keep.reshape(rows, cols // pattern.m, pattern.m).astype(np.int64)
    bitmask = (groups << np.arange(pattern.m)).sum(-1)
    symbols = _nm_index(pattern.n, pattern.m)[bitmask]
    if (symbols < 0).any():
        raise EncodeError(f"the mask does not keep exactly {pattern.n} of every {pattern.m} elements")
    return symbols.reshape(-1)


# -------------------------------------------------------------------------------------------- encoding
def _pack_bits(keep: np.ndarray) -> np.ndarray:
    return np.packbits(keep.reshape(-1).astype(np.uint8), bitorder="little")


def _levels(keep: np.ndarray, n_levels: int) -> np.ndarray:
    """Unstructured masks: each column's level, by its keep rate (columns split into ``n_levels`` equal-count
    classes, rarest kept first)."""
    cols = keep.shape[1]
    if n_levels == 1:
        return np.zeros(cols, np.uint8)
    rate = keep.mean(0)
    order = np.argsort(rate, kind="stable")
    levels = np.empty(cols, np.uint8)
    levels[order] = (np.arange(cols) * n_levels // cols).astype(np.uint8)
    return levels


def _estimate(symbols: np.ndarray, context: Context, alphabet: int, lane_symbols: int) -> tuple[float, np.ndarray]:
    from nwcfmt.encoders.latents import estimate_bytes, table_counts

    counts = table_counts(symbols.astype(np.uint16), alphabet, context)
    nbytes, freqs = estimate_bytes(counts, symbols.size, lane_symbols)
    return nbytes + (context.levels.size if context.levels is not None else 0), freqs


def encode_mask(keep: torch.Tensor, pattern: Pattern, lane_symbols: int = rans.DEFAULT_LANE_SYMBOLS):
    """A bool ``[rows, cols]`` mask -> ``(params, segments)`` of its smaller stored form (module docstring)."""
    keep_np = keep.detach().cpu().numpy().astype(bool)
    cols = keep_np.shape[1]
    symbols = symbols_of(keep_np, pattern)
    nnz = int(keep_np.sum())
    bits = _pack_bits(keep_np)
    best: tuple[float, np.ndarray, np.ndarray, Context] | None = None
    positions = pattern.positions(cols)
    if symbols.size and positions:
        choices = (1,) if pattern.structured else tuple(t for t in LEVEL_CHOICES if t <= positions)
        for n_levels in choices:
            levels = _levels(keep_np, n_levels)
            context = Context(levels=levels, level_run=1, n_levels=n_levels) if n_levels > 1 else Context()
            nbytes, freqs = _estimate(symbols, context, pattern.alphabet, lane_symbols)
            if best is None or nbytes < best[0]:
                best = (nbytes, levels, freqs, context)
    params: dict[str, Any] = {"nnz": nnz, "mask_coding": MASK_BITS}
    if best is None or best[0] >= bits.nbytes:
        return params, {PRIMARY_SEGMENT: torch.from_numpy(bits)}
    _, levels, freqs, context = best
    n_levels = freqs.shape[0]
    stream = rans.encode(symbols.astype(np.uint16), freqs, context, lane_symbols)
    segments = {
        PRIMARY_SEGMENT: torch.from_numpy(stream.words),
        LANES_SEGMENT: torch.from_numpy(stream.lanes),
        TABLES_SEGMENT: torch.from_numpy(np.ascontiguousarray(freqs, dtype=np.uint16)),
    }
    if n_levels > 1:
        segments[LEVELS_SEGMENT] = torch.from_numpy(levels)
    if sum(s.numel() * s.element_size() for s in segments.values()) >= bits.nbytes:
        return params, {PRIMARY_SEGMENT: torch.from_numpy(bits)}
    params.update(mask_coding=MASK_RANS, mask_lane_symbols=lane_symbols, mask_levels=n_levels)
    return params, segments


# -------------------------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class MaskLayout:
    """A record's validated mask params."""

    rows: int
    cols: int
    pattern: Pattern
    nnz: int
    coding: str
    lane_symbols: int = 0
    n_levels: int = 1

    @property
    def n_symbols(self) -> int:
        return self.rows * self.pattern.positions(self.cols)

    def segment_names(self) -> set[str]:
        if self.coding == MASK_BITS:
            return {PRIMARY_SEGMENT}
        names = {PRIMARY_SEGMENT, LANES_SEGMENT, TABLES_SEGMENT}
        return names | {LEVELS_SEGMENT} if self.n_levels > 1 else names

    def context(self, levels: np.ndarray | None) -> Context:
        if self.n_levels == 1:
            return Context()
        return Context(levels=levels, level_run=1, n_levels=self.n_levels)


def _int(params: Mapping[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise FormatError(f"{where}: param {key!r} must be an integer in [{lo}, {hi}]")
    return value


def mask_layout(params: Mapping[str, Any], shape: tuple[int, ...], where: str) -> MaskLayout:
    """The mask params of a record of ``shape``, checked (FormatError)."""
    rows, cols = matrix_shape(shape)
    try:
        pattern = Pattern.parse(params.get("pattern", ""))
    except ValueError as exc:
        raise FormatError(f"{where}: {exc}") from None
    if pattern.structured and cols % pattern.m:
        raise FormatError(f"{where}: {pattern} needs a multiple of {pattern.m} columns, the tensor has {cols}")
    nnz = _int(params, "nnz", 0, rows * cols, where)
    if pattern.structured and nnz != rows * cols // pattern.m * pattern.n:
        raise FormatError(f"{where}: an {pattern} mask keeps {rows * cols // pattern.m * pattern.n}, not {nnz}")
    coding = params.get("mask_coding")
    if coding == MASK_BITS:
        return MaskLayout(rows, cols, pattern, nnz, coding)
    if coding != MASK_RANS:
        raise FormatError(f"{where}: param 'mask_coding' must be {MASK_BITS!r} or {MASK_RANS!r}")
    lane_symbols = _int(params, "mask_lane_symbols", rans.MIN_LANE_SYMBOLS, rans.MAX_LANE_SYMBOLS, where)
    n_levels = _int(params, "mask_levels", 1, MAX_MASK_LEVELS, where)
    if n_levels > 1 and pattern.positions(cols) == 0:
        raise FormatError(f"{where}: mask levels need at least one symbol per row")
    return MaskLayout(rows, cols, pattern, nnz, coding, lane_symbols, n_levels)


def _expect(info: TensorInfo, dtype: str, shape: tuple[int, ...], where: str, name: str) -> None:
    if info.dtype != dtype or tuple(info.shape) != shape:
        raise FormatError(
            f"{where}: segment {name!r} must be {dtype} {list(shape)}, not {info.dtype} {list(info.shape)}"
        )


def validate_mask(layout: MaskLayout, infos: Mapping[str, TensorInfo], where: str) -> None:
    """Check the mask segments' header entries against the layout (nothing is read)."""
    if layout.coding == MASK_BITS:
        _expect(infos[PRIMARY_SEGMENT], "U8", (math.ceil(layout.rows * layout.cols / 8),), where, PRIMARY_SEGMENT)
        return
    lanes = rans.n_lanes(layout.n_symbols, layout.lane_symbols)
    _expect(infos[LANES_SEGMENT], "U32", (lanes, 2), where, LANES_SEGMENT)
    _expect(infos[TABLES_SEGMENT], "U16", (layout.n_levels, layout.pattern.alphabet), where, TABLES_SEGMENT)
    data = infos[PRIMARY_SEGMENT]
    if data.dtype != "U16" or len(data.shape) != 1 or data.shape[0] > layout.n_symbols:
        raise FormatError(f"{where}: segment 'data' must be U16 [words] with at most one word per mask symbol")
    if layout.n_levels > 1:
        _expect(infos[LEVELS_SEGMENT], "U8", (layout.pattern.positions(layout.cols),), where, LEVELS_SEGMENT)


def check_mask(layout: MaskLayout, segments: Mapping[str, torch.Tensor], where: str) -> None:
    """Content checks before decoding (FormatError): valid tables and levels, a stream of the right size."""
    if layout.coding == MASK_BITS:
        return
    problem = check_tables(segments[TABLES_SEGMENT].cpu().numpy().view(np.uint16))
    if problem:
        raise FormatError(f"{where}: mask tables: {problem}")
    if layout.n_levels > 1 and int(segments[LEVELS_SEGMENT].max()) >= layout.n_levels:
        raise FormatError(f"{where}: a mask level is not below mask_levels = {layout.n_levels}")
    stream = RansStream(segments[PRIMARY_SEGMENT].cpu().numpy(), segments[LANES_SEGMENT].cpu().numpy())
    rans.check_stream(stream, layout.n_symbols, layout.lane_symbols, f"{where}: mask")


def decode_mask(layout: MaskLayout, segments: Mapping[str, torch.Tensor], device: torch.device, where: str):
    """The bool ``[rows, cols]`` mask on ``device``; FormatError unless it keeps ``nnz`` and fits the pattern."""
    rows, cols, pattern = layout.rows, layout.cols, layout.pattern
    if layout.coding == MASK_BITS:
        packed = segments[PRIMARY_SEGMENT].to(device)
        shifts = torch.arange(8, dtype=torch.uint8, device=device)
        keep = ((packed[:, None] >> shifts) & 1).reshape(-1)[: rows * cols].bool()
        if packed.numel() * 8 > rows * cols and bool(((packed[-1] >> ((rows * cols) % 8)) != 0).item()):
            raise FormatError(f"{where}: mask padding bits must be 0")
        keep = keep.reshape(rows, cols)
        if pattern.structured and bool((keep.view(rows, -1, pattern.m).sum(-1) != pattern.n).any()):
            raise FormatError(f"{where}: the mask does not keep {pattern.n} of every {pattern.m} elements")
    else:
        from nwcfmt.entropy.gpu import decode_on_device

        levels = segments[LEVELS_SEGMENT].cpu().numpy() if layout.n_levels > 1 else None
        freqs = segments[TABLES_SEGMENT].cpu().numpy().view(np.uint16)
        symbols = decode_on_device(
            segments[PRIMARY_SEGMENT],
            segments[LANES_SEGMENT],
            freqs,
            layout.context(levels),
            layout.n_symbols,
            layout.lane_symbols,
            device,
            f"{where}: mask",
        )
        if pattern.structured:
            sets = torch.from_numpy(nm_sets(pattern.n, pattern.m)).to(device).bool()
            keep = sets[symbols.long()].reshape(rows, cols)  # symbols come from tables of C(m, n) entries
        else:
            keep = symbols.reshape(rows, cols).bool()
    if int(keep.sum()) != layout.nnz:
        raise FormatError(f"{where}: the mask keeps {int(keep.sum())} elements, the record says {layout.nnz}")
    return keep
