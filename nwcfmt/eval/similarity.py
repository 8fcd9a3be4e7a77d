"""Quality of an encoder (e.g. all-MiniLM-L6-v2) as sentence-embedding cosine similarity to the original.

Protocol (``PROTOCOL``):

1. Sentences: :func:`split_sentences` of the text (default: ``nwcfmt.data.eval_text()``), the first
   ``sentences`` of them (default 256). Splitting is deterministic and dependency-free: whitespace runs
   (newlines included) become one space; a sentence ends at ``.``, ``!`` or ``?`` (optionally followed by a
   closing quote or bracket) when whitespace and an upper-case letter, digit or opening quote follow, except
   after the abbreviations in ``_ABBREVIATIONS`` (``Mr.``, ``Mrs.``, ``Dr.``, ...); sentences of fewer than
   ``min_words`` (4) words are dropped.
2. Embeddings: the evaluated folder's tokenizer (padding, truncation to ``max_length``: the model's
   ``sentence_bert_config.json`` ``max_seq_length`` when present, else 256), the encoder's
   ``last_hidden_state`` mean-pooled over the tokens whose attention mask is 1, as sentence-transformers'
   ``Pooling(mean)`` does for all-MiniLM-L6-v2 (its final L2 normalisation does not change cosines).
   Batches of 32 sentences of similar length (sorted by token count, as sentence-transformers' ``encode``
   does, so little padding is computed; masked padding does not change an embedding), fp32,
   ``torch.inference_mode()``.
3. Score: cosine similarity of each sentence's embedding under the evaluated model and under the reference
   (original) model, same token ids for both; reported as mean and minimum over the sentences.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nwcfmt.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_SENTENCES",
    "PROTOCOL",
    "SimilarityResult",
    "embedding_similarity",
    "max_seq_length",
    "sentence_embeddings",
    "split_sentences",
]

PROTOCOL = "nwc-cos-v1"
DEFAULT_SENTENCES = 256
DEFAULT_MAX_LENGTH = 256
DEFAULT_BATCH = 32
_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "St", "Jr", "Sr", "Gen", "Sen", "Rep", "Gov", "No", "vs", "U.S", "D.C")
_END = re.compile(r"[.!?][\"'”’)\]]*(?= [A-Z0-9\"“'‘(])")


@dataclass(frozen=True)
class SimilarityResult:
    """Mean / minimum cosine similarity of the evaluated embeddings to the reference embeddings."""

    mean_cosine: float
    min_cosine: float
    sentences: int
    tokens: int  # non-padding tokens embedded per model
    max_length: int
    seconds: float  # both models' forward passes
    cosines: list[float] = field(default_factory=list)
    protocol: str = PROTOCOL

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["mean_cosine"] = round(self.mean_cosine, 8)
        doc["min_cosine"] = round(self.min_cosine, 8)
        doc["seconds"] = round(self.seconds, 3)
        doc.pop("cosines")
        return doc


def split_sentences(text: str, limit: int | None = None, *, min_words: int = 4) -> list[str]:
    """The first ``limit`` sentences of ``text`` (all when ``None``), split as in the module docstring."""
    flat = " ".join(text.split())
    sentences: list[str] = []
    begin = 0
    for match in _END.finditer(flat):
        head = flat[begin : match.start()]
        if any(head.endswith(" " + a) or head == a for a in _ABBREVIATIONS):
            continue
        sentence = flat[begin : match.end()].strip()
        begin = match.end() + 1
        if len(sentence.split()) >= min_words:
            sentences.append(sentence)
            if limit is not None and len(sentences) >= limit:
                return sentences
    tail = flat[begin:].strip()
    if tail and len(tail.split()) >= min_words:
        sentences.append(tail)
    return sentences if limit is None else sentences[:limit]


def max_seq_length(folder: str | Path | None) -> int:
    """``max_seq_length`` from ``folder/sentence_bert_config.json`` when present, else 256."""
    if folder is not None:
        path = Path(folder) / "sentence_bert_config.json"
        try:
            value = json.loads(path.read_text()).get("max_seq_length")
        except (OSError, ValueError, AttributeError):
            value = None
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def _encode(tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str], max_length: int) -> dict:
    return tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _length_order(tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str], max_length: int) -> list[int]:
    """Indices of ``sentences`` by increasing token count (ties keep text order): the batching order."""
    ids = tokenizer(list(sentences), truncation=True, max_length=max_length, verbose=False)["input_ids"]
    return sorted(range(len(sentences)), key=lambda i: (len(ids[i]), i))


def _embed(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    output = model(**batch)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def sentence_embeddings(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch: int = DEFAULT_BATCH,
) -> torch.Tensor:
    """Mean-pooled (attention-masked) fp32 sentence embeddings, ``[len(sentences), hidden]``."""
    order = _length_order(tokenizer, sentences, max_length)
    out: list[torch.Tensor] = [torch.empty(0)] * len(sentences)
    with torch.inference_mode():
        for i in range(0, len(order), batch):
            chosen = order[i : i + batch]
            rows = _embed(model, _encode(tokenizer, [sentences[j] for j in chosen], max_length)).float()
            for j, row in zip(chosen, rows, strict=True):
                out[j] = row
    return torch.stack(out) if out else torch.empty(0, 0)


def embedding_similarity(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    sentences: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch: int = DEFAULT_BATCH,
) -> SimilarityResult:
    """Cosine similarity of ``model``'s sentence embeddings to ``reference``'s (the protocol above)."""
    if not sentences:
        raise InputError("no sentences to embed (the text is empty or has no sentence of 4+ words)")
    begin = time.perf_counter()
    order = _length_order(tokenizer, sentences, max_length)
    cosines = [0.0] * len(sentences)  # in text order
    tokens = 0
    with torch.inference_mode():
        for i in range(0, len(order), batch):
            chosen = order[i : i + batch]
            enc = _encode(tokenizer, [sentences[j] for j in chosen], max_length)
            tokens += int(enc["attention_mask"].sum())
            a = _embed(model, enc).double()
            b = _embed(reference, enc).double()
            for j, cos in zip(chosen, torch.nn.functional.cosine_similarity(a, b, dim=1).tolist(), strict=True):
                cosines[j] = cos
    seconds = time.perf_counter() - begin
    return SimilarityResult(
        mean_cosine=sum(cosines) / len(cosines),
        min_cosine=min(cosines),
        sentences=len(cosines),
        tokens=tokens,
        max_length=max_length,
        seconds=seconds,
        cosines=cosines,
    )
