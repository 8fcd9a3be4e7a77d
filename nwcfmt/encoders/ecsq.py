"""Entropy-coded scalar quantization (ECSQ) of row-normalised weights, data-free.

Each row is divided by its RMS (stored as the row scale), one uniform step quantizes the whole tensor
(``q = round(y / step)``), and every symbol reconstructs at the centroid of its cell (the mean of the
normalised weights that fell in it), which is what makes ECSQ 0.25 bit from the Shannon bound on Gaussian
sources at >= 2 bits instead of losing ~0.4 dB at midpoints. Finally each row scale is refit by least squares
against the reconstruction (``refit``). The step is the rate knob.

Calibrated (:func:`ldlq_quantize`): with the Hessian ``H`` of the layer's input, columns get importance levels
(:func:`importance_levels`), each level its own step (equal-slope allocation, :func:`level_steps`), and the
columns are rounded one by one with LDLQ error feedback (:mod:`nwcfmt.encoders.ldlq`); the reconstruction
values are fixed before the sweep (centroids of a feedback-free pass) so that the feedback sees exactly what a
decoder rebuilds, and row scales are refit in the ``H`` metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def stored(values: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Values as the file holds them (rounded to the scale dtype), back in fp32."""
    return values.to(SCALE_DTYPES[scale_dtype]).to(torch.float32)


def row_rms(weight: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Per-row RMS as stored; rows of zeros get scale 1 (their latents are all 0)."""
    rms = weight.pow(2).mean(dim=1).sqrt()
    return stored(torch.where(rms > 0, rms, torch.ones_like(rms)), scale_dtype)


LEVEL_FRACTIONS = (0.10, 0.01, 0.001)  # the most important columns at level >= 1, 2, 3 (NWC's split)
STEP_GAIN_MIN = 1 / 16  # a level's step is at least this fraction of level 0's
CLAMP_CELLS = 4  # LDLQ may push a target past the feedback-free range: this many extra cells each side


@dataclass
class EcsqResult:
    symbols: np.ndarray  # int64 [rows * cols], alphabet indices, row-major
    recon: torch.Tensor  # fp32 [n_levels, alphabet]: a symbol's value in row-scale units, per level
    scale: torch.Tensor  # fp32 [rows], as stored
    cols: int
    levels: np.ndarray | None = None  # uint8 [cols] when there is more than one level

    @property
    def values(self) -> torch.Tensor:
        """The decoded weights in row-scale units ``[rows, cols]`` (before the row scale)."""
        alphabet = self.recon.shape[1]
        sym = torch.from_numpy(self.symbols).view(-1, self.cols)
        if self.levels is not None:
            sym = sym + torch.from_numpy(self.levels.astype(np.int64))[None, :] * alphabet
        return self.recon.reshape(-1)[sym]


def latents(normalised: torch.Tensor, step: float) -> tuple[torch.Tensor, int, int]:
    """``round(y / step)`` as int64, with its minimum and the alphabet size."""
    q = torch.round(normalised / step).to(torch.int64)
    q_min, q_max = int(q.min()), int(q.max())
    return q, q_min, q_max - q_min + 1


def refit_scales(weight: torch.Tensor, decoded: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-row least-squares scales of ``decoded`` (in row-scale units) against ``weight``; rows whose
    reconstruction is all zero keep ``scale``."""
    vv = (decoded * decoded).sum(dim=1)
    return torch.where(vv > 0, (weight * decoded).sum(dim=1) / vv.clamp(min=1e-30), scale)


def quantize(
    weight: torch.Tensor,
    normalised: torch.Tensor,
    step: float,
    scale_dtype: str,
    centroids: bool,
    scale: torch.Tensor,
    refit: bool = True,
):
    """ECSQ of ``weight`` ``[rows, cols]`` (``normalised`` = weight / ``scale``, the stored row scales) at
    ``step``; with ``refit`` the row scales are refit by least squares against the reconstruction."""
    q, q_min, alphabet = latents(normalised, step)
    symbols = (q - q_min).reshape(-1)
    midpoints = (torch.arange(alphabet, dtype=torch.float64) + q_min) * step
    if centroids:
        counts = torch.bincount(symbols, minlength=alphabet).to(torch.float64)
        sums = torch.bincount(symbols, weights=normalised.reshape(-1).to(torch.float64), minlength=alphabet)
        recon = torch.where(counts > 0, sums / counts.clamp(min=1), midpoints)
    else:
        recon = midpoints
    recon = recon.to(torch.float32)
    if refit:
        scale = stored(refit_scales(weight, recon[symbols].view_as(weight), scale), scale_dtype)
    return EcsqResult(symbols.numpy(), recon[None], scale, weight.shape[1])


# ------------------------------------------------------------------------------------------------ calibrated
def importance_levels(importance: torch.Tensor, n_levels: int) -> torch.Tensor:
    """Per-column level (int64 ``[cols]``): the top :data:`LEVEL_FRACTIONS` of columns by ``importance`` get
    levels 1, 2, 3 (as many as ``n_levels`` allows); ties broken by column index."""
    cols = importance.numel()
    levels = torch.zeros(cols, dtype=torch.int64)
    order = torch.argsort(importance.to(torch.float64), descending=True, stable=True)
    for fraction in LEVEL_FRACTIONS[: n_levels - 1]:
        levels[order[: math.ceil(fraction * cols)]] += 1
    return levels


@dataclass(frozen=True)
class ColumnPlan:
    """What a calibrated latent encoder derives from ``H`` before any rounding: the feedback's column
    ``order``, its Cholesky factor ``upper`` (None without feedback), each column's ``importance`` and level."""

    order: torch.Tensor
    upper: torch.Tensor | None
    importance: torch.Tensor
    levels: torch.Tensor


def column_plan(hessian: torch.Tensor, options) -> ColumnPlan:
    """The :class:`ColumnPlan` of ``hessian`` for calibrated ``options`` (``act_order``, ``feedback``,
    ``percdamp``, ``importance``, ``levels``), shared by ``ecsq`` and ``neural``."""
    from nwcfmt.encoders.ldlq import column_importance, column_order, ordered_upper

    order = column_order(hessian, options.act_order)
    upper = ordered_upper(hessian, order, options.percdamp) if options.feedback else None
    importance = column_importance(hessian, order, options, upper)
    return ColumnPlan(order, upper, importance, importance_levels(importance, options.levels))


def level_steps(importance: torch.Tensor, levels: torch.Tensor, n_levels: int, step: float) -> torch.Tensor:
    """Each level's step (fp64 ``[n_levels]``): equal-slope allocation, ``step * sqrt(I_0 / I_l)`` with
    ``I_l`` the mean importance of the level's columns (high-rate ECSQ: a column weighted ``I`` wants a step
    ``~ 1/sqrt(I)``), never below :data:`STEP_GAIN_MIN` of ``step`` nor above it."""
    imp = importance.to(torch.float64)
    base = float(imp[levels == 0].mean()) if bool((levels == 0).any()) else float(imp.mean())
    gains = torch.ones(n_levels, dtype=torch.float64)
    for lv in range(1, n_levels):
        member = levels == lv
        if bool(member.any()) and base > 0:
            gains[lv] = math.sqrt(base / float(imp[member].mean()))
    return step * gains.clamp(STEP_GAIN_MIN, 1.0)


def _recon_tables(normalised: torch.Tensor, col_steps: torch.Tensor, levels: torch.Tensor, steps: torch.Tensor,
                  centroids: bool, lo: int, hi: int) -> torch.Tensor:  # fmt: skip
    """fp64 ``[n_levels, hi - lo + 1]``: the value of latent ``lo + k`` at each level, the centroid of the
    weights that round to it without feedback (midpoint where none does, or with ``centroids=False``)."""
    n_levels, width = steps.numel(), hi - lo + 1
    grid = torch.arange(lo, hi + 1, dtype=torch.float64)
    recon = grid[None, :] * steps[:, None]
    if not centroids:
        return recon
    q = torch.round(normalised / col_steps[None, :]).to(torch.int64) - lo
    cell = (levels[None, :] * width + q).reshape(-1)
    counts = torch.bincount(cell, minlength=n_levels * width).to(torch.float64).view(n_levels, width)
    sums = torch.bincount(cell, weights=normalised.reshape(-1).to(torch.float64), minlength=n_levels * width)
    return torch.where(counts > 0, sums.view(n_levels, width) / counts.clamp(min=1), recon)


def hessian_refit(
    weight: torch.Tensor, values: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Per-row scales minimising ``(w - s v) H (w - s v)^T`` (the layer-output error); rows whose
    ``v H v^T`` vanishes keep ``scale``."""
    h = hessian.to(torch.float64)
    v, w = values.to(torch.float64), weight.to(torch.float64)
    vh = v @ h
    vv = (vh * v).sum(dim=1)
    fit = (vh * w).sum(dim=1) / vv.clamp(min=1e-300)
    return torch.where(vv > 0, fit, scale.to(torch.float64)).to(torch.float32)


def ldlq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    step: float,
    levels: torch.Tensor,
    steps_of: Callable[[float], torch.Tensor],
    scale_dtype: str,
    *,
    centroids: bool = True,
    refit: bool = True,
    feedback: bool = True,
    order: torch.Tensor | None = None,
    group: int = 1,
    percdamp: float = 0.01,
    upper: torch.Tensor | None = None,
) -> EcsqResult:
    """Calibrated ECSQ of ``weight`` ``[rows, cols]`` at ``step``: ``steps_of(step)`` gives each level's step,
    ``levels`` each column's level; ``scale`` the stored row scales (``weight / scale`` is coded). With
    ``feedback`` the columns are rounded by LDLQ through ``hessian`` (else each to its nearest latent); ``upper``
    is the feedback's factor (:func:`nwcfmt.encoders.ldlq.ordered_upper`) when the caller has it."""
    from nwcfmt.encoders.ldlq import ldlq

    normalised = weight / scale[:, None]
    steps = steps_of(step).to(torch.float64)
    n_levels = steps.numel()
    col_steps = steps[levels].to(torch.float32)
    q0 = torch.round(normalised / col_steps[None, :])
    lo, hi = int(q0.min()) - CLAMP_CELLS, int(q0.max()) + CLAMP_CELLS
    recon = _recon_tables(normalised, col_steps, levels, steps, centroids, lo, hi).to(torch.float32)
    rows, cols = normalised.shape
    q = torch.empty(rows, cols, dtype=torch.int64)

    def quantize_columns(js: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        k = torch.round(targets / col_steps[js][:, None]).clamp(lo, hi).to(torch.int64) - lo
        q[:, js] = k.T
        return recon[levels[js][:, None], k]

    if feedback:
        ldlq(normalised, hessian, quantize_columns, order=order, group=group, percdamp=percdamp, upper=upper)
    else:
        quantize_columns(torch.arange(cols), normalised.T)
    used_lo, used_hi = int(q.min()), int(q.max())
    recon = recon[:, used_lo : used_hi + 1].contiguous()
    symbols = (q - used_lo).reshape(-1).numpy()
    lv = levels.to(torch.uint8).numpy() if n_levels > 1 else None
    result = EcsqResult(symbols, recon, scale, cols, lv)
    if refit:
        result.scale = stored(hessian_refit(weight, result.values, hessian, scale), scale_dtype)
    return result
