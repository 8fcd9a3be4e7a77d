"""The entropy-coded latent layout shared by ``ecsq`` and ``neural`` (``spec/codecs/latent.md``).

A tensor is viewed as ``[rows, cols]`` (``rows = shape[0]``). Each row has a scale (fp16/bf16), each column an
optional importance level (``levels`` segment, uint8; absent: every column has level 0). The tensor's integer
latents, as indices into an alphabet of ``K`` symbols, are coded by the rANS engine (:mod:`nwcfmt.entropy`):
segments ``data`` (16-bit words), ``lanes`` (start state and word count per lane) and ``tables`` (uint16
frequencies ``[n_levels * channels, K]``). What the latents mean is the codec's:

* ``ecsq``: one latent per weight, row-major; ``recon`` (fp32 ``[n_levels, K]``) gives each symbol's value in
  row-scale units, so ``w[r, c] = recon[level[c], sym] * scale[r]`` (one fp32 product, rounded once).
* ``neural``: 16 latents per chunk of 16 rows of one column, rebuilt by the decoder network the record
  references (:mod:`nwcfmt.codecs.neural`).

Decoders use the stored integer tables as they are; every size is checked against the record before decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from nwcfmt.codecs.base import PRIMARY_SEGMENT, Codec, EncodeContext, EncodedTensor
from nwcfmt.constants import DTYPE_NAMES
from nwcfmt.container.manifest import TensorRecord
from nwcfmt.container.safetensors_io import TensorInfo
from nwcfmt.entropy import rans
from nwcfmt.entropy.rans import Context, RansStream
from nwcfmt.entropy.tables import check_tables
from nwcfmt.errors import EncodeError, FormatError

LANES_SEGMENT, TABLES_SEGMENT, SCALE_SEGMENT, LEVELS_SEGMENT = "lanes", "tables", "scale", "levels"
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SCALE_ST = {"float16": "F16", "bfloat16": "BF16"}
MAX_LEVELS = 4
LATENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


LEVELS_PACKED_SINCE = 2  # codec_version from which the levels segment holds 2 bits a column
LEVELS_PER_BYTE = 4


def pack_levels(levels: np.ndarray) -> np.ndarray:
    """Column levels (uint8, each below 4) packed 4 to a byte, column ``c`` in bits ``2(c mod 4)`` and
    ``2(c mod 4) + 1`` of byte ``c div 4``; the last byte's unused bits are 0."""
    padded = np.zeros(-(-levels.size // LEVELS_PER_BYTE) * LEVELS_PER_BYTE, np.uint8)
    padded[: levels.size] = levels
    quads = padded.reshape(-1, LEVELS_PER_BYTE)
    return (quads[:, 0] | quads[:, 1] << 2 | quads[:, 2] << 4 | quads[:, 3] << 6).astype(np.uint8)


def unpack_levels(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """:func:`pack_levels` undone on the tensor's device: uint8 ``[cols]``."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 3).reshape(-1)[:cols]


@dataclass(frozen=True)
class LatentLayout:
    """Geometry and entropy-stream parameters of one record, validated."""

    rows: int
    cols: int
    n_symbols: int
    lane_symbols: int
    channels: int
    n_levels: int
    level_run: int
    scale_dtype: str
    codec_version: int = LEVELS_PACKED_SINCE

    @property
    def levels_bytes(self) -> int:
        """Length of the ``levels`` segment: 2 bits a column (version 2), one byte a column (version 1)."""
        packed = self.codec_version >= LEVELS_PACKED_SINCE
        return -(-self.cols // LEVELS_PER_BYTE) if packed else self.cols

    def column_levels(self, stored: torch.Tensor) -> torch.Tensor:
        """The ``levels`` segment as one uint8 level per column (on the segment's device)."""
        return stored if self.codec_version < LEVELS_PACKED_SINCE else unpack_levels(stored, self.cols)

    @property
    def n_lanes(self) -> int:
        return rans.n_lanes(self.n_symbols, self.lane_symbols)

    @property
    def n_tables(self) -> int:
        return self.channels * self.n_levels

    def context(self, levels: np.ndarray | None) -> Context:
        return Context(self.channels, levels, self.level_run, self.n_levels)


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, math.prod(shape) // rows


def int_param(record: TensorRecord, key: str, lo: int, hi: int) -> int:
    value = record.params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise FormatError(f"tensor {record.name!r}: param {key!r} must be an integer in [{lo}, {hi}]")
    return value


def expect(record: TensorRecord, info: TensorInfo, dtype: str, shape: tuple[int, ...], name: str) -> None:
    if info.dtype != dtype or tuple(info.shape) != shape:
        raise FormatError(
            f"tensor {record.name!r}: segment {name!r} is {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}"
        )


@dataclass(frozen=True)
class CalibratedOptions:
    """The calibrated stages of a latent encoder (each switchable, to measure it)."""

    levels: int = MAX_LEVELS  # importance levels from diag(H) (1: none)
    feedback: bool = True  # LDLQ error feedback
    finetune: bool = True  # row scales tuned on the block output
    tune_uncoded: bool = True  # the block's not-yet-coded weights tuned on its output after each coding stage
    act_order: bool = True  # feedback in decreasing diag(H) order (GPTQ act-order; free here: no groups)
    percdamp: float = 0.01
    importance: str = "ldl"  # what ranks columns into levels: "ldl" (the feedback's LDL diagonal) or "hdiag"
    group: int = 1  # columns quantized together by the feedback (block LDLQ)


@dataclass
class CalibratedLatent:
    """A calibrated encoder's result for one Linear, before its row scales are final: the decoded weight is
    ``values * scale[:, None]`` (fp32); ``finish(scale)`` stores it with the given (stored-dtype) scales."""

    values: torch.Tensor  # fp32 [rows, cols], in row-scale units
    scale: torch.Tensor  # fp32 [rows], as stored
    finish: Callable[[torch.Tensor], EncodedTensor]
    stats: dict[str, float] = field(default_factory=dict)


class LatentCodec(Codec):
    """Storage, validation and entropy decoding of the latent layout; subclasses say what latents mean."""

    version = 2  # 2: levels packed 2 bits a column (1: a byte a column; still read)
    exact = False
    base_segments: ClassVar[tuple[str, ...]] = (PRIMARY_SEGMENT, LANES_SEGMENT, TABLES_SEGMENT, SCALE_SEGMENT)
    chunk: ClassVar[int] = 1  # latents per position: symbol i belongs to position i // chunk
    calibration_optional: ClassVar[bool] = True  # calibrated from a model folder, else data-free
    feedback_group: ClassVar[int] = 1  # default columns per LDLQ step

    # ------------------------------------------------------------------------------------------ layout
    @classmethod
    def n_symbols(cls, rows: int, cols: int) -> int:
        return rows * cols

    @classmethod
    def channels_of(cls, record: TensorRecord) -> int:
        return 1

    @classmethod
    def layout(cls, record: TensorRecord) -> LatentLayout:
        if record.dtype not in ("float32", "float16", "bfloat16") or not record.shape or 0 in record.shape:
            raise FormatError(f"tensor {record.name!r}: {record.codec} tensors must be non-empty float tensors")
        if record.params.get("scale_dtype") not in tuple(SCALE_DTYPES):
            raise FormatError(f"tensor {record.name!r}: param 'scale_dtype' must be one of {', '.join(SCALE_DTYPES)}")
        rows, cols = matrix_shape(record.shape)
        lane = int_param(record, "lane_symbols", rans.MIN_LANE_SYMBOLS, rans.MAX_LANE_SYMBOLS)
        channels = cls.channels_of(record)
        if lane % channels:
            raise FormatError(f"tensor {record.name!r}: lane_symbols must be a multiple of the channels")
        n_levels = int_param(record, "levels", 1, MAX_LEVELS)
        return LatentLayout(
            rows,
            cols,
            cls.n_symbols(rows, cols),
            lane,
            channels,
            n_levels,
            cls.chunk,
            record.params["scale_dtype"],
            record.codec_version,
        )

    @classmethod
    def expected_segments(cls, record: TensorRecord, layout: LatentLayout) -> set[str]:
        return {*cls.base_segments, *((LEVELS_SEGMENT,) if layout.n_levels > 1 else ())}

    @classmethod
    def validate(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> None:
        layout = cls.layout(record)
        expected = cls.expected_segments(record, layout)
        if set(segments) != expected:
            raise FormatError(
                f"tensor {record.name!r}: {record.codec} expects segments {sorted(expected)}, found {sorted(segments)}"
            )
        data = segments[PRIMARY_SEGMENT]
        if data.dtype != "U16" or len(data.shape) != 1 or data.shape[0] > layout.n_symbols:
            raise FormatError(f"tensor {record.name!r}: segment 'data' must be 1-D U16 of at most one word a symbol")
        expect(record, segments[LANES_SEGMENT], "U32", (layout.n_lanes, 2), LANES_SEGMENT)
        tables = segments[TABLES_SEGMENT]
        if tables.dtype != "U16" or len(tables.shape) != 2 or tables.shape[0] != layout.n_tables:
            raise FormatError(f"tensor {record.name!r}: segment 'tables' must be U16 [{layout.n_tables}, alphabet]")
        if not 1 <= tables.shape[1] <= rans.MAX_ALPHABET:
            raise FormatError(f"tensor {record.name!r}: alphabet must hold 1 to {rans.MAX_ALPHABET} symbols")
        expect(record, segments[SCALE_SEGMENT], SCALE_ST[layout.scale_dtype], (layout.rows,), SCALE_SEGMENT)
        if layout.n_levels > 1:
            expect(record, segments[LEVELS_SEGMENT], "U8", (layout.levels_bytes,), LEVELS_SEGMENT)

    @classmethod
    def check(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor]) -> None:
        layout = cls.layout(record)
        reason = check_tables(segments[TABLES_SEGMENT].numpy())
        if reason:
            raise FormatError(f"tensor {record.name!r}: {reason}")
        scale = segments[SCALE_SEGMENT].to(torch.float32)
        if not bool(torch.isfinite(scale).all()):
            raise FormatError(f"tensor {record.name!r}: row scales must be finite")
        if layout.n_levels > 1:
            stored = segments[LEVELS_SEGMENT]
            if int(layout.column_levels(stored).max()) >= layout.n_levels:
                raise FormatError(f"tensor {record.name!r}: a column level is not below 'levels'")
            tail = layout.cols % LEVELS_PER_BYTE if layout.codec_version >= LEVELS_PACKED_SINCE else 0
            if tail and int(stored[-1]) >> 2 * tail:
                raise FormatError(f"tensor {record.name!r}: the levels' padding bits must be 0")

    @classmethod
    def stream(cls, segments: Mapping[str, torch.Tensor]) -> RansStream:
        return RansStream(segments[PRIMARY_SEGMENT].numpy(), segments[LANES_SEGMENT].numpy())

    @classmethod
    def on_cpu(cls, segments: Mapping[str, torch.Tensor]) -> bool:
        """CPU segments are checked by :meth:`decode`; device copies were checked on the CPU by the loader."""
        return segments[PRIMARY_SEGMENT].device.type == "cpu"

    @classmethod
    def decode_symbols(
        cls, record: TensorRecord, segments: Mapping[str, torch.Tensor], device: torch.device | None = None
    ) -> torch.Tensor:
        """The latents as alphabet indices (int64), decoded exactly from the stored stream and tables, on
        ``device`` (default: the segments'). On a CUDA device only the stream's bytes cross PCIe and the Triton
        decoder runs there (:mod:`nwcfmt.entropy.gpu`); the small tables come back to the host."""
        from nwcfmt.entropy.gpu import decode_on_device

        layout = cls.layout(record)
        levels = layout.column_levels(segments[LEVELS_SEGMENT].cpu()).numpy() if layout.n_levels > 1 else None
        device = segments[PRIMARY_SEGMENT].device if device is None else device
        symbols = decode_on_device(
            segments[PRIMARY_SEGMENT],
            segments[LANES_SEGMENT],
            segments[TABLES_SEGMENT].cpu().numpy(),
            layout.context(levels),
            layout.n_symbols,
            layout.lane_symbols,
            device,
            f"tensor {record.name!r}",
        )
        return symbols.to(torch.int64)

    @classmethod
    def decodes_on_device(cls, record: TensorRecord) -> bool:
        return True  # the stream decodes on CUDA (Triton); the rest is torch arithmetic on the device

    @classmethod
    def describe(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> dict[str, Any]:
        layout = cls.layout(record)
        parts: dict[str, int] = {}
        for name, info in segments.items():  # a network's tensors count as one part (summaries amortise it)
            key = "net" if name.startswith("net.") else name
            parts[key] = parts.get(key, 0) + info.nbytes
        return {
            "latents": layout.n_symbols,
            "alphabet": segments[TABLES_SEGMENT].shape[1],
            "levels": layout.n_levels,
            "bits_target": record.params.get("bits_target"),
            "bytes": parts,
        }

    # ------------------------------------------------------------------------------------------ encode helpers
    def __init__(
        self,
        bits: float | None = 4.0,
        step: float | None = None,
        refit: bool = True,
        lane_symbols: int = rans.DEFAULT_LANE_SYMBOLS,
        scale_dtype: str = "float16",
        calibrate: bool = True,
        levels: int = MAX_LEVELS,
        feedback: bool = True,
        finetune: bool = True,
        tune_uncoded: bool = True,
        act_order: bool = True,
        percdamp: float = 0.01,
        importance: str = "ldl",
        group: int | None = None,
    ) -> None:
        """The config every latent encoder shares: a target ``bits`` per weight (a real number) or a fixed
        ``step``, ``refit`` (least-squares row scales), ``lane_symbols`` and ``scale_dtype``; and the calibrated
        stages, used when a model folder is encoded with calibration (``calibrate``): ``levels`` (importance
        levels from diag(H), 1 to 4), ``feedback`` (LDLQ), ``finetune`` (row scales tuned on the block output),
        ``tune_uncoded`` (the block's weights not yet coded tuned on its output after each coding stage),
        ``act_order`` and ``percdamp`` (of the feedback), ``importance`` (what ranks columns into levels: "ldl",
        the feedback's LDL diagonal, or "hdiag", diag(H) as NWC does), ``group`` (columns quantized together
        by the feedback; default :attr:`feedback_group`)."""
        if step is None and (not isinstance(bits, (int, float)) or isinstance(bits, bool) or not 0.5 <= bits <= 16):
            raise EncodeError("bits must be a number in [0.5, 16] (or give step)")
        if step is not None and not (isinstance(step, (int, float)) and 0 < step < float("inf")):
            raise EncodeError("step must be a positive number")
        if not rans.MIN_LANE_SYMBOLS <= lane_symbols <= rans.MAX_LANE_SYMBOLS or lane_symbols % self.chunk:
            raise EncodeError(
                f"lane_symbols must be a multiple of {self.chunk} in [{rans.MIN_LANE_SYMBOLS}, {rans.MAX_LANE_SYMBOLS}]"
            )
        if scale_dtype not in tuple(SCALE_DTYPES):
            raise EncodeError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}")
        if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= MAX_LEVELS:
            raise EncodeError(f"levels must be an integer from 1 to {MAX_LEVELS}")
        if not isinstance(percdamp, (int, float)) or not 0 <= percdamp < 10:
            raise EncodeError("percdamp must be a number in [0, 10)")
        self.bits, self.step, self.refit = bits, step, bool(refit)
        self.lane_symbols, self.scale_dtype = lane_symbols, scale_dtype
        self.calibrate = bool(calibrate)
        if importance not in ("ldl", "hdiag"):
            raise EncodeError("importance must be 'ldl' or 'hdiag'")
        group = self.feedback_group if group is None else group
        if not isinstance(group, int) or isinstance(group, bool) or not 1 <= group <= 128:
            raise EncodeError("group must be an integer from 1 to 128")
        self.calibration = CalibratedOptions(
            levels,
            bool(feedback),
            bool(finetune),
            bool(tune_uncoded),
            bool(act_order),
            float(percdamp),
            importance,
            group,
        )

    def get_config(self) -> dict[str, Any]:
        rate = {"step": self.step} if self.step is not None else {"bits": self.bits}
        stages = {**asdict(self.calibration), "calibrate": self.calibrate} if self.calibrate else {"calibrate": False}
        return {
            **rate,
            "refit": self.refit,
            "lane_symbols": self.lane_symbols,
            "scale_dtype": self.scale_dtype,
            **stages,
        }

    def rows_and_scales(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A checked input as fp32 ``[rows, cols]`` and its row RMS as stored (the starting row scales)."""
        from nwcfmt.encoders.ecsq import row_rms

        self.check_input(tensor)
        rows, cols = matrix_shape(tuple(tensor.shape))
        weight = tensor.detach().to(torch.float32).reshape(rows, cols)
        return weight, row_rms(weight, self.scale_dtype)

    def encode_with_hessian(
        self, tensor: torch.Tensor, hessian: torch.Tensor, options: CalibratedOptions, ctx: EncodeContext | None = None
    ) -> CalibratedLatent:
        """Calibrated encode of one Linear weight with the Hessian ``[cols, cols]`` of its input."""
        raise EncodeError(f"{self.codec_id} has no calibrated encoder")

    def check_input(self, tensor: torch.Tensor) -> None:
        if tensor.dtype not in LATENT_DTYPES or tensor.dim() < 1 or tensor.numel() == 0:
            raise EncodeError(
                f"{self.codec_id} encodes non-empty float tensors, not {tensor.dtype}{list(tensor.shape)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise EncodeError(f"{self.codec_id} cannot encode a tensor holding inf or NaN")

    def supports(self, tensor: torch.Tensor) -> bool:
        return tensor.dtype in LATENT_DTYPES and tensor.dim() >= 1 and tensor.numel() > 0


def out_dtype(record: TensorRecord) -> torch.dtype:
    return DTYPE_NAMES[record.dtype]
