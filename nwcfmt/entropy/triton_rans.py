"""Triton decoder of the rANS stream of :mod:`nwcfmt.entropy.rans`, bit-exact with the CPU decoders.

One GPU thread (one element of a program's ``BLOCK``-wide vector) decodes one lane: it loops over the lane's
symbols, looks each slot up in a per-table *slot table*, and reads the lane's next 16-bit word (a gather) when
the state drops below ``2**16``. Everything but the stream (``words``, ``lanes``) is small: the frequency
tables cross PCIe as ``uint16[T, K]`` and the rest is derived on the device (:func:`device_tables`,
:func:`slot_table`).

The slot table folds the three lookups of a decode step into one 64-bit gather: for table ``t`` and slot ``u``
(with ``s = lut[t, u]``) it holds ``s | freq[t, s] << 16 | (u - cum[t, s]) << 32``, so that a step is
``x = freq * (x >> 15) + (u - cum)``. With tables summing to ``2**15`` that value lies in ``[2, 2**32)``: the
state stays a uint32 and never wraps, and one renormalisation always brings it back to ``[2**16, 2**32)``.

Validity is decided per lane, as the CPU decoders do: a lane fails when its start state is below ``2**16``,
when it needs a word it does not have (or that lies past the end of ``words``), when it does not consume
exactly its words, or when it does not end in state ``2**16``; the last lane also fails when the lanes do not
declare exactly ``words.numel()`` words. :func:`decode_lanes` returns the flags without synchronising;
:func:`check_lanes` turns them into a :class:`~nwcfmt.errors.FormatError` worded as :mod:`rans` words it. A
corrupt stream cannot make the kernel read out of bounds (word reads are masked to the lane's words and to the
stream; slot table reads are in range by construction) or loop longer than ``lane_symbols`` steps.

Per step, the lane's next word is read ahead, masked only by the lane's word count: it does not wait for the
slot table read, so the state's dependency chain holds one gather per symbol. A program first takes the steps
every one of its live lanes takes (no masks but the stores'), then the rest of its longer lanes (only the
program holding the stream's short last lane has any).

The kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors; :func:`compile_for` compiles
it for an NVIDIA architecture without a GPU (register and spill counts from ptxas).
"""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import torch
import triton
import triton.language as tl

from nwcfmt.entropy import rans
from nwcfmt.entropy.tables import PROB_BITS, PROB_SCALE, check_tables
from nwcfmt.errors import FormatError

BLOCK = 64  # lanes per program (one per thread)
NUM_WARPS = 2
MAX_LANE_SYMBOLS = (1 << 31) - 1  # the step counter is an int32
MAX_TABLES = (1 << 16) - 1  # table rows are addressed with int32 (table << 15)
MAX_ALPHABET = 1 << 16  # a symbol takes 16 bits of a slot table entry


# --------------------------------------------------------------------------------------------- device code
@triton.jit
def _decode_step(
    x,
    pos,
    chan,
    in_run,
    run,
    active,
    dest,
    table_ptr,
    levels_ptr,
    words,
    limit,
    channels,
    level_run,
    n_levels,
    zero,
    one,
    slot_mask,
    low,
    HAS_LEVELS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One symbol of every lane: store it at ``dest`` and return the next (x, pos, chan, in_run, run).

    ``MASKED``: some live lanes have ended (``active`` tells which go on); otherwise every live lane decodes
    and ``active`` only keeps the lanes past the last one (whose table reads stay in bounds) from storing.
    """
    # the lane's next word, read ahead of knowing whether it is needed: it does not wait for the table read
    word = tl.load(words + pos, mask=pos < limit, other=0)
    if HAS_LEVELS:
        if MASKED:
            level = tl.load(levels_ptr + run, mask=active, other=0).to(tl.int32)
        else:
            level = tl.load(levels_ptr + run).to(tl.int32)
        row = table_ptr + ((chan + channels * level) << 15)
    else:
        row = table_ptr + (chan << 15)
    if MASKED:
        entry = tl.load(row + (x & slot_mask).to(tl.int32), mask=active, other=0)
    else:
        entry = tl.load(row + (x & slot_mask).to(tl.int32))
    nx = (entry.to(tl.uint32) >> 16) * (x >> 15) + (entry >> 32).to(tl.uint32)
    need = nx < low
    if MASKED:
        need = need & active
    nx = tl.where(need, (nx << 16) | word.to(tl.uint32), nx)
    pos += need.to(tl.int64)
    x = tl.where(active, nx, x) if MASKED else nx
    tl.store(dest, entry.to(tl.uint16), mask=active)
    chan += one
    chan = tl.where(chan == channels, zero, chan)
    if HAS_LEVELS:
        in_run += one
        wrap = in_run == level_run
        in_run = tl.where(wrap, zero, in_run)
        run = tl.where(wrap, run + one, run)
        run = tl.where(run == n_levels, zero, run)
    return x, pos, chan, in_run, run


@triton.jit
def _rans_decode_kernel(
    words_ptr,  # u16 [n_words]: every lane's words, lane after lane
    start_ptr,  # i64 [n_lanes]: start states (the encoder's final states)
    count_ptr,  # i64 [n_lanes]: words per lane
    offset_ptr,  # i64 [n_lanes]: where each lane's words start (exclusive prefix sum of the counts)
    table_ptr,  # i64 [T * 2**15]: slot tables (see the module docstring)
    levels_ptr,  # u8 [n_levels]: per-run levels (unused without HAS_LEVELS)
    out_ptr,  # u16 [n]: decoded symbols
    ok_ptr,  # u8 [n_lanes]: 1 where the lane decoded exactly
    n,
    n_words,
    n_lanes,
    lane_symbols,
    channels,
    level_run,
    n_levels,
    HAS_LEVELS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Decode ``BLOCK`` lanes, one per vector element, in lock step."""
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lane < n_lanes
    start = tl.load(start_ptr + lane, mask=live, other=65536)
    count = tl.load(count_ptr + lane, mask=live, other=0)
    offset = tl.load(offset_ptr + lane, mask=live, other=0)
    # words the lane may read: its own, and only those inside the stream (<= 0 when it starts past the end)
    limit = tl.minimum(count, n_words - offset)
    words = words_ptr + offset
    x = start.to(tl.uint32)
    pos = tl.zeros([BLOCK], dtype=tl.int64)  # words read (or, after running out, wanted)

    first = lane.to(tl.int64) * lane_symbols  # stream index of the lane's first symbol
    length = tl.minimum(n - first, lane_symbols)  # <= 0 past the last lane
    out = out_ptr + first
    # the table of symbol i: chan = i % channels, in_run = i % level_run, run = i // level_run % n_levels
    chan = (first % channels).to(tl.int32)
    if HAS_LEVELS:
        run_idx = first // level_run
        in_run = (first - run_idx * level_run).to(tl.int32)
        run = (run_idx % n_levels).to(tl.int32)
    else:
        in_run = chan  # unused
        run = chan
    # loop constants as tensors: the interpreter converts a Python constant on every use
    zero = tl.zeros([BLOCK], dtype=tl.int32)
    one = zero + 1
    slot_mask = (zero + 0x7FFF).to(tl.uint32)
    low = (zero + 65536).to(tl.uint32)

    # steps every live lane takes, then those of the longer lanes (all lanes but the stream's last are full)
    full = tl.min(tl.where(live, length, lane_symbols)).to(tl.int32)
    longest = tl.max(tl.where(live, length, 0)).to(tl.int32)
    for j in range(0, full):
        x, pos, chan, in_run, run = _decode_step(
            x, pos, chan, in_run, run, live, out + j, table_ptr, levels_ptr, words, limit, channels, level_run,
            n_levels, zero, one, slot_mask, low, HAS_LEVELS, False,
        )  # fmt: skip
    for j in range(full, longest):
        x, pos, chan, in_run, run = _decode_step(
            x, pos, chan, in_run, run, j < length, out + j, table_ptr, levels_ptr, words, limit, channels,
            level_run, n_levels, zero, one, slot_mask, low, HAS_LEVELS, True,
        )  # fmt: skip

    # pos only grows, so pos == count <= limit means that no read went past the lane's words or the stream
    ok = live & (start >= 65536) & (start < 4294967296) & (x == 65536) & (pos == count) & (count <= limit)
    # the last lane's words must end where the stream ends (no words left over)
    ok = ok & ((lane != n_lanes - 1) | (offset + count == n_words))
    tl.store(ok_ptr + lane, ok.to(tl.uint8), mask=live)


# ----------------------------------------------------------------------------------------------- host code
def device_tables(
    freqs: np.ndarray, device: torch.device | str, where: str = "stream"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stored ``[T, K]`` frequencies -> ``(freqs, cum, lut)`` on ``device``: int32 ``[T, K]``, int32 ``[T, K]``
    and int32 ``[T, 2**15]``, the values of :func:`tables.cumulative` and :func:`tables.slot_lookup`.

    Only the uint16 frequencies are copied; the rest is computed on the device. FormatError when the tables
    cannot drive a decoder.
    """
    freqs = np.ascontiguousarray(freqs, dtype=np.uint16)
    reason = check_tables(freqs)
    if reason is not None:
        raise FormatError(f"{where}: {reason}")
    t, k = freqs.shape
    f = torch.from_numpy(freqs).to(device).to(torch.int32)
    cum = torch.cumsum(f, dim=1, dtype=torch.int32) - f
    # each row sums to 2**15, so repeating every (table, symbol) index by its frequency lays out all rows
    flat = torch.repeat_interleave(
        torch.arange(t * k, device=f.device, dtype=torch.int32), f.reshape(-1), output_size=t * PROB_SCALE
    )
    lut = (flat.reshape(t, PROB_SCALE) % k).to(torch.int32)
    return f, cum, lut


def slot_table(freqs: torch.Tensor, cum: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``int64[T * 2**15]`` slot table (``s | freq << 16 | (slot - cum) << 32``) from consistent tables:
    ``freqs``/``cum`` ``[T, K]`` and ``lut`` ``[T, 2**15]``, any integer dtypes, all on one device."""
    rows = torch.arange(lut.shape[0], device=lut.device).unsqueeze(1)
    s = lut.to(torch.int64)
    f = freqs.to(torch.int64)[rows, s]
    c = cum.to(torch.int64)[rows, s]
    bias = torch.arange(PROB_SCALE, device=lut.device, dtype=torch.int64) - c
    return (s | (f << 16) | (bias << 32)).reshape(-1)


def unsupported_reason(
    words: torch.Tensor, lanes: torch.Tensor, tables_shape: tuple[int, ...], n: int, lane_symbols: int
) -> str | None:
    """Why :func:`decode_lanes` does not take a stream of these tensors and sizes (None when it does).

    ``tables_shape`` is the frequency tables' ``(T, K)``. Malformed streams are not "unsupported": they raise
    FormatError when decoded.
    """
    if words.dim() != 1 or words.dtype not in (torch.uint16, torch.int16):
        return f"words {words.dtype}{list(words.shape)} (expected 1-D uint16)"
    if lanes.dtype not in (torch.uint32, torch.int32, torch.int64):
        return f"lanes {lanes.dtype} (expected uint32)"
    if lanes.device != words.device:
        return f"lanes on {lanes.device}, words on {words.device}"
    if len(tables_shape) == 2 and not (tables_shape[0] <= MAX_TABLES and tables_shape[1] <= MAX_ALPHABET):
        return f"{tables_shape[0]} tables of {tables_shape[1]} symbols"
    if not 1 <= lane_symbols <= MAX_LANE_SYMBOLS or not 0 <= n < 1 << 62:
        return f"{n} symbols in lanes of {lane_symbols}"
    return None


def lane_arrays(lanes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[n_lanes, 2]`` lanes (uint32, or their int32 view, or int64) -> int64 (starts, counts, offsets)."""
    wide = lanes.to(torch.int64)
    if lanes.dtype == torch.int32:  # the bits of a uint32 array
        wide = wide & 0xFFFFFFFF
    starts = wide[:, 0].contiguous()
    counts = wide[:, 1].contiguous()
    offsets = torch.cumsum(counts, 0) - counts
    return starts, counts, offsets


def decode_lanes(
    words: torch.Tensor,
    lanes: torch.Tensor,
    freqs: torch.Tensor,
    cum: torch.Tensor,
    lut: torch.Tensor,
    levels: torch.Tensor | None,
    channels: int,
    level_run: int,
    n: int,
    lane_symbols: int,
    *,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
    where: str = "stream",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a stream on the device of ``words``: ``(uint16[n] symbols, bool[n_lanes] ok)``; no synchronisation.

    ``words``: uint16 (or its int16 view) ``[n_words]``; ``lanes``: ``[n_lanes, 2]`` (start state, word count),
    uint32 (or its int32 view) or int64; ``freqs``/``cum``/``lut``: the tables of :func:`device_tables`;
    ``levels``: uint8 ``[n_levels]`` or None. Symbol ``i`` uses table ``i % channels`` (plus ``channels *
    levels[(i // level_run) % n_levels]``), which must exist. Symbols of lanes whose flag is false are garbage:
    check the flags (:func:`check_lanes`) before using them. ValueError on arguments the kernel does not take.
    """
    reason = unsupported_reason(words, lanes, tuple(freqs.shape), n, lane_symbols)
    if reason is not None:
        raise ValueError(f"the Triton rANS decoder does not support {reason}")
    device = words.device
    lane_count = rans.n_lanes(n, lane_symbols)
    if lanes.shape != (lane_count, 2):
        found = lanes.shape[0] if lanes.dim() else 0
        raise FormatError(f"{where}: expected {lane_count} lanes, found {found}")
    tables = int(freqs.shape[0])
    n_levels = 0 if levels is None else int(levels.numel())
    if channels < 1 or level_run < 1 or (levels is not None and n_levels == 0):
        raise ValueError(f"bad context: channels={channels}, level_run={level_run}, {n_levels} levels")
    if tables < channels or lut.shape != (tables, PROB_SCALE):
        raise ValueError(f"{tables} tables (lut {list(lut.shape)}) for {channels} channels")
    out = torch.empty(n, dtype=torch.uint16, device=device)
    ok = torch.zeros(lane_count, dtype=torch.uint8, device=device)
    if lane_count == 0:
        return out, ok.bool()
    starts, counts, offsets = lane_arrays(lanes)
    table = slot_table(freqs, cum, lut)
    # without levels, any tensor serves as the (never read) levels pointer
    levels_t = ok if levels is None else levels.to(device=device, dtype=torch.uint8).contiguous()
    _rans_decode_kernel[(triton.cdiv(lane_count, block),)](
        words.contiguous().view(torch.uint16),
        starts,
        counts,
        offsets,
        table,
        levels_t,
        out,
        ok,
        n,
        words.numel(),
        lane_count,
        lane_symbols,
        channels,
        level_run,
        max(n_levels, 1),
        HAS_LEVELS=levels is not None,
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,  # no floating point; stated to keep triton from warning about its default
    )
    return out, ok.bool()


def check_lanes(
    ok: torch.Tensor, lanes: torch.Tensor, n_words: int, n: int, lane_symbols: int, where: str = "stream"
) -> None:
    """FormatError, worded as :func:`rans.decode` words it, unless every lane decoded (synchronises once)."""
    if bool(ok.all()):
        return
    # a failure: find out why on the host, where the lanes are small
    wide = lanes.to(torch.int64).cpu().numpy()
    if lanes.dtype == torch.int32:  # the bits of a uint32 array
        wide = wide & 0xFFFFFFFF
    if bool(((wide < 0) | (wide >= 1 << 32)).any()):
        raise FormatError(f"{where}: a lane's start state or word count does not fit 32 bits")
    lanes_np = wide.astype(np.uint32)
    words = np.broadcast_to(np.zeros(1, np.uint16), (n_words,))  # check_stream reads only the size
    rans.check_stream(rans.RansStream(words, lanes_np), n, lane_symbols, where)
    bad = int(torch.nonzero(~ok.cpu())[0, 0])
    raise FormatError(f"{where}: lane {bad} does not decode (corrupt or truncated bitstream)")


def context_arrays(context: rans.Context, tables: int, where: str = "stream") -> np.ndarray | None:
    """The context's levels as a uint8 array (None without levels), checked against ``tables`` tables."""
    levels = None
    top = 0
    if context.levels is not None:
        levels = np.ascontiguousarray(context.levels, dtype=np.uint8).reshape(-1)
        if levels.size == 0:
            raise FormatError(f"{where}: the context has an empty levels array")
        top = int(levels.max())
    if context.channels < 1 or context.level_run < 1:
        raise FormatError(f"{where}: bad context (channels={context.channels}, level_run={context.level_run})")
    if context.channels * (top + 1) > tables:
        raise FormatError(f"{where}: the context needs {context.channels * (top + 1)} tables, the stream has {tables}")
    return levels


def decode_stream(
    words: torch.Tensor,
    lanes: torch.Tensor,
    freqs: np.ndarray,
    context: rans.Context,
    n: int,
    lane_symbols: int,
    where: str = "stream",
    *,
    block: int = BLOCK,
) -> torch.Tensor:
    """:func:`rans.decode` on the device of ``words``: ``uint16[n]`` symbols, or FormatError (one sync).

    ``words`` (uint16 or its int16 view) and ``lanes`` (``[n_lanes, 2]``, uint32 or its int32 view, or int64)
    are the stream on the device; ``freqs`` (``uint16[T, K]``) and the context's levels are copied to it.
    """
    freqs = np.ascontiguousarray(freqs, dtype=np.uint16)
    if freqs.ndim != 2:
        raise FormatError(f"{where}: frequency tables must be a [tables, alphabet] array")
    levels = context_arrays(context, freqs.shape[0], where)
    f, cum, lut = device_tables(freqs, words.device, where)
    levels_t = None if levels is None else torch.from_numpy(levels).to(words.device)
    symbols, ok = decode_lanes(
        words, lanes, f, cum, lut, levels_t, context.channels, context.level_run, n, lane_symbols, block=block,
        where=where,
    )  # fmt: skip
    check_lanes(ok, lanes, words.numel(), n, lane_symbols, where)
    return symbols


# ------------------------------------------------------------------------------------------------ compiling
def kernel_source(has_levels: bool, block: int = BLOCK):
    """``ASTSource`` of the kernel as a launch on large, aligned tensors specialises it."""
    from triton.compiler import ASTSource

    fn = _rans_decode_kernel
    consts = {"HAS_LEVELS": has_levels, "BLOCK": block}
    pointers = {
        "words_ptr": "*u16",
        "start_ptr": "*i64",
        "count_ptr": "*i64",
        "offset_ptr": "*i64",
        "table_ptr": "*i64",
        "levels_ptr": "*u8",
        "out_ptr": "*u16",
        "ok_ptr": "*u8",
    }
    wide = ("n", "n_words")  # int64: streams of 2**31 symbols or words
    signature = {
        name: "constexpr" if name in consts else pointers.get(name, "i64" if name in wide else "i32")
        for name in fn.arg_names
    }
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name in pointers}
    return ASTSource(fn, signature, consts, attrs)


def compile_for(arch: int, has_levels: bool, block: int = BLOCK, num_warps: int = NUM_WARPS) -> dict:
    """Compile for ``sm_<arch>`` without a GPU: ``{"registers", "spill_stores", "spill_loads", "ptx"}``.

    The counts come from the ``ptxas -v`` log of triton's own ptxas run (triton fills ``n_regs`` only when it
    loads the binary on a device); the cache is bypassed so that ptxas does run.
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(
            kernel_source(has_levels, block),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "enable_fp_fusion": False},
        )
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not (regs and spills and compiled.asm.get("cubin")):
        raise RuntimeError(f"unexpected ptxas output for sm_{arch}:\n{text}")
    return {
        "registers": int(regs.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "ptx": compiled.asm["ptx"],
    }


assert PROB_BITS == 15, "the kernel's constants assume 15-bit tables"
