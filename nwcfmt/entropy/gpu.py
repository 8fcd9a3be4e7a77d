"""rANS streams decoded into device tensors: the Triton decoder for CUDA devices, the CPU decoder otherwise.

:func:`decode_on_device` takes the stream (``words``, ``lanes``) as tensors, so that only the compressed
bytes cross PCIe, and returns the ``uint16[n]`` symbols on the requested device, with exactly the symbols and
errors of :func:`nwcfmt.entropy.rans.decode`. triton is imported lazily, on the first CUDA decode:
``import nwcfmt`` and CPU decoding never import it.

The ``NWC_KERNELS`` environment variable (:func:`nwcfmt.kernels.kernel_mode`, read on every call) chooses:

* ``auto`` (default): Triton for CUDA devices. If triton does not import, or the kernel fails to compile or
  launch, a warning is logged once and the CPU decoder is used from then on (its symbols are then copied over).
* ``reference``: always the CPU decoder.
* ``triton``: Triton for CUDA devices, and an error instead of any fallback (CPU devices as with ``auto``).

A corrupt stream raises :class:`~nwcfmt.errors.FormatError` on every path; it is never a reason to fall back.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import numpy as np
import torch

from nwcfmt.entropy import rans
from nwcfmt.errors import FormatError
from nwcfmt.kernels import ENV_VAR, kernel_mode

__all__ = ["backend_for", "decode_on_device"]

log = logging.getLogger(__name__)
_triton_broken: str | None = None  # set once Triton failed in "auto" mode: later calls use the CPU decoder


@functools.cache
def _triton_module() -> ModuleType | str:
    """The Triton decoder module, or why it cannot be imported."""
    try:
        from nwcfmt.entropy import triton_rans
    except Exception as exc:  # ImportError, or a broken triton install
        return f"{type(exc).__name__}: {exc}"
    return triton_rans


def _disable_triton(reason: str) -> None:
    global _triton_broken
    if _triton_broken is None:
        log.warning("nwcfmt: Triton rANS decoding disabled, using the CPU decoder: %s", reason)
        _triton_broken = reason


def backend_for(device: torch.device | str) -> str:
    """``"triton"`` or ``"cpu"``: what :func:`decode_on_device` uses to decode for ``device``."""
    mode = kernel_mode()
    if torch.device(device).type != "cuda" or mode == "reference" or (mode == "auto" and _triton_broken):
        return "cpu"
    module = _triton_module()
    if isinstance(module, str):
        if mode == "triton":
            raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported ({module})")
        _disable_triton(f"triton cannot be imported ({module})")
        return "cpu"
    return "triton"


def _stream_numpy(words: torch.Tensor, lanes: torch.Tensor, where: str) -> rans.RansStream:
    """The stream's tensors as the numpy arrays of :class:`rans.RansStream` (uint16 words, uint32 lanes)."""
    words = words.detach().cpu()
    if words.dtype == torch.int16:
        words = words.view(torch.uint16)
    lanes = lanes.detach().cpu()
    if lanes.dtype == torch.int32:  # the bits of uint32 values
        lanes = lanes.view(torch.uint32)
    wide = lanes.to(torch.int64).numpy()
    if wide.size and (wide.min() < 0 or wide.max() >= 1 << 32):
        raise FormatError(f"{where}: a lane's start state or word count does not fit 32 bits")
    return rans.RansStream(words.numpy().reshape(-1), wide.astype(np.uint32))


def _check_dtypes(words: torch.Tensor, lanes: torch.Tensor) -> None:
    if words.dtype not in (torch.uint16, torch.int16):
        raise ValueError(f"stream words must be uint16 (or their int16 view), not {words.dtype}")
    if lanes.dtype not in (torch.uint32, torch.int32, torch.int64):
        raise ValueError(f"stream lanes must be uint32 (or their int32 view, or int64), not {lanes.dtype}")


def decode_on_device(
    stream_words: torch.Tensor,
    stream_lanes: torch.Tensor,
    freqs: np.ndarray,
    context: rans.Context,
    n: int,
    lane_symbols: int,
    device: torch.device | str,
    where: str = "stream",
) -> torch.Tensor:
    """Decode a stream into ``uint16[n]`` symbols on ``device``: the symbols and errors of :func:`rans.decode`.

    ``stream_words``: the stream's uint16 words (or their int16 view), ``[n_words]``; ``stream_lanes``: its
    ``[n_lanes, 2]`` lanes (start state, word count) as uint32 (or their int32 view) or int64. Both may live on
    any device; for a CUDA ``device`` they are moved there (a no-op when they already are) and decoded by the
    Triton kernel, and the frequency tables ``freqs`` (``uint16[T, K]``) and the context are copied over.
    """
    _check_dtypes(stream_words, stream_lanes)
    device = torch.device(device)
    if backend_for(device) == "triton":
        module = _triton_module()
        assert not isinstance(module, str)
        words, lanes = stream_words.to(device), stream_lanes.to(device)
        reason = module.unsupported_reason(words, lanes, np.shape(freqs), n, lane_symbols)
        if reason is None:
            args = (words, lanes, freqs, context, n, lane_symbols, where)
            if kernel_mode() == "triton":
                return module.decode_stream(*args)
            try:
                return module.decode_stream(*args)
            except (FormatError, torch.cuda.OutOfMemoryError):
                raise
            except Exception as exc:  # a compiler or driver problem: degrade to the CPU decoder, once
                _disable_triton(f"{type(exc).__name__}: {exc}")
        elif kernel_mode() == "triton":
            raise ValueError(f"{ENV_VAR}=triton but the Triton rANS decoder does not support {reason}")
        else:
            log.debug("nwcfmt: CPU rANS decoding (%s)", reason)
    stream = _stream_numpy(stream_words, stream_lanes, where)
    return torch.from_numpy(rans.decode(stream, freqs, context, n, lane_symbols, where)).to(device)
