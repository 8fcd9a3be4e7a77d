"""Calibration text -> token batches.

Each of the ``samples`` windows starts at a character offset drawn with a seeded generator, moved forward to
the next word start; the text from there is tokenized without special tokens (no BOS, like the perplexity
protocol) and its first ``seqlen`` tokens form the window (a window that would run past the end of the text is
taken from the end instead). The same text, options and seed give the same batches on every machine.
Only the pieces are tokenized, in one batched call: tokenizing all 11 MB of the default text would take about
20 s on 2 cores, for 1.4% of its tokens.

Defaults: 128 windows of 256 tokens (32,768 tokens) in batches of 16. Measured on SmolLM2-135M (fp32, CPU), one
decoder block costs the pipeline two forward passes over the cached activations plus the Hessians: 10 CPU-seconds
with 128 x 256 (about 5 s on 2 idle cores, so about 2.5 minutes for its 30 blocks, before the encoder's own work)
and 17 CPU-seconds with 128 x 512 (about 4.5 minutes). 32k tokens is already 21 rows per column of the widest
Linear input (1,536), so every Hessian is well determined. Raise ``--calib-samples`` / ``--calib-seqlen`` for
larger models or when the time is there: the cost grows about linearly with the tokens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nwcfmt.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 256
DEFAULT_BATCH_SIZE = 16


def default_text() -> str:
    """The project's calibration text (State of the Union speeches before 2000; never the evaluation text)."""
    from nwcfmt.data import calib_text

    return calib_text()


def tokenize(tokenizer: PreTrainedTokenizerBase, pieces: list[str]) -> list[list[int]]:
    """Token ids of each piece, no special tokens."""
    return tokenizer(pieces, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def _word_start(text: str, offset: int) -> int:
    """The first character of the word at or after ``offset`` (``offset`` itself at 0 or after whitespace)."""
    if offset == 0 or text[offset - 1].isspace():
        return offset
    while offset < len(text) and not text[offset].isspace():
        offset += 1
    while offset < len(text) and text[offset].isspace():
        offset += 1
    return offset


def _windows(tokenizer: PreTrainedTokenizerBase, text: str, starts: list[int], seqlen: int) -> list[list[int]]:
    """``seqlen`` tokens from each start (from the end of the text for a start too close to it)."""
    chars = 8 * seqlen  # English runs 4-5 characters per token; doubled until every window is full
    while True:
        pieces = [text[s : s + chars] if s + chars <= len(text) else text[-chars:] for s in starts]
        ids = tokenize(tokenizer, pieces)
        short = [i for i, w in enumerate(ids) if len(w) < seqlen]
        if not short:
            return [w[:seqlen] if s + chars <= len(text) else w[-seqlen:] for s, w in zip(starts, ids, strict=True)]
        if chars >= len(text):
            count = len(tokenize(tokenizer, [text])[0])
            raise InputError(
                f"the calibration text has {count} tokens, fewer than one window of {seqlen}: "
                "use a longer text or a smaller --calib-seqlen"
            )
        chars = min(2 * chars, len(text))


def calibration_batches(
    tokenizer: PreTrainedTokenizerBase,
    text: str | None = None,
    samples: int = DEFAULT_SAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> list[torch.Tensor]:
    """``samples`` windows of ``seqlen`` tokens from ``text`` (default: :func:`default_text`), as LongTensor
    batches ``[b, seqlen]``. Deterministic for a given ``seed``.

    Every batch has the same size ``b``: the largest divisor of ``samples`` not above ``batch_size``, so one set
    of block arguments (attention mask, position embeddings) serves all batches.
    """
    if samples < 1 or seqlen < 2 or batch_size < 1:
        raise InputError(
            f"calibration needs samples >= 1, seqlen >= 2 and batch_size >= 1 (got {samples}, {seqlen}, {batch_size})"
        )
    text = default_text() if text is None else text
    if not text.strip():
        raise InputError("the calibration text is empty")
    starts = _starts(text, samples, seed)
    windows = torch.tensor(_windows(tokenizer, text, starts, seqlen), dtype=torch.long)
    return _batches(windows, batch_size)


def _starts(text: str, samples: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(text), (samples,), generator=generator).tolist()
    return [min(_word_start(text, o), len(text) - 1) for o in offsets]


HELDOUT_SEED_OFFSET = 1_000_003


def heldout_batches(
    tokenizer: PreTrainedTokenizerBase,
    text: str | None,
    samples: int,
    seqlen: int,
    calib_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    batch_size: int = 8,
    skip: int = 0,
) -> list[torch.Tensor]:
    """``samples`` windows of the calibration text that share no text with the ``calib_samples`` windows
    :func:`calibration_batches` takes for ``seed`` nor with each other (each window's span, 16 characters a
    token, is kept clear of the others'): held-out text for checking what calibration chose. The windows are
    drawn in a fixed order; ``skip`` leaves out the first ones (the planner's Fisher takes windows 0-15, its KL
    check the next 16)."""
    text = default_text() if text is None else text
    if not text.strip():
        raise InputError("the calibration text is empty")
    span = 16 * seqlen
    used = sorted(_starts(text, calib_samples, seed))
    generator = torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET)
    starts: list[int] = []
    for _ in range(100):
        for o in torch.randint(0, max(1, len(text) - span), (4 * samples,), generator=generator).tolist():
            s = _word_start(text, o)
            if all(s + span <= u or u + span <= s for u in used + starts):
                starts.append(s)
            if len(starts) == skip + samples:
                windows = torch.tensor(_windows(tokenizer, text, starts[skip:], seqlen), dtype=torch.long)
                return _batches(windows, batch_size)
    raise InputError(f"the calibration text is too short for {skip + samples} held-out windows of {seqlen} tokens")


def _batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    samples = windows.shape[0]
    size = max(d for d in range(1, min(batch_size, samples) + 1) if samples % d == 0)
    return list(windows.split(size))


GREEDY_TOKENS = 3  # self-generated windows: tokens after the random first one chosen greedily, before sampling
# Sequences generated together. generate() on a CPU is dominated by per-step overhead: on 2 cores a 256-token
# window costs about 14 s at 8 sequences a call, 6 s at 32 and 5 s at 64.
GENERATE_BATCH = 64


def generated_batches(
    model_dir: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    samples: int = DEFAULT_SAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Self-generated calibration windows (``--calib self``; Shin et al., EMNLP 2024, after LLM-QAT): the model
    writes each window from a uniformly random first token (no special token), :data:`GREEDY_TOKENS` greedy
    tokens, then tokens sampled from its full distribution (temperature 1, no top-k/top-p), never stopping at
    EOS. Seeded, so the same model and seed give the same windows. Needs the whole model in memory (fp32) once,
    before calibration starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if samples < 1 or seqlen < 2 or batch_size < 1:
        raise InputError("calibration needs samples >= 1, seqlen >= 2 and batch_size >= 1")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if not any(a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or ()):
        raise InputError("--calib self needs a causal language model (it writes its own calibration text)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    vocab = min(len(tokenizer), model.get_output_embeddings().weight.shape[0])
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    first = allowed[torch.randint(allowed.numel(), (samples,), generator=gen)]
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    windows = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, samples, GENERATE_BATCH):
            ids = first[start : start + GENERATE_BATCH, None]
            mask = torch.ones_like(ids)
            common = {"pad_token_id": pad, "attention_mask": mask}
            greedy = min(GREEDY_TOKENS, seqlen - 1)
            ids = model.generate(ids, max_new_tokens=greedy, min_new_tokens=greedy, do_sample=False, **common)
            rest = seqlen - ids.shape[1]
            if rest > 0:
                common["attention_mask"] = torch.ones_like(ids)
                ids = model.generate(
                    ids, max_new_tokens=rest, min_new_tokens=rest, do_sample=True, top_k=0, top_p=1.0, **common
                )
            windows.append(ids[:, :seqlen])
    return _batches(torch.cat(windows), batch_size)


def read_text_file(path: str | os.PathLike) -> str:
    """A calibration text file (UTF-8); :class:`InputError` when missing, unreadable, not text or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: calibration text file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a calibration text file") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: the calibration text is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the calibration text ({exc.strerror or exc})") from None
    if not text.strip():
        raise InputError(f"{path}: the calibration text is empty")
    return text
