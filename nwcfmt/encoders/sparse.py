"""The calibrated encoder of ``sparse`` records: prune, optionally reconstruct, then code the kept values.

For each decoder block (:mod:`nwcfmt.calibration.pipeline`) and each of its Linears:

1. **Prune** with the block's Hessians (:mod:`nwcfmt.encoders.prune`): Wanda and magnitude keep the kept weights
   as they are; SparseGPT also updates them to make up for the pruned ones.
2. **Reconstruct** (``reconstruct``; Shin et al., "Rethinking Pruning Large Language Models", EMNLP 2024): the
   kept weights of all the block's Linears are fine-tuned together, masks fixed, on the MSE between the block's
   output and the full-precision block's output. One minibatch in eight (one in two when there are fewer) is
   held out: the tuned weights are kept only if they lower the held-out MSE (an overfitting check, recorded in
   the stats).
3. **Code the values** (the values matrix of :mod:`nwcfmt.codecs.sparse`) with the values codec:

   * ``gptq``: jointly with the mask. The grid (scale and zero per group of the values matrix) is chosen on the
     pruned weights as gptq chooses it, weighted by ``diag H`` of each value's column; then one GPTQ sweep over
     the original columns quantizes every kept weight on its group's grid and sets every pruned one to zero,
     spreading both errors over the columns not yet visited (SparseGPT's joint mode). The sweep starts from the
     original weights for SparseGPT, from the pruned (or reconstructed) ones otherwise. gptq's scale refit is
     not run on sparse values, and ``act_order`` is refused.
   * any data-free codec (``raw``, ``lossless``, ``rtn``, and ``ecsq``/``neural`` through their data-free
     encoders): the values matrix as it is.
   * ``flexround`` and ``lrq`` are refused: their learned rounding does not yet know masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nwcfmt.calibration import register_method
from nwcfmt.calibration.method import BlockData, LinearResult, require_hessians
from nwcfmt.calibration.reconstruction import block_mse, fit_block_output, split_batches
from nwcfmt.codecs.gptq import GptqCodec, init_grid, layer_loss
from nwcfmt.codecs.quant import QuantLayout
from nwcfmt.codecs.sparse import SparseCodec, compact, encode_values, expand, sparse_encoded, values_shape
from nwcfmt.container.writer import decode_encoded
from nwcfmt.encoders import prune
from nwcfmt.errors import EncodeError

REFUSED_VALUES = ("flexround", "lrq")
RECON_LR = 1e-5
RECON_ITERS = 256
RECON_BATCH = 4  # sequences per step
HOLDOUT = 8  # one batch in this many is held out for the overfitting check


@dataclass
class Pruned:
    keep: torch.Tensor  # bool [rows, cols]
    weight: torch.Tensor  # fp32 [rows, cols], zeros where pruned


@dataclass
class SparseMethod:
    """The :class:`~nwcfmt.calibration.method.BlockQuantizer` of ``sparse`` (module docstring)."""

    codec: SparseCodec

    def __post_init__(self) -> None:
        if self.codec.values_codec in REFUSED_VALUES:
            raise EncodeError(
                f"{self.codec.values_codec} cannot code sparse values yet (its learned rounding ignores masks); "
                "use gptq, rtn, ecsq, neural, lossless or raw"
            )
        if isinstance(self.codec.inner, GptqCodec) and self.codec.inner.act_order:
            raise EncodeError("gptq's act_order is not supported for sparse values")
        if self.codec.scope == "global":
            raise EncodeError("global magnitude pruning is data-free: use --prune magnitude without calibration")

    @property
    def needs_targets(self) -> bool:
        return self.codec.reconstruct

    # ------------------------------------------------------------------------------------------ steps
    def prune_one(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> Pruned:
        """Step 1 for one Linear."""
        c, w = self.codec, weight.detach().to(torch.float32)
        if c.prune == "sparsegpt":
            result = prune.sparsegpt(w, hessian, sparsity=c.sparsity, pattern=c.pattern)
            return Pruned(result.keep, result.weight)
        keep = prune.wanda_mask(w, hessian, c.sparsity, c.pattern) if c.prune == "wanda" else c.mask_for(name, w)
        return Pruned(keep, w * keep)

    def code_values(
        self, name: str, weight: torch.Tensor, pruned: Pruned, hessian: torch.Tensor, dtype: torch.dtype
    ) -> LinearResult:
        """Step 3 for one Linear: the sparse record and the weight it decodes to (fp32)."""
        c, keep = self.codec, pruned.keep
        if isinstance(c.inner, GptqCodec):
            start = weight.detach().float() if c.prune == "sparsegpt" and not c.reconstruct else pruned.weight
            values, dense = self._joint_gptq(start, pruned, hessian)
            inner = c.inner
        else:
            inner, values = encode_values(name, pruned.weight, keep, dtype, c.inner, None)
            shape = values_shape(keep.shape[0], int(keep.sum()))
            decoded = decode_encoded(name, inner, values, shape, dtype).float()
            dense = expand(decoded, keep)
        encoded = sparse_encoded(keep, c.pattern, inner, values, c.provenance())
        stats = {
            "sparsity": 1.0 - float(keep.float().mean()),
            "loss_ref": layer_loss(weight, torch.zeros_like(weight), hessian),
            "loss": layer_loss(weight, dense, hessian),
        }
        return LinearResult(encoded, dense, stats)

    def _joint_gptq(self, start: torch.Tensor, pruned: Pruned, hessian: torch.Tensor):
        inner: GptqCodec = self.codec.inner  # type: ignore[assignment]
        keep = pruned.keep
        nnz = int(keep.sum())
        vshape = values_shape(keep.shape[0], nnz)
        layout = QuantLayout.of(vshape, inner.bits, inner.group_size, inner.symmetric)
        diag = torch.diagonal(hessian).to(torch.float32).expand_as(pruned.weight)
        grid = init_grid(
            compact(pruned.weight, keep),
            None,
            layout,
            inner.scale_dtype,
            search=inner.grid_init,
            element_weights=compact(diag.contiguous(), keep),
        )
        s_v, z_v = grid.columns(layout)
        qgrid = prune.QuantGrid(expand(s_v, keep, fill=1.0), expand(z_v, keep), (1 << inner.bits) - 1)
        swept = prune.sparsegpt(
            start, hessian, keep=keep, grid=qgrid, block_size=inner.block_size, percdamp=inner.percdamp
        )
        assert swept.codes is not None
        codes = compact(swept.codes, keep).to(torch.uint8)
        zero = None if layout.symmetric else grid.zero
        result = inner.result(codes, grid.scale, zero, layout)
        return result.encoded, expand(result.weight, keep)

    def reconstruct(
        self, block: torch.nn.Module, pruned: dict[str, Pruned], data: BlockData
    ) -> tuple[dict[str, Pruned], dict[str, float]]:
        """Step 2: the kept weights fine-tuned on the block's output, if that lowers the held-out MSE."""
        batches = split_batches(data, RECON_BATCH)
        stride = max(2, min(HOLDOUT, len(batches)))  # at least one batch held out when there are two
        held = [b for i, b in enumerate(batches) if i % stride == stride - 1] or batches
        train = [b for i, b in enumerate(batches) if i % stride != stride - 1] or batches
        masks = {f"{n}.weight": p.keep.float() for n, p in pruned.items()}
        params = {f"{n}.weight": torch.nn.Parameter(p.weight.clone()) for n, p in pruned.items()}

        def current() -> dict[str, torch.Tensor]:
            return {k: v * masks[k] for k, v in params.items()}

        before = block_mse(block, current(), held)
        gen = torch.Generator().manual_seed(data.index)
        optimizer = torch.optim.Adam(list(params.values()), lr=RECON_LR)
        fit_block_output(block, current, optimizer, train, RECON_ITERS, gen)
        after = block_mse(block, current(), held)
        stats = {"recon_heldout_before": before, "recon_heldout_after": after}
        if not after < before:
            return pruned, {**stats, "recon_kept": 0.0}
        tuned = current()
        out = {n: Pruned(p.keep, tuned[f"{n}.weight"].detach().clone()) for n, p in pruned.items()}
        return out, {**stats, "recon_kept": 1.0}

    # --------------------------------------------------------------------------------------- the block
    def quantize_block(
        self, block: torch.nn.Module, linears: dict[str, torch.nn.Linear], data: BlockData
    ) -> dict[str, LinearResult]:
        require_hessians(linears, data, "sparse")
        names = list(linears)
        weights = {n: linears[n].weight.detach().float() for n in names}
        costs = [float(linears[n].weight.numel() * linears[n].in_features) for n in names]
        jobs = [(n, weights[n], data.hessians[n]) for n in names]
        pruned = dict(zip(names, data.executor.map(self.prune_one, jobs, costs), strict=True))
        recon: dict[str, float] = {}
        if self.codec.reconstruct:
            pruned, recon = self.reconstruct(block, pruned, data)
        dtypes = data.dtypes or {}
        jobs2 = [(n, weights[n], pruned[n], data.hessians[n], dtypes.get(n, torch.float32)) for n in names]
        results = dict(zip(names, data.executor.map(self.code_values, jobs2, costs), strict=True))
        for r in results.values():
            r.stats.update(recon)
        return results


def sparse_method(config: dict[str, Any]) -> SparseMethod:
    """The sparse encoder for the calibration pipeline, from a codec config."""
    return SparseMethod(SparseCodec.from_config(config))


register_method(SparseCodec.codec_id, sparse_method)

__all__ = ["Pruned", "SparseMethod", "sparse_method"]
