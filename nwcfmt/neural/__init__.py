"""The ``neural`` codec's networks (architecture ``nwc-mlp-1``): chunk encoder and decoder, shipped weights.

* :mod:`nwcfmt.neural.arch`: the architecture, ``encode_chunks`` / ``decode_chunks``, decoder checks and hash;
* :mod:`nwcfmt.neural.weights`: ``load_codec()``, the shipped ``nwc-mlp-1.safetensors``;
* :mod:`nwcfmt.neural.train` / :mod:`nwcfmt.neural.evaluate`: how the weights were made and measured.
"""

from nwcfmt.neural.arch import (
    ARCH_ID,
    CHUNK,
    DECODER_TENSORS,
    ENCODER_TENSORS,
    N_LEVELS,
    decode_chunks,
    decoder_hash,
    encode_chunks,
    validate_decoder,
)
from nwcfmt.neural.weights import NeuralCodecWeights, load_codec, read_weights

__all__ = [
    "ARCH_ID",
    "CHUNK",
    "DECODER_TENSORS",
    "ENCODER_TENSORS",
    "N_LEVELS",
    "NeuralCodecWeights",
    "decode_chunks",
    "decoder_hash",
    "encode_chunks",
    "load_codec",
    "read_weights",
    "validate_decoder",
]
