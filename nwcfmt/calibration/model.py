"""The calibrated model, built without its weights: a transformers model whose parameters live on ``meta`` until
the pipeline reads them part by part from the checkpoint (:func:`load_weights`, :func:`release_weights`), and the
checks and names that go with it. Shared by the calibration pipeline and the planner's measuring pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from nwcfmt.calibration.blocks import SUPPORTED, BlockLayout, find_layout, refuse_config
from nwcfmt.errors import EncodeError, InputError, NwcError, UnsupportedError
from nwcfmt.sources import WeightSource


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from transformers while the pipeline loads the model (it reports itself)."""
    from transformers.utils import logging

    bars, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def auto_class(config: Any):
    """``AutoModel`` for an encoder (``config.architectures`` names no causal LM, as ``nwc eval`` decides),
    else ``AutoModelForCausalLM``."""
    from transformers import AutoModel, AutoModelForCausalLM

    from nwcfmt.eval.loading import model_kind

    encoder = bool(getattr(config, "architectures", None)) and model_kind(config) == "encoder"
    return AutoModel if encoder else AutoModelForCausalLM


def load_full_model(src: Path) -> tuple[torch.nn.Module, Any]:
    """The whole model in fp32, in eval mode, with the auto class that built it (:func:`auto_class`): for the
    passes that need all of it at once (the planner's Fisher and its end-to-end check)."""
    from transformers import AutoConfig

    cls = auto_class(AutoConfig.from_pretrained(src, local_files_only=True))
    with quiet_transformers():
        model = cls.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    return model, cls


def supported_config(src: Path) -> Any:
    """The folder's transformers config, once its architecture is known to run block by block (checked on a
    ``meta`` model, before any weight is read); :class:`InputError` or :class:`UnsupportedError` otherwise."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{src}: transformers cannot read config.json ({exc})") from None
    refuse_config(config)
    arch = f"{(getattr(config, 'architectures', None) or ['?'])[0]} ({config.model_type})"
    with quiet_transformers():
        try:
            with torch.device("meta"):
                find_layout(auto_class(config).from_config(config))
        except ValueError:
            message = f"{arch}: transformers has no model class for it; calibrated codecs support {SUPPORTED}"
            raise UnsupportedError(message) from None
    return config


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside put their parameters on the ``meta`` device as they register them (each is allocated
    once, uninitialised, and dropped); buffers (rotary tables, position ids) stay real."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def load_model(src: Path) -> tuple[torch.nn.Module, BlockLayout, Any]:
    """The model with its parameters on ``meta`` (:func:`load_weights` reads them part by part), its block
    layout and its tokenizer; refuses unsupported architectures before reading anything."""
    from transformers import AutoTokenizer

    config = supported_config(src)
    with quiet_transformers(), _parameters_on_meta():
        model = auto_class(config).from_config(config, dtype=torch.float32)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{src}: calibration needs the model's tokenizer in the folder ({exc})") from None
    return model, find_layout(model), tokenizer


def _set_parameter(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    target = module.get_submodule(owner) if owner else module
    target._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def load_weights(
    module: torch.nn.Module,
    prefix: str,
    source: WeightSource,
    model: torch.nn.Module,
    skip: tuple[torch.nn.Module, ...] = (),
    required: bool = True,
) -> None:
    """Read ``module``'s parameters (its name in ``model`` is ``prefix``) from the checkpoint, in fp32, except those
    inside ``skip``. A parameter the checkpoint lacks is an error when ``required``, else zeros (a head outside
    the blocks that calibration never reaches, such as an untrained pooler)."""
    skipped = {id(p) for m in skip for p in m.parameters()}
    for name, param in list(module.named_parameters()):
        if id(param) in skipped or param.device.type != "meta":
            continue
        full = f"{prefix}.{name}" if prefix else name
        try:
            value = source.get(checkpoint_name(full, source, model)).to(torch.float32)
        except EncodeError:
            if required:
                raise
            value = torch.zeros(param.shape, dtype=torch.float32)
        if tuple(value.shape) != tuple(param.shape):
            raise EncodeError(f"{full}: the checkpoint holds {list(value.shape)}, the model {list(param.shape)}")
        _set_parameter(module, name, value)


def release_weights(module: torch.nn.Module) -> None:
    """Put ``module``'s parameters back on ``meta``, freeing their memory."""
    for name, param in list(module.named_parameters()):
        if param.device.type != "meta":
            _set_parameter(module, name, param.detach().to("meta"))


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc keeps freed blocks below its mmap threshold, and a run
    that frees one block's tensors after another would otherwise grow with depth); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def base_prefix(model: torch.nn.Module, layout: BlockLayout) -> str:
    """The name of the layout's base module (the one holding the embeddings and the blocks) in ``model``."""
    return next(name for name, module in model.named_modules() if module is layout.base)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def calibration_unavailable(src: Path) -> str | None:
    """Why ``src`` cannot be calibrated (not a model folder, no tokenizer, an unsupported architecture), or
    None when it can: lets codecs whose calibration is optional fall back to their data-free encoder."""
    if not (src.is_dir() and (src / "config.json").is_file()):
        return f"{src} is not a model folder with config.json"
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        return f"{src} has no tokenizer"
    try:
        supported_config(src)
    except NwcError as exc:
        return f"{src} cannot be calibrated ({str(exc).splitlines()[0][:160]})"
    return None


def checkpoint_name(name: str, source: WeightSource, model: torch.nn.Module) -> str:
    """The checkpoint's name for the model's parameter ``name`` (with or without the base model prefix)."""
    if name in source.locations:
        return name
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if name.startswith(prefix) and name[len(prefix) :] in source.locations:
        return name[len(prefix) :]
    raise EncodeError(f"the checkpoint has no tensor for {name} (renamed weights are not supported)")


__all__ = [
    "TOKENIZER_FILES",
    "auto_class",
    "base_prefix",
    "calibration_unavailable",
    "checkpoint_name",
    "load_full_model",
    "load_model",
    "load_weights",
    "quiet_transformers",
    "release_weights",
    "supported_config",
    "trim_heap",
]
