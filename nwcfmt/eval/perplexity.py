"""Perplexity of a causal LM on a text, with one fixed protocol (the project's yardstick).

Protocol (``PROTOCOL`` below names it in reports):

1. The whole text is tokenized **once**, with ``add_special_tokens=False``: no BOS/EOS is added, at the
   start or anywhere else (SmolLM2's tokenizer adds none by default either).
2. Window ``i`` is tokens ``[i*stride, i*stride + seqlen)``; ``stride >= seqlen`` (the default,
   ``stride == seqlen == 2048``, gives back-to-back, non-overlapping windows). The first ``windows``
   windows are used; a text too short for them is an error, never a silent change of protocol.
3. Each window is one independent forward pass (fresh context, no KV cache across windows). Its first token
   has no context and is **not** predicted; tokens ``1..seqlen-1`` are, from the tokens before them in the
   window. So ``windows * (seqlen - 1)`` tokens are scored.
4. NLL per token is ``cross_entropy`` of the fp32 logits; perplexity = ``exp(mean NLL over all scored
   tokens)`` (accumulated in float64). The model runs in fp32 under ``torch.inference_mode()``.

On SmolLM2-135M-Instruct (fp32) and ``nwcfmt.data.eval_text()`` this gives 21.74 with 8 windows and 20.97
with 40 windows (see ``shared/DATA.md``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from nwcfmt.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DEFAULT_SEQLEN", "DEFAULT_WINDOWS", "PROTOCOL", "PerplexityResult", "perplexity", "tokenize_text"]

PROTOCOL = "nwc-ppl-v1"
DEFAULT_WINDOWS = 8
DEFAULT_SEQLEN = 2048


@dataclass(frozen=True)
class PerplexityResult:
    """The outcome of :func:`perplexity` with the protocol parameters that produced it."""

    perplexity: float
    mean_nll: float
    windows: int
    seqlen: int
    stride: int
    tokens_scored: int  # windows * (seqlen - 1)
    tokens_used: int  # windows * seqlen: tokens fed to the model
    text_tokens: int  # tokens in the whole text
    seconds: float  # forward passes only (tokenization excluded)
    window_nll: list[float] = field(default_factory=list)  # mean NLL of each window
    protocol: str = PROTOCOL

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["perplexity"] = round(self.perplexity, 6)
        doc["mean_nll"] = round(self.mean_nll, 8)
        doc["seconds"] = round(self.seconds, 3)
        doc["window_nll"] = [round(x, 6) for x in self.window_nll]
        return doc


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The protocol's tokenization: the whole text at once, no special tokens; a 1-D int64 tensor."""
    if not text:
        raise InputError("the evaluation text is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    text: str | torch.Tensor,
    *,
    windows: int | None = DEFAULT_WINDOWS,
    seqlen: int = DEFAULT_SEQLEN,
    stride: int | None = None,
    batch: int = 1,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` with the protocol in this module's docstring.

    ``text`` may also be the already tokenized 1-D id tensor (``tokenizer`` is then unused). ``windows=None``
    uses every full window of the text. ``stride`` defaults to ``seqlen``. ``batch`` windows go through the
    model together (same result; more memory). ``progress(n)`` is called with 0 before the first forward
    pass and then after each batch with the number of windows done.
    """
    stride = seqlen if stride is None else stride
    if seqlen < 2:
        raise InputError(f"seqlen must be at least 2, not {seqlen}")
    if stride < seqlen:
        raise InputError(f"stride ({stride}) must be >= seqlen ({seqlen}): windows must not overlap")
    if batch < 1:
        raise InputError(f"batch must be at least 1, not {batch}")
    limit = _max_positions(model)
    if limit is not None and seqlen > limit:
        raise InputError(f"seqlen {seqlen} exceeds the model's max_position_embeddings ({limit})")
    if isinstance(text, torch.Tensor):
        ids = text.to(torch.long).flatten()
    else:
        if tokenizer is None:
            raise InputError("perplexity needs a tokenizer to tokenize the text")
        ids = tokenize_text(tokenizer, text)
    available = 0 if ids.numel() < seqlen else (ids.numel() - seqlen) // stride + 1
    if windows is None:
        windows = available
    if windows < 1:
        raise InputError(f"windows must be at least 1, not {windows}")
    if windows > available:
        raise InputError(
            f"the text has {ids.numel()} tokens: {available} window(s) of {seqlen} tokens (stride {stride}), "
            f"fewer than the {windows} asked for"
        )
    starts = [i * stride for i in range(windows)]
    device = next(model.parameters()).device
    window_nll: list[float] = []
    total = 0.0
    if progress:
        progress(0)
    begin = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, windows, batch):
            chunk = torch.stack([ids[s : s + seqlen] for s in starts[first : first + batch]]).to(device)
            logits = model(input_ids=chunk, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="none"
            ).view(chunk.shape[0], seqlen - 1)
            del logits
            sums = nll.double().sum(dim=1)
            total += float(sums.sum())
            window_nll.extend(float(s) / (seqlen - 1) for s in sums)
            if progress:
                progress(len(window_nll))
    seconds = time.perf_counter() - begin
    scored = windows * (seqlen - 1)
    mean = total / scored
    return PerplexityResult(
        perplexity=math.exp(mean),
        mean_nll=mean,
        windows=windows,
        seqlen=seqlen,
        stride=stride,
        tokens_scored=scored,
        tokens_used=windows * seqlen,
        text_tokens=int(ids.numel()),
        seconds=seconds,
        window_nll=window_nll,
    )
