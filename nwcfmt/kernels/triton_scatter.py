"""Triton kernel: scatter the kept values of a sparse record into the dense tensor, bit for bit as the reference.

Inputs are flat: ``keep`` (uint8 0/1, one per element, row-major), ``values`` (the kept values in row-major order,
already in the output dtype) and ``offsets`` (int64, per program: how many elements the earlier programs keep,
an exclusive prefix sum computed with torch). Each program takes :data:`BLOCK` elements, numbers its kept
elements with a prefix sum of ``keep``, gathers their values and writes zeros elsewhere. Values move as integer
bit patterns (int16 for bf16/fp16, int32 for fp32), so no float conversion can change a bit: the output equals
:func:`nwcfmt.kernels.reference.scatter_kept` exactly, NaN payloads and signed zeros included. Every load and
store is masked (the interpreter does not detect out-of-bounds accesses).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # elements per program
BIT_VIEWS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@triton.jit
def _scatter_kernel(keep_ptr, offsets_ptr, values_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = idx < n
    kept = tl.load(keep_ptr + idx, mask=inside, other=0).to(tl.int32)
    base = tl.load(offsets_ptr + pid)
    slot = base + (tl.cumsum(kept, axis=0) - kept).to(tl.int64)  # the element's index among the kept ones
    take = inside & (kept != 0)
    value = tl.load(values_ptr + slot, mask=take, other=0)
    value = tl.where(take, value, tl.zeros_like(value))
    tl.store(out_ptr + idx, value, mask=inside)


def unsupported_reason(keep: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype) -> str | None:
    """Why the kernel does not take these arguments (the dispatcher then uses the reference), or None."""
    if out_dtype not in BIT_VIEWS:
        return f"output dtype {out_dtype}"
    if keep.dtype not in (torch.bool, torch.uint8) or keep.dim() != 1:
        return f"keep {keep.dtype}{list(keep.shape)} (expected 1-D bool or uint8)"
    if values.dim() != 1 or values.dtype != out_dtype:
        return f"values {values.dtype}{list(values.shape)} (expected 1-D {out_dtype})"
    if keep.device != values.device:
        return "keep and values on different devices"
    return None


def scatter_kept(keep: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype, nnz: int) -> torch.Tensor:
    """``[n]`` dense tensor: ``values[:nnz]`` where ``keep``, in order, and +0 elsewhere (on ``keep``'s device)."""
    n = keep.numel()
    out = torch.empty(n, dtype=out_dtype, device=keep.device)
    if n == 0:
        return out
    keep_u8 = keep.to(torch.uint8).contiguous()
    blocks = triton.cdiv(n, BLOCK)
    padded = torch.nn.functional.pad(keep_u8, (0, blocks * BLOCK - n))
    counts = padded.view(blocks, BLOCK).sum(1, dtype=torch.int64)
    offsets = torch.cumsum(counts, 0) - counts
    view = BIT_VIEWS[out_dtype]
    src = values[:nnz].contiguous()
    if src.numel() == 0:  # nothing kept: any valid pointer will do, no load is unmasked
        src = torch.zeros(1, dtype=out_dtype, device=keep.device)
    _scatter_kernel[(blocks,)](keep_u8, offsets, src.view(view), out.view(view), n, BLOCK=BLOCK)
    return out
