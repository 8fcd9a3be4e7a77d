"""The calibrated encoder of the entropy-coded codecs (``ecsq``, ``neural``) for the calibration pipeline.

Per decoder block: each selected Linear is coded from the Hessian of its input by its codec's
``encode_with_hessian`` (importance levels, LDLQ error feedback, rate control on the record's real bytes; see
:mod:`nwcfmt.encoders.ecsq` and :mod:`nwcfmt.encoders.ldlq`), in stages of Linears that share an input (q/k/v,
o, gate/up, down). With ``tune_uncoded``, after each stage the weights not yet coded are tuned on the block
output with the coded ones in place (:data:`TUNE_UNCODED_ITERS` Adam steps), so later Linears absorb part of
the earlier ones' error before they are coded themselves. Then, with ``finetune``, the row scales of all
the block's Linears are tuned jointly with Adam on the mean squared error between the block's output and the
full-precision block's output (NWC's row-norm fine-tuning); scales are rounded to their stored dtype in the
forward pass (straight-through), so the loss is the decoder's. The latents never change, so the rate does not
either (scales are a fixed number of bytes). The block loss is measured before and after on evenly spaced
calibration batches, and the untuned scales are kept when tuning did not lower it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nwcfmt.calibration import register_method
from nwcfmt.calibration.method import BlockData, LinearResult
from nwcfmt.calibration.reconstruction import block_mse, fit_block_output, guard_batches, split_batches
from nwcfmt.codecs.base import EncodeContext
from nwcfmt.codecs.gptq import layer_loss
from nwcfmt.codecs.latent import SCALE_DTYPES, CalibratedLatent, LatentCodec
from nwcfmt.codecs.registry import get_codec
from nwcfmt.container.writer import decode_encoded
from nwcfmt.errors import EncodeError

FINETUNE_ITERS = 100  # Adam steps per block
FINETUNE_LR = 1e-3  # on the log of each row scale
FINETUNE_BATCH = 4  # sequences per step
TUNE_UNCODED_ITERS = 50  # Adam steps on the not-yet-coded weights after each coding stage
TUNE_UNCODED_LR = 3e-3  # in units of each weight row's RMS


def _stored(values: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """``values`` rounded to the scale dtype, with a straight-through gradient."""
    rounded = values.detach().to(SCALE_DTYPES[scale_dtype]).to(torch.float32)
    return values + (rounded - values).detach()


@dataclass
class LatentMethod:
    """The :class:`~nwcfmt.calibration.method.BlockQuantizer` of ``ecsq`` and ``neural``."""

    codec: LatentCodec
    per_linear_keys: tuple[str, ...] = ("bits", "step")  # a planned mix of rates (``nwc plan``)

    @property
    def needs_targets(self) -> bool:
        return self.codec.calibration.finetune or self.codec.calibration.tune_uncoded

    def quantize_block(
        self, block: nn.Module, linears: dict[str, nn.Linear], data: BlockData
    ) -> dict[str, LinearResult]:
        start = time.perf_counter()
        options = self.codec.calibration
        missing = [name for name in linears if name not in data.hessians]
        if missing:
            raise EncodeError(f"{self.codec.codec_id}: block {data.index} has no Hessian for {missing[0]!r}")
        weights = {name: linear.weight.detach().to(torch.float32) for name, linear in linears.items()}
        drafts: dict[str, CalibratedLatent] = {}
        stats: dict[str, dict[str, float]] = {}
        tuned_before: dict[str, dict[str, float]] = {}  # what tuning a Linear's weight before coding it did
        stages = coding_stages(list(linears), data.hessians)
        for k, stage in enumerate(stages):
            jobs = [(name, weights[name], data) for name in stage]  # a stage's Linears are coded independently
            costs = [float(weights[name].numel() * weights[name].shape[1]) for name in stage]
            for name, (draft, stat) in zip(stage, data.executor.map(self._code, jobs, costs), strict=True):
                drafts[name], stats[name] = draft, {**stat, **tuned_before.get(name, {})}
            uncoded = [name for later in stages[k + 1 :] for name in later]
            if options.tune_uncoded and uncoded:
                tuned, tune_stats = self._tune_uncoded(block, drafts, {n: weights[n] for n in uncoded}, data, k)
                weights.update(tuned)
                tuned_before.update({name: tune_stats for name in uncoded})
        scales = {name: d.scale for name, d in drafts.items()}
        if options.finetune and drafts:
            scales, block_stats = self._finetune(block, drafts, data)
            for s in stats.values():
                s.update(block_stats)
        results = {}
        for name, draft in drafts.items():
            encoded = draft.finish(scales[name])
            weight = linears[name].weight
            decoded = decode_encoded(name, self.codec, encoded, tuple(weight.shape), weight.dtype)
            stats[name]["seconds"] = time.perf_counter() - start
            results[name] = LinearResult(encoded, decoded.to(torch.float32), stats[name])
        return results

    def _code(self, name: str, weight: torch.Tensor, data: BlockData) -> tuple[CalibratedLatent, dict[str, float]]:
        """One Linear coded from its (possibly tuned) weight and its input Hessian; the layer loss relative to
        the weight's own ``tr(W H W^T)``."""
        hessian = data.hessians[name]
        ctx = EncodeContext(name=name, shared_claims=data.shared_claims)
        codec = data.codec_for(name, self.codec)
        draft = codec.encode_with_hessian(weight, hessian, self.codec.calibration, ctx)
        ref = layer_loss(weight, torch.zeros_like(weight), hessian)
        loss = layer_loss(weight, draft.values * draft.scale[:, None], hessian)
        return draft, {"layer_loss": loss / ref if ref > 0 else 0.0, **draft.stats}

    def _tune_uncoded(
        self,
        block: nn.Module,
        drafts: dict[str, CalibratedLatent],
        uncoded: dict[str, torch.Tensor],
        data: BlockData,
        stage: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The weights not yet coded, tuned on the block-output MSE with the coded Linears as their drafts decode
        (NWC's and QuIP#'s fine-tuning of what is left), so they absorb the coded weights' error. Adam moves each
        weight in units of its row's RMS. Trained on the calibration batches outside the check batches; the
        tuned weights are kept only when the check batches' block loss falls."""
        batches = split_batches(data, FINETUNE_BATCH)
        guard = guard_batches(batches)
        train = [b for b in batches if not any(b is g for g in guard)] or batches
        frozen = {name: p.detach() for name, p in block.named_parameters()}
        coded = {f"{name}.weight": d.values * d.scale[:, None] for name, d in drafts.items()}
        rms = {name: w.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12) for name, w in uncoded.items()}
        deltas = {name: torch.zeros_like(w, requires_grad=True) for name, w in uncoded.items()}

        def params() -> dict[str, Any]:
            tuned = {f"{name}.weight": w + deltas[name] * rms[name] for name, w in uncoded.items()}
            return {**frozen, **coded, **tuned}

        def guard_loss() -> float:
            with torch.no_grad():
                return block_mse(block, params(), guard)

        before = guard_loss()
        gen = torch.Generator().manual_seed(data.index * 1009 + stage)
        opt = torch.optim.Adam(list(deltas.values()), lr=TUNE_UNCODED_LR)
        fit_block_output(block, params, opt, train, TUNE_UNCODED_ITERS, gen)
        after = guard_loss()
        kept = after < before
        with torch.no_grad():
            tuned = {name: (w + deltas[name] * rms[name]) if kept else w for name, w in uncoded.items()}
        return tuned, {"uncoded_loss_untuned": before, "uncoded_loss": min(before, after), "uncoded_tuned": float(kept)}

    def _finetune(
        self, block: nn.Module, drafts: dict[str, CalibratedLatent], data: BlockData
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Row scales tuned on the block-output MSE (as stored, fp32), and the block losses before and after."""
        scale_dtype = self.codec.scale_dtype
        batches = split_batches(data, FINETUNE_BATCH)
        guard = guard_batches(batches)
        frozen = {name: p.detach() for name, p in block.named_parameters()}
        logs = {name: torch.zeros_like(d.scale, requires_grad=True) for name, d in drafts.items()}

        def scales() -> dict[str, torch.Tensor]:
            return {name: _stored(d.scale * logs[name].exp(), scale_dtype) for name, d in drafts.items()}

        def params(current: dict[str, torch.Tensor]) -> dict[str, Any]:
            weights = {f"{name}.weight": d.values * current[name][:, None] for name, d in drafts.items()}
            return {**frozen, **weights}

        def guard_loss() -> float:
            with torch.no_grad():
                return block_mse(block, params(scales()), guard)

        before = guard_loss()
        initial = {name: d.scale for name, d in drafts.items()}
        gen = torch.Generator().manual_seed(data.index)
        opt = torch.optim.Adam(list(logs.values()), lr=FINETUNE_LR)
        fit_block_output(block, lambda: params(scales()), opt, batches, FINETUNE_ITERS, gen)
        after = guard_loss()
        kept = after < before
        with torch.no_grad():
            final = {name: s.detach().clone() for name, s in scales().items()} if kept else initial
        return final, {"block_loss": min(before, after), "block_loss_untuned": before, "tuned": float(kept)}


def coding_stages(names: list[str], hessians: dict[str, torch.Tensor]) -> list[list[str]]:
    """The block's Linears in coding order, in stages: consecutive Linears with the same input (equal Hessians:
    q/k/v, gate/up) are coded together, since tuning one cannot help the others."""
    stages: list[list[str]] = []
    for name in names:
        last = stages[-1][-1] if stages else None
        same = last is not None and hessians[last].shape == hessians[name].shape
        if same and torch.equal(hessians[last], hessians[name]):
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


def latent_method(codec_id: str):
    def factory(config: dict[str, Any]) -> LatentMethod:
        codec = get_codec(codec_id).from_config(config)
        return LatentMethod(codec)

    factory.__qualname__ = f"latent_method.{codec_id}"
    return factory


for _codec_id in ("ecsq", "neural"):
    register_method(_codec_id, latent_method(_codec_id))
