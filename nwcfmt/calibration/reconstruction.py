"""Block-output reconstruction helpers shared by every encoder that trains on a block's output (learned
rounding, the latent codecs' fine-tuning): running a block with some parameters replaced, its output MSE against
the full-precision targets, calibration minibatches and the evenly spaced batches of the before/after check."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nwcfmt.calibration.method import BlockData
from nwcfmt.errors import EncodeError

GUARD_TOKENS = 8192  # calibration tokens of the before/after block-loss check (a forward pass each)
Batch = tuple[torch.Tensor, dict[str, Any], torch.Tensor]


def block_output(block: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, kwargs: dict[str, Any]):
    """Run ``block`` with some parameters replaced (``torch.func.functional_call``); the hidden state out."""
    out = torch.func.functional_call(block, params, (x,), kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def block_mse(block: nn.Module, params: dict[str, torch.Tensor], batches: list[Batch]) -> float:
    """Mean squared error between ``block``'s output with ``params`` and the targets, over all of ``batches``."""
    mse = torch.nn.functional.mse_loss
    with torch.no_grad():
        total = sum(mse(block_output(block, params, x, kw), y).item() * x.numel() for x, kw, y in batches)
    return total / sum(x.numel() for x, _, _ in batches)


def split_batches(data: BlockData, batch_size: int) -> list[Batch]:
    """(input, kwargs, target) minibatches of at most ``batch_size`` sequences, kwargs sliced alongside."""
    if data.targets is None or len(data.targets) != len(data.inputs):
        raise EncodeError("learned rounding needs the full-precision block outputs (BlockData.targets)")
    kwargs = dict(data.kwargs)
    if "past_key_values" in kwargs:  # never grow a cache while training
        kwargs["past_key_values"] = None
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    batches = []
    for x, y in zip(data.inputs, data.targets, strict=True):
        n = x.shape[0]
        for start in range(0, n, batch_size):
            sl = slice(start, min(n, start + batch_size))
            kw = kwargs if n <= batch_size else {k: _slice_batch(v, n, sl) for k, v in kwargs.items()}
            batches.append((x[sl], kw, y[sl]))
    return batches


def guard_batches(batches: list[Batch]) -> list[Batch]:
    """Evenly spaced minibatches of about :data:`GUARD_TOKENS` tokens (all when fewer) for the before/after check."""
    tokens = batches[0][0].shape[0] * batches[0][0].shape[1] if batches[0][0].dim() > 1 else 1
    n = min(len(batches), max(1, math.ceil(GUARD_TOKENS / max(tokens, 1))))
    return [batches[i * len(batches) // n] for i in range(n)]


def _slice_batch(value: Any, n: int, sl: slice) -> Any:
    """Slice a forward argument along its batch dimension (when it has one of length ``n``)."""
    if isinstance(value, torch.Tensor):
        return value[sl] if value.dim() > 0 and value.shape[0] == n else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_batch(v, n, sl) for v in value)
    return value


def fit_block_output(
    block: nn.Module,
    params: Callable[[], dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    batches: list[Batch],
    iters: int,
    gen: torch.Generator,
) -> None:
    """``iters`` optimizer steps on the MSE between ``block``'s output with ``params()`` and the targets, one
    minibatch a step, in a fresh random order (from ``gen``) each pass over ``batches``."""
    order: list[int] = []
    with torch.enable_grad():  # callers may run the pipeline under no_grad
        for _ in range(iters):
            if not order:
                order = torch.randperm(len(batches), generator=gen).tolist()
            x, kw, y = batches[order.pop()]
            loss = nn.functional.mse_loss(block_output(block, params(), x, kw), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
