"""The small file-level API: ``open``, ``load``, ``save``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from nwcfmt.container.reader import NwcReader
from nwcfmt.container.writer import NwcWriter
from nwcfmt.errors import InputError


def open(path: str | os.PathLike, *, allow_plain: bool = False) -> NwcReader:
    """Open one NWC file lazily (a context manager)."""
    return NwcReader(path, allow_plain=allow_plain)


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a file or an HF-style folder (single file or sharded, index order)."""
    import json

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{index}: not a valid safetensors index") from None
        files = [path / n for n in sorted(names)]
        if any(Path(n).name != n for n in names):
            raise InputError(f"{index}: shard names must be plain file names")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{index}: missing shard(s) {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path}: no .safetensors files")
    return files


def load(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    allow_plain: bool = True,
) -> dict[str, torch.Tensor]:
    """Decode every tensor of an NWC file or folder onto ``device`` (optionally cast to ``dtype``)."""
    out: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
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
