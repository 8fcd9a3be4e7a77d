"""Codecs and their registry. Importing this package registers the built-in codecs."""

from nwcfmt.codecs import ecsq, flexround, gptq, lossless, lrq, neural, raw, rtn, sparse  # noqa: F401  (registration side effect)
from nwcfmt.codecs.base import Codec, EncodeContext, EncodedTensor
from nwcfmt.codecs.registry import available_codecs, get_codec, register_codec

__all__ = ["Codec", "EncodeContext", "EncodedTensor", "available_codecs", "get_codec", "register_codec"]
