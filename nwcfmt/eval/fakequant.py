"""Reference round-to-nearest (RTN) fake quantization: an independent check of quantizing codecs.

The benchmarks compare the perplexity of an NWC folder with this module applied to the original weights;
the two must agree when a codec implements the same rule. The rule, per group of ``group_size`` consecutive
input columns of a ``[out, in]`` weight (the last group of a row is shorter when ``in`` is not a multiple;
``group_size=None`` means one group per row), with ``qmax = 2**bits - 1``:

* asymmetric (default): ``lo = min(w)``, ``hi = max(w)`` over the group, ``scale = (hi - lo) / qmax`` (then
  rounded to ``scale_dtype``), integer zero point ``zero = clamp(round(-lo / scale), 0, qmax)``,
  ``code = clamp(round(w / scale) + zero, 0, qmax)``, ``w_hat = (code - zero) * scale``;
* symmetric: ``scale = max|w| / (2**(bits-1) - 1)`` (rounded to ``scale_dtype``),
  ``code = clamp(round(w / scale), -2**(bits-1), 2**(bits-1) - 1)``, ``w_hat = code * scale``.

A constant group's range is widened to include 0 (so a constant comes back exactly up to the rounding of
its scale); a scale that is 0 (all-zero group, or underflow in ``scale_dtype``) is replaced by 1. Rounding
is ``torch.round`` (half to even). Everything is computed in fp32; ``w_hat`` is written back in the weight's dtype.

:func:`fake_quantize_linear_weights` applies it to every ``nn.Linear`` weight of a model except the output
embedding (``lm_head``) and any weight tied to another parameter: on SmolLM2 (tied ``lm_head``) that is
every Linear of the decoder layers, the project's RTN yardstick. With the default fp32 scales it gives
29.378 (4-bit g128) and 94.597 (3-bit g128) on the first 8 windows (``shared/DATA.md``: 29.38, 94.6);
scales rounded to fp16 give 29.330 and 94.661.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch

__all__ = ["fake_quantize", "fake_quantize_linear_weights", "quantizable_linears"]


def _quantize_groups(w: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    """Fake-quantize ``w`` of shape ``[rows, groups, size]`` group-wise along the last dimension."""
    if symmetric:
        qpos = 2 ** (bits - 1) - 1
        scale = (w.abs().amax(dim=-1, keepdim=True) / qpos).to(scale_dtype).float()
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return torch.clamp(torch.round(w / scale), -qpos - 1, qpos) * scale
    qmax = 2**bits - 1
    lo = w.amin(dim=-1, keepdim=True)
    hi = w.amax(dim=-1, keepdim=True)
    flat = hi == lo  # a constant group: widen its range to include 0 so that it comes back exactly
    lo, hi = torch.where(flat, lo.clamp(max=0), lo), torch.where(flat, hi.clamp(min=0), hi)
    scale = ((hi - lo) / qmax).to(scale_dtype).float()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    code = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
    return (code - zero) * scale


def fake_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int | None = 128,
    *,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Quantize-dequantize a 2-D ``[out, in]`` weight group-wise along ``in`` (see the module docstring)."""
    if weight.dim() != 2:
        raise ValueError(f"fake_quantize expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}")
    if not 1 <= bits <= 16 or (symmetric and bits < 2):
        raise ValueError(f"bits must be in 1..16 (2..16 when symmetric), not {bits}")
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be positive or None, not {group_size}")
    w = weight.detach().float()
    rows, cols = w.shape
    size = cols if group_size is None else min(group_size, cols)
    full = cols - cols % size
    parts = []
    if full:
        parts.append(_quantize_groups(w[:, :full].reshape(rows, full // size, size), bits, symmetric, scale_dtype))
        parts[-1] = parts[-1].reshape(rows, full)
    if full < cols:  # the shorter last group of each row
        parts.append(_quantize_groups(w[:, full:].reshape(rows, 1, cols - full), bits, symmetric, scale_dtype)[:, 0])
    return torch.cat(parts, dim=1).to(weight.dtype)


def quantizable_linears(model: torch.nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` modules whose weight the reference quantizes.

    Left out: the output embedding (``model.get_output_embeddings()``, i.e. ``lm_head``), any Linear whose
    weight is tied to another parameter, and names matching a glob in ``exclude``.
    """
    patterns = list(exclude)
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    get_out = getattr(model, "get_output_embeddings", None)
    output = get_out() if callable(get_out) else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if counts.get(id(module.weight), 0) > 1 or any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        names.append(name)
    return names


def fake_quantize_linear_weights(
    model: torch.nn.Module,
    bits: int,
    group_size: int | None = 128,
    symmetric: bool = False,
    scale_dtype: torch.dtype = torch.float32,
    *,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Replace, in place, each weight of :func:`quantizable_linears` by its :func:`fake_quantize` value.

    Returns the names of the Linear modules changed.
    """
    names = quantizable_linears(model, exclude)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            weight.copy_(fake_quantize(weight, bits, group_size, symmetric=symmetric, scale_dtype=scale_dtype))
    return names
