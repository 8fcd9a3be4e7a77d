"""The vLLM classes of the plugin (:mod:`nwcfmt.integrations.vllm`), in a module of their own because they
subclass vLLM's and vLLM pickles them across processes: imported only by ``register()``, inside vLLM."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from nwcfmt.integrations.vllm import QUANT_METHOD, nwc_weights
from nwcfmt.sources import find_weight_files


class NwcConfig(QuantizationConfig):
    """NWC checkpoints, decoded at load: every layer is dense in vLLM (level one)."""

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        self.config = dict(config or {})

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # dense layers run on every device

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict) -> NwcConfig:
        return cls(config)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        return UnquantizedLinearMethod() if isinstance(layer, LinearBase) else None


class NwcModelLoader(DefaultModelLoader):
    """vLLM's default loader, fed the decoded tensors of an NWC folder instead of the raw file contents."""

    def download_model(self, model_config) -> None:
        find_weight_files(Path(model_config.model))  # a local folder with weights, or a clear error

    def get_all_weights(self, model_config, model) -> Iterator[tuple[str, torch.Tensor]]:
        yield from nwc_weights(model_config.model)
