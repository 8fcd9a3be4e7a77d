"""``sparse``: a mask plus the kept values, coded by any other codec (``spec/codecs/sparse.md``).

A tensor is viewed as ``[rows, cols]`` (as the integer-code layout). A record stores

* the **mask** (:mod:`nwcfmt.codecs.mask`): segment ``data`` and, when entropy-coded, ``mask_lanes``,
  ``mask_tables`` and ``mask_levels``;
* the **values**: the ``nnz`` kept elements in row-major order, laid out as a ``[ceil(nnz / w), w]`` matrix with
  ``w = max(1, ceil(nnz / rows))`` (zero padding after the last kept value), encoded by the **values codec**
  (``values_codec``, ``values_codec_version``, ``values_params``) whose segments are stored under the names
  ``values.<segment>``. When every row keeps the same number of elements (N:M, per-row pruning) the matrix is
  ``[rows, kept per row]``, so a values codec's groups stay within a row.

Decoding: the values codec decodes the values matrix (on the target device when it can), the mask is decoded
there too, and the kept values are scattered into a zero tensor (:func:`nwcfmt.kernels.scatter_kept`: Triton on
CUDA, torch otherwise, the same bits). Pruned elements decode to +0.

:class:`SparseCodec` also encodes data-free: magnitude (per tensor, or under a global threshold found by a pass
over the model) and random masks, then the values with the values codec's own data-free encoder. The
calibrated pruners (Wanda, SparseGPT), reconstruction and the jointly quantized values are
:mod:`nwcfmt.encoders.sparse`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from nwcfmt.codecs.base import PRIMARY_SEGMENT, Codec, EncodeContext, EncodedTensor
from nwcfmt.codecs.mask import (
    Pattern,
    check_mask,
    decode_mask,
    encode_mask,
    mask_layout,
    matrix_shape,
    validate_mask,
)
from nwcfmt.codecs.registry import get_codec, register_codec
from nwcfmt.container.manifest import TensorRecord
from nwcfmt.container.safetensors_io import TensorInfo
from nwcfmt.entropy.rans import DEFAULT_LANE_SYMBOLS
from nwcfmt.errors import EncodeError, FormatError, UnsupportedVersionError

VALUES_PREFIX = "values."
PRUNERS = ("magnitude", "random", "wanda", "sparsegpt")
DATA_FREE_PRUNERS = ("magnitude", "random")
SCOPES = ("layer", "global")
SPARSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def values_shape(rows: int, nnz: int) -> tuple[int, int]:
    """The values matrix of ``nnz`` kept elements of a ``rows``-row tensor: ``[ceil(nnz / w), w]``."""
    width = max(1, math.ceil(nnz / max(rows, 1)))
    return math.ceil(nnz / width), width


def compact(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The values matrix (:func:`values_shape`) of ``weight [rows, cols]`` under ``keep``, zero-padded."""
    kept = weight[keep]  # row-major
    vr, vw = values_shape(weight.shape[0], kept.numel())
    out = torch.zeros(vr * vw, dtype=weight.dtype)
    out[: kept.numel()] = kept
    return out.view(vr, vw)


def expand(values: torch.Tensor, keep: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """The inverse of :func:`compact`: ``[rows, cols]`` with the first ``keep.sum()`` values where kept."""
    out = torch.full(keep.shape, fill, dtype=values.dtype)
    out[keep] = values.reshape(-1)[: int(keep.sum())]
    return out


def _params_int(params: Mapping[str, Any], key: str, where: str) -> int:
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FormatError(f"{where}: param {key!r} must be a positive integer")
    return value


def values_record(record: TensorRecord) -> tuple[type[Codec], TensorRecord]:
    """The values codec's class and the record it decodes (the values matrix, the record's dtype), built from a
    sparse record's params and its ``values.*`` segments; FormatError / UnknownCodecError /
    UnsupportedVersionError for params no reader may trust."""
    where = f"tensor {record.name!r}"
    params = record.params
    codec_id = params.get("values_codec")
    if not isinstance(codec_id, str) or codec_id == SparseCodec.codec_id:
        raise FormatError(f"{where}: param 'values_codec' must name a codec other than 'sparse'")
    cls = get_codec(codec_id)
    version = _params_int(params, "values_codec_version", where)
    if version > cls.version:
        raise UnsupportedVersionError(
            f"{where}: values codec {codec_id!r} version {version} is newer than this nwcfmt reads ({cls.version})"
        )
    inner_params = params.get("values_params")
    if not isinstance(inner_params, dict):
        raise FormatError(f"{where}: param 'values_params' must be an object")
    layout = mask_layout(params, record.shape, where)
    segments = {
        name[len(VALUES_PREFIX) :]: ref for name, ref in record.segments.items() if name.startswith(VALUES_PREFIX)
    }
    inner = TensorRecord(
        name=f"{record.name} (values)",
        codec=codec_id,
        codec_version=version,
        dtype=record.dtype,
        shape=values_shape(layout.rows, layout.nnz),
        params=inner_params,
        segments=segments,
    )
    return cls, inner


def _split(segments: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    mask = {k: v for k, v in segments.items() if not k.startswith(VALUES_PREFIX)}
    values = {k[len(VALUES_PREFIX) :]: v for k, v in segments.items() if k.startswith(VALUES_PREFIX)}
    return mask, values


def sparse_encoded(
    keep: torch.Tensor,
    pattern: Pattern,
    values_codec: Codec,
    values: EncodedTensor,
    provenance: Mapping[str, Any] | None = None,
    lane_symbols: int = DEFAULT_LANE_SYMBOLS,
) -> EncodedTensor:
    """A sparse record from a bool ``[rows, cols]`` mask and the values codec's record of the values matrix."""
    mask_params, mask_segments = encode_mask(keep, pattern, lane_symbols)
    segments = {**mask_segments, **{VALUES_PREFIX + k: v for k, v in values.segments.items()}}
    params = {
        "pattern": str(pattern),
        **mask_params,
        "values_codec": values_codec.codec_id,
        "values_codec_version": values_codec.version,
        "values_params": values.params,
        **(provenance or {}),
    }
    shared = {VALUES_PREFIX + k: key for k, key in values.shared.items()}
    return EncodedTensor(segments, params, shared)


def encode_values(
    name: str, weight: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype, codec: Codec, ctx: EncodeContext | None
) -> tuple[Codec, EncodedTensor]:
    """The values matrix of ``weight`` under ``keep`` (in ``dtype``) coded data-free by ``codec``; an empty one raw."""
    from nwcfmt.container.writer import encode_tensor

    values = compact(weight, keep).to(dtype)
    if values.numel() == 0 or not codec.supports(values):
        return encode_tensor(name, values, "raw")
    return encode_tensor(name, values, codec, ctx)


@register_codec
class SparseCodec(Codec):
    """Config: ``values_codec`` and its config ``values``; ``prune`` (magnitude, random, wanda, sparsegpt),
    ``sparsity`` (the pruned fraction, for unstructured patterns), ``pattern`` (``unstructured`` or ``N:M``),
    ``scope`` (magnitude: ``layer``, or ``global`` with the ``threshold`` and ``tie_fraction`` of a model-wide
    pass), ``seed`` (random), ``reconstruct`` (calibrated: fine-tune the kept weights on each block's output)."""

    codec_id = "sparse"
    version = 1

    def __init__(
        self,
        *,
        values_codec: str = "raw",
        values: Mapping[str, Any] | None = None,
        prune: str = "magnitude",
        sparsity: float = 0.5,
        pattern: str = "unstructured",
        scope: str = "layer",
        threshold: float | None = None,
        tie_fraction: float = 0.0,
        seed: int = 0,
        reconstruct: bool = False,
    ) -> None:
        if values_codec == self.codec_id:
            raise EncodeError("sparse values cannot be coded by the sparse codec")
        if prune not in PRUNERS:
            raise EncodeError(f"prune must be one of {', '.join(PRUNERS)}, not {prune!r}")
        if scope not in SCOPES or (scope == "global" and prune != "magnitude"):
            raise EncodeError("scope is 'layer', or 'global' for magnitude pruning")
        try:
            self.pattern = Pattern.parse(pattern)
        except ValueError as exc:
            raise EncodeError(str(exc)) from None
        if not self.pattern.structured and not 0.0 <= float(sparsity) < 1.0:
            raise EncodeError(f"sparsity must be in [0, 1), not {sparsity}")
        self.values_codec, self.values = values_codec, dict(values or {})
        try:
            self.inner = get_codec(values_codec)(**self.values)
        except TypeError as exc:
            raise EncodeError(f"values codec {values_codec!r}: invalid params {self.values} ({exc})") from None
        self.prune, self.scope, self.seed, self.reconstruct = prune, scope, int(seed), bool(reconstruct)
        self.sparsity = 1.0 - self.pattern.n / self.pattern.m if self.pattern.structured else float(sparsity)
        self.threshold = None if threshold is None else float(threshold)
        self.tie_fraction = float(tie_fraction)

    def get_config(self) -> dict[str, Any]:
        config = {
            "values_codec": self.values_codec,
            "values": self.values,
            "prune": self.prune,
            "sparsity": self.sparsity,
            "pattern": str(self.pattern),
            "scope": self.scope,
            "seed": self.seed,
            "reconstruct": self.reconstruct,
        }
        if self.threshold is not None:
            config.update(threshold=self.threshold, tie_fraction=self.tie_fraction)
        return config

    @property
    def calibrated(self) -> bool:
        """Whether encoding needs the calibration pipeline (a calibrated pruner, values codec or reconstruction)."""
        from nwcfmt.calibration import get_method

        inner_calibrated = get_method(self.values_codec) is not None and not getattr(
            self.inner, "calibration_optional", False
        )
        return self.prune not in DATA_FREE_PRUNERS or self.reconstruct or inner_calibrated

    def supports(self, tensor: torch.Tensor) -> bool:
        if tensor.dtype not in SPARSE_DTYPES or tensor.dim() < 1 or tensor.numel() == 0:
            return False
        return not self.pattern.structured or matrix_shape(tuple(tensor.shape))[1] % self.pattern.m == 0

    def provenance(self) -> dict[str, Any]:
        return {"prune": self.prune, "sparsity": round(self.sparsity, 6)}

    def mask_for(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The data-free pruners' mask of ``weight [rows, cols]`` (fp32)."""
        from nwcfmt.encoders import prune

        if self.prune == "random":
            return prune.random_mask(weight.shape, self.sparsity, self.pattern, prune.tensor_seed(name, self.seed))
        if self.prune != "magnitude":
            raise EncodeError(
                f"{self.prune} pruning needs calibration data: encode a model folder (nwc encode --prune {self.prune})"
            )
        if self.scope == "global":
            if self.threshold is None:
                raise EncodeError("global magnitude pruning needs the model-wide threshold (nwc encode finds it)")
            return prune.threshold_mask(weight, self.threshold, self.tie_fraction)
        return prune.magnitude_mask(weight, self.sparsity, self.pattern)

    def encode(self, tensor: torch.Tensor, ctx: EncodeContext | None = None) -> EncodedTensor:
        if not self.supports(tensor):
            need = (
                f" (an {self.pattern} pattern needs a multiple of {self.pattern.m} columns)" if self.pattern.m else ""
            )
            raise EncodeError(f"sparse: cannot encode {tensor.dtype}{list(tensor.shape)}{need}")
        ctx = ctx or EncodeContext()
        if self.calibrated and self.prune not in DATA_FREE_PRUNERS:
            self.mask_for(ctx.name, tensor)  # raises the calibration message
        rows, cols = matrix_shape(tuple(tensor.shape))
        weight = tensor.detach().reshape(rows, cols).to(torch.float32)
        keep = self.mask_for(ctx.name, weight)
        codec, values = encode_values(ctx.name or "tensor", weight, keep, tensor.dtype, self.inner, ctx)
        return sparse_encoded(keep, self.pattern, codec, values, self.provenance())

    # ------------------------------------------------------------------------------------------ reading
    @classmethod
    def validate(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> None:
        where = f"tensor {record.name!r}"
        if record.dtype not in ("float32", "float16", "bfloat16") or not record.shape or 0 in record.shape:
            raise FormatError(f"{where}: sparse tensors must be non-empty float tensors")
        layout = mask_layout(record.params, record.shape, where)
        mask_infos, value_infos = _split(segments)
        if set(mask_infos) != layout.segment_names():
            raise FormatError(
                f"{where}: a {layout.coding} mask has segments {sorted(layout.segment_names())}, "
                f"found {sorted(mask_infos)}"
            )
        validate_mask(layout, mask_infos, where)
        inner_cls, inner = values_record(record)
        inner_cls.validate(inner, value_infos)

    @classmethod
    def check(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor]) -> None:
        where = f"tensor {record.name!r}"
        mask_segments, value_segments = _split(segments)
        check_mask(mask_layout(record.params, record.shape, where), mask_segments, where)
        inner_cls, inner = values_record(record)
        inner_cls.check(inner, value_segments)

    @classmethod
    def decodes_on_device(cls, record: TensorRecord) -> bool:
        inner_cls, inner = values_record(record)
        return inner_cls.decodes_on_device(inner)

    @classmethod
    def decode(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        from nwcfmt.constants import DTYPE_NAMES
        from nwcfmt.kernels import scatter_kept

        where = f"tensor {record.name!r}"
        layout = mask_layout(record.params, record.shape, where)
        mask_segments, value_segments = _split(segments)
        if mask_segments[PRIMARY_SEGMENT].device.type == "cpu":  # device copies were checked on the CPU by loaders
            check_mask(layout, mask_segments, where)
        inner_cls, inner = values_record(record)
        values = inner_cls.decode(inner, value_segments, device)  # the values codec checks its own CPU segments
        keep = decode_mask(layout, mask_segments, torch.device(device), where)
        dtype = DTYPE_NAMES[record.dtype]
        return scatter_kept(keep.reshape(-1), values.reshape(-1), dtype, layout.nnz).reshape(record.shape)

    @classmethod
    def describe(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> dict[str, Any]:
        layout = mask_layout(record.params, record.shape, f"tensor {record.name!r}")
        mask_infos, value_infos = _split(segments)
        mask_bytes = sum(i.nbytes for i in mask_infos.values())
        numel = layout.rows * layout.cols
        inner_cls, inner = values_record(record)
        facts = {
            "pattern": str(layout.pattern),
            "sparsity": round(1 - layout.nnz / numel, 4),
            "mask": layout.coding,
            "mask_bits_per_weight": round(8 * mask_bytes / numel, 4),
            "values_codec": inner.codec,
        }
        for key in ("prune",):
            if key in record.params:
                facts[key] = record.params[key]
        facts.update({f"values_{k}": v for k, v in inner_cls.describe(inner, value_infos).items()})
        return facts
