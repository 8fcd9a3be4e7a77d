"""LDLQ: GPTQ-style error feedback around any column quantizer.

Quantizing ``W`` ``[rows, cols]`` whose input has the Hessian ``H`` costs ``tr(dW H dW^T)`` in the layer
output. LDLQ (Chee et al. 2023; the same recursion as GPTQ) quantizes one column at a time and moves each
column's error onto the columns not yet quantized through the upper Cholesky factor ``U`` of ``H^-1``::

    e_j = (w_j - q(w_j)) / U[j, j]          w_k -= e_j * U[j, k]     for every later column k

Rows are independent of one another (the recursion only mixes columns), so the same feedback works for a
quantizer that codes a whole column at once: a scalar quantizer per element (``ecsq``) or the chunk network
of ``neural``, which codes 16 rows of one column together. The quantizer is a callback: it receives the
column's current target values (after the feedback so far) and returns the values a decoder will rebuild,
keeping whatever it chose (symbols, latents) itself. Columns go in blocks of ``block_size`` with lazy updates
of the later blocks, as in GPTQ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nwcfmt.calibration.hessian import DEFAULT_PERCDAMP, damped_inverse_cholesky
from nwcfmt.errors import EncodeError

ColumnQuantizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (columns [g], targets [g, rows]) -> decoded


@dataclass
class LdlqResult:
    decoded: torch.Tensor  # fp32 [rows, cols]: what the quantizer returned for each column
    targets: torch.Tensor  # fp32 [rows, cols]: each column's values when it was quantized (after feedback)


def column_order(hessian: torch.Tensor, act_order: bool) -> torch.Tensor:
    """The order columns are quantized in: as stored, or by decreasing ``diag(H)`` (GPTQ's act-order)."""
    cols = hessian.shape[0]
    if not act_order:
        return torch.arange(cols)
    return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)


def ordered_upper(hessian: torch.Tensor, order: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of the damped ``H^-1`` with rows and columns in ``order``: what the
    feedback runs on. Computed once per weight and reused by every rate-control try."""
    h = hessian.detach().to(torch.float64)
    h = ((h + h.T) / 2)[order][:, order]
    return damped_inverse_cholesky(h, percdamp).upper


def column_importance(
    hessian: torch.Tensor, order: torch.Tensor, options, upper: torch.Tensor | None = None
) -> torch.Tensor:
    """fp64 ``[cols]``: how much a unit error in each column costs. Without feedback ``diag(H)``; with LDLQ the
    diagonal of ``H``'s LDL factorisation in the feedback order, ``1 / U[j, j]^2`` (the error left in a column
    after the earlier columns' feedback), which is what each column's rounding error actually costs. ``upper``
    is :func:`ordered_upper`'s factor when the caller has it."""
    if not options.feedback or options.importance == "hdiag":
        return torch.diagonal(hessian).to(torch.float64).clone()
    if upper is None:
        upper = ordered_upper(hessian, order, options.percdamp)
    d = torch.empty(hessian.shape[0], dtype=torch.float64)
    d[order] = 1.0 / torch.diagonal(upper).to(torch.float64).square()
    return d


def ldlq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_columns: ColumnQuantizer,
    *,
    order: torch.Tensor | None = None,
    group: int = 1,
    block_size: int = 128,
    percdamp: float = DEFAULT_PERCDAMP,
    upper: torch.Tensor | None = None,
) -> LdlqResult:
    """Quantize ``weight`` ``[rows, cols]`` ``group`` columns at a time with error feedback through ``hessian``.

    ``quantize_columns(js, targets)`` gets original column indices ``js`` (int64 ``[g]``, in ``order``) and
    their targets ``[g, rows]`` and returns the decoded ``[g, rows]``. With ``group > 1`` (block LDLQ, as in
    QuIP#) the columns of a group are quantized together from the same targets, and their errors still reach
    the later columns exactly: ``e = U_BB^-T (w_B - q_B)`` replaces ``(w_j - q_j) / U_jj``. Columns with a
    zero Hessian diagonal (inputs that never fire) still get quantized, with no feedback from them.
    ``upper``: :func:`ordered_upper` for this ``order`` and ``percdamp``, when the caller already has it.
    """
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise EncodeError(f"ldlq: Hessian {list(hessian.shape)} does not match {cols} input columns")
    if block_size < 1 or group < 1:
        raise EncodeError("ldlq: block_size and group must be >= 1")
    order = torch.arange(cols) if order is None else order
    if upper is None:
        upper = ordered_upper(hessian, order, percdamp)
    w_t = weight.detach().to(torch.float32)[:, order].T.contiguous()  # [cols, rows]: a column is a row here
    decoded_t = torch.empty_like(w_t)
    targets_t = torch.empty_like(w_t)
    block_size = max(block_size, group)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, u1 = w_t[i1:i2], upper[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for a in range(0, i2 - i1, group):
            b = min(a + group, i2 - i1)
            targets_t[i1 + a : i1 + b] = w1[a:b]
            q = quantize_columns(order[i1 + a : i1 + b], w1[a:b].clone())
            if q.shape != w1[a:b].shape:
                raise EncodeError(f"ldlq: the column quantizer returned {list(q.shape)}, not {list(w1[a:b].shape)}")
            decoded_t[i1 + a : i1 + b] = q
            if b - a == 1:
                e = (w1[a:b] - q) / u1[a, a]
            else:
                e = torch.linalg.solve_triangular(u1[a:b, a:b].T, w1[a:b] - q, upper=False)
            w1[b:].addmm_(u1[a:b, b:].T, e, alpha=-1)
            err1[a:b] = e
        w_t[i2:].addmm_(upper[i1:i2, i2:].T, err1, alpha=-1)
    decoded = torch.empty(rows, cols, dtype=torch.float32)
    targets = torch.empty_like(decoded)
    decoded[:, order] = decoded_t.T
    targets[:, order] = targets_t.T
    return LdlqResult(decoded, targets)
