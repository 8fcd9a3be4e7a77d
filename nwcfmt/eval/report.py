"""Evaluate model folders and report: perplexity or embedding cosine next to bits per weight.

:func:`evaluate_folder` loads a plain HF or NWC folder (:mod:`nwcfmt.eval.loading`) and measures

* a causal LM: perplexity on the text (:mod:`nwcfmt.eval.perplexity`);
* an encoder: mean cosine of sentence embeddings against a reference folder (:mod:`nwcfmt.eval.similarity`).

Bits per weight count every stored byte (codec payloads and their parameters; file headers excluded, as in
``nwc info``), from :func:`nwcfmt.summary.summarize`, over two sets of tensors:

* ``all``: every tensor stored in the folder (a tied ``lm_head`` is stored once, so counted once);
* ``linear``: the weights of the Linear layers the reference quantizer targets
  (:func:`nwcfmt.eval.fakequant.quantizable_linears`: every ``nn.Linear`` except the output embedding and
  tied weights), the tensors a weight quantizer compresses. A plain bf16 folder gives 16 for both, fp32 32.

:func:`save_eval_json` records results in ``<folder>/nwc_eval.json`` (what model cards read)::

    {"schema": "nwc-eval/1",
     "evaluations": {"<metric>/<text>/<protocol key>": {<record>, "date": ISO-8601 UTC, "versions": {...}}}}

One entry per metric, text and protocol parameters; a new run replaces the entry with the same key and keeps
the others. The file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nwcfmt.errors import InputError

__all__ = [
    "EVAL_FILE",
    "EvalRecord",
    "TextSource",
    "bits_per_weight",
    "evaluate_folder",
    "format_table",
    "plot_records",
    "resolve_text",
    "save_eval_json",
]

EVAL_FILE = "nwc_eval.json"
SCHEMA = "nwc-eval/1"
SOTU_EVAL = "sotu-eval"


@dataclass(frozen=True)
class TextSource:
    """An evaluation text and how to name it in reports."""

    name: str  # "sotu-eval" or the file name given
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def to_json(self) -> dict:
        return {"name": self.name, "chars": len(self.text), "sha256": self.sha256}


def resolve_text(spec: str | os.PathLike = SOTU_EVAL) -> TextSource:
    """``"sotu-eval"``: :func:`nwcfmt.data.eval_text` (speeches from 2000 on); otherwise a UTF-8 text file."""
    if str(spec) == SOTU_EVAL:
        from nwcfmt import data

        return TextSource(SOTU_EVAL, data.eval_text())
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"{path}: no such text file (use a UTF-8 text file or '{SOTU_EVAL}')")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    return TextSource(str(path), text)


@dataclass
class EvalRecord:
    """One folder's evaluation: the metric, the storage cost and the wall time."""

    folder: str
    kind: str  # "causal-lm" | "encoder"
    is_nwc: bool
    metric: str  # "perplexity" | "mean_cosine"
    value: float
    bits_all: float
    bits_linear: float | None
    text: dict
    details: dict  # the PerplexityResult / SimilarityResult as JSON
    load_seconds: float
    eval_seconds: float
    reference: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.load_seconds + self.eval_seconds

    def key(self) -> str:
        """The protocol key this record is filed under in ``nwc_eval.json``."""
        d = self.details
        if self.metric == "perplexity":
            params = f"{d['protocol']}-w{d['windows']}-s{d['seqlen']}-st{d['stride']}"
        else:
            params = f"{d['protocol']}-n{d['sentences']}-l{d['max_length']}"
        text = self.text["name"] if self.text["name"] == SOTU_EVAL else f"sha256:{self.text['sha256'][:16]}"
        return f"{self.metric}/{text}/{params}"

    def to_json(self) -> dict:
        return {
            "folder": self.folder,
            "kind": self.kind,
            "is_nwc": self.is_nwc,
            "metric": self.metric,
            "value": round(self.value, 6) if self.metric == "perplexity" else round(self.value, 8),
            "bits_per_weight": {"all": round(self.bits_all, 4), "linear": _round(self.bits_linear)},
            "text": self.text,
            "reference": self.reference,
            "details": self.details,
            "seconds": {"load": round(self.load_seconds, 3), "eval": round(self.eval_seconds, 3)},
            **self.extra,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def bits_per_weight(folder: str | os.PathLike, linear_weights: set[str] | None = None) -> tuple[float, float | None]:
    """``(all tensors, linear weights)`` stored bits per weight of ``folder`` (see the module docstring)."""
    from nwcfmt.summary import summarize

    summary = summarize(folder)
    numel = summary.numel
    bits_all = 8 * summary.stored_bytes / numel if numel else 0.0
    bits_linear = None
    if linear_weights:
        chosen = [t for t in summary.tensors if t.name in linear_weights]
        n = sum(t.numel for t in chosen)
        bits_linear = 8 * sum(t.stored_bytes for t in chosen) / n if n else None
    return bits_all, bits_linear


def evaluate_folder(
    folder: str | os.PathLike,
    *,
    text: TextSource | None = None,
    windows: int | None = None,
    seqlen: int | None = None,
    batch: int = 1,
    reference: str | os.PathLike | None = None,
    sentences: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalRecord:
    """Load ``folder`` and measure it: perplexity for a causal LM, embedding cosine against ``reference``
    for an encoder (``reference`` is required there). ``text`` defaults to ``sotu-eval``."""
    from nwcfmt.eval.fakequant import quantizable_linears
    from nwcfmt.eval.loading import load_for_eval
    from nwcfmt.eval.perplexity import DEFAULT_SEQLEN, DEFAULT_WINDOWS, perplexity
    from nwcfmt.eval.similarity import DEFAULT_SENTENCES, embedding_similarity, max_seq_length, split_sentences

    folder = Path(folder)
    text = text or resolve_text()
    loaded = load_for_eval(folder)
    linear = {f"{name}.weight" for name in quantizable_linears(loaded.model)}
    bits_all, bits_linear = bits_per_weight(folder, linear)
    begin = time.perf_counter()
    if loaded.kind == "causal-lm":
        result = perplexity(
            loaded.model,
            loaded.tokenizer,
            text.text,
            windows=DEFAULT_WINDOWS if windows is None else windows,
            seqlen=seqlen or DEFAULT_SEQLEN,
            batch=batch,
            progress=progress,
        )
        metric, value, details, ref = "perplexity", result.perplexity, result.to_json(), None
    else:
        if reference is None:
            raise InputError(
                f"{folder}: an encoder is scored by embedding cosine against its original: pass --reference DIR"
            )
        if loaded.tokenizer is None:  # pragma: no cover - load_for_eval raises first
            raise InputError(f"{folder}: no tokenizer")
        original = load_for_eval(reference, tokenizer=False)
        if original.kind != "encoder":
            raise InputError(f"{reference}: the reference is a {original.kind}, not an encoder")
        chosen = split_sentences(text.text, sentences or DEFAULT_SENTENCES)
        result = embedding_similarity(
            loaded.model, original.model, loaded.tokenizer, chosen, max_length=max_seq_length(folder)
        )
        metric, value, details, ref = "mean_cosine", result.mean_cosine, result.to_json(), str(reference)
    return EvalRecord(
        folder=str(folder),
        kind=loaded.kind,
        is_nwc=loaded.is_nwc,
        metric=metric,
        value=value,
        bits_all=bits_all,
        bits_linear=bits_linear,
        text=text.to_json(),
        details=details,
        load_seconds=loaded.seconds,
        eval_seconds=time.perf_counter() - begin,
        reference=ref,
    )


def format_table(records: Sequence[EvalRecord]) -> str:
    """A fixed-width table, one row per record; deltas are relative to the first record of the same metric."""
    head = (
        "model",
        "kind",
        "bits/w all",
        "bits/w linear",
        "metric",
        "value",
        "vs first",
        "windows/sent.",
        "tokens",
        "time s",
    )
    rows = [head]
    first: dict[str, float] = {}
    for r in records:
        base = first.setdefault(r.metric, r.value)
        d = r.details
        if r.metric == "perplexity":
            value, extent, tokens = f"{r.value:.4f}", f"{d['windows']}x{d['seqlen']}", str(d["tokens_scored"])
            delta = f"{r.value / base:.4f}x" if base else "-"
        else:
            value, extent, tokens = f"{r.value:.6f}", str(d["sentences"]), str(d["tokens"])
            delta = f"{r.value - base:+.6f}"
        rows.append(
            (
                r.folder,
                r.kind,
                f"{r.bits_all:.3f}",
                "-" if r.bits_linear is None else f"{r.bits_linear:.3f}",
                "ppl" if r.metric == "perplexity" else "cosine",
                value,
                delta,
                extent,
                tokens,
                f"{r.seconds:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    left = {0, 1, 4}
    lines = [
        "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows
    ]
    return "\n".join(lines)


def plot_records(records: Sequence[EvalRecord], path: str | os.PathLike, *, linear: bool = False) -> Path:
    """Draw each metric against bits per weight (all tensors, or the Linear weights) into a PNG.

    Perplexity uses a log axis; a comparison of causal LMs and encoders gets one panel per metric. Uses
    matplotlib's object API (no pyplot, no global backend change).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'nwcfmt[eval]'") from None
    if not records:
        raise InputError("nothing to plot")
    path = Path(path)
    metrics = list(dict.fromkeys(r.metric for r in records))
    fig = Figure(figsize=(6.4 * len(metrics), 4.4), dpi=120)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        chosen = [r for r in records if r.metric == metric]
        xs = [(r.bits_linear if linear and r.bits_linear is not None else r.bits_all) for r in chosen]
        ys = [r.value for r in chosen]
        ax.plot(xs, ys, "o")
        for x, y, r in zip(xs, ys, chosen, strict=True):
            ax.annotate(Path(r.folder).name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"bits per weight ({'Linear weights' if linear else 'all tensors'})")
        d = chosen[0].details
        if metric == "perplexity":
            ax.set_ylabel("perplexity")
            ax.set_yscale("log")
            extent = f"{d['windows']}x{d['seqlen']} tokens"
        else:
            ax.set_ylabel("mean embedding cosine vs reference")
            extent = f"{d['sentences']} sentences"
        ax.set_title(f"nwc eval: {chosen[0].text['name']}, {extent}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _versions() -> dict:
    import torch
    import transformers

    from nwcfmt import __version__

    return {"nwcfmt": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def save_eval_json(record: EvalRecord, folder: str | os.PathLike | None = None) -> Path:
    """Merge ``record`` into ``<folder>/nwc_eval.json`` (default: the record's folder), atomically."""
    folder = Path(folder or record.folder)
    path = folder / EVAL_FILE
    doc: dict = {"schema": SCHEMA, "evaluations": {}}
    try:
        existing = json.loads(path.read_text())
        if isinstance(existing, dict) and isinstance(existing.get("evaluations"), dict):
            doc["evaluations"] = existing["evaluations"]
    except (OSError, ValueError):
        pass  # missing or unreadable: start afresh
    entry = record.to_json()
    entry.pop("folder")  # the file lives in the folder; a path would go stale when the folder moves
    entry["date"] = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    entry["versions"] = _versions()
    doc["evaluations"][record.key()] = entry
    fd, tmp = tempfile.mkstemp(prefix=f".{EVAL_FILE}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
