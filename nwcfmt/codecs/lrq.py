"""``lrq``: low-rank learned rounding (LRQ, Lee et al., 2024), FlexRound with ``S2`` made low rank.

``codes = clamp(round(W / (s1 * exp(L @ U + r + c))) + z, 0, 2**bits - 1)`` with a learned grid scale ``s1``
(per group), ``L`` ``[rows, rank]``, ``U`` ``[rank, cols]``, a row vector ``r`` and a column vector ``c``, trained
block by block (:mod:`nwcfmt.codecs.learned_rounding`). Far fewer learned values than FlexRound's ``S2``.
Only the codes, ``s1`` and ``z`` are stored (spec/codecs/quant.md). Spec: spec/codecs/lrq.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nwcfmt.calibration import register_method
from nwcfmt.codecs.learned_rounding import LearnedRounding, LearnedRoundingCodec, LearnedRoundingMethod
from nwcfmt.codecs.registry import register_codec
from nwcfmt.errors import EncodeError


@register_codec
class LrqCodec(LearnedRoundingCodec):
    """LRQ. Config: see :class:`LearnedRoundingCodec` (but ``scale_lr`` 0.01: tuned on SmolLM2 block losses,
    spec/codecs/lrq.md), plus ``rank`` of the low-rank factor."""

    codec_id = "lrq"

    def __init__(self, *, rank: int = 64, scale_lr: float | None = 1e-2, **config: Any) -> None:
        super().__init__(scale_lr=scale_lr, **config)
        if rank < 1:
            raise EncodeError("rank must be >= 1")
        self.rank = int(rank)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rank": self.rank}


class LrqRounding(LearnedRounding):
    """``log D = L @ U + r + c``: ``L`` starts at 0, ``U`` random (std ``1/sqrt(rank)``), ``r`` and ``c`` at 0."""

    def __init__(self, weight: torch.Tensor, codec: LrqCodec, gen: torch.Generator) -> None:
        super().__init__(weight, codec)
        rows, cols = self.layout.rows, self.layout.cols
        rank = min(codec.rank, rows, cols)
        self.left = nn.Parameter(torch.zeros(rows, rank))
        self.right = nn.Parameter(torch.randn(rank, cols, generator=gen) / rank**0.5)
        self.row = nn.Parameter(torch.zeros(rows, 1))
        self.col = nn.Parameter(torch.zeros(1, cols))

    def log_divisor(self) -> torch.Tensor:
        return self.left @ self.right + self.row + self.col


class LrqMethod(LearnedRoundingMethod):
    """The calibrated LRQ encoder (a ``BlockQuantizer``)."""

    def __init__(self, codec: LrqCodec) -> None:
        super().__init__(codec, lambda weight, gen: LrqRounding(weight, codec, gen))


def lrq_method(config: dict[str, Any]) -> LrqMethod:
    """The pipeline's factory: ``config`` is the codec config."""
    return LrqMethod(LrqCodec(**config))


register_method("lrq", lrq_method)
