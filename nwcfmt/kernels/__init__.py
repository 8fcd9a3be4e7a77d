"""Dequantization kernels: a torch reference (the test oracle), a native CPU kernel and Triton kernels for CUDA.

:func:`dequantize_packed` runs the Triton kernels (:mod:`nwcfmt.kernels.triton_dequant`) when the packed codes
are on a CUDA device and triton imports, the native CPU kernel (:mod:`nwcfmt.kernels.cpu`, an optional C
extension; ``NWC_NATIVE=0`` turns it off) for CPU tensors when it was built, and the torch reference
otherwise; all give the same bits. triton is
imported lazily, on the first CUDA call: ``import nwcfmt`` never imports it.

The environment variable ``NWC_KERNELS`` (read on every call) chooses:

* ``auto`` (default): Triton for CUDA tensors where possible. If triton does not import, or a kernel fails to
  compile or launch, a warning is logged once and the reference is used from then on.
* ``reference``: always the torch reference (the native CPU kernel too is off).
* ``triton``: Triton for CUDA tensors, and an error instead of any fallback (CPU tensors as with ``auto``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from types import ModuleType

import torch

from nwcfmt.kernels import cpu, reference
from nwcfmt.kernels.reference import dequantize, pack_codes, row_bytes, unpack_codes

__all__ = [
    "backend_for",
    "dequantize",
    "dequantize_packed",
    "kernel_mode",
    "pack_codes",
    "row_bytes",
    "scatter_kept",
    "unpack_codes",
]

ENV_VAR = "NWC_KERNELS"
MODES = ("auto", "reference", "triton")
log = logging.getLogger(__name__)
_triton_broken: str | None = None  # set once Triton failed in "auto" mode: later calls use the reference


def kernel_mode() -> str:
    """The ``NWC_KERNELS`` setting: ``auto`` (default), ``reference`` or ``triton``."""
    mode = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {', '.join(MODES)}")
    return mode


@functools.cache
def _triton_module() -> ModuleType | str:
    """The Triton kernel module, or why it cannot be imported."""
    try:
        from nwcfmt.kernels import triton_dequant
    except Exception as exc:  # ImportError, or a broken triton install
        return f"{type(exc).__name__}: {exc}"
    return triton_dequant


@functools.cache
def _scatter_module() -> ModuleType | str:
    """The Triton scatter kernel module, or why it cannot be imported."""
    try:
        from nwcfmt.kernels import triton_scatter
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return triton_scatter


def backend_for(device: torch.device | str) -> str:
    """``"triton"`` or ``"reference"``: what :func:`dequantize_packed` uses for tensors on ``device``."""
    mode = kernel_mode()
    if torch.device(device).type != "cuda" or mode == "reference" or (mode == "auto" and _triton_broken):
        return "reference"
    module = _triton_module()
    if isinstance(module, str):
        if mode == "triton":
            raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported ({module})")
        _disable_triton(f"triton cannot be imported ({module})")
        return "reference"
    return "triton"


def _disable_triton(reason: str) -> None:
    global _triton_broken
    if _triton_broken is None:
        log.warning("nwcfmt: Triton dequantization disabled, using the torch reference: %s", reason)
        _triton_broken = reason


def _run_triton(kernel: Callable[[], torch.Tensor], reason: str | None, what: str) -> torch.Tensor | None:
    """Run a Triton kernel under the ``NWC_KERNELS`` rules (module docstring): its result, or None when the
    caller should use the reference (the kernel does not take these arguments, ``reason``; or it failed in
    ``auto`` mode, which turns Triton off for the rest of the process)."""
    if reason is None:
        if kernel_mode() == "triton":
            return kernel()
        try:
            return kernel()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # a compiler or driver problem: degrade to the reference, once
            _disable_triton(f"{type(exc).__name__}: {exc}")
            return None
    if kernel_mode() == "triton":
        raise ValueError(f"{ENV_VAR}=triton but the Triton {what} does not support {reason}")
    log.debug("nwcfmt: torch reference %s (%s)", what, reason)
    return None


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | int,
    bits: int,
    group_size: int,
    cols: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``[rows, row_bytes]`` packed codes -> ``[rows, cols]`` ``(code - zero) * scale`` in ``out_dtype``.

    Same contract and bits as :func:`nwcfmt.kernels.reference.dequantize_packed`; see the module docstring for
    which implementation runs.
    """
    if backend_for(packed.device) == "triton":
        kernels = _triton_module()
        assert not isinstance(kernels, str)
        args = (packed, scale, zero, bits, group_size, cols, out_dtype)
        out = _run_triton(lambda: kernels.dequantize_packed(*args), kernels.unsupported_reason(*args), "kernels")
        if out is not None:
            return out
    if packed.device.type == "cpu" and cpu.available(out_dtype):  # the optional native CPU kernel, same bits
        return cpu.dequantize_packed(packed, scale, zero, bits, group_size, cols, out_dtype)
    return reference.dequantize_packed(packed, scale, zero, bits, group_size, cols, out_dtype)


def scatter_kept(keep: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype, nnz: int) -> torch.Tensor:
    """A sparse record's dense values: ``values[:nnz]`` where the flat bool ``keep`` is set, +0 elsewhere.

    Same contract and bits as :func:`nwcfmt.kernels.reference.scatter_kept`; the Triton kernel
    (:mod:`nwcfmt.kernels.triton_scatter`) runs for CUDA tensors under the rules of the module docstring.
    """
    values = values.reshape(-1)
    if backend_for(keep.device) == "triton":
        module = _scatter_module()
        args = (keep, values.to(out_dtype), out_dtype)
        reason = module if isinstance(module, str) else module.unsupported_reason(*args)
        out = _run_triton(lambda: module.scatter_kept(*args, nnz), reason, "scatter kernel")  # type: ignore[union-attr]
        if out is not None:
            return out
    return reference.scatter_kept(keep, values, out_dtype, nnz)
