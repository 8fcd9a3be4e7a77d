"""Calibration: token batches, block-by-block execution, Hessians, and the encoder contract (method.py).

Calibrated encoders register a factory under their codec id::

    from nwcfmt.calibration import register_method
    register_method("gptq", lambda config: GptqMethod(GptqCodec.from_config(config)))

``config`` is the codec config from the command line or a policy (``bits``, ``group_size``, ...); the factory
returns a :class:`~nwcfmt.calibration.method.BlockQuantizer`. ``nwc encode --codec ID`` routes every registered
id through :func:`nwcfmt.calibration.pipeline.encode_calibrated`. This module stays import-light (no torch) so
codec modules can register at import without cycles.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nwcfmt.calibration.method import BlockQuantizer

MethodFactory = Callable[[dict[str, Any]], "BlockQuantizer"]

# Modules that register calibrated methods when imported; imported lazily, skipped when absent.
BUILTIN_METHOD_MODULES = (
    "nwcfmt.codecs.gptq",
    "nwcfmt.codecs.flexround",
    "nwcfmt.codecs.lrq",
    "nwcfmt.encoders.calibrated_latent",  # ecsq, neural
    "nwcfmt.encoders.sparse",  # sparse (Wanda, SparseGPT, reconstruction)
)

_METHODS: dict[str, MethodFactory] = {}


def register_method(codec_id: str, factory: MethodFactory) -> MethodFactory:
    """Register the calibrated encoder of ``codec_id``: ``factory(codec_config) -> BlockQuantizer``."""
    existing = _METHODS.get(codec_id)
    same = existing is not None and (existing.__module__, existing.__qualname__) == (
        factory.__module__,
        factory.__qualname__,
    )  # the same module imported again
    if existing is not None and existing is not factory and not same:
        raise ValueError(f"a calibrated method is already registered for codec {codec_id!r}")
    _METHODS[codec_id] = factory
    return factory


def unregister_method(codec_id: str) -> None:
    """Remove a registration (for tests)."""
    _METHODS.pop(codec_id, None)


def load_builtin_methods() -> None:
    """Import the built-in calibrated codec modules that exist, so that they register."""
    for module in BUILTIN_METHOD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # the module exists but something it needs does not
                raise


def get_method(codec_id: str) -> MethodFactory | None:
    """The factory registered for ``codec_id`` (None when the codec is not calibrated)."""
    if codec_id not in _METHODS:
        load_builtin_methods()
    return _METHODS.get(codec_id)


def calibrated_methods() -> list[str]:
    load_builtin_methods()
    return sorted(_METHODS)


__all__ = [
    "BUILTIN_METHOD_MODULES",
    "MethodFactory",
    "calibrated_methods",
    "get_method",
    "load_builtin_methods",
    "register_method",
    "unregister_method",
]
