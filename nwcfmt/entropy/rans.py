"""The rANS stream of ``spec/entropy.md``: independent lanes, 32-bit state, 16-bit words, 15-bit tables.

``N`` symbols (indices into an alphabet of ``K``) are cut into lanes of ``lane_symbols`` consecutive symbols
(the last lane may be shorter). Each lane is its own rANS stream: a final encoder state (the decoder's start)
and its 16-bit words in the order the decoder reads them. Symbol ``i`` is coded with table
``Context.table_id(i)``: ``(i mod channels)``, plus ``channels * levels[(i // level_run) mod len(levels)]``
when the stream has per-position levels. Lanes decode independently: on CPU threads, and one GPU thread each.

:func:`encode_reference` and :func:`decode_reference` are the numpy oracle (vectorised over lanes). The native
coder (``_rans_native``, built at install; ``NWC_NATIVE=0`` turns it off) gives the same words and symbols.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from nwcfmt.entropy.tables import PROB_BITS, PROB_SCALE, cumulative, slot_lookup
from nwcfmt.errors import FormatError
from nwcfmt.parallel import parallel_map

try:
    from nwcfmt.entropy import _rans_native
except ImportError:  # pragma: no cover - installs without a C compiler
    _rans_native = None

STATE_LOW = 1 << 16  # L: a state is renormalised into [L, 2**32)
WORD_BITS = 16
DEFAULT_LANE_SYMBOLS = 1 << 14
MIN_LANE_SYMBOLS, MAX_LANE_SYMBOLS = 1 << 10, 1 << 24
MAX_TABLES = 64
MAX_ALPHABET = 1 << 15


@dataclass(frozen=True)
class Context:
    """Which frequency table codes symbol ``i``: ``i % channels + channels * levels[(i // level_run) % len]``."""

    channels: int = 1
    levels: np.ndarray | None = None  # uint8, values < n_levels
    level_run: int = 1
    n_levels: int = 1

    @property
    def n_tables(self) -> int:
        return self.channels * self.n_levels

    def table_ids(self, start: int, stop: int) -> np.ndarray:
        i = np.arange(start, stop, dtype=np.int64)
        t = i % self.channels
        if self.levels is not None:
            t = t + self.channels * self.levels.astype(np.int64)[(i // self.level_run) % self.levels.size]
        return t

    def native_args(self) -> tuple:
        levels = b"" if self.levels is None else np.ascontiguousarray(self.levels, dtype=np.uint8)
        return self.channels, levels, self.level_run


@dataclass
class RansStream:
    """An encoded stream: ``words`` (uint16, lane after lane) and ``lanes`` (uint32 ``[n_lanes, 2]``:
    the decoder's start state and the lane's word count)."""

    words: np.ndarray
    lanes: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.words.nbytes + self.lanes.nbytes


def encoded_bytes(stream: RansStream) -> int:
    return stream.nbytes


def n_lanes(n: int, lane_symbols: int) -> int:
    return math.ceil(n / lane_symbols)


def native_enabled() -> bool:
    return _rans_native is not None and os.environ.get("NWC_NATIVE", "1") != "0"


# ---------------------------------------------------------------------------------------------- encoding
def encode(symbols: np.ndarray, freqs: np.ndarray, context: Context, lane_symbols: int = DEFAULT_LANE_SYMBOLS):
    """Symbols (indices into each table's alphabet) -> :class:`RansStream`. Every symbol needs a frequency > 0
    in its table (ValueError otherwise)."""
    symbols = np.ascontiguousarray(symbols, dtype=np.uint16)
    freqs = np.ascontiguousarray(freqs, dtype=np.uint16)
    if not native_enabled():
        return encode_reference(symbols, freqs, context, lane_symbols)
    n = symbols.size
    cum = cumulative(freqs)
    scratch = np.empty(max(n, 1), dtype=np.uint16)
    args = context.native_args()
    k = freqs.shape[1]

    def run(lane: int) -> tuple[int, int]:
        start = lane * lane_symbols
        stop = min(n, start + lane_symbols)
        result = _rans_native.encode_lane(scratch[start:stop], symbols[start:stop], start, freqs, cum, k, *args)
        if result[0] == 0:
            raise ValueError(f"symbol {result[1]} has no frequency in its table")
        return result

    results = parallel_map(run, range(n_lanes(n, lane_symbols)))
    lanes = np.array(results, dtype=np.uint32).reshape(-1, 2)
    parts = [
        scratch[min(n, (j + 1) * lane_symbols) - int(c) : min(n, (j + 1) * lane_symbols)]
        for j, c in enumerate(lanes[:, 1])
    ]
    words = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)
    return RansStream(words.astype(np.uint16, copy=False), lanes)


def encode_reference(symbols: np.ndarray, freqs: np.ndarray, context: Context, lane_symbols: int) -> RansStream:
    """numpy reference of :func:`encode` (all lanes advance together, from their last symbol to their first)."""
    n = symbols.size
    lanes = n_lanes(n, lane_symbols)
    if lanes == 0:
        return RansStream(np.empty(0, np.uint16), np.empty((0, 2), np.uint32))
    total = lanes * lane_symbols
    tid = context.table_ids(0, total).reshape(lanes, lane_symbols)
    sym = np.zeros(total, dtype=np.int64)
    sym[:n] = symbols
    sym = sym.reshape(lanes, lane_symbols)
    active = (np.arange(total) < n).reshape(lanes, lane_symbols)
    f = freqs.astype(np.uint64)[tid, sym]
    if bool((active & (f == 0)).any()):
        raise ValueError("a symbol has no frequency in its table")
    c = cumulative(freqs).astype(np.uint64)[tid, sym]
    f = np.where(active, f, 1)
    x = np.full(lanes, STATE_LOW, dtype=np.uint64)
    emitted = np.zeros((lanes, lane_symbols), dtype=np.uint16)
    emit = np.zeros((lanes, lane_symbols), dtype=bool)
    for t in range(lane_symbols - 1, -1, -1):
        a, ft = active[:, t], f[:, t]
        shift = a & (x >= (ft << np.uint64(32 - PROB_BITS)))
        emitted[:, t] = (x & np.uint64(0xFFFF)).astype(np.uint16)
        emit[:, t] = shift
        x = np.where(shift, x >> np.uint64(WORD_BITS), x)
        coded = ((x // ft) << np.uint64(PROB_BITS)) + (x % ft) + c[:, t]
        x = np.where(a, coded, x)
    words = emitted[emit]  # lane-major, in decode order (the word emitted before symbol t is read after it)
    return RansStream(words, np.stack([x, emit.sum(axis=1)], axis=1).astype(np.uint32))


# ---------------------------------------------------------------------------------------------- decoding
def check_stream(stream: RansStream, n: int, lane_symbols: int, where: str) -> None:
    """Sizes a decoder relies on, checked before any decoding (FormatError)."""
    lanes = n_lanes(n, lane_symbols)
    if stream.lanes.shape != (lanes, 2):
        raise FormatError(f"{where}: expected {lanes} lanes, found {stream.lanes.shape[0]}")
    counts = stream.lanes[:, 1].astype(np.int64)
    limits = np.minimum(lane_symbols, n - np.arange(lanes, dtype=np.int64) * lane_symbols)
    if bool((counts > limits).any()):
        raise FormatError(f"{where}: a lane declares more words than it has symbols")
    if int(counts.sum()) != stream.words.size:
        raise FormatError(f"{where}: lanes declare {int(counts.sum())} words, the stream has {stream.words.size}")
    if bool((stream.lanes[:, 0] < STATE_LOW).any()):
        raise FormatError(f"{where}: a lane's start state is below 2^16")


def decode(
    stream: RansStream, freqs: np.ndarray, context: Context, n: int, lane_symbols: int, where: str = "stream"
) -> np.ndarray:
    """:class:`RansStream` -> ``uint16[n]`` symbols. Raises FormatError on a stream that does not decode
    exactly (words run out, words left over, or a lane that does not end in the initial state)."""
    check_stream(stream, n, lane_symbols, where)
    freqs = np.ascontiguousarray(freqs, dtype=np.uint16)
    if not native_enabled():
        return decode_reference(stream, freqs, context, n, lane_symbols, where)
    cum = cumulative(freqs)
    lut = slot_lookup(freqs)
    out = np.empty(n, dtype=np.uint16)
    offsets = np.concatenate([[0], np.cumsum(stream.lanes[:, 1].astype(np.int64))])
    args = context.native_args()
    words = np.ascontiguousarray(stream.words)
    k = freqs.shape[1]

    def run(lane: int) -> int:
        start = lane * lane_symbols
        stop = min(n, start + lane_symbols)
        w = words[offsets[lane] : offsets[lane + 1]]
        state = int(stream.lanes[lane, 0])
        return _rans_native.decode_lane(out[start:stop], w, state, start, freqs, cum, lut, k, *args)

    bad = [lane for lane, ok in enumerate(parallel_map(run, range(stream.lanes.shape[0]))) if not ok]
    if bad:
        raise FormatError(f"{where}: lane {bad[0]} does not decode (corrupt or truncated bitstream)")
    return out


def decode_reference(
    stream: RansStream, freqs: np.ndarray, context: Context, n: int, lane_symbols: int, where: str = "stream"
) -> np.ndarray:
    """numpy reference of :func:`decode` (all lanes advance together)."""
    check_stream(stream, n, lane_symbols, where)
    lanes = stream.lanes.shape[0]
    if lanes == 0:
        return np.empty(0, dtype=np.uint16)
    total = lanes * lane_symbols
    tid = context.table_ids(0, total).reshape(lanes, lane_symbols)
    active = (np.arange(total) < n).reshape(lanes, lane_symbols)
    f_tab = freqs.astype(np.uint64)
    c_tab = cumulative(freqs).astype(np.uint64)
    lut = slot_lookup(freqs)
    counts = stream.lanes[:, 1].astype(np.int64)
    end = np.cumsum(counts)
    pos = end - counts
    words = np.concatenate([stream.words.astype(np.uint64), np.zeros(1, np.uint64)])
    x = stream.lanes[:, 0].astype(np.uint64)
    out = np.zeros((lanes, lane_symbols), dtype=np.uint16)
    mask = np.uint64(PROB_SCALE - 1)
    failed = np.zeros(lanes, dtype=bool)  # lanes that ran out of words stop there
    for t in range(lane_symbols):
        tt = tid[:, t]
        slot = x & mask
        s = lut[tt, slot.astype(np.int64)]
        nx = f_tab[tt, s] * (x >> np.uint64(PROB_BITS)) + slot - c_tab[tt, s]
        failed |= active[:, t] & (nx < STATE_LOW) & (pos >= end)
        a = active[:, t] & ~failed
        need = a & (nx < STATE_LOW)
        nx = np.where(need, (nx << np.uint64(WORD_BITS)) | words[np.minimum(pos, words.size - 1)], nx)
        pos = pos + need
        x = np.where(a, nx, x)
        out[:, t] = s
    bad = np.flatnonzero(failed | (x != STATE_LOW) | (pos != end))
    if bad.size:  # the native decoder's words: the first lane that does not decode
        raise FormatError(f"{where}: lane {bad[0]} does not decode (corrupt or truncated bitstream)")
    return out.reshape(-1)[:n]
