"""Codec registry: maps codec ids to codec classes."""

from __future__ import annotations

from nwcfmt.codecs.base import Codec
from nwcfmt.errors import UnknownCodecError

_REGISTRY: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Register a codec class under its ``codec_id`` (usable as a class decorator)."""
    existing = _REGISTRY.get(cls.codec_id)
    if existing is not None and existing is not cls:
        raise ValueError(f"codec id {cls.codec_id!r} is already registered by {existing.__qualname__}")
    _REGISTRY[cls.codec_id] = cls
    return cls


def get_codec(codec_id: str) -> type[Codec]:
    """The codec class registered under ``codec_id``; :class:`UnknownCodecError` if none is."""
    try:
        return _REGISTRY[codec_id]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownCodecError(f"unknown codec {codec_id!r} (this nwcfmt knows: {known})") from None


def available_codecs() -> list[str]:
    return sorted(_REGISTRY)
