"""Reading the weights of a model to encode: a Hugging Face folder or a single file.

Supports single-file and sharded safetensors, and ``pytorch_model.bin`` checkpoints loaded only through
``torch.load(weights_only=True)``. Tensors come one at a time (memory-mapped), in model order.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nwcfmt.constants import MANIFEST_KEY, ST_TO_TORCH
from nwcfmt.container.safetensors_io import read_header
from nwcfmt.errors import InputError, NwcError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def model_order_key(name: str) -> list:
    """Natural sort key: ``layers.2`` before ``layers.10``, so payloads follow the model layer by layer."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{index}: not a valid weight index") from None
    if any(Path(n).name != n for n in names):
        raise InputError(f"{index}: shard names must be plain file names")
    files = [index.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{index}: missing shard(s) {', '.join(missing)}")
    return files


def find_weight_files(path: Path) -> list[Path]:
    """The weight files of a model folder (or the file itself)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    for index_name in INDEX_NAMES:
        if (path / index_name).is_file():
            return _index_files(path / index_name)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path}: no model weights (model.safetensors, a sharded index or pytorch_model.bin)")
    return files


@dataclass
class WeightSource:
    """The tensors of a model, readable one at a time."""

    path: Path
    files: list[Path]
    locations: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of each tensor, read from headers
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)  # shape, dtype of each
    metadata: dict[str, str] = field(default_factory=dict)
    _bin_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> WeightSource:
        path = Path(path)
        source = cls(path, find_weight_files(path))
        for file in source.files:
            for name, nbytes, spec in source._scan(file):
                if name in source.locations:
                    raise InputError(f"{path}: tensor {name!r} appears in two weight files")
                source.locations[name] = file
                source.sizes[name] = nbytes
                source.specs[name] = spec
        return source

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def _scan(self, file: Path) -> list[tuple[str, int, tuple[tuple[int, ...], torch.dtype]]]:
        """(name, bytes, (shape, dtype)) of every tensor in a weight file, from its header or state dict."""
        if file.suffix != ".safetensors":
            state = self._load_bin(file)
            return [(k, v.numel() * v.element_size(), (tuple(v.shape), v.dtype)) for k, v in state.items()]
        try:
            with open(file, "rb") as f:
                header = read_header(f, file)
        except NwcError as exc:
            raise InputError(f"not a readable safetensors file: {exc}") from None
        if MANIFEST_KEY in header.metadata:
            raise InputError(f"{file}: already an NWC file (decode it first)")
        self.metadata.update(header.metadata)
        return [(t.name, t.nbytes, (t.shape, ST_TO_TORCH[t.dtype])) for t in header.tensors.values()]

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._bin_cache:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for unsafe or corrupt pickles
                raise InputError(f"{file}: cannot load with weights_only=True ({exc.__class__.__name__})") from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise InputError(f"{file}: not a flat state dict of tensors")
            self._bin_cache.clear()  # keep one mmapped checkpoint open at a time
            self._bin_cache[file] = state
        return self._bin_cache[file]

    @property
    def names(self) -> list[str]:
        """Tensor names in model order."""
        return sorted(self.locations, key=model_order_key)

    def get(self, name: str) -> torch.Tensor:
        file = self.locations[name]
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(file, "pt") as f:
                return f.get_tensor(name)
        return self._load_bin(file)[name].contiguous()

    def meta(self, name: str) -> torch.Tensor:
        """A tensor on the ``meta`` device with ``name``'s shape and dtype (nothing read): for planning."""
        shape, dtype = self.specs[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names:
            yield name, self.get(name)

    def is_weight_file(self, path: Path) -> bool:
        return path.suffix in WEIGHT_SUFFIXES or path.name in INDEX_NAMES
