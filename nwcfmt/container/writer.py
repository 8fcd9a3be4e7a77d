"""NwcWriter: encode tensors one at a time into an NWC (safetensors) file, atomically.

:func:`encoded_record` builds the manifest record the writer stores for an :class:`EncodedTensor`;
:func:`check_encoded` and :func:`decode_encoded` check and decode one in memory exactly as a reader does once
it is written to a file (no file is written).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from nwcfmt.codecs.base import PRIMARY_SEGMENT, Codec, EncodeContext, EncodedTensor
from nwcfmt.codecs.registry import get_codec
from nwcfmt.constants import (
    ALIGNMENT,
    LOADER_NOTICE,
    MANIFEST_KEY,
    PAD_PREFIX,
    SEGMENT_SEPARATOR,
    SHARED_FORMAT_VERSION,
    SHARED_PREFIX,
    SHARED_SEGMENTS,
    TORCH_TO_ST,
    dtype_name,
)
from nwcfmt.container.checksum import crc32
from nwcfmt.container.manifest import Manifest, SegmentRef, TensorRecord
from nwcfmt.container.safetensors_io import StreamingWriter, TensorInfo, tensor_bytes
from nwcfmt.errors import EncodeError, FormatError


def segment_tensor_name(name: str, segment: str) -> str:
    """The primary segment keeps the tensor's own name; others get ``name::segment``."""
    return name if segment == PRIMARY_SEGMENT else f"{name}{SEGMENT_SEPARATOR}{segment}"


def check_name(name: str) -> None:
    if not name or SEGMENT_SEPARATOR in name or name.startswith("__"):
        raise EncodeError(f"tensor name {name!r} is reserved or empty")


def encoded_nbytes(encoded: EncodedTensor) -> int:
    return sum(seg.numel() * seg.element_size() for seg in encoded.segments.values())


def encode_tensor(
    name: str,
    tensor: torch.Tensor,
    codec: str | Codec = "raw",
    ctx: EncodeContext | None = None,
    raw_if_larger: bool = True,
    **config: Any,
) -> tuple[Codec, EncodedTensor]:
    """Encode one tensor; returns the codec that was used and its output.

    With ``raw_if_larger``, a bit-exact codec whose output is not smaller than the tensor is replaced by
    ``raw`` (same decoded bits, fewer bytes).
    """
    check_name(name)
    if isinstance(codec, str):
        codec = get_codec(codec)(**config)
    tensor = tensor.detach().cpu()
    encoded = codec.encode(tensor, ctx or EncodeContext(name=name))
    exact_alternative = raw_if_larger and codec.exact and codec.codec_id != "raw"
    if exact_alternative and encoded_nbytes(encoded) >= tensor.numel() * tensor.element_size():
        codec = get_codec("raw")()
        encoded = codec.encode(tensor)
    return codec, encoded


def encoded_record(
    name: str, codec: Codec, encoded: EncodedTensor, shape: Sequence[int], dtype: torch.dtype
) -> TensorRecord:
    """The manifest record a file stores for ``encoded`` as tensor ``name`` (``shape``, ``dtype``): segments named
    as the writer names them (shared ones by their key), each with the CRC-32 of its bytes."""
    check_name(name)
    try:
        json.dumps(encoded.params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"tensor {name!r}: codec params are not plain JSON ({exc})") from None
    segments = {}
    for seg_name, seg in encoded.segments.items():
        key = encoded.shared.get(seg_name)
        st_name = segment_tensor_name(name, seg_name) if key is None else f"{SHARED_PREFIX}{key}"
        segments[seg_name] = SegmentRef(st_name, crc32(tensor_bytes(seg)))
    return TensorRecord(
        name=name,
        codec=codec.codec_id,
        codec_version=codec.version,
        dtype=dtype_name(dtype),
        shape=tuple(shape),
        params=encoded.params,
        segments=segments,
    )


_OFFSET_BOUND = 10**15  # data offsets as wide as a header can need (a petabyte)
HEADER_ALLOWANCE = 4096  # a file's header beyond its records: framing, manifest fields, producer, metadata


def record_overhead(
    name: str, codec: Codec, encoded: EncodedTensor, shape: Sequence[int], dtype: torch.dtype,
    alignment: int = ALIGNMENT,
) -> int:  # fmt: skip
    """An upper bound of the bytes a file spends on ``encoded`` (stored as ``name``) beyond its segments' data:
    its manifest record as the header's JSON escapes it, a header entry per segment, and the alignment padding
    before each segment with the header entry of that padding. Shared segments are counted as if not shared."""
    record = encoded_record(name, codec, encoded, shape, dtype)
    manifest_entry = json.dumps(record.to_json(), separators=(",", ":"), allow_nan=False)
    total = len(json.dumps(manifest_entry)) - 1  # escaped inside the header's metadata string, with its comma
    offsets = [_OFFSET_BOUND, _OFFSET_BOUND]
    for seg_name, seg in encoded.segments.items():
        entry = {"dtype": TORCH_TO_ST[seg.dtype], "shape": list(seg.shape), "data_offsets": offsets}
        total += len(json.dumps({record.segments[seg_name].tensor: entry}, separators=(",", ":")))
        pad = {f"{PAD_PREFIX}{_OFFSET_BOUND}": {"dtype": "U8", "shape": [alignment], "data_offsets": offsets}}
        total += len(json.dumps(pad, separators=(",", ":"))) + alignment - 1
    return total


def check_encoded(
    name: str, codec: Codec, encoded: EncodedTensor, shape: Sequence[int], dtype: torch.dtype
) -> TensorRecord:
    """The checks a reader runs before it decodes ``encoded`` stored as tensor ``name`` (``shape``, ``dtype``):
    the codec's ``validate`` on its segments' header entries, then ``check`` on their contents (CPU).

    Returns the record (params as they read back from the file's JSON). Raises what the codec raises
    (:class:`FormatError`), or :class:`EncodeError` for what no file can hold.
    """
    return _checked(name, codec, encoded, shape, dtype)[0]


def decode_encoded(
    name: str, codec: Codec, encoded: EncodedTensor, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Decode ``encoded`` in memory on the CPU, as a reader decodes it once written as tensor ``name`` of
    ``shape`` and ``dtype`` (after :func:`check_encoded`'s checks). The codec's own class decodes it."""
    record, segments = _checked(name, codec, encoded, shape, dtype)
    tensor = type(codec).decode(record, segments, torch.device("cpu"))
    if tensor.dtype != dtype or tuple(tensor.shape) != record.shape:
        raise FormatError(f"tensor {name!r} decoded to {tensor.dtype}{list(tensor.shape)}, not {dtype}{list(shape)}")
    return tensor


def _checked(
    name: str, codec: Codec, encoded: EncodedTensor, shape: Sequence[int], dtype: torch.dtype
) -> tuple[TensorRecord, dict[str, torch.Tensor]]:
    """The record and CPU segments of ``encoded`` as a reader sees them, after the codec's ``validate`` and
    ``check``."""
    record = encoded_record(name, codec, encoded, shape, dtype)
    record = replace(record, params=json.loads(json.dumps(record.params)))  # as the manifest's JSON gives them
    segments = {k: v.detach().cpu().contiguous() for k, v in encoded.segments.items()}
    infos = {}
    for seg_name, seg in segments.items():
        if seg.dtype not in TORCH_TO_ST:
            raise EncodeError(f"tensor {name!r}: segment {seg_name!r} has dtype {seg.dtype}, which no file can hold")
        st_name, nbytes = record.segments[seg_name].tensor, seg.numel() * seg.element_size()
        infos[seg_name] = TensorInfo(st_name, TORCH_TO_ST[seg.dtype], tuple(seg.shape), 0, nbytes)
    type(codec).validate(record, infos)
    type(codec).check(record, segments)
    return record, segments


def producer_info() -> dict[str, str]:
    from nwcfmt import __version__

    return {"name": "nwcfmt", "version": __version__}


class NwcWriter:
    """Writes an NWC file. Use as a context manager; the file appears at ``path`` only on success.

    >>> with NwcWriter("model.safetensors") as w:
    ...     w.write("layer.weight", tensor, codec="lossless")
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        alignment: int = ALIGNMENT,
        metadata: Mapping[str, str] | None = None,
        shard: tuple[int, int] = (1, 1),
        loader_notice: bool = False,
    ) -> None:
        """``loader_notice`` adds the empty tensor telling loaders without nwcfmt to import it (format-v1 6.5)."""
        self.path = Path(path)
        self._stream = StreamingWriter(self.path, alignment=alignment)
        if loader_notice:
            self._stream.add(LOADER_NOTICE, torch.empty(0, dtype=torch.uint8))
        self.manifest = Manifest(producer=producer_info(), alignment=alignment, shard=shard)
        self._shared: dict[str, SegmentRef] = {}  # shared segments already written to this file
        self.metadata = {**(metadata or {}), "format": "pt"}  # transformers requires format == "pt"
        self.metadata.pop(MANIFEST_KEY, None)

    @property
    def bytes_written(self) -> int:
        return self._stream.offset

    def write(
        self,
        name: str,
        tensor: torch.Tensor,
        codec: str | Codec = "raw",
        ctx: EncodeContext | None = None,
        raw_if_larger: bool = True,
        **config: Any,
    ) -> TensorRecord:
        """Encode ``tensor`` with ``codec`` (an id plus config, or an instance) and append it."""
        codec, encoded = encode_tensor(name, tensor, codec, ctx, raw_if_larger, **config)
        return self.append(name, tensor, codec, encoded)

    def append(self, name: str, tensor: torch.Tensor, codec: Codec, encoded: EncodedTensor) -> TensorRecord:
        """Append an already encoded tensor (see :func:`encode_tensor`)."""
        record = encoded_record(name, codec, encoded, tensor.shape, tensor.dtype)
        for seg_name, seg in encoded.segments.items():
            ref = record.segments[seg_name]
            if seg_name in encoded.shared:
                self._add_shared(ref, seg)
            else:
                self._stream.add(ref.tensor, seg)
        self.manifest.tensors.append(record)
        return record

    def _add_shared(self, ref: SegmentRef, seg: torch.Tensor) -> None:
        """Write a shared segment once per file (format 1.1, required feature ``shared_segments``)."""
        written = self._shared.get(ref.tensor)
        if written is None:
            self._stream.add(ref.tensor, seg)
            self._shared[ref.tensor] = ref
            if SHARED_SEGMENTS not in self.manifest.required_features:
                self.manifest.required_features.append(SHARED_SEGMENTS)
                self.manifest.format_version = max(self.manifest.format_version, SHARED_FORMAT_VERSION)
        elif written.crc32 != ref.crc32:
            key = ref.tensor.removeprefix(SHARED_PREFIX)
            raise EncodeError(f"shared segment {key!r} was written with other contents")

    def close(self, path: str | os.PathLike | None = None) -> Path:
        """Finish the file: write header and manifest, rename into place (at ``path`` if given)."""
        return self._stream.finish({**self.metadata, MANIFEST_KEY: self.manifest.to_json()}, path)

    def abort(self) -> None:
        self._stream.abort()

    def __enter__(self) -> NwcWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
