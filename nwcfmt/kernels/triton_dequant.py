"""Triton kernels: fused unpack + dequantize of the packed integer-code layout, bit-exact with the reference.

Input is the layout of :mod:`nwcfmt.kernels.reference`: ``[rows, row_bytes]`` uint8 codes (each row an
LSB-first bitstream of ``bits``-bit codes), per-group ``scale`` ``[rows or 1, n_groups]`` and ``zero`` (a
tensor of the scale's shape, or one integer). Output is ``(code - zero) * scale`` computed in fp32 and rounded
to nearest even into bf16, fp16 or fp32, with exactly the bits :func:`reference.dequantize_packed` gives.

Two kernels:

* ``_dequant_words_kernel`` (2, 3, 4 and 8 bits): loads whole "words" (the ``lcm(bits, 8)`` bits holding
  ``codes_per_word`` codes: 1 byte for 2/4/8 bits, 3 bytes for 3 bits) as contiguous bytes, extracts each
  code position, dequantizes it, and interleaves the positions back into column order with ``tl.join``.
* ``_dequant_generic_kernel`` (any bits 1..8): per output element, gathers the one or two bytes that hold
  its code.

Exactness, on the GPU and in the interpreter (``TRITON_INTERPRET=1``) alike:

* ``(code - zero) * scale`` in fp32, with FMA contraction disabled at launch (there is no add after the
  multiply anyway) and no flush of subnormals. With fp16/bf16 scales the product is exact (at most 8 + 11
  significant bits, subnormals included) unless it overflows to inf; with fp32 scales both round to nearest even.
* fp32 -> bf16 is rounded with integer ops (``bits + 0x7FFF + lsb``), because the interpreter truncates; the
  output is written through an int16 view. NaN becomes 0x7FFF, the canonical NaN of the GPU and of torch on
  CUDA (torch on the CPU writes 0xFFFF): NaN payloads (only from inf/NaN scales) are not part of the contract.
* bf16 scales are widened by shifting their bits (the interpreter mis-converts bf16 subnormals).
* fp32 -> fp16 is the plain cast: ``cvt.rn.f16.f32`` on the GPU, numpy's correctly rounded conversion in the
  interpreter (round to nearest even, subnormals and overflow included).

Every load and store is masked (the interpreter does not detect out-of-bounds accesses); offsets along rows
are int64. Block sizes follow a fixed rule (:func:`block_sizes`), no autotuning: about 4096 outputs per program
and, for grouped scales, tiles no wider than the largest power of two dividing the group size, so that a tile
row needs a single scale and zero.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nwcfmt.kernels.reference import SUPPORTED_BITS, row_bytes

WORD_BITS = (2, 3, 4, 8)  # widths with a specialised kernel; the others use the generic one
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ZERO_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.float32)
OUT_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # OUT_KIND of the kernels
MAX_IMPLICIT_ZERO = 1 << 24  # an integer zero is converted to fp32 exactly up to here
TILE = 4096  # output elements per program
MAX_BLOCK_C = 512
MIN_BLOCK_C = 16
NUM_WARPS = 4


# --------------------------------------------------------------------------------------------- device code
@triton.jit
def _group_params(
    scale_ptr,
    zero_ptr,
    s_row,
    z_row,
    col,
    mask,
    GROUP_SIZE: tl.constexpr,
    SCALE_BF16: tl.constexpr,
    HAS_ZERO: tl.constexpr,
):
    """fp32 scale (and zero, if stored) of the group holding column ``col``; ``0`` where masked.

    ``col`` is a scalar (the tile row lies in one group) or a tensor of columns; ``s_row``/``z_row`` are the
    int32 offsets of the rows' first group (scale and zero hold fewer than 2**31 values).
    """
    g = col // GROUP_SIZE if GROUP_SIZE > 0 else col * 0  # GROUP_SIZE 0: one group per row
    if SCALE_BF16:
        bits = tl.load(scale_ptr + s_row + g, mask=mask, other=0)  # int16 view of bf16
        scale = (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        scale = tl.load(scale_ptr + s_row + g, mask=mask, other=0).to(tl.float32)
    zero = tl.load(zero_ptr + z_row + g, mask=mask, other=0).to(tl.float32) if HAS_ZERO else scale  # else unused
    return scale, zero


@triton.jit
def _dequant_value(
    code,
    scale,
    zero,
    HAS_ZERO: tl.constexpr,
    ZERO_POINT: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    """``(code - zero) * scale`` in fp32, as the stored output type (bf16 as its int16 bits)."""
    # the implicit zero is subtracted as an integer: exact, like its fp32 subtraction (|code - ZERO_POINT| < 2**24)
    diff = code.to(tl.float32) - zero if HAS_ZERO else (code - ZERO_POINT).to(tl.float32)
    value = diff * scale
    if OUT_KIND == 2:  # bf16: round to nearest even with integer ops
        u = value.to(tl.uint32, bitcast=True)
        rounded = (u + ((u >> 16) & 1) + 0x7FFF) >> 16
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        rounded = tl.where(is_nan, 0x7FFF, rounded)
        out = rounded.to(tl.uint16).to(tl.int16, bitcast=True)
    elif OUT_KIND == 1:
        out = value.to(tl.float16)
    else:
        out = value
    return out


@triton.jit
def _interleaved_positions(
    word,
    FIRST: tl.constexpr,
    STRIDE: tl.constexpr,
    COUNT: tl.constexpr,
    scale_ptr,
    zero_ptr,
    s_row,
    z_row,
    col0,
    rmask,
    scale,
    zero,
    cols,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    WORD_GROUP: tl.constexpr,
    SCALE_BF16: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO_POINT: tl.constexpr,
    OUT_KIND: tl.constexpr,
):
    """Dequantized code positions FIRST, FIRST + STRIDE, ... (COUNT of them) of every word, joined so that
    flattening the trailing ``log2(COUNT)`` dims lists them in that order (the evens, then the odds, recursively).
    """
    if COUNT == 1:
        code = (word >> (FIRST * BITS)) & ((1 << BITS) - 1)
        if not WORD_GROUP:  # the codes of a word may straddle groups: look up this position's group
            col = col0 + FIRST
            scale, zero = _group_params(
                scale_ptr, zero_ptr, s_row, z_row, col, rmask & (col < cols), GROUP_SIZE, SCALE_BF16, HAS_ZERO
            )
        return _dequant_value(code, scale, zero, HAS_ZERO, ZERO_POINT, OUT_KIND)
    else:
        evens = _interleaved_positions(
            word, FIRST, 2 * STRIDE, COUNT // 2, scale_ptr, zero_ptr, s_row, z_row, col0, rmask, scale, zero,
            cols, BITS, GROUP_SIZE, WORD_GROUP, SCALE_BF16, HAS_ZERO, ZERO_POINT, OUT_KIND,
        )  # fmt: skip
        odds = _interleaved_positions(
            word, FIRST + STRIDE, 2 * STRIDE, COUNT // 2, scale_ptr, zero_ptr, s_row, z_row, col0, rmask, scale,
            zero, cols, BITS, GROUP_SIZE, WORD_GROUP, SCALE_BF16, HAS_ZERO, ZERO_POINT, OUT_KIND,
        )  # fmt: skip
        return tl.join(evens, odds)


@triton.jit
def _dequant_words_kernel(
    packed_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    rows,
    cols,
    row_bytes,
    scale_row_stride,
    zero_row_stride,
    BITS: tl.constexpr,
    CODES_PER_WORD: tl.constexpr,
    WORD_BYTES: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    ROW_GROUP: tl.constexpr,
    SCALE_BF16: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO_POINT: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One ``[BLOCK_R, BLOCK_C]`` output tile from ``BLOCK_C / CODES_PER_WORD`` whole words per row.

    ``ROW_GROUP``: each row of the tile lies in one group (one scale per row); otherwise groups are looked
    up per word, or per code when a word's codes may straddle groups.
    """
    BLOCK_W: tl.constexpr = BLOCK_C // CODES_PER_WORD
    WORD_GROUP: tl.constexpr = ROW_GROUP or GROUP_SIZE % CODES_PER_WORD == 0  # a word's codes share a group
    pid = tl.program_id(0)
    col_blocks = (cols + BLOCK_C - 1) // BLOCK_C
    pid_r = pid // col_blocks
    pid_c = pid % col_blocks

    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    rmask = r < rows
    word_idx = (pid_c * BLOCK_W + tl.arange(0, BLOCK_W))[None, :]

    # gather the words: WORD_BYTES little-endian bytes each (bytes past the row end read as 0)
    packed_row = packed_ptr + r.to(tl.int64) * row_bytes
    word = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.int32)
    for j in tl.static_range(WORD_BYTES):
        byte = word_idx * WORD_BYTES + j
        b = tl.load(packed_row + byte, mask=rmask & (byte < row_bytes), other=0)
        word = word | (b.to(tl.int32) << (8 * j))

    s_row = r * scale_row_stride
    z_row = r * zero_row_stride
    col0 = word_idx * CODES_PER_WORD
    if ROW_GROUP:
        scale, zero = _group_params(
            scale_ptr, zero_ptr, s_row, z_row, pid_c * BLOCK_C, rmask, GROUP_SIZE, SCALE_BF16, HAS_ZERO
        )
    elif WORD_GROUP:
        scale, zero = _group_params(
            scale_ptr, zero_ptr, s_row, z_row, col0, rmask & (col0 < cols), GROUP_SIZE, SCALE_BF16, HAS_ZERO
        )
    else:  # looked up per code position
        scale = 0.0
        zero = 0.0
    tile = _interleaved_positions(
        word, 0, 1, CODES_PER_WORD, scale_ptr, zero_ptr, s_row, z_row, col0, rmask, scale, zero, cols,
        BITS, GROUP_SIZE, WORD_GROUP, SCALE_BF16, HAS_ZERO, ZERO_POINT, OUT_KIND,
    )  # fmt: skip
    tile = tl.reshape(tile, (BLOCK_R, BLOCK_C))

    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    tl.store(out_ptr + r.to(tl.int64) * cols + c, tile, mask=rmask & (c < cols))


@triton.jit
def _dequant_generic_kernel(
    packed_ptr,
    scale_ptr,
    zero_ptr,
    out_ptr,
    rows,
    cols,
    row_bytes,
    scale_row_stride,
    zero_row_stride,
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    ROW_GROUP: tl.constexpr,
    SCALE_BF16: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO_POINT: tl.constexpr,
    OUT_KIND: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One ``[BLOCK_R, BLOCK_C]`` output tile; each element reads the one or two bytes holding its code."""
    pid = tl.program_id(0)
    col_blocks = (cols + BLOCK_C - 1) // BLOCK_C
    pid_r = pid // col_blocks
    pid_c = pid % col_blocks

    r = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R))[:, None]
    rmask = r < rows
    c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    mask = rmask & (c < cols)

    # code c starts at stream bit c * BITS = (c // 8) * BITS bytes + (c % 8) * BITS bits (no int32 overflow)
    within = (c & 7) * BITS
    byte = (c >> 3) * BITS + (within >> 3)
    packed_row = packed_ptr + r.to(tl.int64) * row_bytes
    word = tl.load(packed_row + byte, mask=mask, other=0).to(tl.int32)
    if 8 % BITS != 0:  # a code may continue into the next byte
        nxt = tl.load(packed_row + byte + 1, mask=mask & (byte + 1 < row_bytes), other=0)
        word = word | (nxt.to(tl.int32) << 8)
    code = (word >> (within & 7)) & ((1 << BITS) - 1)

    if ROW_GROUP:
        scale, zero = _group_params(
            scale_ptr, zero_ptr, r * scale_row_stride, r * zero_row_stride, pid_c * BLOCK_C, rmask,
            GROUP_SIZE, SCALE_BF16, HAS_ZERO,
        )  # fmt: skip
    else:
        scale, zero = _group_params(
            scale_ptr, zero_ptr, r * scale_row_stride, r * zero_row_stride, c, mask,
            GROUP_SIZE, SCALE_BF16, HAS_ZERO,
        )  # fmt: skip
    tile = _dequant_value(code, scale, zero, HAS_ZERO, ZERO_POINT, OUT_KIND)
    tl.store(out_ptr + r.to(tl.int64) * cols + c, tile, mask=mask)


# ----------------------------------------------------------------------------------------------- host code
def word_geometry(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one word: the ``lcm(bits, 8)`` bits that hold a whole number of codes."""
    lcm = math.lcm(bits, 8)
    return lcm // bits, lcm // 8


def block_sizes(rows: int, cols: int, group_size: int, n_groups: int, codes_per_word: int = 1) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) by rule: about TILE elements, at most MAX_BLOCK_C columns, a multiple of the word.

    With several groups per row, BLOCK_C is the largest power of two dividing ``group_size`` (when that is
    at least MIN_BLOCK_C), so that each row of a tile lies in one group and needs one scale.
    """
    low = group_size & -group_size if n_groups > 1 else 0
    if low >= max(MIN_BLOCK_C, codes_per_word):
        block_c = min(low, MAX_BLOCK_C)
    else:
        block_c = min(max(triton.next_power_of_2(cols), MIN_BLOCK_C, codes_per_word), MAX_BLOCK_C)
    block_r = min(triton.next_power_of_2(rows), max(1, TILE // block_c))
    return block_r, block_c


def unsupported_reason(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | int,
    bits: int,
    group_size: int,
    cols: int,
    out_dtype: torch.dtype,
) -> str | None:
    """Why the kernels do not take these arguments (the dispatcher then uses the reference), or None."""
    if bits not in SUPPORTED_BITS:
        return f"bits={bits}"
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        return f"packed codes {packed.dtype}{list(packed.shape)} (expected 2-D uint8)"
    rows, n_bytes = packed.shape
    if n_bytes != row_bytes(cols, bits):
        return f"{n_bytes} bytes a row for {cols} columns of {bits}-bit codes (expected {row_bytes(cols, bits)})"
    if scale.dtype not in SCALE_DTYPES or scale.dim() != 2 or scale.shape[0] not in (1, rows):
        return f"scale {scale.dtype}{list(scale.shape)} for {rows} rows"
    n_groups = scale.shape[1]
    if n_groups > 1 and (group_size <= 0 or math.ceil(cols / group_size) != n_groups):
        return f"{n_groups} groups of {group_size} columns for {cols} columns"
    if isinstance(zero, torch.Tensor):
        if zero.dtype not in ZERO_DTYPES or zero.dim() != 2 or zero.shape[0] not in (1, rows):
            return f"zero {zero.dtype}{list(zero.shape)} for {rows} rows"
        if zero.shape[1] != n_groups:
            return f"zero {list(zero.shape)} with scale {list(scale.shape)}"
    elif not isinstance(zero, int) or not -MAX_IMPLICIT_ZERO <= zero <= MAX_IMPLICIT_ZERO:
        return f"implicit zero {zero!r}"
    if out_dtype not in OUT_KINDS:
        return f"output dtype {out_dtype}"
    if max(cols, n_bytes) + MAX_BLOCK_C >= 1 << 31 or rows * n_groups >= 1 << 31:
        return "rows of 2**31 values or scales of 2**31 values"
    return None


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | int,
    bits: int,
    group_size: int,
    cols: int,
    out_dtype: torch.dtype,
    *,
    kernel: str = "auto",
    block: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`reference.dequantize_packed`: same arguments, same bits.

    ``kernel`` is ``"words"`` (2, 3, 4 and 8 bits), ``"generic"`` or ``"auto"`` (words where it applies);
    ``block`` overrides the (BLOCK_R, BLOCK_C) rule: powers of two, BLOCK_C a multiple of the word's codes.
    ``out``: a contiguous ``[rows, cols]`` tensor of ``out_dtype`` on the packed tensor's device to write to.
    """
    reason = unsupported_reason(packed, scale, zero, bits, group_size, cols, out_dtype)
    if reason is not None:
        raise ValueError(f"the Triton dequantization kernels do not support {reason}")
    if kernel == "auto":
        kernel = "words" if bits in WORD_BITS else "generic"
    if kernel not in ("words", "generic") or (kernel == "words" and bits not in WORD_BITS):
        raise ValueError(f"no {kernel!r} kernel for {bits}-bit codes")

    device = packed.device
    rows, n_bytes = packed.shape
    if out is None:
        out = torch.empty(rows, cols, dtype=out_dtype, device=device)
    elif out.shape != (rows, cols) or out.dtype != out_dtype or out.device != device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype}[{rows}, {cols}] tensor on {device}")
    if rows == 0 or cols == 0:
        return out
    n_groups = scale.shape[1]
    codes_per_word, word_bytes = word_geometry(bits) if kernel == "words" else (1, 1)
    block_r, block_c = block or block_sizes(rows, cols, group_size, n_groups, codes_per_word)
    if block_c % codes_per_word:
        raise ValueError(f"BLOCK_C={block_c} is not a multiple of the {codes_per_word} codes of a word")
    scale = scale.to(device).contiguous()
    has_zero = isinstance(zero, torch.Tensor)
    zero_t = zero.to(device).contiguous() if has_zero else scale  # a placeholder pointer, never read
    constexprs = {
        "BITS": bits,
        "GROUP_SIZE": group_size if n_groups > 1 else 0,
        "ROW_GROUP": n_groups == 1 or group_size % block_c == 0,
        "SCALE_BF16": scale.dtype == torch.bfloat16,
        "HAS_ZERO": has_zero,
        "ZERO_POINT": 0 if has_zero else zero,
        "OUT_KIND": OUT_KINDS[out_dtype],
        "BLOCK_R": block_r,
        "BLOCK_C": block_c,
    }
    args = (
        packed.contiguous(),
        scale.view(torch.int16) if scale.dtype == torch.bfloat16 else scale,
        zero_t,
        out.view(torch.int16) if out_dtype == torch.bfloat16 else out,
        rows,
        cols,
        n_bytes,
        n_groups if scale.shape[0] > 1 else 0,
        n_groups if has_zero and zero_t.shape[0] > 1 else 0,
    )
    grid = (triton.cdiv(rows, block_r) * triton.cdiv(cols, block_c),)
    launch = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}  # nothing to fuse; keep it that way
    if kernel == "words":
        _dequant_words_kernel[grid](*args, CODES_PER_WORD=codes_per_word, WORD_BYTES=word_bytes, **constexprs, **launch)
    else:
        _dequant_generic_kernel[grid](*args, **constexprs, **launch)
    return out
