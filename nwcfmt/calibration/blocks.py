"""Transformer blocks of a transformers model: finding them, capturing their inputs, running them one at a time.

Supported layouts (models whose blocks hold their weights in ``nn.Linear`` modules):

- ``model.model.layers``: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 (text), Phi-3 and the like;
- ``model.transformer.h``: GPT-Neo, GPT-J, GPT-BigCode, Falcon, BLOOM and the like;
- ``model.encoder.layer``: encoder-only models loaded with ``AutoModel`` (BERT, RoBERTa, MiniLM, ...).

GPT-2 itself is refused: its ``Conv1D`` weights are stored ``[in, out]``, so the shared quantized layout (groups
along each stored row) would group along output channels, not along the inputs the Hessian describes.
Encoder-decoder models, and blocks with weights outside ``nn.Linear`` (fused MoE experts, convolutions) are
refused with :class:`~nwcfmt.errors.UnsupportedError`.

Block inputs are captured by running the model's pre-block part (embeddings, rotary tables, masks) with the
blocks' ``forward`` temporarily replaced by recorders: the hidden states reaching block 0 are kept for every
batch, and each block's keyword arguments (attention mask, position embeddings, ...) once per batch shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from nwcfmt.errors import UnsupportedError

# (the module that embeds tokens and runs the blocks, the block list within it); "" is the model itself
LAYOUTS = (("model", "layers"), ("transformer", "h"), ("", "encoder.layer"))
SUPPORTED = (
    "transformers causal LMs with nn.Linear blocks under model.layers (Llama, Mistral, Qwen2, "
    "Qwen3, Gemma, Gemma2, Phi-3, ...) or transformer.h (GPT-Neo, GPT-J, GPT-BigCode, Falcon, ...), "
    "and encoders under encoder.layer (BERT, RoBERTa, MiniLM, ...)"
)
Kwargs = dict[str, Any]


@dataclass
class BlockLayout:
    """Where the transformer blocks of a model live."""

    base: torch.nn.Module  # the module that embeds tokens and runs the blocks (LlamaModel, GPT-Neo's transformer,
    # a BertModel itself)
    blocks: torch.nn.ModuleList
    prefix: str  # qualified name of the block list in the full model, e.g. "model.layers", "encoder.layer"

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"


def architecture(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    names = getattr(config, "architectures", None) or [type(model).__name__]
    return f"{names[0]} ({getattr(config, 'model_type', '?')})"


def refuse_config(config: Any) -> None:
    """Refuse encoder-decoder configs (two stacks of blocks and cross-attention), before any weight is loaded."""
    arch = (getattr(config, "architectures", None) or ["?"])[0]
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedError(
            f"{arch} ({model_type}) is an encoder-decoder model; calibrated codecs support {SUPPORTED}"
        )


def find_layout(model: torch.nn.Module) -> BlockLayout:
    """The block list of a supported model; :class:`UnsupportedError` naming the architecture otherwise."""
    for base_name, list_name in LAYOUTS:
        base = getattr(model, base_name, None) if base_name else model
        blocks = base
        for attr in list_name.split("."):
            blocks = getattr(blocks, attr, None) if blocks is not None else None
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            layout = BlockLayout(base, blocks, f"{base_name}.{list_name}" if base_name else list_name)
            for block in blocks:
                check_block(block, model)
            return layout
    raise UnsupportedError(f"{architecture(model)}: no block list found; calibrated codecs support {SUPPORTED}")


def check_block(block: torch.nn.Module, model: torch.nn.Module) -> None:
    """Every weight of two or more dimensions must be the weight of an ``nn.Linear``."""
    linear_weights = {id(m.weight) for m in block.modules() if isinstance(m, torch.nn.Linear)}
    for module_name, module in block.named_modules():
        if type(module).__name__ == "Conv1D":
            raise UnsupportedError(
                f"{architecture(model)}: its blocks use GPT-2's Conv1D (weights stored [in, out]), which the "
                "quantized layout cannot group along the input dimension; calibrated codecs support "
                f"{SUPPORTED}. Use --codec rtn for this model"
            )
        for name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2 and id(param) not in linear_weights:
                where = f"{module_name}.{name}" if module_name else name
                raise UnsupportedError(
                    f"{architecture(model)}: block weight {where} {list(param.shape)} is not an nn.Linear weight "
                    f"(fused MoE experts or convolutions are not supported); calibrated codecs support {SUPPORTED}"
                )


def block_linears(block: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every ``nn.Linear`` inside a block, by its name within the block, in module order."""
    return {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def run_block(block: torch.nn.Module, x: torch.Tensor, kwargs: Kwargs) -> torch.Tensor:
    """One block's output hidden states for input ``x``."""
    return block_output(block(x, **kwargs))


class _Stop(Exception):
    """Raised by the block-0 recorder to end a forward pass early (private)."""


@dataclass
class CapturedInputs:
    """Block-0 inputs per batch, and each block's keyword arguments (the same for every batch: batches all
    have one shape and no padding)."""

    inputs: list[torch.Tensor]
    kwargs: list[Kwargs] = field(default_factory=list)  # per block


def _split_hidden(block: torch.nn.Module, args: tuple, kwargs: Kwargs) -> tuple[torch.Tensor, Kwargs]:
    """A block call's hidden states and its other arguments by name (BERT's encoder passes the attention mask
    positionally; the pipeline calls blocks with keywords)."""
    kwargs = dict(kwargs)
    if not args:
        return kwargs.pop("hidden_states"), kwargs
    names = [
        p.name
        for p in list(inspect.signature(type(block).forward).parameters.values())[1:]  # after self
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > max(1, len(names)) or any(n in kwargs for n in names[1 : len(args)]):
        raise UnsupportedError(f"blocks called with {len(args)} positional arguments are not supported")
    kwargs.update(zip(names[1:], args[1:], strict=False))
    return args[0], kwargs


@contextmanager
def _patched_forwards(blocks: torch.nn.ModuleList, make: Callable[[int], Callable]) -> Iterator[None]:
    """Replace each block's ``forward`` by ``make(index)`` (an instance attribute, removed afterwards)."""
    try:
        for i, block in enumerate(blocks):
            block.forward = make(i)
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def _returns_tuple(layout: BlockLayout, batch: torch.Tensor) -> bool:
    """Run block 0 once on ``batch``'s real inputs: does a block return a tuple or a tensor?"""
    first: list[tuple[torch.Tensor, Kwargs]] = []

    def stop_at_first(i: int) -> Callable:
        def forward(*args, **kwargs):
            first.append(_split_hidden(layout.blocks[i], args, kwargs))
            raise _Stop

        return forward

    with _patched_forwards(layout.blocks, stop_at_first), suppress(_Stop):
        layout.base(input_ids=batch, use_cache=False)
    if not first:
        raise UnsupportedError("the model's forward never reached its first block")
    x, kwargs = first[0]
    return isinstance(layout.blocks[0](x, **kwargs), (tuple, list))


def capture_inputs(layout: BlockLayout, batches: list[torch.Tensor]) -> CapturedInputs:
    """Block-0 hidden states for every batch and every block's kwargs, without running any block's weights
    (except block 0 once, on the first batch, to learn whether blocks return a tensor or a tuple)."""
    if len({tuple(b.shape) for b in batches}) != 1:
        raise ValueError("calibration batches must all have the same shape")
    with torch.no_grad():
        returns_tuple = _returns_tuple(layout, batches[0])
        captured = CapturedInputs([], [{} for _ in layout.blocks])

        def identity(i: int) -> Callable:
            def forward(*args, **kwargs):
                x, rest = _split_hidden(layout.blocks[i], args, kwargs)
                if i == 0:
                    captured.inputs.append(x.detach())
                if len(captured.inputs) == 1:
                    captured.kwargs[i] = rest
                return (x,) if returns_tuple else x

            return forward

        with _patched_forwards(layout.blocks, identity):
            for batch in batches:
                layout.base(input_ids=batch, use_cache=False)
    return captured
