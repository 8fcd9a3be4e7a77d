"""Learned rounding (shared by ``flexround`` and ``lrq``): block-output reconstruction with learned divisors.

Per Linear weight ``W`` (``[rows, cols]``) with the per-group grid scale ``s1`` and integer zero ``z`` of the
shared layout (:mod:`nwcfmt.codecs.quant`), the encoder learns a positive divisor ``D`` (``[rows, cols]``) that
only decides the rounding::

    codes = clamp(round(W / (s1 * D)) + z, 0, 2**bits - 1)        W_hat = s1 * (codes - z)

``W_hat`` is exactly what a decoder rebuilds from the stored codes, ``s1`` (rounded to ``scale_dtype``) and
``z``: ``D`` is not stored. ``flexround`` uses ``D = exp(S2) * exp(s3) * exp(s4)`` (element-wise matrix,
per-column and per-row vectors), ``lrq`` ``D = exp(L @ U + r + c)`` (low rank plus row and column vectors).
``s1`` starts from the ``rtn`` grid (optionally its weighted clipping search) and ``D`` from 1, so iteration 0
is ``rtn``. All Linears of a block are trained jointly with Adam (straight-through rounding) to minimise the
mean squared error between the block's output and the full-precision block's output on the calibration
batches; the block's own parameters stay frozen and untouched. The block loss is measured before and after
training on evenly spaced batches of about
:data:`~nwcfmt.calibration.reconstruction.GUARD_TOKENS` tokens, and the ``rtn`` start is kept when training did
not lower it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nwcfmt.calibration.method import BlockData, LinearResult
from nwcfmt.calibration.reconstruction import Batch, block_mse, fit_block_output, guard_batches, split_batches
from nwcfmt.codecs.quant import GroupQuantCodec, QuantLayout
from nwcfmt.codecs.rtn import RtnCodec, stored_scale
from nwcfmt.errors import EncodeError
from nwcfmt.kernels.reference import expand_groups


class LearnedRoundingCodec(GroupQuantCodec):
    """Storage as :class:`GroupQuantCodec`; the encoder needs calibration (:class:`LearnedRoundingMethod`).

    Config: the shared quantizer config plus ``iters`` (Adam steps per block), ``lr`` (of the divisor's values),
    ``scale_lr`` (of the grid scale ``s1``; default: ``lr``), ``batch_size`` (sequences per step),
    ``clip_search`` (start from rtn's weighted clipping search) and ``seed``.
    """

    def __init__(
        self,
        *,
        iters: int = 200,
        lr: float = 3e-3,
        scale_lr: float | None = None,
        batch_size: int = 1,
        clip_search: bool = True,
        seed: int = 0,
        **config: Any,
    ) -> None:
        super().__init__(**config)
        scale_lr = lr if scale_lr is None else scale_lr
        if iters < 0 or batch_size < 1 or not all(_positive_number(v) for v in (lr, scale_lr)):
            raise EncodeError("iters must be >= 0, batch_size >= 1 and lr and scale_lr positive numbers")
        if self.symmetric and self.bits < 2:
            raise EncodeError("symmetric quantization needs at least 2 bits")
        self.iters, self.lr, self.scale_lr, self.batch_size = int(iters), float(lr), float(scale_lr), int(batch_size)
        self.clip_search, self.seed = bool(clip_search), int(seed)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "iters": self.iters,
            "lr": self.lr,
            "scale_lr": self.scale_lr,
            "batch_size": self.batch_size,
            "clip_search": self.clip_search,
        }

    def quantize(self, weight: torch.Tensor, layout: QuantLayout):
        raise EncodeError(
            f"{self.codec_id} learns its rounding from calibration data and cannot encode a lone tensor: "
            f"encode a model folder with calibration (the block-by-block pipeline)"
        )


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class LearnedRounding(nn.Module):
    """The learned grid and rounding of one Linear weight. Subclasses define :meth:`log_divisor`."""

    def __init__(self, weight: torch.Tensor, codec: LearnedRoundingCodec) -> None:
        super().__init__()
        self.codec = codec
        self.layout = codec.layout(weight)
        self.bits, self.scale_dtype = codec.bits, codec.scale_dtype
        w = weight.detach().to(torch.float32).reshape(self.layout.rows, self.layout.cols)
        rtn = RtnCodec(
            bits=codec.bits,
            group_size=codec.group_size,
            symmetric=codec.symmetric,
            scale_dtype=codec.scale_dtype,
            clip_search=codec.clip_search,
        )
        _, scale, zero = rtn.quantize(w, self.layout)
        zero = torch.full_like(scale, self.layout.implicit_zero) if zero is None else zero.to(torch.float32)
        self.register_buffer("weight", w.clone())
        self.register_buffer("zero", zero.reshape(self.layout.scale_rows, self.layout.n_groups))
        self.log_s1 = nn.Parameter(scale.reshape(self.layout.scale_rows, self.layout.n_groups).log())

    def log_divisor(self) -> torch.Tensor:
        """``log D``, broadcastable to ``[rows, cols]``."""
        raise NotImplementedError

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """Per-group ``[scale_rows, n_groups]`` values broadcast to ``[rows, cols]`` (as the decoder does)."""
        if self.layout.scale_rows == 1:
            values = values.expand(self.layout.rows, values.shape[1])
        return expand_groups(values, self.layout.cols, self.layout.group_size)

    def scale(self) -> torch.Tensor:
        """``s1`` as stored (rounded to ``scale_dtype``), with a straight-through gradient."""
        s1 = self.log_s1.exp()
        return s1 + (stored_scale(s1.detach(), self.scale_dtype) - s1).detach()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(``W_hat`` [rows, cols], codes as float [rows, cols], stored scale [scale_rows, n_groups])."""
        s1 = self.scale()
        s, z = self.expand(s1), self.expand(self.zero)
        q = torch.clamp(round_ste(self.weight / (s * self.log_divisor().exp())) + z, 0, (1 << self.bits) - 1)
        return s * (q - z), q, s1

    def result(self) -> LinearResult:
        """The hard-rounded result packed in the shared layout; its weight is exactly ``self()[0]``."""
        with torch.no_grad():
            _, q, s1 = self()
        zero = None if self.layout.symmetric else self.zero.to(torch.uint8)
        return self.codec.result(q.to(torch.uint8), s1.detach().clone(), zero, self.layout)


class LearnedRoundingMethod:
    """A :class:`~nwcfmt.calibration.method.BlockQuantizer` training one :class:`LearnedRounding` per Linear."""

    needs_targets = True

    def __init__(self, codec: LearnedRoundingCodec, make: Callable[[torch.Tensor, torch.Generator], LearnedRounding]):
        self.codec, self.make = codec, make

    def quantize_block(
        self, block: nn.Module, linears: dict[str, nn.Linear], data: BlockData
    ) -> dict[str, LinearResult]:
        """Train the Linears of ``block`` jointly on block-output MSE; keep the rtn start if training did not help."""
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(self.codec.seed * 100003 + data.index)
        batches = split_batches(data, self.codec.batch_size)
        frozen = {name: p.detach() for name, p in block.named_parameters()}
        mods = {name: self.make(lin.weight, gen) for name, lin in linears.items()}

        def params() -> dict[str, torch.Tensor]:
            return {**frozen, **{f"{name}.weight": m()[0] for name, m in mods.items()}}

        guard = guard_batches(batches)

        def guard_loss() -> float:
            with torch.no_grad():
                weights = {f"{name}.weight": m()[0] for name, m in mods.items()}
            return block_mse(block, {**frozen, **weights}, guard)

        init_loss = guard_loss()
        init = {name: m.result() for name, m in mods.items()}
        self._train(block, mods, batches, params, gen)
        final_loss = guard_loss()
        results = {name: m.result() for name, m in mods.items()}
        fallback = final_loss > init_loss
        if fallback:
            results = init
        stats = {  # block-output MSE over all calibration batches; the first two sorted keys show in the CLI
            "block_loss": min(init_loss, final_loss),
            "block_loss_rtn": init_loss,
            "block_loss_trained": final_loss,
            "fallback": float(fallback),
            "seconds": time.perf_counter() - start,
        }
        for r in results.values():
            r.stats.update(stats)
        return results

    def _train(
        self, block: nn.Module, mods: dict[str, LearnedRounding], batches: list[Batch], params, gen: torch.Generator
    ) -> None:
        if not mods or self.codec.iters == 0:
            return
        scales = [m.log_s1 for m in mods.values()]
        divisor = [p for m in mods.values() for name, p in m.named_parameters() if name != "log_s1"]
        opt = torch.optim.Adam(
            [{"params": scales, "lr": self.codec.scale_lr}, {"params": divisor, "lr": self.codec.lr}]
        )
        fit_block_output(block, params, opt, batches, self.codec.iters, gen)


def trainable_params(method: LearnedRoundingMethod, linears: dict[str, nn.Linear]) -> int:
    """How many values the method learns for these Linears (the grid scales included)."""
    gen = torch.Generator().manual_seed(0)
    return sum(p.numel() for lin in linears.values() for p in method.make(lin.weight, gen).parameters())
