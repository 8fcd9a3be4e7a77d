"""The small file-level API: ``open``, ``load``, ``save``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from nwcfmt.container.reader import NwcReader
from nwcfmt.container.writer import NwcWriter
from nwcfmt.sources import find_weight_files


def open(path: str | os.PathLike, *, allow_plain: bool = False) -> NwcReader:
    """Open one NWC file lazily (a context manager)."""
    return NwcReader(path, allow_plain=allow_plain)


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    allow_plain: bool = True,
) -> dict[str, torch.Tensor]:
    """Decode every tensor of an NWC file or folder onto ``device`` (optionally cast to ``dtype``)."""
    out: dict[str, torch.Tensor] = {}
    for file in find_weight_files(Path(path)):
        with NwcReader(file, allow_plain=allow_plain) as reader:
            for name, tensor in reader.items(device=device, dtype=dtype):
                out[name] = tensor
    return out


def save(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    codec: str = "lossless",
    metadata: Mapping[str, str] | None = None,
    **config,
) -> None:
    """Write ``tensors`` to one NWC file; tensors ``codec`` cannot hold are stored raw.

    ``config`` is the codec's configuration, e.g. ``save(t, path, codec="lossless", profile="fast")``.
    """
    from nwcfmt.codecs.registry import get_codec

    chosen = get_codec(codec)(**config)
    with NwcWriter(path, metadata=metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor, chosen if chosen.supports(tensor) else "raw")
