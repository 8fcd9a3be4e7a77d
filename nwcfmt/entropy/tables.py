"""Integer frequency tables: every table of a stream sums to ``PROB_SCALE = 2**PROB_BITS``.

Encoders derive them from symbol counts (:func:`normalize_counts`); files store them as uint16 and decoders use
them as stored (:func:`slot_lookup` builds the decoder's slot -> symbol table with integer arithmetic only).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

PROB_BITS = 15
PROB_SCALE = 1 << PROB_BITS


def normalize_counts(counts: np.ndarray) -> np.ndarray:
    """Symbol counts ``[K]`` -> frequencies ``uint16[K]`` summing to ``PROB_SCALE``.

    Every counted symbol gets at least 1; the rest get 0. Starting from the rounded proportional share, single
    steps move probability where they cost the fewest coded bits (``sum count * -log2(freq)``), so the table is
    the best ``PROB_BITS``-bit table for these counts to within rounding. Deterministic for given counts.
    """
    counts = np.asarray(counts, dtype=np.int64)
    present = counts > 0
    n_present = int(present.sum())
    if n_present == 0:
        raise ValueError("cannot build a frequency table without symbols")
    if n_present > PROB_SCALE:
        raise ValueError(f"at most {PROB_SCALE} distinct symbols fit a {PROB_BITS}-bit table")
    total = int(counts.sum())
    freq = np.where(present, np.maximum(1, (counts * PROB_SCALE + total // 2) // total), 0)
    diff = PROB_SCALE - int(freq.sum())
    idx = np.flatnonzero(present)
    if diff > 0:  # give steps to the symbols where one more step saves the most bits
        heap = [(-float(counts[k]) * math.log2((freq[k] + 1) / freq[k]), int(k)) for k in idx]
        heapq.heapify(heap)
        for _ in range(diff):
            _, k = heapq.heappop(heap)
            freq[k] += 1
            heapq.heappush(heap, (-float(counts[k]) * math.log2((freq[k] + 1) / freq[k]), k))
    elif diff < 0:  # take steps where one less step costs the fewest bits
        cost = lambda k: float(counts[k]) * math.log2(freq[k] / (freq[k] - 1)) if freq[k] > 1 else math.inf  # noqa: E731
        heap = [(cost(k), int(k)) for k in idx]
        heapq.heapify(heap)
        for _ in range(-diff):
            _, k = heapq.heappop(heap)
            freq[k] -= 1
            heapq.heappush(heap, (cost(k), k))
    assert int(freq.sum()) == PROB_SCALE
    return freq.astype(np.uint16)


def cumulative(freqs: np.ndarray) -> np.ndarray:
    """``[T, K]`` frequencies -> ``uint32[T, K]`` exclusive prefix sums (where each symbol's slots start)."""
    freqs = np.asarray(freqs, dtype=np.uint32)
    return (np.cumsum(freqs, axis=-1, dtype=np.uint32) - freqs).astype(np.uint32)


def slot_lookup(freqs: np.ndarray) -> np.ndarray:
    """``[T, K]`` frequencies (rows summing to ``PROB_SCALE``) -> ``uint16[T, PROB_SCALE]`` slot -> symbol."""
    freqs = np.asarray(freqs)
    symbols = np.arange(freqs.shape[1], dtype=np.uint16)
    return np.stack([np.repeat(symbols, row.astype(np.int64)) for row in freqs]).astype(np.uint16)


def check_tables(freqs: np.ndarray) -> str | None:
    """Why ``[T, K]`` stored frequencies cannot drive a decoder (None when they can)."""
    if freqs.ndim != 2 or freqs.shape[0] < 1 or freqs.shape[1] < 1:
        return "frequency tables must be a non-empty [tables, alphabet] array"
    sums = freqs.astype(np.int64).sum(axis=1)
    bad = np.flatnonzero(sums != PROB_SCALE)
    if bad.size:
        return f"frequency table {int(bad[0])} sums to {int(sums[bad[0]])}, not {PROB_SCALE}"
    return None
