"""A differentiable estimate of the coded rate of rounded latents: the entropy of a soft histogram.

The rANS tables are built from each tensor's empirical counts (one table per importance level), so the coded
rate of ``q = round(y)`` is close to the empirical entropy of ``q`` given the level. During training ``y`` is
replaced by ``y + u`` with ``u ~ U(-1/2, 1/2)``, in expectation: ``P(round(y + u) = k)`` is the triangle kernel
``max(0, 1 - |y - k|)``, so each value spreads a unit of mass over its two neighbouring integers, linearly. The
entropy of that histogram is differentiable in ``y``; its gradient moves a value towards the more probable of
the two integers it lies between, which is what rate-distortion optimised rounding needs.
"""

from __future__ import annotations

import torch

_TINY = 1e-12


def _entropy_bits(y: torch.Tensor, levels: torch.Tensor, n_levels: int, soft: bool) -> torch.Tensor:
    groups = y.shape[0]
    flat = y.reshape(groups, -1)
    lv = levels.reshape(groups, -1, 1).expand(groups, -1, y.shape[-1]).reshape(groups, -1)
    lo = torch.floor(flat.detach()) if soft else torch.round(flat.detach())
    base = lo.amin(dim=1, keepdim=True)
    width = int((lo.amax(dim=1, keepdim=True) - base).max().item()) + 2
    row = torch.arange(groups, device=y.device).reshape(-1, 1) * n_levels + lv
    idx = (row * width + (lo - base).long()).reshape(-1)
    hist = torch.zeros(groups * n_levels * width, dtype=y.dtype, device=y.device)
    if soft:
        frac = (flat - lo).reshape(-1)
        hist = hist.index_add(0, idx, 1 - frac).index_add(0, idx + 1, frac)
    else:
        hist = hist.index_add(0, idx, torch.ones_like(idx, dtype=y.dtype))
    hist = hist.reshape(groups, n_levels, width)
    count = hist.sum(dim=2, keepdim=True).detach()
    p = hist / count.clamp_min(1)
    h_level = -(p * torch.log2(p.clamp_min(_TINY))).sum(dim=2)  # [groups, n_levels]
    return (h_level * count.squeeze(2)).sum(dim=1) / flat.shape[1]


def soft_rate(y: torch.Tensor, levels: torch.Tensor, n_levels: int) -> torch.Tensor:
    """Bits per value of each group ``[G]`` for latents ``y`` ``[G, n, 16]`` with chunk levels ``[G, n]``:
    the level-conditional entropy of the triangle-kernel histogram (differentiable)."""
    return _entropy_bits(y, levels, n_levels, soft=True)


@torch.no_grad()
def hard_rate(y: torch.Tensor, levels: torch.Tensor, n_levels: int) -> torch.Tensor:
    """Bits per value of each group: the level-conditional empirical entropy of ``round(y)``."""
    return _entropy_bits(y, levels, n_levels, soft=False)
