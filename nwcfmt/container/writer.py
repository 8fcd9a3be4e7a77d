"""NwcWriter: encode tensors one at a time into an NWC (safetensors) file, atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nwcfmt.codecs.base import PRIMARY_SEGMENT, Codec, EncodeContext, EncodedTensor
from nwcfmt.codecs.registry import get_codec
from nwcfmt.constants import (
    ALIGNMENT,
    LOADER_NOTICE,
    MANIFEST_KEY,
    SEGMENT_SEPARATOR,
    SHARED_FORMAT_VERSION,
    SHARED_PREFIX,
    SHARED_SEGMENTS,
    dtype_name,
)
from nwcfmt.container.checksum import crc32
from nwcfmt.container.manifest import Manifest, SegmentRef, TensorRecord
from nwcfmt.container.safetensors_io import StreamingWriter, tensor_bytes
from nwcfmt.errors import EncodeError


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
        check_name(name)
        try:
            json.dumps(encoded.params, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise EncodeError(f"tensor {name!r}: codec params are not plain JSON ({exc})") from None
        segments = {}
        for seg_name, seg in encoded.segments.items():
            key = encoded.shared.get(seg_name)
            if key is not None:
                segments[seg_name] = self._shared_ref(key, seg)
                continue
            st_name = segment_tensor_name(name, seg_name)
            self._stream.add(st_name, seg)
            segments[seg_name] = SegmentRef(st_name, crc32(tensor_bytes(seg)))
        record = TensorRecord(
            name=name,
            codec=codec.codec_id,
            codec_version=codec.version,
            dtype=dtype_name(tensor.dtype),
            shape=tuple(tensor.shape),
            params=encoded.params,
            segments=segments,
        )
        self.manifest.tensors.append(record)
        return record

    def _shared_ref(self, key: str, seg: torch.Tensor) -> SegmentRef:
        """Write a shared segment once per file (format 1.1, required feature ``shared_segments``)."""
        st_name = f"{SHARED_PREFIX}{key}"
        ref = self._shared.get(st_name)
        crc = crc32(tensor_bytes(seg))
        if ref is None:
            self._stream.add(st_name, seg)
            ref = self._shared[st_name] = SegmentRef(st_name, crc)
            if SHARED_SEGMENTS not in self.manifest.required_features:
                self.manifest.required_features.append(SHARED_SEGMENTS)
                self.manifest.format_version = max(self.manifest.format_version, SHARED_FORMAT_VERSION)
        elif ref.crc32 != crc:
            raise EncodeError(f"shared segment {key!r} was written with other contents")
        return ref

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
