"""Pruning: which weights a sparse record keeps (and, for SparseGPT, what the kept ones become).

Masks are bool ``[rows, cols]``, ``True`` where a weight is kept. Unstructured sparsity ``s`` prunes
``floor(s * n)`` weights of each ranking unit; ``N:M`` keeps the ``N`` best of every ``M`` consecutive weights of
a row. Ties are broken by position (stable sorts), so masks are deterministic.

* :func:`magnitude_mask`: ``|W|`` ranked over the whole tensor (one-shot magnitude pruning per layer);
  :func:`global_threshold` + :func:`threshold_mask`: one threshold over every pruned tensor of the model.
* :func:`random_mask`: a uniformly random mask (the floor any method must beat), seeded per tensor.
* :func:`wanda_mask`: Wanda's score ``|W_ij| * ||X_j||`` (``sqrt(diag H)``, the same ranking), ranked within each
  output row (Sun et al., 2023).
* :func:`sparsegpt`: SparseGPT (Frantar and Alistarh, 2023): the GPTQ sweep over the columns with the upper
  Cholesky factor of the damped ``H^-1``, lazy updates in blocks of 128 columns, the mask of each block chosen
  at its start from ``w^2 / [H^-1]_jj^2`` (unstructured: over the block's whole ``[rows, 128]`` slice; N:M: per
  group, when the sweep reaches it), pruned weights' errors spread over the columns not yet visited. With a
  fixed mask and a quantization grid it prunes and quantizes jointly (zero as the pruned weights' grid point).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from nwcfmt.calibration.hessian import damped_inverse_cholesky
from nwcfmt.codecs.mask import Pattern
from nwcfmt.errors import EncodeError

DEFAULT_BLOCK = 128
UNSTRUCTURED = Pattern()  # SparseGPT's lazy-update block (and unstructured mask-selection block)


def tensor_seed(name: str, seed: int) -> int:
    """A per-tensor seed from the run's seed and the tensor's name (independent of the order of tensors)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask of a 2-D score matrix pruning the ``count`` lowest of each row (stable)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count > 0:
        order = torch.argsort(scores, dim=-1, stable=True)[..., :count]
        keep.scatter_(-1, order, False)
    return keep


def nm_mask(scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Keep the ``N`` highest scores of every group of ``M`` columns (``scores [rows, cols]``)."""
    rows, cols = scores.shape
    if cols % pattern.m:
        raise EncodeError(f"{pattern} pruning needs a multiple of {pattern.m} columns, not {cols}")
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    return _prune_lowest(groups, pattern.m - pattern.n).reshape(rows, cols)


def score_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool) -> torch.Tensor:
    """The mask of a score matrix: N:M per group; unstructured per row (``per_row``) or over the whole tensor."""
    if pattern.structured:
        return nm_mask(scores, pattern)
    if per_row:
        return _prune_lowest(scores, int(sparsity * scores.shape[1]))
    return _prune_lowest(scores.reshape(1, -1), int(sparsity * scores.numel())).reshape(scores.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Prune the smallest ``|w|`` of the whole tensor (N:M: of each group)."""
    return score_mask(weight.abs().float(), sparsity, pattern, per_row=False)


def random_mask(shape: tuple[int, int] | torch.Size, sparsity: float, pattern: Pattern, seed: int) -> torch.Tensor:
    """A uniformly random mask with exactly the pattern's count (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return score_mask(torch.rand(tuple(shape), generator=gen), sparsity, pattern, per_row=False)


def wanda_mask(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: Pattern) -> torch.Tensor:
    """Wanda: ``|W| * sqrt(diag H)`` (``diag H`` is proportional to the squared input norms), ranked per row."""
    norms = torch.diagonal(hessian).to(torch.float32).clamp(min=0).sqrt()
    return score_mask(weight.abs().float() * norms, sparsity, pattern, per_row=True)


# -------------------------------------------------------------------------------------- global magnitude
def _magnitude_bits(weight: torch.Tensor) -> torch.Tensor:
    """``|w|`` as fp32 bit patterns (int64): non-negative floats sort as their bit patterns."""
    return weight.detach().float().abs().reshape(-1).view(torch.int32).to(torch.int64)


@dataclass(frozen=True)
class GlobalThreshold:
    """Prune ``|w| < threshold`` everywhere, and the first ``tie_fraction`` of each tensor's ``|w| == threshold``."""

    threshold: float
    tie_fraction: float
    pruned: int
    total: int


def global_threshold(tensors, sparsity: float) -> GlobalThreshold:
    """The exact model-wide magnitude threshold of ``sparsity`` over ``tensors`` (an iterable called twice:
    a zero-argument callable returning a fresh iterator), by two histogram passes over the fp32 bit patterns
    (the high 16 bits, then the low 16 bits inside the threshold's bin): memory stays at one tensor."""
    high = torch.zeros(1 << 16, dtype=torch.int64)
    total = 0
    for w in tensors():
        bits = _magnitude_bits(w)
        high += torch.bincount(bits >> 16, minlength=1 << 16)
        total += bits.numel()
    k = int(sparsity * total)
    if k == 0:
        return GlobalThreshold(0.0, 0.0, 0, total)
    cum = torch.cumsum(high, 0)
    hbin = int(torch.searchsorted(cum, torch.tensor(k), right=False))  # first bin whose cumulative count >= k
    below = int(cum[hbin - 1]) if hbin else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for w in tensors():
        bits = _magnitude_bits(w)
        low += torch.bincount(bits[(bits >> 16) == hbin] & 0xFFFF, minlength=1 << 16)
    cum_low = torch.cumsum(low, 0) + below
    lbin = int(torch.searchsorted(cum_low, torch.tensor(k), right=False))
    value_bits = (hbin << 16) | lbin
    strictly_below = int(cum_low[lbin - 1]) if lbin else below
    ties = int(low[lbin])
    threshold = torch.tensor([value_bits], dtype=torch.int32).view(torch.float32).item()
    return GlobalThreshold(threshold, (k - strictly_below) / ties, k, total)


def threshold_mask(weight: torch.Tensor, threshold: float, tie_fraction: float) -> torch.Tensor:
    """Prune ``|w| < threshold`` and the first ``round(tie_fraction * ties)`` weights equal to it (row-major)."""
    mag = weight.detach().float().abs()
    keep = mag >= threshold
    tied = (mag == threshold).reshape(-1).nonzero().squeeze(1)
    n_prune = round(tie_fraction * tied.numel())
    flat = keep.reshape(-1)
    flat[tied[:n_prune]] = False
    return keep


# ------------------------------------------------------------------------------------------- SparseGPT
@dataclass
class QuantGrid:
    """A per-element quantization grid in the tensor's own positions: ``scale``, ``zero`` fp32 ``[rows, cols]``
    (pruned positions: any finite scale), codes in ``[0, qmax]``."""

    scale: torch.Tensor
    zero: torch.Tensor
    qmax: int


@dataclass
class SparseGptResult:
    keep: torch.Tensor  # bool [rows, cols]
    weight: torch.Tensor  # fp32 [rows, cols]: the pruned (and quantized) weight, zeros where pruned
    codes: torch.Tensor | None  # fp32 [rows, cols] integer codes where kept (with a grid)


def sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    sparsity: float = 0.5,
    pattern: Pattern = UNSTRUCTURED,
    keep: torch.Tensor | None = None,
    grid: QuantGrid | None = None,
    block_size: int = DEFAULT_BLOCK,
    percdamp: float = 0.01,
) -> SparseGptResult:
    """SparseGPT over ``weight [rows, cols]`` with the Hessian ``[cols, cols]`` of its input (module docstring).

    ``keep`` fixes the mask instead of choosing it; ``grid`` quantizes the kept weights as the sweep visits them
    (GPTQ with zero for the pruned ones). Returns the mask, the weight and the codes (with a grid)."""
    if weight.dim() != 2 or tuple(hessian.shape) != (weight.shape[1],) * 2:
        raise EncodeError(f"sparsegpt: weight {list(weight.shape)} and Hessian {list(hessian.shape)} do not match")
    if not bool(torch.isfinite(weight).all()):
        raise EncodeError("sparsegpt cannot prune a weight holding inf or NaN")
    rows, cols = weight.shape
    w = weight.detach().to(torch.float32).clone()
    inverse = damped_inverse_cholesky(hessian, percdamp)
    w[:, inverse.dead] = 0
    hinv = inverse.upper
    chosen = torch.ones(rows, cols, dtype=torch.bool) if keep is None else keep.clone()
    codes = torch.zeros(rows, cols) if grid is not None else None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, h1 = w[:, i1:i2], hinv[i1:i2, i1:i2]
        d = torch.diagonal(h1)
        err = torch.zeros_like(w1)
        if keep is None and not pattern.structured:
            score = w1.square() / d.square()
            count = int(score.numel() * sparsity)
            if count:
                # the reference's rule: prune everything at or below the count-th smallest score
                thresh = torch.sort(score.reshape(-1)).values[count]
                chosen[:, i1:i2] = score > thresh
        for i in range(i2 - i1):
            col = i1 + i
            if keep is None and pattern.structured and col % pattern.m == 0:
                score = w1[:, i : i + pattern.m].square() / d[i : i + pattern.m].square()
                chosen[:, col : col + pattern.m] = nm_mask(score, pattern)
            q = torch.where(chosen[:, col], w1[:, i], 0.0)
            if grid is not None:
                s, z = grid.scale[:, col], grid.zero[:, col]
                c = torch.clamp(torch.round(q / s) + z, 0, grid.qmax)
                codes[:, col] = c
                q = torch.where(chosen[:, col], (c - z) * s, 0.0)
            e = (w1[:, i] - q) / d[i]
            w1[:, i:].addr_(e, h1[i, i:], alpha=-1)
            w1[:, i] = q
            err[:, i] = e
        w[:, i2:].addmm_(err, hinv[i1:i2, i2:], alpha=-1)
    return SparseGptResult(chosen, w, codes)
