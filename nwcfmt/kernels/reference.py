"""Torch reference of the integer-code layout: packing, unpacking and dequantization.

This is the CPU decode path and the oracle every accelerated kernel is tested against, bit for bit.

Layout (``spec/codecs/quant.md``): each row of a ``[rows, cols]`` code matrix is an LSB-first bitstream of
``bits``-bit codes, ``row_bytes = ceil(cols * bits / 8)`` bytes, rows back to back. Code ``i`` of a row holds
bits ``[i * bits, (i + 1) * bits)`` of the stream, and stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``
(4-bit: low nibble first; 3-bit: 8 codes in 3 bytes). Dequantization is ``(code - zero) * scale`` in fp32,
rounded to nearest even into the output dtype.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def row_bytes(cols: int, bits: int) -> int:
    return math.ceil(cols * bits / 8)


def _word_geometry(bits: int) -> tuple[int, int]:
    """(bytes, codes) of the smallest whole group: lcm(bits, 8) bits."""
    lcm = math.lcm(bits, 8)
    return lcm // 8, lcm // bits


def _word_dtype(group_bytes: int) -> torch.dtype:
    return torch.int32 if group_bytes <= 3 else torch.int64


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, cols]`` codes (integers in ``[0, 2**bits)``) -> ``[rows, row_bytes]`` uint8."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be in {SUPPORTED_BITS}")
    rows, cols = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must be in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    group_bytes, group_codes = _word_geometry(bits)
    n_groups = math.ceil(cols / group_codes)
    wide = _word_dtype(group_bytes)
    padded = torch.zeros(rows, n_groups * group_codes, dtype=wide, device=codes.device)
    padded[:, :cols] = codes.to(wide)
    padded = padded.view(rows, n_groups, group_codes)
    word = torch.zeros(rows, n_groups, dtype=wide, device=codes.device)
    for k in range(group_codes):
        word |= padded[:, :, k] << (k * bits)
    out = torch.stack([((word >> (8 * j)) & 0xFF).to(torch.uint8) for j in range(group_bytes)], dim=-1)
    return out.view(rows, n_groups * group_bytes)[:, : row_bytes(cols, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """``[rows, row_bytes]`` uint8 -> ``[rows, cols]`` codes as uint8 (on the packed tensor's device)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be in {SUPPORTED_BITS}")
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :cols]
    group_bytes, group_codes = _word_geometry(bits)
    n_groups = math.ceil(cols / group_codes)
    pad = n_groups * group_bytes - packed.shape[1]
    if pad:
        packed = torch.nn.functional.pad(packed, (0, pad))
    grouped = packed.view(rows, n_groups, group_bytes)
    if group_bytes == 1:
        word = grouped[:, :, 0]
        mask = (1 << bits) - 1
        parts = [(word >> (k * bits)) & mask for k in range(group_codes)]
    else:
        wide = _word_dtype(group_bytes)
        word = grouped[:, :, 0].to(wide)
        for j in range(1, group_bytes):
            word |= grouped[:, :, j].to(wide) << (8 * j)
        mask = (1 << bits) - 1
        parts = [((word >> (k * bits)) & mask).to(torch.uint8) for k in range(group_codes)]
    return torch.stack(parts, dim=-1).view(rows, n_groups * group_codes)[:, :cols]


def expand_groups(values: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """Per-group values ``[rows or 1, n_groups]`` broadcast to ``[rows, cols]`` (a view where possible)."""
    if values.shape[1] == 1:
        return values
    return values.repeat_interleave(group_size, dim=1)[:, :cols]


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | int,
    group_size: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(code - zero) * scale`` in fp32, rounded to nearest even into ``out_dtype``.

    ``scale`` and ``zero`` (a tensor of per-group integers, or one integer) are ``[rows or 1, n_groups]``.
    """
    rows, cols = codes.shape
    n_groups = scale.shape[1]
    if n_groups > 1 and cols % group_size == 0:  # groups tile the row: broadcast without copies
        c = codes.view(rows, n_groups, group_size).to(torch.float32)
        z = zero if isinstance(zero, int) else zero.to(torch.float32).unsqueeze(-1)
        w = (c - z) * scale.to(torch.float32).unsqueeze(-1)
        return w.view(rows, cols).to(out_dtype)
    z = zero if isinstance(zero, int) else expand_groups(zero.to(torch.float32), cols, group_size)
    s = expand_groups(scale.to(torch.float32), cols, group_size)
    return ((codes.to(torch.float32) - z) * s).to(out_dtype)


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | int,
    bits: int,
    group_size: int,
    cols: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Unpack and dequantize in one call (the reference for the fused kernels)."""
    return dequantize(unpack_codes(packed, bits, cols), scale, zero, group_size, out_dtype)


def scatter_kept(keep: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype, nnz: int) -> torch.Tensor:
    """``[n]`` dense tensor of a sparse record: ``values[:nnz]`` (in order) where the flat bool ``keep`` is set,
    +0 elsewhere, on ``keep``'s device. Values are copied, never converted, when they are in ``out_dtype``."""
    out = torch.zeros(keep.numel(), dtype=out_dtype, device=keep.device)
    return out.masked_scatter_(keep.bool(), values.reshape(-1)[:nnz].to(out_dtype))
