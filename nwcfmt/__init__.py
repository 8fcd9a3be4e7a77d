"""nwcfmt: a versioned, safetensors-compatible compressed checkpoint format and codec tool for LLM weights.

The small API, in the spirit of ``safetensors``::

    nwcfmt.save({"w": tensor}, "model.safetensors", codec="lossless")
    tensors = nwcfmt.load("model.safetensors", device="cpu")
    with nwcfmt.open("model.safetensors") as f:
        w = f.decode("w")
"""

from __future__ import annotations

__version__ = "0.1.0"

import sys

from nwcfmt.api import load, open, save
from nwcfmt.codecs import Codec, available_codecs, get_codec, register_codec
from nwcfmt.container import NwcReader, NwcWriter
from nwcfmt.errors import (
    ChecksumError,
    EncodeError,
    FormatError,
    InputError,
    LimitError,
    NwcError,
    UnknownCodecError,
    UnknownFeatureError,
    UnsupportedError,
    UnsupportedVersionError,
)

if sys.byteorder != "little":  # pragma: no cover - the format is little-endian and so is every target we ship
    raise ImportError("nwcfmt requires a little-endian host")

__all__ = [
    "ChecksumError",
    "Codec",
    "EncodeError",
    "FormatError",
    "InputError",
    "LimitError",
    "NwcError",
    "NwcReader",
    "NwcWriter",
    "UnknownCodecError",
    "UnknownFeatureError",
    "UnsupportedError",
    "UnsupportedVersionError",
    "__version__",
    "available_codecs",
    "get_codec",
    "load",
    "open",
    "register_codec",
    "save",
]
