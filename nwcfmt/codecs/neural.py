"""``neural``: NWC's learned transform (architecture ``nwc-mlp-1``) in the entropy-coded latent layout.

Each row is divided by its RMS; the normalised weights are cut into chunks of 16 consecutive rows of one
column (rows padded with zeros to a multiple of 16); the shipped encoder network maps each chunk to 16 integer
latents at the tensor's latent step, and the decoder network, stored once per file as shared segments and
referenced by its hash, rebuilds the chunk (:mod:`nwcfmt.neural.arch`). Latent ``i`` is element ``i mod 16``
of chunk ``i div 16``, chunks ordered row block by row block, column by column; tables are per latent channel
(16) or one for all, whichever is smaller. The step is found by bisection so that the record's bytes, with its
share of the decoder network (split over the file's ``neural`` records), meet ``bits`` per weight; the row
scales are then refit by least squares against the decoded chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch

from nwcfmt.codecs.base import PRIMARY_SEGMENT, EncodeContext, EncodedTensor
from nwcfmt.codecs.ecsq import SAMPLE_SYMBOLS
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
    int_param,
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
from nwcfmt.errors import EncodeError, FormatError
from nwcfmt.neural import arch

NET_PREFIX = "net."
CHANNEL_CHOICES = ("auto", 1, arch.CHUNK)
DEFAULT_NET_SHARE = 64  # tensors assumed to share one file's decoder network when budgeting its bytes


def net_bytes() -> int:
    return 4 * sum(math.prod(shape) for shape in arch.DECODER_TENSORS.values())


def chunk_view(matrix: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` -> ``[n_blocks * cols, 16]`` chunks (rows zero-padded to a multiple of 16)."""
    rows, cols = matrix.shape
    blocks = math.ceil(rows / arch.CHUNK)
    padded = torch.zeros(blocks * arch.CHUNK, cols, dtype=matrix.dtype, device=matrix.device)
    padded[:rows] = matrix
    return padded.view(blocks, arch.CHUNK, cols).permute(0, 2, 1).reshape(-1, arch.CHUNK)


def unchunk(chunks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`chunk_view`: ``[n_blocks * cols, 16]`` -> ``[rows, cols]``."""
    blocks = chunks.shape[0] // cols
    return chunks.view(blocks, cols, arch.CHUNK).permute(0, 2, 1).reshape(blocks * arch.CHUNK, cols)[:rows]


@register_codec
class NeuralCodec(LatentCodec):
    """Config: ``bits`` (target bits per weight, a real number; default 4) or ``step`` (the latent step,
    skipping rate control), ``channels`` ("auto", 1 or 16 tables), ``net_share`` (over how many records
    the file's decoder network is budgeted: "auto" takes the count ``encode_model`` plans, else 64),
    ``refit`` (least-squares row scales), ``lane_symbols``, ``scale_dtype``."""

    codec_id = "neural"
    chunk = arch.CHUNK
    feedback_group = 4  # the network's per-call cost dominates one column: block LDLQ of 4 columns

    def __init__(self, channels: str | int = "auto", net_share: str | int = "auto", **config: Any) -> None:
        super().__init__(**config)
        if channels not in CHANNEL_CHOICES:
            raise EncodeError("channels must be 'auto', 1 or 16")
        if net_share != "auto" and (not isinstance(net_share, int) or isinstance(net_share, bool) or net_share < 1):
            raise EncodeError("net_share must be 'auto' or a positive integer")
        self.channels, self.net_share = channels, net_share

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "channels": self.channels, "net_share": self.net_share}

    def claims(self, ctx: EncodeContext | None) -> int:
        """Over how many records the file's one copy of the decoder network is budgeted."""
        if self.net_share != "auto":
            return int(self.net_share)
        return ctx.shared_claims if ctx is not None and ctx.shared_claims > 0 else DEFAULT_NET_SHARE

    # ------------------------------------------------------------------------------------------ encode
    def encode(self, tensor: torch.Tensor, ctx: EncodeContext | None = None) -> EncodedTensor:
        from nwcfmt.neural.weights import load_codec

        net = load_codec()
        weight, scale0 = self.rows_and_scales(tensor)
        rows, cols = weight.shape
        normalised = weight / scale0[:, None]
        chunks = chunk_view(normalised)
        levels = torch.zeros(chunks.shape[0], dtype=torch.int64)
        net_share = net_bytes() / self.claims(ctx)  # this record's budgeted share of the file's decoder network

        def encode_at(step: float) -> tuple[float, EncodedTensor]:
            q = arch.encode_chunks(chunks, levels, step, net.encoder)
            decoded = unchunk(arch.decode_chunks(q, levels, step, net.decoder), rows, cols)
            scale = ecsq.refit_scales(weight, decoded, scale0) if self.refit else scale0
            return self.record(q, None, step, ecsq.stored(scale, self.scale_dtype), cols, net_share)

        if self.step is not None:
            return encode_at(float(np.float32(self.step)))[1]
        step = self._data_free_step(normalised, net_share)
        return meet_target(lambda s: encode_at(float(np.float32(s))), step, self.bits)[1]

    def _data_free_step(self, normalised: torch.Tensor, net_share: float) -> float:
        """The step whose estimated bytes (ideal code length of the encoder network's latents with integer
        tables, scales, the network's share) meet ``bits`` (:func:`nwcfmt.encoders.rate.find_step`)."""
        from nwcfmt.neural.weights import load_codec

        net = load_codec()
        rows, cols = normalised.shape
        chunks = chunk_view(normalised)
        levels = torch.zeros(chunks.shape[0], dtype=torch.int64)
        n = rows * cols  # weights; the latents also cover the padding rows
        side = rows * SCALE_DTYPES[self.scale_dtype].itemsize + net_share
        channel_options = (1, arch.CHUNK) if self.channels == "auto" else (self.channels,)

        def stream_estimate(q: torch.Tensor, scale_up: float) -> float:
            """Estimated stream bytes of latents ``q`` ``[m, 16]`` with the better channel choice."""
            q_min = int(q.min())
            alphabet = int(q.max()) - q_min + 1
            if alphabet > rans.MAX_ALPHABET:
                return float("inf")
            sym = (q - q_min).numpy()
            best = float("inf")
            for c in channel_options:
                counts = np.stack([np.bincount(sym[:, k], minlength=alphabet) for k in range(arch.CHUNK)])
                counts = counts.sum(0, keepdims=True) if c == 1 else counts
                nbytes, _ = latents.estimate_bytes(counts * scale_up, chunks.numel(), self.lane_symbols)
                best = min(best, nbytes)
            return best

        def estimate_on(values: torch.Tensor) -> Callable[[float], float]:
            scale_up = chunks.shape[0] / values.shape[0]

            def bits_at(step: float) -> float:
                q = arch.encode_chunks(values, levels[: values.shape[0]], step, net.encoder)
                return 8 * (stream_estimate(q, scale_up) + side) / n

            return bits_at

        stride = max(1, chunks.shape[0] * arch.CHUNK // SAMPLE_SYMBOLS)
        return find_step(estimate_on, chunks[::stride], chunks, self.bits)

    def record(
        self, q: torch.Tensor, levels: np.ndarray | None, step: float, scale: torch.Tensor, cols: int, net_share: float
    ) -> tuple[float, EncodedTensor]:
        """The stored record of latents ``q`` ``[n_chunks, 16]`` (chunk ``b * cols + c``), column ``levels``
        (uint8, or None for one level), the float32 ``step`` and stored row ``scale``; and its bits per weight
        with ``net_share`` bytes of the decoder network. Tables per channel or one for all, the smaller."""
        from nwcfmt.neural.weights import load_codec

        net = load_codec()
        rows = scale.numel()
        n_levels = 1 if levels is None else int(levels.max()) + 1
        levels = levels if n_levels > 1 else None
        q_min = int(q.min())
        alphabet = int(q.max()) - q_min + 1
        latents.check_alphabet(alphabet, self.codec_id)
        symbols = (q - q_min).reshape(-1).numpy()
        options = (1, arch.CHUNK) if self.channels == "auto" else (self.channels,)
        best: tuple[float, int, np.ndarray] | None = None
        for channels in options:
            context = Context(channels, levels, arch.CHUNK, n_levels)
            counts = latents.table_counts(symbols, alphabet, context)
            nbytes, freqs = latents.estimate_bytes(counts, symbols.size, self.lane_symbols)
            if best is None or nbytes < best[0]:
                best = (nbytes, channels, freqs)
        _, channels, freqs = best
        context = Context(channels, levels, arch.CHUNK, n_levels)
        stream = latents.encode_stream(symbols, freqs, context, self.lane_symbols)
        segments = {
            PRIMARY_SEGMENT: torch.from_numpy(stream.words),
            LANES_SEGMENT: torch.from_numpy(stream.lanes),
            TABLES_SEGMENT: torch.from_numpy(freqs),
            SCALE_SEGMENT: scale.to(SCALE_DTYPES[self.scale_dtype]),
        }
        if levels is not None:
            segments[LEVELS_SEGMENT] = torch.from_numpy(pack_levels(levels))
        own = sum(s.numel() * s.element_size() for s in segments.values())
        params: dict[str, Any] = {
            "levels": n_levels,
            "lane_symbols": self.lane_symbols,
            "scale_dtype": self.scale_dtype,
            "step": step,
            "latent_min": q_min,
            "channels": channels,
            "arch": arch.ARCH_ID,
            "decoder_sha256": net.decoder_hash,
            "refit": self.refit,
        }
        if self.step is None:
            params["bits_target"] = self.bits
        shared = {}
        for name in arch.DECODER_TENSORS:  # a fixed order (a loaded file's key order is not): same bytes
            segments[NET_PREFIX + name] = net.decoder[name]
            shared[NET_PREFIX + name] = f"{arch.ARCH_ID}.{net.decoder_hash[:16]}.{name}"
        return 8 * (own + net_share) / (rows * cols), EncodedTensor(segments, params, shared)

    def encode_with_hessian(
        self, tensor: torch.Tensor, hessian: torch.Tensor, options: CalibratedOptions, ctx: EncodeContext | None = None
    ) -> CalibratedLatent:
        """Calibrated ``neural``: LDLQ over the columns, each column's chunks coded by the encoder network at
        the column's importance level (the quality embedding), rate-controlled on the record's real bytes; the
        row scales are refit in the ``H`` metric and may still be tuned (``CalibratedLatent``)."""
        from nwcfmt.encoders.ldlq import ldlq
        from nwcfmt.neural.weights import load_codec

        net = load_codec()
        weight, scale0 = self.rows_and_scales(tensor)
        rows, cols = weight.shape
        normalised = weight / scale0[:, None]
        plan = ecsq.column_plan(hessian, options)
        order, upper, col_levels = plan.order, plan.upper, plan.levels
        stored_levels = col_levels.to(torch.uint8).numpy() if options.levels > 1 else None
        blocks = math.ceil(rows / arch.CHUNK)
        padded = blocks * arch.CHUNK
        net_share = net_bytes() / self.claims(ctx)

        def sweep(step: float) -> tuple[torch.Tensor, torch.Tensor]:
            """Latents ``[blocks, cols, 16]`` and decoded values ``[rows, cols]`` at ``step``."""
            q = torch.empty(blocks, cols, arch.CHUNK, dtype=torch.int64)
            st = torch.tensor(step, dtype=torch.float32)

            @torch.no_grad()
            def quantize_columns(js: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
                # the networks' functions directly (a few small columns per call: the checked batch wrappers
                # cost as much as the arithmetic); the final weights are decoded from the record
                g = js.numel()
                x = torch.zeros(g, padded, dtype=torch.float32)
                x[:, :rows] = targets
                lv = col_levels[js].repeat_interleave(blocks)
                qj = torch.round(arch.encoder_latents(x.view(g * blocks, arch.CHUNK), lv, st, net.encoder))
                q[:, js] = qj.view(g, blocks, arch.CHUNK).transpose(0, 1).to(torch.int64)
                return arch.decoder_output(qj, lv, st, net.decoder).view(g, padded)[:, :rows]

            if options.feedback:
                result = ldlq(normalised, hessian, quantize_columns, order=order, group=options.group,
                              percdamp=options.percdamp, upper=upper)  # fmt: skip
                decoded = result.decoded
            else:
                decoded = quantize_columns(torch.arange(cols), normalised.T).T.contiguous()
            return q.reshape(-1, arch.CHUNK), decoded

        def encode_at(step: float) -> tuple[float, tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]]:
            step = float(np.float32(step))
            q, values = sweep(step)
            scale = scale0
            if self.refit:
                scale = ecsq.stored(ecsq.hessian_refit(weight, values, hessian, scale0), self.scale_dtype)
            return self.record(q, stored_levels, step, scale, cols, net_share)[0], (step, q, values, scale)

        if self.step is not None:
            _, (step, q, values, scale) = encode_at(float(self.step))
        else:
            start = self._data_free_step(normalised, net_share)
            _, (step, q, values, scale) = secant_step(encode_at, start, self.bits)
        return CalibratedLatent(
            values=values,
            scale=scale,
            finish=partial(self._finish, q, stored_levels, step, cols, net_share),  # picklable (torch.distributed)
        )

    def _finish(self, q, stored_levels, step: float, cols: int, net_share: int, tuned: torch.Tensor) -> EncodedTensor:
        return self.record(q, stored_levels, step, tuned, cols, net_share)[1]

    # ------------------------------------------------------------------------------------------ layout
    @classmethod
    def n_symbols(cls, rows: int, cols: int) -> int:
        return math.ceil(rows / arch.CHUNK) * arch.CHUNK * cols

    @classmethod
    def channels_of(cls, record: TensorRecord) -> int:
        channels = record.params.get("channels")
        if channels not in (1, arch.CHUNK) or isinstance(channels, bool):
            raise FormatError(f"tensor {record.name!r}: param 'channels' must be 1 or {arch.CHUNK}")
        return channels

    @classmethod
    def net_params(cls, record: TensorRecord) -> tuple[float, int]:
        """The validated latent step and latent offset."""
        if record.params.get("arch") != arch.ARCH_ID:
            raise FormatError(f"tensor {record.name!r}: unknown decoder architecture {record.params.get('arch')!r}")
        digest = record.params.get("decoder_sha256")
        if not isinstance(digest, str) or len(digest) != 64:
            raise FormatError(f"tensor {record.name!r}: param 'decoder_sha256' must be 64 hex digits")
        step = record.params.get("step")
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not 0 < step < float("inf"):
            raise FormatError(f"tensor {record.name!r}: param 'step' must be a positive finite number")
        if float(np.float32(step)) != float(step):
            raise FormatError(f"tensor {record.name!r}: param 'step' must be a float32 value")
        latent_min = int_param(record, "latent_min", -(1 << 30), 1 << 30)
        return float(step), latent_min

    @classmethod
    def expected_segments(cls, record: TensorRecord, layout: LatentLayout) -> set[str]:
        return {*super().expected_segments(record, layout), *(NET_PREFIX + k for k in arch.DECODER_TENSORS)}

    @classmethod
    def validate(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> None:
        super().validate(record, segments)
        cls.net_params(record)
        for name, shape in arch.DECODER_TENSORS.items():
            expect(record, segments[NET_PREFIX + name], "F32", shape, NET_PREFIX + name)

    @classmethod
    def decoder_weights(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = {name: segments[NET_PREFIX + name] for name in arch.DECODER_TENSORS}
        arch.validate_decoder(weights)
        if arch.decoder_hash(weights) != record.params["decoder_sha256"]:
            raise FormatError(f"tensor {record.name!r}: the decoder weights do not match their hash")
        return weights

    @classmethod
    def check(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor]) -> None:
        super().check(record, segments)
        cls.decoder_weights(record, segments)

    @classmethod
    def decode(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        layout = cls.layout(record)
        step, latent_min = cls.net_params(record)
        if cls.on_cpu(segments):
            cls.check(record, segments)  # tables, scales, levels, and the decoder weights against their hash
        weights = {name: segments[NET_PREFIX + name].to(device) for name in arch.DECODER_TENSORS}
        q = (cls.decode_symbols(record, segments, device) + latent_min).view(-1, arch.CHUNK)
        if layout.n_levels > 1:
            col_levels = layout.column_levels(segments[LEVELS_SEGMENT].to(device)).to(torch.int64)
            levels = col_levels.repeat(q.shape[0] // layout.cols)
        else:
            levels = torch.zeros(q.shape[0], dtype=torch.int64, device=device)
        values = unchunk(arch.decode_chunks(q, levels, step, weights), layout.rows, layout.cols)
        scale = segments[SCALE_SEGMENT].to(device=device, dtype=torch.float32)
        return (values * scale[:, None]).to(out_dtype(record)).reshape(record.shape)
