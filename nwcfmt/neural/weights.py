"""The shipped ``nwc-mlp-1`` weights: read with safetensors (no pickle), checked against a recorded sha256."""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from nwcfmt.errors import ChecksumError, FormatError
from nwcfmt.neural.arch import (
    ARCH_ID,
    DECODER_TENSORS,
    ENCODER_TENSORS,
    decoder_hash,
    validate_decoder,
    validate_encoder,
)

METADATA_KEY = "nwc.neural"  # safetensors metadata: canonical JSON {arch, decoder_sha256, encoder_bound, hidden}
WEIGHTS_FILE = Path(__file__).with_name(f"{ARCH_ID}.safetensors")
# sha256 of WEIGHTS_FILE's bytes, as written by ``python -m nwcfmt.neural.train`` (see nwc-mlp-1.json)
WEIGHTS_SHA256 = "2a074d49d9227becba5b48a7bd037f997838dc8cfdff3b86b1b313d0ceb5865e"


@dataclass(frozen=True)
class NeuralCodecWeights:
    """An encoder and decoder of one architecture; the mappings are read-only views (do not modify the tensors)."""

    arch: str
    encoder: Mapping[str, torch.Tensor]
    decoder: Mapping[str, torch.Tensor]
    decoder_hash: str


def read_weights(path: Path, sha256: str | None = None) -> NeuralCodecWeights:
    """Read and validate a weights file; with ``sha256``, the file's bytes must hash to it
    (:class:`ChecksumError` otherwise)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise FormatError(f"cannot read neural codec weights {path}: {exc}") from exc
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise ChecksumError(f"{path}: sha256 {got} does not match the recorded {sha256 or '(none)'}")
    try:
        tensors = load(data)
        header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
        meta = json.loads((header.get("__metadata__") or {}).get(METADATA_KEY, "{}"))
    except (SafetensorError, ValueError, RuntimeError, struct.error, AttributeError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("arch") != ARCH_ID:
        raise FormatError(f"{path}: architecture {meta.get('arch')!r}, expected {ARCH_ID!r}")
    encoder = {k: v for k, v in tensors.items() if k in ENCODER_TENSORS}
    decoder = {k: v for k, v in tensors.items() if k not in ENCODER_TENSORS}
    validate_encoder(encoder)
    validate_decoder(decoder)
    digest = decoder_hash(decoder)
    if meta.get("decoder_sha256", digest) != digest:
        raise FormatError(f"{path}: decoder hash {digest} does not match the file's metadata")
    return NeuralCodecWeights(ARCH_ID, MappingProxyType(encoder), MappingProxyType(decoder), digest)


@functools.cache
def load_codec() -> NeuralCodecWeights:
    """The shipped weights (read once per process)."""
    return read_weights(WEIGHTS_FILE, WEIGHTS_SHA256)


__all__ = ["DECODER_TENSORS", "WEIGHTS_FILE", "WEIGHTS_SHA256", "NeuralCodecWeights", "load_codec", "read_weights"]
