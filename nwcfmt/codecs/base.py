"""The codec interface (numcodecs style): a small class with an id, a version, a config, encode and decode."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from nwcfmt.container.manifest import TensorRecord
from nwcfmt.container.safetensors_io import TensorInfo
from nwcfmt.errors import FormatError

PRIMARY_SEGMENT = "data"


@dataclass
class EncodedTensor:
    """What a codec produces: named segments (any dtype/shape, stored as safetensors tensors) and params."""

    segments: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)
    # segment name -> key of a segment shared by the records of a file (stored once, as SHARED_PREFIX + key;
    # format-v1.md 6.2): e.g. a neural codec's decoder weights, keyed by their hash
    shared: dict[str, str] = field(default_factory=dict)


@dataclass
class EncodeContext:
    """Information an encoder may use beyond the tensor itself (later: calibration statistics)."""

    name: str = ""
    # how many records of the output file this codec instance encodes (0: unknown); an encoder whose records
    # share file-level segments (a neural decoder network) amortises their bytes over this many
    shared_claims: int = 0


class Codec(ABC):
    """A codec turns one tensor into segments + JSON params and back.

    Subclasses set ``codec_id`` and ``version``; constructor keyword arguments are the codec's config.
    ``version`` is the newest stored-layout version the class can read and the one it writes.
    """

    codec_id: ClassVar[str]
    version: ClassVar[int] = 1
    segment_names: ClassVar[tuple[str, ...]] = (PRIMARY_SEGMENT,)
    exact: ClassVar[bool] = False  # decodes bit for bit to the input: ``raw`` is an equivalent fallback

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Codec:
        return cls(**config)

    def supports(self, tensor: torch.Tensor) -> bool:
        """Whether this codec can encode the tensor (dtype, shape)."""
        return True

    @abstractmethod
    def encode(self, tensor: torch.Tensor, ctx: EncodeContext | None = None) -> EncodedTensor:
        """Encode a CPU tensor."""

    @classmethod
    def validate(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> None:
        """Check a record's params against its segments' header entries before any payload is read.

        Raises :class:`FormatError` on disagreement. The base check: exactly the expected segment names.
        """
        expected = set(cls.segment_names)
        if set(segments) != expected:
            raise FormatError(
                f"tensor {record.name!r}: codec {cls.codec_id!r} expects segments {sorted(expected)}, "
                f"found {sorted(segments)}"
            )

    @classmethod
    def describe(cls, record: TensorRecord, segments: Mapping[str, TensorInfo]) -> dict[str, Any]:
        """Codec-specific facts for ``nwc info`` (bits, grouping, savings of an entropy stage...)."""
        return {}

    @classmethod
    def check(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor]) -> None:
        """Content checks on CPU segments that decoding relies on (e.g. finite scales); raises FormatError."""
        return None  # most codecs have nothing to check beyond validate()

    @classmethod
    def decodes_on_device(cls, record: TensorRecord) -> bool:
        """Whether :meth:`decode` accepts this record's segments already on the target device.

        Loaders then copy the stored bytes to the device and decode there (after :meth:`check` on the CPU).
        """
        return False

    @classmethod
    @abstractmethod
    def decode(cls, record: TensorRecord, segments: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """Rebuild the tensor (its original dtype and shape) on ``device`` from validated segments.

        Segments are CPU tensors that may view a memory map (a decoder must not keep references to them),
        or, where :meth:`decodes_on_device` says so, tensors already on ``device`` that passed :meth:`check`.
        """
