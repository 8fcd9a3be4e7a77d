"""Load a model for evaluation from a plain Hugging Face folder or an NWC folder (fp32, CPU).

The loader is deliberately small (a later transformers ``from_pretrained`` integration replaces it):

1. the config comes from ``config.json`` through ``AutoConfig``, without its ``quantization_config``
   (an NWC folder's weights are decoded by nwcfmt, not by a transformers quantizer);
2. the model is built from that config in fp32 on the CPU: ``AutoModelForCausalLM`` when the config's
   ``architectures`` name a causal LM (``...ForCausalLM`` / ``...LMHeadModel``), else ``AutoModel``
   (encoders such as all-MiniLM-L6-v2's ``BertModel``);
3. the weights come from :func:`nwcfmt.load` (NWC or plain safetensors, single or sharded); floating-point
   tensors are cast to fp32, integer tensors keep their dtype;
4. ``load_state_dict`` copies them in. Tied parameters (SmolLM2's ``lm_head.weight`` is
   ``model.embed_tokens.weight``; the folder stores it once) are filled from whichever name the checkpoint
   holds. Tensors the model keeps as non-persistent buffers (e.g. BERT's legacy ``embeddings.position_ids``)
   are ignored. With ``strict=True`` any other missing or unexpected tensor is an :class:`InputError`.

Nothing in the folder is written or changed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from nwcfmt.errors import InputError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EvalModel",
    "ModelKind",
    "folder_kind",
    "is_nwc_folder",
    "load_for_eval",
    "load_state_dict_tied",
    "model_kind",
]

ModelKind = Literal["causal-lm", "encoder"]
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass
class EvalModel:
    """A model ready for evaluation (fp32, CPU, ``eval()`` mode) and what it was loaded from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    kind: ModelKind
    folder: Path
    is_nwc: bool
    seconds: float  # wall time of the load (config, model build, decode, copy)


def _read_config(folder: Path) -> PretrainedConfig:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder}/config.json: transformers cannot read it ({exc})") from None
    if getattr(config, "quantization_config", None) is not None:
        # NWC weights are decoded by nwcfmt; the model itself is an ordinary fp32 model.
        del config.quantization_config
    return config


def is_nwc_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder/config.json`` declares ``quantization_config.quant_method == "nwc"``."""
    import json

    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "nwc"


def model_kind(config: PretrainedConfig) -> ModelKind:
    """``"causal-lm"`` when ``config.architectures`` names a causal LM, else ``"encoder"``."""
    architectures = getattr(config, "architectures", None) or []
    return "causal-lm" if any(str(a).endswith(_CAUSAL_SUFFIXES) for a in architectures) else "encoder"


def folder_kind(folder: str | os.PathLike) -> ModelKind:
    """:func:`model_kind` from ``folder/config.json`` read as plain JSON (cheap: no transformers, no weights)."""
    import json

    path = Path(folder) / "config.json"
    if not Path(folder).is_dir():
        raise InputError(f"{folder}: no such model folder")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{folder}: not a model folder (no config.json)") from None
    except ValueError:
        raise InputError(f"{path}: not valid JSON") from None
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(architectures, list):
        architectures = []
    return "causal-lm" if any(str(a).endswith(_CAUSAL_SUFFIXES) for a in architectures) else "encoder"


def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names that share one Parameter object (e.g. ``["model.embed_tokens.weight", "lm_head.weight"]``)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def load_state_dict_tied(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, strict: bool = True
) -> tuple[list[str], list[str]]:
    """Copy ``state_dict`` into ``model``, filling tied parameters from whichever alias is stored.

    Returns ``(missing, unexpected)`` after ties and non-persistent buffers are accounted for; with
    ``strict=True`` either being non-empty raises :class:`InputError`. ``state_dict`` is not modified.
    """
    sd = dict(state_dict)
    for names in _tied_groups(model):
        present = [n for n in names if n in sd]
        if not present:
            continue
        first = sd[present[0]]
        for other in present[1:]:
            if sd[other].shape != first.shape or not torch.equal(sd[other], first):
                raise InputError(f"tied weights {present[0]} and {other} are stored with different values")
        for name in names:
            sd.setdefault(name, first)
    persistent = set(model.state_dict().keys())
    transient = {name for name, _ in model.named_buffers()} - persistent
    unexpected = sorted(k for k in sd if k not in persistent and k not in transient)
    missing = sorted(k for k in persistent if k not in sd)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:5])}{' ...' * (len(missing) > 5)}")
        if unexpected:
            extra = " ..." * (len(unexpected) > 5)
            parts.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:5])}{extra}")
        raise InputError(f"checkpoint does not match the model built from config.json: {'; '.join(parts)}")
    loadable = {k: v for k, v in sd.items() if k in persistent}
    with torch.no_grad():
        model.load_state_dict(loadable, strict=False)
    return missing, unexpected


def _strip_base_prefix(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A base model (``BertModel``) loading a checkpoint saved from its task model (``bert.`` prefix)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or hasattr(model, prefix) or not sd:
        return sd
    dotted = prefix + "."
    if all(k.startswith(dotted) for k in sd):
        return {k[len(dotted) :]: v for k, v in sd.items()}
    return sd


def load_for_eval(
    folder: str | os.PathLike,
    *,
    kind: ModelKind | None = None,
    strict: bool = True,
    tokenizer: bool = True,
) -> EvalModel:
    """Build the model of ``folder`` (plain HF or NWC) in fp32 on the CPU, in ``eval()`` mode.

    ``kind`` overrides the causal-LM / encoder choice made from ``config.architectures``. The tokenizer is
    loaded from the folder with ``AutoTokenizer`` (``None`` when ``tokenizer=False``).
    """
    import time

    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    import nwcfmt

    start = time.perf_counter()
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such model folder")
    config = _read_config(folder)
    kind = kind or model_kind(config)
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    try:
        model = auto.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError) as exc:
        raise InputError(f"{folder}: transformers cannot build a {kind} model from config.json ({exc})") from None
    raw = nwcfmt.load(folder)
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in raw.items()}
    del raw
    load_state_dict_tied(model, _strip_base_prefix(model, sd), strict=strict)
    del sd
    model.eval()
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{folder}: cannot load the tokenizer ({exc})") from None
    return EvalModel(model, tok, kind, folder, is_nwc_folder(folder), time.perf_counter() - start)
