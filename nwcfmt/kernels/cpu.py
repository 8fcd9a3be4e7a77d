"""Native CPU dequantization (optional C kernel), bit-identical to the torch reference.

Used for CPU decodes when the extension was built at install and ``NWC_NATIVE`` is not ``0``; row blocks run on
the worker threads (``nwcfmt.parallel``) with the GIL released.
"""

from __future__ import annotations

import math
import os

import torch

from nwcfmt.parallel import num_threads, parallel_map

try:
    from nwcfmt.kernels import _cpu_native
except ImportError:  # pragma: no cover - installs without a C compiler
    _cpu_native = None

OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available(out_dtype: torch.dtype) -> bool:
    """Built, enabled (``NWC_NATIVE`` is not 0 and ``NWC_KERNELS`` is not ``reference``) and for this dtype."""
    enabled = os.environ.get("NWC_NATIVE", "1") != "0" and os.environ.get("NWC_KERNELS", "auto") != "reference"
    return _cpu_native is not None and out_dtype in OUT_KINDS and enabled


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | int,
    bits: int,
    group_size: int,
    cols: int,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as :func:`nwcfmt.kernels.reference.dequantize_packed`, for CPU tensors.

    ``out`` (a contiguous ``[rows, cols]`` tensor of ``out_dtype``) is written instead of a new tensor.
    """
    rows = packed.shape[0]
    if out is None:
        out = torch.empty(rows, cols, dtype=out_dtype)
    elif out.shape != (rows, cols) or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape {(rows, cols)}")
    out_buf = out.view(torch.int16 if out_dtype != torch.float32 else torch.float32).numpy()
    packed_buf = packed.contiguous().numpy()
    scale_f32 = scale.to(torch.float32).contiguous()
    scale_rows, n_groups = scale_f32.shape
    scale_buf = scale_f32.numpy()
    zero_buf = zero.contiguous().numpy() if isinstance(zero, torch.Tensor) else b""
    implicit = 0 if isinstance(zero, torch.Tensor) else int(zero)
    kind = OUT_KINDS[out_dtype]
    step = max(1, math.ceil(rows / (4 * num_threads())))

    def run(row0: int) -> None:
        row1 = min(row0 + step, rows)
        _cpu_native.dequantize(
            out_buf,
            packed_buf,
            scale_buf,
            zero_buf,
            bits,
            group_size,
            cols,
            row0,
            row1,
            scale_rows,
            n_groups,
            implicit,
            kind,
        )

    parallel_map(run, range(0, rows, step))
    return out
