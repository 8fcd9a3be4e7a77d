"""The integer-code layout shared by every scalar quantizer (rtn now; gptq, flexround, lrq later).

A tensor is viewed as ``[rows, cols]`` (``rows = shape[0]``, ``cols = numel / rows``). Codes are ``bits``-bit
unsigned integers, packed per row LSB first; each group of ``group_size`` consecutive values of a row has a
``scale`` (fp16 or bf16) and, when asymmetric, an integer ``zero`` (uint8). Symmetric codes use the implicit
zero ``2**(bits - 1)``. ``group_size`` 0 means one group per row (per channel), -1 one group for the whole
tensor. Only encoders differ between codecs; :class:`GroupQuantCodec` holds the storage and decoding.

Optionally the packed codes are entropy-coded with zstd in chunks of rows (``entropy: "zstd"``) when that
saves space. The exact layout is in ``spec/codecs/quant.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nwcfmt.codecs.base import PRIMARY_SEGMENT, Codec, EncodedTensor
from nwcfmt.codecs.entropy import check_stream, compress_frame, unpack_stream
from nwcfmt.constants import DTYPE_NAMES
from nwcfmt.container.manifest import TensorRecord
from nwcfmt.container.safetensors_io import TensorInfo
from nwcfmt.errors import EncodeError, FormatError, LimitError
from nwcfmt.kernels import reference
from nwcfmt.parallel import parallel_map

if TYPE_CHECKING:
    from nwcfmt.calibration.method import LinearResult

SCALE_SEGMENT, ZERO_SEGMENT, INDEX_SEGMENT = "scale", "zero", "index"
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
PER_CHANNEL, PER_TENSOR = 0, -1
ZSTD_BLOCK = 1 << 17
ENTROPY_CHUNK_BYTES = 1 << 20  # packed bytes per zstd frame (whole rows), decoded independently
QUANTIZABLE = (torch.float32, torch.float16, torch.bfloat16)
OptTensor = torch.Tensor | None


@dataclass(frozen=True)
class QuantLayout:
    """Geometry of one quantized tensor, derived from its shape and params."""

    rows: int
    cols: int
    bits: int
    group_size: int  # the effective group length along a row
    n_groups: int
    scale_rows: int
    symmetric: bool

    @classmethod
    def of(cls, shape: tuple[int, ...], bits: int, group_size: int, symmetric: bool) -> QuantLayout:
        rows = shape[0] if len(shape) >= 2 else 1  # 2-D and up: rows are output channels; 1-D: one row
        cols = math.prod(shape) // rows
        if group_size == PER_TENSOR:
            return cls(rows, cols, bits, cols, 1, 1, symmetric)
        if group_size == PER_CHANNEL or group_size >= cols:
            return cls(rows, cols, bits, cols, 1, rows, symmetric)
        return cls(rows, cols, bits, group_size, math.ceil(cols / group_size), rows, symmetric)

    @property
    def row_bytes(self) -> int:
        return reference.row_bytes(self.cols, self.bits)

    @property
    def packed_bytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def implicit_zero(self) -> int:
        return 1 << (self.bits - 1)

    def rows_per_chunk(self) -> int:
        return max(1, ENTROPY_CHUNK_BYTES // max(self.row_bytes, 1))


def _int_param(record: TensorRecord, key: str, lo: int, hi: int) -> int:
    value = record.params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise FormatError(f"tensor {record.name!r}: param {key!r} must be an integer in [{lo}, {hi}]")
    return value


def layout_of(record: TensorRecord) -> QuantLayout:
    """The validated layout a record declares."""
    bits = _int_param(record, "bits", 1, 8)
    group_size = _int_param(record, "group_size", -1, 1 << 31)
    symmetric = record.params.get("symmetric")
    if not isinstance(symmetric, bool):
        raise FormatError(f"tensor {record.name!r}: param 'symmetric' must be a boolean")
    if record.params.get("scale_dtype") not in tuple(SCALE_DTYPES):
        raise FormatError(f"tensor {record.name!r}: param 'scale_dtype' must be one of {', '.join(SCALE_DTYPES)}")
    if record.params.get("entropy", "none") not in ("none", "zstd"):
        raise FormatError(f"tensor {record.name!r}: param 'entropy' must be 'none' or 'zstd'")
    if record.dtype not in ("float32", "float16", "bfloat16") or not record.shape or 0 in record.shape:
        raise FormatError(f"tensor {record.name!r}: quantized tensors must be non-empty float tensors")
    return QuantLayout.of(record.shape, bits, group_size, symmetric)


def _check_segment(record: TensorRecord, info: TensorInfo, dtype: str, shape: tuple[int, ...], name: str) -> None:
    if info.dtype != dtype or info.shape != shape:
        raise FormatError(
            f"tensor {record.name!r}: segment {name!r} is {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}"
        )


class GroupQuantCodec(Codec):
    """Storage and decoding of integer codes with per-group scale and zero; subclasses implement encoding.

    Config shared by every encoder: ``bits`` (1-8), ``group_size`` (> 0, or 0 per channel, -1 per tensor),
    ``symmetric``, ``scale_dtype`` ("float16" or "bfloat16") and ``entropy``: "none" (default: the plain
    layout, what GPU kernels read directly), "auto" (zstd when it saves at least 2%) or "zstd".
    """

    version = 1
    segment_names = (PRIMARY_SEGMENT, SCALE_SEGMENT, ZERO_SEGMENT, INDEX_SEGMENT)  # zero/index are optional

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 128,
        symmetric: bool = False,
        scale_dtype: str = "float16",
        entropy: str = "none",
    ) -> None:
        if bits not in reference.SUPPORTED_BITS:
            raise EncodeError(f"bits must be one of {reference.SUPPORTED_BITS}")
        if group_size < -1:
            raise EncodeError("group_size must be > 0, 0 (per channel) or -1 (per tensor)")
        if scale_dtype not in SCALE_DTYPES:
            raise EncodeError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}")
        if entropy not in ("auto", "zstd", "none"):
            raise EncodeError("entropy must be 'auto', 'zstd' or 'none'")
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.scale_dtype, self.entropy = scale_dtype, entropy

    def get_config(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_dtype": self.scale_dtype,
        }

    def supports(self, tensor: torch.Tensor) -> bool:
        return tensor.dtype in QUANTIZABLE and tensor.dim() >= 1 and tensor.numel() > 0

    def layout(self, tensor: torch.Tensor) -> QuantLayout:
        return QuantLayout.of(tuple(tensor.shape), self.bits, self.group_size, self.symmetric)

    # ------------------------------------------------------------------------------------------ encode
    def quantize(
        self, weight: torch.Tensor, layout: QuantLayout
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Encoder hook: ``[rows, cols]`` fp32 weight -> (codes uint8, scale, zero uint8 or None)."""
        raise NotImplementedError

    def encode(self, tensor: torch.Tensor, ctx=None) -> EncodedTensor:
        if not self.supports(tensor):
            raise EncodeError(
                f"{self.codec_id} quantizes non-empty float tensors, not {tensor.dtype}{list(tensor.shape)}"
            )
        layout = self.layout(tensor)
        weight = tensor.detach().to(torch.float32).reshape(layout.rows, layout.cols)
        codes, scale, zero = self.quantize(weight, layout)
        return self.pack(codes, scale, zero, layout)

    def pack(
        self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, layout: QuantLayout
    ) -> EncodedTensor:
        """Store codes, scale and zero in the shared layout (with the optional entropy stage)."""
        packed = reference.pack_codes(codes.cpu(), layout.bits).reshape(-1)
        params = {**self.get_config(), "entropy": "none"}
        segments: dict[str, torch.Tensor] = {PRIMARY_SEGMENT: packed}
        if self.entropy != "none":
            index, data = _compress_rows(packed.numpy(), layout)
            if self.entropy == "zstd" or len(data) < 0.98 * packed.numel():
                segments = {INDEX_SEGMENT: torch.from_numpy(index), PRIMARY_SEGMENT: torch.from_numpy(data)}
                params["entropy"] = "zstd"
        segments[SCALE_SEGMENT] = scale.to(SCALE_DTYPES[self.scale_dtype]).reshape(layout.scale_rows, layout.n_groups)
        if not layout.symmetric:
            segments[ZERO_SEGMENT] = zero.to(torch.uint8).reshape(layout.scale_rows, layout.n_groups)
        return EncodedTensor(segments, params)

    def result(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None,
        layout: QuantLayout,
        stats: dict[str, float] | None = None,
    ) -> LinearResult:
        """A calibrated encoder's result (:mod:`nwcfmt.calibration.method`): the packed record (:meth:`pack`)
        and the fp32 weight a decoder rebuilds from it, ``(codes - zero) * scale`` with the stored scale.

        ``codes``: uint8 ``[rows, cols]``; ``scale``: ``[scale_rows, n_groups]`` values (rounded to
        ``scale_dtype`` when stored); ``zero``: integer-valued ``[scale_rows, n_groups]``, None when symmetric.
        """
        from nwcfmt.calibration.method import LinearResult

        check_codes(codes, scale, zero, layout)
        encoded = self.pack(codes, scale, zero, layout)
        stored_zero = None if layout.symmetric else encoded.segments[ZERO_SEGMENT]
        weight = dequantize(codes, encoded.segments[SCALE_SEGMENT], stored_zero, layout)
        return LinearResult(encoded, weight, dict(stats or {}))

    # ------------------------------------------------------------------------------------------ decode
    @classmethod
    def validate(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> None:
        layout = layout_of(record)
        entropy = record.params.get("entropy", "none") == "zstd"
        expected = {PRIMARY_SEGMENT, SCALE_SEGMENT}
        expected |= {ZERO_SEGMENT} if not layout.symmetric else set()
        expected |= {INDEX_SEGMENT} if entropy else set()
        if set(segments) != expected:
            raise FormatError(
                f"tensor {record.name!r}: {record.codec} expects segments {sorted(expected)}, found {sorted(segments)}"
            )
        scale_st = "F16" if record.params["scale_dtype"] == "float16" else "BF16"
        _check_segment(record, segments[SCALE_SEGMENT], scale_st, (layout.scale_rows, layout.n_groups), SCALE_SEGMENT)
        if not layout.symmetric:
            _check_segment(record, segments[ZERO_SEGMENT], "U8", (layout.scale_rows, layout.n_groups), ZERO_SEGMENT)
        data = segments[PRIMARY_SEGMENT]
        if data.dtype != "U8" or len(data.shape) != 1:
            raise FormatError(f"tensor {record.name!r}: segment 'data' must be 1-D U8")
        if entropy:
            n_chunks = math.ceil(layout.rows / layout.rows_per_chunk())
            _check_segment(record, segments[INDEX_SEGMENT], "U32", (n_chunks,), INDEX_SEGMENT)
            if data.nbytes < _min_entropy_bytes(layout):  # a decompression bomb: too little data for the shape
                raise LimitError(
                    f"tensor {record.name!r}: {data.nbytes} bytes of zstd frames cannot hold "
                    f"{layout.packed_bytes} bytes of codes"
                )
        elif data.nbytes != layout.packed_bytes:
            raise FormatError(
                f"tensor {record.name!r}: packed codes have {data.nbytes} bytes, expected {layout.packed_bytes}"
            )

    @classmethod
    def describe(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> dict[str, Any]:
        layout = layout_of(record)
        granularity = {PER_TENSOR: "tensor", PER_CHANNEL: "channel"}.get(record.params["group_size"])
        entropy = record.params.get("entropy", "none") == "zstd"
        saved = layout.packed_bytes - segments[PRIMARY_SEGMENT].nbytes if entropy else 0
        return {
            "bits": layout.bits,
            "group": granularity or f"g{layout.group_size}",
            "symmetric": layout.symmetric,
            "packed_bytes": layout.packed_bytes,
            "entropy_saved_bytes": saved,
        }

    @classmethod
    def packed_codes(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ``[rows, row_bytes]`` packed codes on the CPU (entropy stage undone)."""
        layout = layout_of(record)
        data = segments[PRIMARY_SEGMENT]
        if record.params.get("entropy", "none") == "zstd":
            data = torch.from_numpy(
                _decompress_rows(data.numpy(), segments[INDEX_SEGMENT].numpy(), layout, record.name)
            )
        return data.view(layout.rows, layout.row_bytes)

    @classmethod
    def check(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor]) -> None:
        _check_scale_and_zero(record, segments, layout_of(record))

    @classmethod
    def decodes_on_device(cls, record: TensorRecord) -> bool:
        return record.params.get("entropy", "none") == "none"  # the zstd stage is undone on the CPU

    @classmethod
    def decode(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        from nwcfmt.kernels import dequantize_packed  # picks Triton, the native CPU kernel or the reference

        layout = layout_of(record)
        out_dtype = DTYPE_NAMES[record.dtype]
        if segments[SCALE_SEGMENT].device.type == "cpu":  # device segments were checked before they moved
            cls.check(record, segments)
        packed = cls.packed_codes(record, segments).to(device)  # packed bytes cross to the device, not floats
        scale = segments[SCALE_SEGMENT].to(device)
        zero = segments[ZERO_SEGMENT].to(device) if not layout.symmetric else layout.implicit_zero
        out = dequantize_packed(packed, scale, zero, layout.bits, layout.group_size, layout.cols, out_dtype)
        return out.reshape(record.shape)


def check_codes(codes: torch.Tensor, scale: torch.Tensor, zero: OptTensor, layout: QuantLayout) -> None:
    """Codes uint8 ``[rows, cols]`` within the code range, a float scale and (asymmetric only) a zero point within
    the code range per group; :class:`EncodeError` otherwise (what :meth:`GroupQuantCodec.pack` relies on)."""
    grid = layout.scale_rows * layout.n_groups
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (layout.rows, layout.cols):
        raise EncodeError(f"codes must be uint8 {[layout.rows, layout.cols]}, not {codes.dtype} {list(codes.shape)}")
    if int(codes.max()) >= 1 << layout.bits:
        raise EncodeError(f"codes above the {layout.bits}-bit range")
    if not scale.is_floating_point() or scale.numel() != grid:
        raise EncodeError(f"scale must be a float tensor of {layout.scale_rows}x{layout.n_groups} values")
    if layout.symmetric != (zero is None):
        raise EncodeError(f"zero must be {'None' if layout.symmetric else 'given'}")
    if zero is not None and (zero.numel() != grid or int(zero.max()) >= 1 << layout.bits):
        raise EncodeError(f"zero must hold {layout.scale_rows}x{layout.n_groups} values within the code range")


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: OptTensor, layout: QuantLayout) -> torch.Tensor:
    """``(codes - zero) * scale`` in fp32, ``[rows, cols]``, as every decoder computes it (``zero`` None:
    symmetric, the implicit zero); ``scale`` and ``zero`` hold ``[scale_rows, n_groups]`` values."""
    scale = scale.to(torch.float32).reshape(layout.scale_rows, layout.n_groups)
    zero = torch.full_like(scale, layout.implicit_zero) if zero is None else zero.to(torch.float32)
    zero = zero.reshape(layout.scale_rows, layout.n_groups)
    if layout.scale_rows < layout.rows:  # per tensor: one scale row for every row
        scale, zero = scale.expand(layout.rows, 1), zero.expand(layout.rows, 1)
    s = reference.expand_groups(scale, layout.cols, layout.group_size)
    z = reference.expand_groups(zero, layout.cols, layout.group_size)
    return (codes.to(torch.float32).reshape(layout.rows, layout.cols) - z) * s


def _check_scale_and_zero(record: TensorRecord, segments: Mapping[str, torch.Tensor], layout: QuantLayout) -> None:
    """Scales must be positive and finite, zero points within the code range (spec/codecs/quant.md 5.2)."""
    scale = segments[SCALE_SEGMENT].to(torch.float32)
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise FormatError(f"tensor {record.name!r}: scales must be positive and finite")
    if not layout.symmetric and int(segments[ZERO_SEGMENT].max()) >= 1 << layout.bits:
        raise FormatError(f"tensor {record.name!r}: zero point above the {layout.bits}-bit code range")


def _min_entropy_bytes(layout: QuantLayout) -> int:
    """Fewest bytes the zstd frames of a layout can take: 4 per 128 KiB block of packed codes."""
    step = layout.rows_per_chunk() * layout.row_bytes
    full, last = divmod(layout.packed_bytes, step)
    per = lambda n: min(n, 4 * math.ceil(n / ZSTD_BLOCK))  # noqa: E731
    return full * per(step) + (per(last) if last else 0)


def _compress_rows(packed: np.ndarray, layout: QuantLayout) -> tuple[np.ndarray, np.ndarray]:
    step = layout.rows_per_chunk() * layout.row_bytes
    frames = parallel_map(lambda s: compress_frame(packed[s : s + step]), range(0, packed.size, step))
    index = np.array([len(f) for f in frames], dtype=np.uint32)
    return index, np.frombuffer(b"".join(frames), dtype=np.uint8).copy()


def _decompress_rows(data: np.ndarray, index: np.ndarray, layout: QuantLayout, name: str) -> np.ndarray:
    step = layout.rows_per_chunk() * layout.row_bytes
    offsets = np.concatenate([[0], np.cumsum(index.astype(np.int64))])
    if offsets[-1] != data.size:
        raise FormatError(f"tensor {name!r}: entropy chunks cover {offsets[-1]} bytes, data has {data.size}")
    view = memoryview(data)
    for i in range(len(index)):  # frame headers only: a lying frame fails before the allocation
        n = min(step, layout.packed_bytes - i * step)
        check_stream(view[int(offsets[i]) : int(offsets[i + 1])], False, n, f"tensor {name!r} chunk {i}")
    out = np.empty(layout.packed_bytes, dtype=np.uint8)

    def run(i: int) -> None:
        start = i * step
        n = min(step, layout.packed_bytes - start)
        frame = view[int(offsets[i]) : int(offsets[i + 1])]
        out[start : start + n] = unpack_stream(frame, False, n, f"tensor {name!r} chunk {i}")

    parallel_map(run, range(len(index)))
    return out
