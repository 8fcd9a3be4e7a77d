"""``gptq``: GPTQ with static groups and the two-stage grid optimization, into the shared integer-code layout.

Given a Linear weight ``W [rows, cols]`` and the Hessian of its input ``H = 2/N sum x x^T``, the encoder
lowers the layer-wise loss ``tr((W - Ŵ) H (W - Ŵ)^T)`` in three stages (each measured in the result's stats):

1. **grid init** (``grid_init``): each group's scale and zero are chosen once, before GPTQ, from the original
   weights (static groups): among shrunk ranges ``[ρ_lo·lo, ρ_hi·hi]``, the one with the least round-to-nearest
   loss weighted by ``diag(H)``. Off: the plain min-max grid of ``rtn``.
2. **GPTQ**: columns are quantized one at a time on that fixed grid, each one's error spread over the columns
   not yet quantized through the upper Cholesky factor of the damped ``H^-1`` (lazy block updates). With
   ``act_order`` columns go in order of decreasing ``diag(H)``, each on the grid of its own group, so the
   stored layout needs no permutation.
3. **grid refine** (``grid_refine``): with the codes frozen the loss is quadratic in each row's scales: solved
   exactly per row, rounded to the stored dtype, polished by closed-form coordinate descent over stored
   values; a row keeps its previous scales unless the loss with the stored scales falls. Zeros stay.

:func:`gptq_quantize` returns the choice (:class:`GptqSolution`); :meth:`GptqCodec.quantize_with_hessian` packs it
into the pipeline's :class:`~nwcfmt.calibration.method.LinearResult`. Decoding is the plain layout of
``spec/codecs/quant.md``; the algorithm and measurements: ``spec/codecs/gptq.md``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from nwcfmt.calibration import register_method
from nwcfmt.calibration.hessian import damped_inverse_cholesky
from nwcfmt.calibration.method import BlockData, LinearResult, require_hessians
from nwcfmt.codecs.quant import GroupQuantCodec, QuantLayout
from nwcfmt.codecs.registry import register_codec
from nwcfmt.codecs.rtn import grouped_view, quantize_groups, stored_scale
from nwcfmt.errors import EncodeError
from nwcfmt.kernels.reference import expand_groups

GRID_MIN = 0.5  # stage 1 shrinks ranges down to this factor
REFINE_ITERS = 2  # coordinate-descent sweeps over the rounded scales after the exact solve


# ------------------------------------------------------------------------------------------------ losses
def row_losses(error: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Per-row ``e_r H e_r^T`` (fp64) of an error ``[rows, cols]``."""
    e = error.to(torch.float64)
    return ((e @ hessian.to(torch.float64)) * e).sum(1)


def layer_loss(weight: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """The layer-wise loss ``tr((W - Ŵ) H (W - Ŵ)^T)``."""
    return float(row_losses(weight - w_hat, hessian).sum())


def _diag_weights(hessian: torch.Tensor, layout: QuantLayout) -> torch.Tensor:
    """``diag(H)`` of each element's column in the grouped view ``[scale_rows, n_groups, g]``."""
    d = torch.diagonal(hessian).to(torch.float32).expand(layout.rows, layout.cols)
    return grouped_view(d, layout)[0]


def _group_sums(err: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (err.square() * weights).sum(-1)


def group_losses(error: torch.Tensor, hessian: torch.Tensor, layout: QuantLayout) -> torch.Tensor:
    """The stage-1 metric, per group ``[scale_rows, n_groups]``: ``sum_j H_jj e_j^2`` over the group."""
    return _group_sums(grouped_view(error, layout)[0], _diag_weights(hessian, layout))


# ------------------------------------------------------------------------------------------------ the grid
@dataclass
class Grid:
    """Per-group stored scale (fp32, already rounded) and integer zero (fp32), ``[scale_rows, n_groups]``."""

    scale: torch.Tensor
    zero: torch.Tensor

    def columns(self, layout: QuantLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero of every element, ``[rows, cols]``."""
        scale, zero = self.scale, self.zero
        if layout.scale_rows < layout.rows:  # per tensor
            scale, zero = scale.expand(layout.rows, 1), zero.expand(layout.rows, 1)
        cols = layout.cols
        s = expand_groups(scale, cols, layout.group_size).expand(layout.rows, cols)
        z = expand_groups(zero, cols, layout.group_size).expand(layout.rows, cols)
        return s.contiguous(), z.contiguous()


def _round_codes(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / s) + z, 0, qmax)


def rtn_codes(weight: torch.Tensor, grid: Grid, layout: QuantLayout) -> torch.Tensor:
    """Round-to-nearest codes (fp32 ``[rows, cols]``) of a weight on a fixed grid."""
    s, z = grid.columns(layout)
    return _round_codes(weight, s, z, (1 << layout.bits) - 1)


def decode(codes: torch.Tensor, grid: Grid, layout: QuantLayout) -> torch.Tensor:
    """``(codes - zero) * scale`` in fp32, as every decoder computes it."""
    s, z = grid.columns(layout)
    return (codes - z) * s


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded. GPTQ is thousands of small ops; with threads, on a busy machine every one of
    them waits for its slowest thread (SmolLM2 block, 2 cores under load: 3 s single-threaded, 10-44 s with 2
    threads), and on an idle one threads would save at most the matmuls' share (about a quarter)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def shrink_candidates(symmetric: bool) -> list[tuple[float, float]]:
    """Stage-1 candidates ``(ρ_lo, ρ_hi)``, min-max ``(1, 1)`` first: symmetric grids shrink ``max|w|`` by one of
    21 factors from 1 to 0.5; asymmetric ones shrink ``min`` and ``max`` independently (6 x 6 factors)."""
    if symmetric:
        return [(r, r) for r in torch.linspace(1.0, GRID_MIN, 21).tolist()]
    ratios = torch.linspace(1.0, GRID_MIN, 6).tolist()
    return [(lo, hi) for lo in ratios for hi in ratios]


@_one_thread()
def init_grid(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    layout: QuantLayout,
    scale_dtype: str,
    search: bool = True,
    element_weights: torch.Tensor | None = None,
) -> Grid:
    """Stage 1: the static grid (:class:`Grid`). ``search``: per group, the candidate range of
    :func:`shrink_candidates` with the least H-weighted round-to-nearest loss (:func:`group_losses`); else plain
    min-max (the ``rtn`` grid). ``element_weights`` (``[rows, cols]``) replace ``diag(H)`` of each element's
    column as the weights of the search (sparse values, whose columns are not the Hessian's)."""
    w, mask = grouped_view(weight, layout)
    big = torch.finfo(torch.float32).max
    lo = torch.where(mask, w, big).amin(-1).clamp(max=0)
    hi = torch.where(mask, w, -big).amax(-1).clamp(min=0)
    args = (layout.bits, layout.symmetric, scale_dtype)
    codes, scale, zero = quantize_groups(w, lo, hi, *args)
    if not search:
        return Grid(scale, zero)
    if element_weights is not None:
        weights = grouped_view(element_weights.to(torch.float32), layout)[0]
    else:
        assert hessian is not None
        weights = _diag_weights(hessian, layout)
    best = _group_sums((w - (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)) * mask, weights)
    for ratio_lo, ratio_hi in shrink_candidates(layout.symmetric)[1:]:
        c, s, z = quantize_groups(w, lo * ratio_lo, hi * ratio_hi, *args)
        loss = _group_sums((w - (c - z.unsqueeze(-1)) * s.unsqueeze(-1)) * mask, weights)
        better = loss < best
        best = torch.where(better, loss, best)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return Grid(scale, zero)


# ------------------------------------------------------------------------------------------------ GPTQ
def gptq_sweep(
    weight_t: torch.Tensor, hinv_upper: torch.Tensor, s_t: torch.Tensor, z_t: torch.Tensor, qmax: int, block_size: int
) -> torch.Tensor:
    """GPTQ over the columns in the given order, each on its fixed per-element grid; returns the codes.

    Everything is transposed (``[cols, rows]``: a column is a contiguous row); ``weight_t`` is updated in
    place by the error feedback."""
    cols = weight_t.shape[0]
    codes = torch.empty_like(weight_t)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, h1 = weight_t[i1:i2], hinv_upper[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            s, z = s_t[i1 + i], z_t[i1 + i]
            q = _round_codes(w1[i], s, z, qmax)
            codes[i1 + i] = q
            e = (w1[i] - (q - z) * s) / h1[i, i]
            w1[i:].addmm_(h1[i, i:].unsqueeze(1), e.unsqueeze(0), alpha=-1)  # addr_ is far slower
            err1[i] = e
        weight_t[i2:].addmm_(hinv_upper[i1:i2, i2:].T, err1, alpha=-1)
    return codes


def _gptq_codes(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    layout: QuantLayout,
    *,
    act_order: bool,
    block_size: int,
    percdamp: float,
) -> torch.Tensor:
    """Stage 2: GPTQ codes ``[rows, cols]`` (fp32) on the static grid; ``hessian`` has no dead inputs left."""
    s, z = grid.columns(layout)
    order = torch.arange(layout.cols)
    if act_order:
        order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    h = hessian[order][:, order]
    w_t, s_t, z_t = (x[:, order].T.contiguous() for x in (weight, s, z))
    codes_t = gptq_sweep(w_t, damped_inverse_cholesky(h, percdamp).upper, s_t, z_t, (1 << layout.bits) - 1, block_size)
    codes = torch.empty_like(weight)
    codes[:, order] = codes_t.T
    return codes


# ------------------------------------------------------------------------------------------------ refine
def _grouped(x: torch.Tensor, layout: QuantLayout) -> torch.Tensor:
    """``[rows, cols]`` -> ``[rows, n_groups, g]`` (fp64, zero padding)."""
    n = layout.n_groups
    g = layout.cols if n == 1 else layout.group_size
    return torch.nn.functional.pad(x.to(torch.float64), (0, n * g - layout.cols)).view(x.shape[0], n, g)


def _per_scale_row(layout: QuantLayout, *terms: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row terms summed over the rows when one scale serves the whole tensor."""
    return tuple(t.sum(0, keepdim=True) for t in terms) if layout.scale_rows < layout.rows else terms


def _normal_equations(
    weight: torch.Tensor, q: torch.Tensor, hessian: torch.Tensor, layout: QuantLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [R, G, G]``, ``b [R, G]`` of the loss ``s^T A s - 2 b^T s + c`` of ``Ŵ[r, j] = s[r, g(j)] q[r, j]``."""
    h = hessian.to(torch.float64)
    qg = _grouped(q, layout)
    n, g = qg.shape[1], qg.shape[2]
    pad = n * g - layout.cols
    hg = torch.nn.functional.pad(h, (0, pad, 0, pad)).view(n, g, n * g)
    a = torch.empty(layout.rows, n, n, dtype=torch.float64)
    for k in range(n):  # one group at a time: its q H is [R, G*g] (all groups at once would be R x G x cols)
        m = qg[:, k, :] @ hg[k]
        a[:, k, :] = (m.view(layout.rows, n, g) * qg).sum(-1)
    b = (_grouped(weight.to(torch.float64) @ h, layout) * qg).sum(-1)
    return _per_scale_row(layout, a, b)  # type: ignore[return-value]


def _quadratic(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``s^T A s - 2 b^T s`` per row (the loss up to a constant)."""
    return torch.einsum("ra,rab,rb->r", s, a, s) - 2 * (b * s).sum(-1)


def _solve(a: torch.Tensor, b: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Minimiser of ``x^T A x - 2 b^T x`` per row; a tiny ridge towards ``x0`` keeps singular systems solvable."""
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    ridge = 1e-9 * diag.mean(-1, keepdim=True).clamp(min=1e-30) + (diag == 0) * 1.0
    rhs = b - (a @ x0.unsqueeze(-1)).squeeze(-1)
    return x0 + torch.linalg.solve(a + torch.diag_embed(ridge.expand_as(diag)), rhs)


def _stored_or_keep(candidate: torch.Tensor, current: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """``candidate`` rounded to the stored dtype where that is a valid (positive, finite) scale, else ``current``."""
    stored = stored_scale(candidate.to(torch.float32), scale_dtype).to(torch.float64)
    return torch.where(torch.isfinite(candidate) & (candidate > 0) & torch.isfinite(stored), stored, current)


def fit_scales(
    weight: torch.Tensor,
    codes: torch.Tensor,
    grid: Grid,
    hessian: torch.Tensor,
    layout: QuantLayout,
    scale_dtype: str,
    iters: int = REFINE_ITERS,
) -> torch.Tensor:
    """Stored scales (fp64) for frozen codes and zeros: the exact per-row minimiser, rounded, then closed-form
    coordinate descent over the stored values (a step is taken only when it lowers the loss)."""
    a, b = _normal_equations(weight, codes - grid.columns(layout)[1], hessian, layout)
    s0 = grid.scale.to(torch.float64)
    s = _stored_or_keep(_solve(a, b, s0), s0, scale_dtype)
    s = torch.where((_quadratic(a, b, s) < _quadratic(a, b, s0)).unsqueeze(-1), s, s0)
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    for _ in range(iters):
        for j in range(layout.n_groups):
            resid = b[:, j] - (a[:, j, :] * s).sum(-1)
            cand = _stored_or_keep(s[:, j] + resid / diag[:, j].clamp(min=1e-300), s[:, j], scale_dtype)
            d = cand - s[:, j]
            s[:, j] = torch.where((diag[:, j] > 0) & (diag[:, j] * d * d - 2 * d * resid < 0), cand, s[:, j])
    return s


def refine_grid(
    weight: torch.Tensor,
    codes: torch.Tensor,
    grid: Grid,
    hessian: torch.Tensor,
    layout: QuantLayout,
    scale_dtype: str,
    iters: int = REFINE_ITERS,
    losses: torch.Tensor | None = None,
) -> tuple[Grid, torch.Tensor]:
    """Stage 2: refitted scales (:func:`fit_scales`) where, per row, the loss with the stored scales is lower;
    the previous scales elsewhere. Codes and zero points stay. ``losses``: the per-row losses of ``grid`` if
    known. Returns the grid and its per-row losses."""
    if losses is None:
        losses = row_losses(weight - decode(codes, grid, layout), hessian)
    refined = Grid(fit_scales(weight, codes, grid, hessian, layout, scale_dtype, iters).float(), grid.zero)
    new = row_losses(weight - decode(codes, refined, layout), hessian)
    better = _per_scale_row(layout, new)[0] < _per_scale_row(layout, losses)[0]
    scale = torch.where(better.unsqueeze(-1), refined.scale, grid.scale)
    return Grid(scale, grid.zero), torch.where(better.expand_as(new), new, losses)


# ------------------------------------------------------------------------------------------------ entry point
@dataclass
class GptqSolution:
    """GPTQ's choice for one weight, before packing: codes uint8 ``[rows, cols]``, stored scale fp32 and zero
    uint8 ``[scale_rows, n_groups]`` (None when symmetric), and the losses of each stage."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    stats: dict[str, float]


def _check_inputs(
    weight: torch.Tensor, hessian: torch.Tensor, layout: QuantLayout, block_size: int, percdamp: float
) -> None:
    if weight.dim() != 2:
        raise EncodeError(f"gptq quantizes 2-D weights, not {list(weight.shape)}")
    if tuple(hessian.shape) != (layout.cols, layout.cols):
        raise EncodeError(f"gptq: Hessian {list(hessian.shape)} does not match {layout.cols} input columns")
    if not bool(torch.isfinite(weight).all()) or not bool(torch.isfinite(hessian).all()):
        raise EncodeError("gptq cannot quantize with inf or NaN in the weight or the Hessian")
    if layout.symmetric and layout.bits < 2:
        raise EncodeError("symmetric quantization needs at least 2 bits")
    if block_size < 1 or percdamp < 0:
        raise EncodeError("gptq: block_size must be >= 1 and percdamp >= 0")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = False,
    scale_dtype: str = "float16",
    act_order: bool = False,
    block_size: int = 128,
    percdamp: float = 0.01,
    grid_init: bool = True,
    grid_refine: bool = True,
    refine_iters: int = REFINE_ITERS,
) -> GptqSolution:
    """Quantize ``weight [rows, cols]`` against the Hessian ``[cols, cols]`` of its input (see the module doc).

    Stats: ``loss_ref`` (``tr(W H W^T)``), ``loss_rtn`` (round to nearest on the same grid), ``loss_gptq``
    (before refinement) and ``loss`` (final), all with the undamped Hessian and the stored scales.
    """
    layout = QuantLayout.of(tuple(weight.shape), bits, group_size, symmetric)
    _check_inputs(weight, hessian, layout, block_size, percdamp)
    with _one_thread():
        w0 = weight.detach().to(torch.float32).cpu()
        h_loss = hessian.detach().to(torch.float64).cpu()
        h_loss = (h_loss + h_loss.T) / 2
        dead = torch.diagonal(h_loss) == 0
        w, h = w0.clone(), h_loss.clone()
        w[:, dead] = 0
        h[dead, dead] = 1
        grid = init_grid(w, h_loss, layout, scale_dtype, search=grid_init)
        if not bool(torch.isfinite(grid.scale).all()):
            raise EncodeError(f"a group's range overflows {scale_dtype} scales; use scale_dtype='bfloat16'")
        codes = _gptq_codes(w, h, grid, layout, act_order=act_order, block_size=block_size, percdamp=percdamp)
        losses = row_losses(w0 - decode(codes, grid, layout), h_loss)
        stats = {
            "loss_ref": layer_loss(w0, torch.zeros_like(w0), h_loss),
            "loss_rtn": layer_loss(w0, decode(rtn_codes(w, grid, layout), grid, layout), h_loss),
            "loss_gptq": float(losses.sum()),
        }
        if grid_refine:
            grid, losses = refine_grid(w0, codes, grid, h_loss, layout, scale_dtype, refine_iters, losses)
        stats["loss"] = float(losses.sum())
        zero = None if layout.symmetric else grid.zero.to(torch.uint8)
        return GptqSolution(codes.to(torch.uint8), grid.scale, zero, stats)


# ------------------------------------------------------------------------------------------------ codec
@register_codec
class GptqCodec(GroupQuantCodec):
    """GPTQ into the shared layout. Config: the shared quantizer config plus ``act_order``, ``grid_init``,
    ``grid_refine``, ``percdamp``, ``block_size`` (recorded in the params; decoding ignores them)."""

    codec_id = "gptq"

    def __init__(
        self,
        *,
        act_order: bool = False,
        grid_init: bool = True,
        grid_refine: bool = True,
        percdamp: float = 0.01,
        block_size: int = 128,
        **config: Any,
    ) -> None:
        super().__init__(**config)
        if self.symmetric and self.bits < 2:
            raise EncodeError("symmetric quantization needs at least 2 bits")
        if not 0 <= percdamp < 10 or block_size < 1:
            raise EncodeError("percdamp must be in [0, 10) and block_size >= 1")
        self.act_order, self.grid_init, self.grid_refine = bool(act_order), bool(grid_init), bool(grid_refine)
        self.percdamp, self.block_size = float(percdamp), int(block_size)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "act_order": self.act_order,
            "grid_init": self.grid_init,
            "grid_refine": self.grid_refine,
            "percdamp": self.percdamp,
            "block_size": self.block_size,
        }

    def quantize(self, weight: torch.Tensor, layout: QuantLayout) -> tuple[torch.Tensor, torch.Tensor, None]:
        """Refused: GPTQ needs the Hessian of the weight's input (:meth:`quantize_with_hessian`)."""
        raise EncodeError("gptq needs calibration data: encode a model folder with nwc encode --codec gptq")

    def quantize_with_hessian(self, weight: torch.Tensor, hessian: torch.Tensor) -> LinearResult:
        """GPTQ of one ``[rows, cols]`` weight with this codec's config: the packed record and its decoded weight."""
        solution = gptq_quantize(
            weight,
            hessian,
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            scale_dtype=self.scale_dtype,
            act_order=self.act_order,
            block_size=self.block_size,
            percdamp=self.percdamp,
            grid_init=self.grid_init,
            grid_refine=self.grid_refine,
        )
        return self.result(solution.codes, solution.scale, solution.zero, self.layout(weight), solution.stats)


@dataclass
class GptqMethod:
    """The :class:`~nwcfmt.calibration.method.BlockQuantizer` of ``gptq``: each Linear from its Hessian alone (so
    the block's Linears are independent jobs for ``data.executor``)."""

    codec: GptqCodec
    needs_targets: bool = False
    per_linear_keys: tuple[str, ...] = ("bits", "group_size", "symmetric")  # a planned mix may vary these

    def quantize_block(
        self, block: torch.nn.Module, linears: dict[str, torch.nn.Linear], data: BlockData
    ) -> dict[str, LinearResult]:
        require_hessians(linears, data, "gptq")
        jobs = [
            (data.codec_for(name, self.codec), linear.weight.detach(), data.hessians[name])
            for name, linear in linears.items()
        ]
        costs = [float(linear.weight.numel() * linear.in_features) for linear in linears.values()]
        return dict(zip(linears, data.executor.map(_quantize_linear, jobs, costs), strict=True))


def _quantize_linear(codec: GptqCodec, weight: torch.Tensor, hessian: torch.Tensor) -> LinearResult:
    return codec.quantize_with_hessian(weight, hessian)


def gptq_method(config: dict[str, Any]) -> GptqMethod:
    """The gptq encoder for the calibration pipeline, from a codec config."""
    return GptqMethod(GptqCodec.from_config(config))


register_method(GptqCodec.codec_id, gptq_method)


__all__ = [
    "GptqCodec",
    "GptqMethod",
    "GptqSolution",
    "gptq_method",
    "gptq_quantize",
]
