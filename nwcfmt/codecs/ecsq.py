"""``ecsq``: entropy-coded scalar quantization of row-normalised weights in the latent layout.

Encoding (:mod:`nwcfmt.encoders.ecsq`) picks the step by bisection so that the record's bytes (stream, tables,
reconstruction values, row scales) stay within ``bits`` per weight. Decoding: ``recon[level, sym] * scale[row]``
in fp32, rounded once to the tensor's dtype, on any device (spec/codecs/latent.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import torch

from nwcfmt.codecs.base import PRIMARY_SEGMENT, EncodeContext, EncodedTensor
from nwcfmt.codecs.latent import (
    LANES_SEGMENT,
    LEVELS_SEGMENT,
    SCALE_DTYPES,
    SCALE_SEGMENT,
    TABLES_SEGMENT,
    CalibratedLatent,
    CalibratedOptions,
    LatentCodec,
    LatentLayout,
    expect,
    out_dtype,
    pack_levels,
)
from nwcfmt.codecs.registry import register_codec
from nwcfmt.container.manifest import TensorRecord
from nwcfmt.container.safetensors_io import TensorInfo
from nwcfmt.encoders import ecsq, latents
from nwcfmt.encoders.rate import find_step, meet_target, secant_step
from nwcfmt.entropy import rans
from nwcfmt.entropy.rans import Context
from nwcfmt.errors import FormatError

RECON_SEGMENT = "recon"
SAMPLE_SYMBOLS = 1 << 16  # rate control bisects on an evenly strided subsample of about this many weights first


@register_codec
class EcsqCodec(LatentCodec):
    """Config: ``bits`` (target bits per weight, a real number; default 4), or ``step`` (the normalised
    quantizer step, skipping rate control), ``centroids`` (reconstruct at cell centroids; else midpoints),
    ``refit`` (least-squares row scales against the reconstruction; else the rows' RMS),
    ``lane_symbols``, ``scale_dtype``."""

    codec_id = "ecsq"

    def __init__(self, centroids: bool = True, **config: Any) -> None:
        super().__init__(**config)
        self.centroids = bool(centroids)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "centroids": self.centroids}

    # ------------------------------------------------------------------------------------------ encode
    def encode(self, tensor: torch.Tensor, ctx: EncodeContext | None = None) -> EncodedTensor:
        weight, scale0 = self.rows_and_scales(tensor)
        normalised = weight / scale0[:, None]

        def encode_at(step: float) -> tuple[float, EncodedTensor]:
            result = ecsq.quantize(weight, normalised, step, self.scale_dtype, self.centroids, scale0, self.refit)
            return self.record(result, step)

        if self.step is not None:
            return encode_at(float(self.step))[1]
        return meet_target(encode_at, self._data_free_step(normalised), self.bits)[1]

    def _data_free_step(self, normalised: torch.Tensor) -> float:
        """The step whose estimated bytes (ideal code length with the integer tables, scales, centroids) meet
        ``bits`` for round-to-nearest of ``normalised`` (:func:`nwcfmt.encoders.rate.find_step`)."""
        rows, cols = normalised.shape
        n = rows * cols
        side = rows * SCALE_DTYPES[self.scale_dtype].itemsize
        y_min, y_max = float(normalised.min()), float(normalised.max())
        flat = normalised.reshape(-1)
        sample = flat[:: max(1, n // SAMPLE_SYMBOLS)]

        def estimate_on(values: torch.Tensor) -> Callable[[float], float]:
            def bits_at(step: float) -> float:
                q_min = round(y_min / step)  # round is monotonic: the extremes give the alphabet
                alphabet = round(y_max / step) - q_min + 1
                if alphabet > rans.MAX_ALPHABET:
                    return float("inf")
                q = torch.round(values / step).to(torch.int64).numpy()
                scaled = np.bincount(q - q_min, minlength=alphabet)[None] * (n / values.numel())
                stream_bytes, _ = latents.estimate_bytes(scaled, n, self.lane_symbols)
                return 8 * (stream_bytes + side + 4 * alphabet) / n

            return bits_at

        return find_step(estimate_on, sample, flat, self.bits)

    def record(self, result: ecsq.EcsqResult, step: float) -> tuple[float, EncodedTensor]:
        """The stored record of a quantization at ``step``, and its bits per weight (file bytes)."""
        rows = result.scale.numel()
        n_levels, alphabet = result.recon.shape
        latents.check_alphabet(alphabet, self.codec_id)
        context = Context(levels=result.levels, n_levels=n_levels) if n_levels > 1 else Context()
        freqs = latents.tables_for(latents.table_counts(result.symbols, alphabet, context))
        stream = latents.encode_stream(result.symbols, freqs, context, self.lane_symbols)
        segments = {
            PRIMARY_SEGMENT: torch.from_numpy(stream.words),
            LANES_SEGMENT: torch.from_numpy(stream.lanes),
            TABLES_SEGMENT: torch.from_numpy(freqs),
            RECON_SEGMENT: result.recon,
            SCALE_SEGMENT: result.scale.to(SCALE_DTYPES[self.scale_dtype]),
        }
        if n_levels > 1:
            segments[LEVELS_SEGMENT] = torch.from_numpy(pack_levels(result.levels))
        nbytes = sum(s.numel() * s.element_size() for s in segments.values())
        params: dict[str, Any] = {
            "levels": n_levels,
            "lane_symbols": self.lane_symbols,
            "scale_dtype": self.scale_dtype,
            "step": float(np.float32(step)),
            "centroids": self.centroids,
            "refit": self.refit,
        }
        if self.step is None:
            params["bits_target"] = self.bits
        return 8 * nbytes / (rows * result.cols), EncodedTensor(segments, params)

    def encode_with_hessian(
        self, tensor: torch.Tensor, hessian: torch.Tensor, options: CalibratedOptions, ctx: EncodeContext | None = None
    ) -> CalibratedLatent:
        """Calibrated ECSQ (:func:`nwcfmt.encoders.ecsq.ldlq_quantize`) of one Linear weight, rate-controlled
        on the record's real bytes; the row scales of the result may still be tuned (``CalibratedLatent``)."""
        weight, scale0 = self.rows_and_scales(tensor)
        plan = ecsq.column_plan(hessian, options)
        levels = plan.levels

        def steps_of(step: float) -> torch.Tensor:
            return ecsq.level_steps(plan.importance, levels, options.levels, step)

        def encode_at(step: float) -> tuple[float, ecsq.EcsqResult]:
            result = ecsq.ldlq_quantize(
                weight, hessian, scale0, step, levels, steps_of, self.scale_dtype, centroids=self.centroids,
                refit=self.refit, feedback=options.feedback, order=plan.order, group=options.group,
                percdamp=options.percdamp, upper=plan.upper,
            )  # fmt: skip
            return self.record(result, step)[0], result

        if self.step is not None:
            step, result = float(self.step), encode_at(float(self.step))[1]
        else:
            start = self._data_free_step(weight / scale0[:, None])
            step, result = secant_step(encode_at, start, self.bits)
        return CalibratedLatent(
            values=result.values,
            scale=result.scale,
            finish=partial(self._finish, result, step),  # picklable: drafts cross torch.distributed ranks
        )

    def _finish(self, result, step: float, scale: torch.Tensor) -> EncodedTensor:
        return self.record(replace(result, scale=scale), step)[1]

    # ------------------------------------------------------------------------------------------ decode
    @classmethod
    def expected_segments(cls, record: TensorRecord, layout: LatentLayout) -> set[str]:
        return {*super().expected_segments(record, layout), RECON_SEGMENT}

    @classmethod
    def validate(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> None:
        super().validate(record, segments)
        layout = cls.layout(record)
        alphabet = segments[TABLES_SEGMENT].shape[1]
        expect(record, segments[RECON_SEGMENT], "F32", (layout.n_levels, alphabet), RECON_SEGMENT)

    @classmethod
    def check(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor]) -> None:
        super().check(record, segments)
        if not bool(torch.isfinite(segments[RECON_SEGMENT]).all()):
            raise FormatError(f"tensor {record.name!r}: reconstruction values must be finite")

    @classmethod
    def decode(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        layout = cls.layout(record)
        if cls.on_cpu(segments):
            cls.check(record, segments)
        symbols = cls.decode_symbols(record, segments, device)
        recon = segments[RECON_SEGMENT].to(device)
        alphabet = recon.shape[1]
        if layout.n_levels > 1:
            levels = layout.column_levels(segments[LEVELS_SEGMENT].to(device)).to(torch.int64)
            symbols = symbols.view(layout.rows, layout.cols) + levels[None, :] * alphabet
        values = recon.reshape(-1)[symbols.reshape(-1)].view(layout.rows, layout.cols)
        scale = segments[SCALE_SEGMENT].to(device=device, dtype=torch.float32)
        return (values * scale[:, None]).to(out_dtype(record)).reshape(record.shape)
