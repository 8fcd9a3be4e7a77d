"""The rANS engine: integer tables, the numpy reference against the native coder (same words, same symbols),
exact round trips, costs near the entropy, and corrupt streams refused with FormatError."""

from __future__ import annotations

import numpy as np
import pytest

from nwcfmt.entropy import rans
from nwcfmt.entropy.rans import Context, RansStream
from nwcfmt.entropy.tables import PROB_SCALE, check_tables, normalize_counts, slot_lookup
from nwcfmt.errors import FormatError

needs_native = pytest.mark.skipif(not rans.native_enabled(), reason="native rANS coder not built")


def gaussian_symbols(n: int, step: float, seed: int = 0) -> tuple[np.ndarray, int]:
    q = np.round(np.random.default_rng(seed).standard_normal(n) / step).astype(np.int64)
    q -= q.min()
    return q.astype(np.uint16), int(q.max()) + 1


def tables_for(symbols: np.ndarray, alphabet: int, context: Context) -> np.ndarray:
    tid = context.table_ids(0, symbols.size)
    counts = np.bincount(tid * alphabet + symbols, minlength=context.n_tables * alphabet)
    counts = counts.reshape(context.n_tables, alphabet)
    counts[counts.sum(1) == 0, 0] = 1
    return np.stack([normalize_counts(c) for c in counts])


@pytest.mark.parametrize(
    "counts",
    [[5], [1, 0, 0, 7], [10**9, 1, 1], list(range(1, 300)), [1] * PROB_SCALE, [3, 0, 2**40]],
)
def test_normalized_tables_sum_and_keep_every_symbol(counts):
    f = normalize_counts(np.array(counts))
    assert int(f.astype(np.int64).sum()) == PROB_SCALE
    assert ((f > 0) == (np.array(counts) > 0)).all()
    assert check_tables(f[None]) is None


def test_normalized_table_is_near_ideal():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 1000, size=200) ** 2
    f = normalize_counts(counts).astype(np.float64)
    p = counts / counts.sum()
    used = counts > 0
    entropy = -(p[used] * np.log2(p[used])).sum()
    cost = -(p[used] * np.log2(f[used] / PROB_SCALE)).sum()
    assert 0 <= cost - entropy < 2e-3


def test_normalize_refuses_what_no_table_holds():
    with pytest.raises(ValueError):
        normalize_counts(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError):
        normalize_counts(np.ones(PROB_SCALE + 1, dtype=np.int64))


def test_slot_lookup_covers_each_symbols_slots():
    f = np.array([[0, 3, PROB_SCALE - 4, 1]], dtype=np.uint16)
    lut = slot_lookup(f)
    assert lut.shape == (1, PROB_SCALE)
    assert (lut[0, :3] == 1).all() and (lut[0, 3:-1] == 2).all() and lut[0, -1] == 3


CASES = {
    "gauss-4bit": dict(n=50_000, step=0.18, context=Context(), lane=4096),
    "short-last-lane": dict(n=3 * 1024 + 5, step=0.5, context=Context(), lane=1024),
    "one-symbol": dict(n=5000, step=100.0, context=Context(), lane=1024),
    "channels-16": dict(n=16 * 2000, step=0.3, context=Context(channels=16), lane=2048),
    "levels": dict(
        n=40_000,
        step=0.25,
        context=Context(channels=2, levels=np.array([0, 2, 1, 1, 0, 2, 2], np.uint8), level_run=3, n_levels=3),
        lane=1024,
    ),
    "wide-alphabet": dict(n=30_000, step=0.004, context=Context(), lane=1024),
}


@pytest.mark.parametrize("name", CASES)
def test_reference_round_trip(name):
    case = CASES[name]
    symbols, alphabet = gaussian_symbols(case["n"], case["step"])
    freqs = tables_for(symbols, alphabet, case["context"])
    stream = rans.encode_reference(symbols, freqs, case["context"], case["lane"])
    assert stream.lanes.shape == (rans.n_lanes(case["n"], case["lane"]), 2)
    decoded = rans.decode_reference(stream, freqs, case["context"], case["n"], case["lane"])
    np.testing.assert_array_equal(decoded, symbols)


@needs_native
@pytest.mark.parametrize("name", CASES)
def test_native_matches_reference(name):
    case = CASES[name]
    symbols, alphabet = gaussian_symbols(case["n"], case["step"], seed=2)
    freqs = tables_for(symbols, alphabet, case["context"])
    ref = rans.encode_reference(symbols, freqs, case["context"], case["lane"])
    nat = rans.encode(symbols, freqs, case["context"], case["lane"])
    np.testing.assert_array_equal(nat.words, ref.words)
    np.testing.assert_array_equal(nat.lanes, ref.lanes)
    np.testing.assert_array_equal(rans.decode(nat, freqs, case["context"], case["n"], case["lane"]), symbols)


def test_cost_is_near_the_entropy():
    symbols, alphabet = gaussian_symbols(1 << 20, 0.2)
    freqs = tables_for(symbols, alphabet, Context())
    stream = rans.encode(symbols, freqs, Context())
    p = np.bincount(symbols) / symbols.size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    overhead = 8 * stream.nbytes / symbols.size - entropy
    assert 0 < overhead < 0.01  # lanes of 16K symbols: ~10 bytes each


def test_symbol_without_frequency_is_refused():
    freqs = np.array([[PROB_SCALE, 0]], dtype=np.uint16)
    symbols = np.array([0, 1, 0] * 400, dtype=np.uint16)
    with pytest.raises(ValueError):
        rans.encode_reference(symbols, freqs, Context(), 1024)
    if rans.native_enabled():
        with pytest.raises(ValueError):
            rans.encode(symbols, freqs, Context(), 1024)


def _stream():
    symbols, alphabet = gaussian_symbols(3000, 0.3, seed=5)
    freqs = tables_for(symbols, alphabet, Context())
    return rans.encode_reference(symbols, freqs, Context(), 1024), freqs, symbols


def _edits():
    def flip_word(s):
        w = s.words.copy()
        w[len(w) // 2] ^= 0x0100
        return RansStream(w, s.lanes)

    def drop_word(s):
        lanes = s.lanes.copy()
        lanes[0, 1] -= 1
        return RansStream(np.delete(s.words, 0), lanes)

    def extra_word(s):
        lanes = s.lanes.copy()
        lanes[-1, 1] += 1
        return RansStream(np.append(s.words, np.uint16(7)), lanes)

    def low_state(s):
        lanes = s.lanes.copy()
        lanes[1, 0] = 5
        return RansStream(s.words, lanes)

    def other_state(s):
        lanes = s.lanes.copy()
        lanes[1, 0] ^= 0x10000
        return RansStream(s.words, lanes)

    def too_many_words(s):
        lanes = s.lanes.copy()
        lanes[0, 1] = 5000
        return RansStream(s.words, lanes)

    def missing_lane(s):
        return RansStream(s.words, s.lanes[:-1])

    return {
        f.__name__: f for f in (flip_word, drop_word, extra_word, low_state, other_state, too_many_words, missing_lane)
    }


@pytest.mark.parametrize("edit", list(_edits()))
@pytest.mark.parametrize("decoder", ["reference", "native"])
def test_corrupt_streams_raise_format_error(edit, decoder):
    if decoder == "native" and not rans.native_enabled():
        pytest.skip("native rANS coder not built")
    stream, freqs, symbols = _stream()
    bad = _edits()[edit](stream)
    decode = rans.decode_reference if decoder == "reference" else rans.decode
    with pytest.raises(FormatError):
        decode(bad, freqs, Context(), symbols.size, 1024)
