"""``rtn``: round-to-nearest scalar quantization into the shared integer-code layout.

Asymmetric (default): per group, the range ``[min(w, 0), max(w, 0)]`` (0 is always representable) maps to
codes ``0 .. 2**bits - 1`` with ``scale = (hi - lo) / (2**bits - 1)`` and the integer ``zero = round(-lo /
scale)``. Symmetric: ``scale = max|w| / (2**(bits-1) - 1)``, implicit zero ``2**(bits-1)``. Codes are always
computed with the scale *as stored* (rounded to fp16/bf16), so the encoder and every decoder agree.

``clip_search`` (data-free) tries shrinking each group's range by factors from 1 down to ``clip_min`` and
keeps, per group, the factor with the smallest reconstruction error. The default ``clip_metric="weighted"``
weighs each value's squared error by ``w**2``: large weights dominate a layer's output, and plain MSE
("mse") clips them away. Measured on SmolLM2 (8 windows): plain min-max 4-bit g128 29.330, MSE clipping
32.53, weighted clipping 29.281; 3-bit per-channel 544.5 / 2814 / 226.5.
"""

from __future__ import annotations

from typing import Any

import torch

from nwcfmt.codecs.quant import SCALE_DTYPES, GroupQuantCodec, QuantLayout
from nwcfmt.codecs.registry import register_codec
from nwcfmt.errors import EncodeError


def grouped_view(weight: torch.Tensor, layout: QuantLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``[scale_rows, n_groups, g]`` view of the weight (padded with zeros) and the mask of real values."""
    flat = weight.reshape(layout.scale_rows, -1)
    length = flat.shape[1]
    g = length if layout.n_groups == 1 else layout.group_size
    pad = layout.n_groups * g - length
    mask = torch.ones_like(flat, dtype=torch.bool)
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad), value=False)
    return flat.view(layout.scale_rows, layout.n_groups, g), mask.view(layout.scale_rows, layout.n_groups, g)


def ungroup(codes: torch.Tensor, layout: QuantLayout) -> torch.Tensor:
    """Inverse of :func:`grouped_view` for codes: drop the padding, back to ``[rows, cols]``."""
    flat = codes.reshape(layout.scale_rows, -1)[:, : layout.rows * layout.cols // layout.scale_rows]
    return flat.reshape(layout.rows, layout.cols)


def stored_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """The scale as the file will hold it (rounded, never zero), back in fp32."""
    dtype = SCALE_DTYPES[scale_dtype]
    rounded = scale.to(dtype)
    rounded = torch.where(rounded > 0, rounded, torch.tensor(torch.finfo(dtype).tiny, dtype=dtype))
    return rounded.to(torch.float32)


def quantize_groups(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, scale_dtype: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, stored scale and zero for grouped weights ``[R, G, g]`` and per-group ranges ``[R, G]``."""
    qmax = (1 << bits) - 1
    if symmetric:
        scale = stored_scale(torch.maximum(hi.abs(), lo.abs()) / ((1 << (bits - 1)) - 1), scale_dtype)
        zero = torch.full_like(scale, 1 << (bits - 1))
    else:
        scale = stored_scale((hi - lo) / qmax, scale_dtype)
        zero = torch.clamp(torch.round(-lo / scale), 0, qmax)
    codes = torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, qmax)
    return codes, scale, zero


CLIP_METRICS = ("weighted", "mse")


def group_error(w, mask, codes, scale, zero, metric: str = "mse") -> torch.Tensor:
    """Reconstruction error per group (padding excluded), computed like the decoder does.

    ``mse``: the sum of squared errors; ``weighted``: each squared error weighed by ``w**2``.
    """
    w_hat = (codes - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    err = (w - w_hat) ** 2 * mask
    return (err * w * w if metric == "weighted" else err).sum(-1)


@register_codec
class RtnCodec(GroupQuantCodec):
    """Round to nearest. Config: the shared quantizer config plus ``clip_search``, ``clip_min``, ``clip_steps``,
    ``clip_metric``."""

    codec_id = "rtn"

    def __init__(
        self,
        *,
        clip_search: bool = False,
        clip_min: float = 0.5,
        clip_steps: int = 20,
        clip_metric: str = "weighted",
        **config: Any,
    ):
        super().__init__(**config)
        if clip_metric not in CLIP_METRICS:
            raise EncodeError(f"clip_metric must be one of {', '.join(CLIP_METRICS)}")
        self.clip_metric = clip_metric
        if self.symmetric and self.bits < 2:
            raise EncodeError("symmetric quantization needs at least 2 bits")
        if not 0 < clip_min <= 1 or clip_steps < 1:
            raise EncodeError("clip_min must be in (0, 1] and clip_steps >= 1")
        self.clip_search, self.clip_min, self.clip_steps = clip_search, clip_min, clip_steps

    def get_config(self) -> dict[str, Any]:
        clip = {"clip_search": self.clip_search}
        if self.clip_search:
            clip["clip_metric"] = self.clip_metric
        return {**super().get_config(), **clip}

    def quantize(self, weight: torch.Tensor, layout: QuantLayout):
        if not bool(torch.isfinite(weight).all()):
            raise EncodeError("rtn cannot quantize a tensor holding inf or NaN")
        w, mask = grouped_view(weight, layout)
        big = torch.finfo(torch.float32).max
        lo = torch.where(mask, w, big).amin(-1).clamp(max=0)
        hi = torch.where(mask, w, -big).amax(-1).clamp(min=0)
        args = (self.bits, self.symmetric, self.scale_dtype)
        codes, scale, zero = quantize_groups(w, lo, hi, *args)
        if self.clip_search:
            best = group_error(w, mask, codes, scale, zero, self.clip_metric)
            for ratio in torch.linspace(1.0, self.clip_min, self.clip_steps + 1)[1:].tolist():
                c, s, z = quantize_groups(w, lo * ratio, hi * ratio, *args)
                err = group_error(w, mask, c, s, z, self.clip_metric)
                better = err < best
                best = torch.where(better, err, best)
                codes = torch.where(better.unsqueeze(-1), c, codes)
                scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        if not bool(torch.isfinite(scale).all()):
            raise EncodeError(f"a group's range overflows {self.scale_dtype} scales; use scale_dtype='bfloat16'")
        codes = ungroup(codes.to(torch.uint8), layout)
        return codes, scale, None if self.symmetric else zero.to(torch.uint8)
