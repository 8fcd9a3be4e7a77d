"""Integer latents -> the entropy-coded segments: per-table counts, integer tables, the rANS stream, and a
byte estimate cheap enough for rate control."""

from __future__ import annotations

import numpy as np

from nwcfmt.entropy import rans
from nwcfmt.entropy.rans import Context, RansStream
from nwcfmt.entropy.tables import PROB_BITS, normalize_counts
from nwcfmt.errors import EncodeError

LANE_INFO_BYTES = 8  # start state and word count
LANE_FLUSH_BYTES = 2  # measured: a lane's final state carries about 16 bits beyond the ideal code length


def table_counts(symbols: np.ndarray, alphabet: int, context: Context) -> np.ndarray:
    """``[n_tables, alphabet]`` symbol counts."""
    if context.n_tables == 1:
        return np.bincount(symbols, minlength=alphabet)[None].astype(np.int64)
    tid = context.table_ids(0, symbols.size)
    flat = np.bincount(tid * alphabet + symbols, minlength=context.n_tables * alphabet)
    return flat.reshape(context.n_tables, alphabet).astype(np.int64)


def tables_for(counts: np.ndarray) -> np.ndarray:
    """Integer tables for per-table counts (a table with no symbols gets all its mass on symbol 0)."""
    rows = []
    for row in counts:
        if row.sum() == 0:
            row = np.zeros_like(row)
            row[0] = 1
        rows.append(normalize_counts(row))
    return np.stack(rows)


def estimate_bytes(counts: np.ndarray, n_symbols: int, lane_symbols: int) -> tuple[float, np.ndarray]:
    """Bytes the stream will take (ideal code length with the integer tables, plus lane overhead), and the
    tables. ``counts`` may be scaled up from a subsample (floats)."""
    freqs = tables_for(np.rint(counts).astype(np.int64) if counts.dtype.kind == "f" else counts)
    used = counts > 0
    bits = float((counts[used] * (PROB_BITS - np.log2(freqs[used].astype(np.float64)))).sum())
    lanes = rans.n_lanes(n_symbols, lane_symbols)
    return bits / 8 + lanes * (LANE_INFO_BYTES + LANE_FLUSH_BYTES) + freqs.nbytes, freqs


def check_alphabet(alphabet: int, codec: str) -> None:
    if alphabet > rans.MAX_ALPHABET:
        raise EncodeError(f"{codec}: {alphabet} latent values exceed the {rans.MAX_ALPHABET}-symbol alphabet")


def encode_stream(symbols: np.ndarray, freqs: np.ndarray, context: Context, lane_symbols: int) -> RansStream:
    return rans.encode(symbols.astype(np.uint16), freqs, context, lane_symbols)
