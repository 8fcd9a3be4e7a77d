"""vLLM plugin (level one): NWC folders load in vLLM, decoded at load into vLLM's dense (and fused) parameters.

nwcfmt declares the entry point ``nwc = nwcfmt.integrations.vllm:register`` in the ``vllm.general_plugins`` group,
so every vLLM process calls :func:`register` once nwcfmt is installed beside vLLM. It registers:

- quantization method ``nwc`` (``vllm_classes.NwcConfig``), which vLLM finds in the folder's ``config.json``
  (``quantization_config.quant_method``): the model is built with plain dense layers;
- load format ``nwc`` (``NwcModelLoader``): the weights come from :func:`nwc_weights`, which reads each NWC file
  with its manifest and decodes one tensor at a time on the CPU, yielding ``(name, tensor)`` under the original
  checkpoint names. vLLM's model then loads them as it loads any checkpoint: it fuses q/k/v and gate/up itself and
  copies each tensor to the parameter's device (CPU or GPU).

vLLM's own weight iterators yield tensors without the safetensors ``__metadata__`` that holds the manifest, so the
loader reads the files itself: codec parameters reach vLLM as decoded tensors, never through its iterators.

    from vllm import LLM
    llm = LLM("path/to/nwc-folder", load_format="nwc")
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from nwcfmt.container.reader import NwcReader
from nwcfmt.errors import InputError
from nwcfmt.sources import find_weight_files

QUANT_METHOD = "nwc"
LOAD_FORMAT = "nwc"
_registered = False


def nwc_weights(folder: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of an NWC folder, decoded on the CPU one at a time, under its checkpoint name (the loader
    notice and other empty marker tensors are skipped)."""
    path = Path(folder)
    if not path.is_dir():
        raise InputError(f"{folder}: vLLM's nwc loader reads a local NWC folder")
    for file in find_weight_files(path):
        with NwcReader(file, allow_plain=True) as reader:
            for name in reader.names:
                yield name, reader.decode(name)


def register() -> None:
    """Register quantization method ``nwc`` and load format ``nwc`` with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.model_executor.model_loader import register_model_loader

    from nwcfmt.integrations.vllm_classes import NwcConfig, NwcModelLoader

    register_quantization_config(QUANT_METHOD)(NwcConfig)
    register_model_loader(LOAD_FORMAT)(NwcModelLoader)
    _registered = True


__all__ = ["LOAD_FORMAT", "QUANT_METHOD", "nwc_weights", "register"]
