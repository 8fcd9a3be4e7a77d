"""The planner's measuring pass: every candidate of every planned tensor, weighed by how the model uses it.

Planned tensors are the ones a policy would encode rather than keep raw: every floating tensor of two or more
dimensions except norms and biases, embeddings and ``lm_head`` included (:func:`planned_tensors`).

1. The calibration text (the same windows calibrated codecs use) runs through the full-precision model one block
   at a time, as in the calibration pipeline (:mod:`nwcfmt.calibration.pipeline`): each block's Linears get the
   Hessian of their input, and each candidate's error is ``tr(dW H dW^T)``. Inputs stay full precision (the
   plan is not known yet), so memory holds one block and its activations.
2. The input embedding's rows are weighed by how often each token occurs in those windows, plus one (its input
   is one-hot, so that is its Hessian; the added count keeps the tokens calibration never saw from being free
   to destroy); any other planned tensor outside the blocks (an untied ``lm_head``, a
   pooler) is weighed plainly.
3. With ``sensitivity``, the diagonal Fisher of the model's output is measured once on held-out calibration
   windows (:func:`fisher_diagonal`: a causal LM's next-token distribution, labels sampled from the model, so it
   is the Fisher of the KL to the model; an encoder's sentence embedding, by random probes), and each tensor's
   errors are scaled by its measured sensitivity: Fisher-weighted over Hessian-weighted error of its candidates
   (:meth:`TensorCandidates.sensitivity`). That puts every tensor, embeddings included, in one unit (about twice
   the KL it adds; for an encoder, twice one minus the cosine). It needs the whole model in memory once.
4. A tied head that the checkpoint stores as a tensor of its own (the embedding's data under a second name) is
   not measured apart: it takes the embedding's setting and adds its bytes (:attr:`TensorCandidates.copies`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nwcfmt.calibration.blocks import BlockLayout, block_linears, capture_inputs, run_block
from nwcfmt.calibration.data import calibration_batches, heldout_batches
from nwcfmt.calibration.hessian import HessianCollector
from nwcfmt.calibration.model import (
    base_prefix,
    checkpoint_name,
    load_full_model,
    load_model,
    load_weights,
    release_weights,
    trim_heap,
)
from nwcfmt.calibration.pipeline import CalibOptions
from nwcfmt.container.writer import encode_tensor, record_overhead
from nwcfmt.errors import EncodeError, InputError
from nwcfmt.planner.candidates import UNKNOWN_OVERHEAD, Candidate, ErrorWeight, Option, TensorCandidates, measure
from nwcfmt.policy import Policy
from nwcfmt.sources import WeightSource

FISHER_SAMPLES = 16  # held-out windows for the Fisher
ENCODER_PROBES = 8  # random directions of an encoder's sentence embedding per window (its Gauss-Newton Fisher)
Report = Callable[[str], None]


def planned_tensors(source: WeightSource, exclude: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The tensors a plan chooses for, in checkpoint order: those the default lossless policy would encode."""
    policy = Policy(codec="lossless", exclude=list(exclude))
    return [n for n in source.names if policy.choose(n, source.meta(n)).codec_id == "lossless"]


@dataclass
class Measured:
    """The planner's measurements of one model: candidates per planned tensor, and the bytes of the rest."""

    tensors: list[TensorCandidates]
    fixed_bytes: int  # the tensors not planned (norms, biases, excluded), stored raw
    fixed_numel: int
    proxy: str  # "hessian" or "fisher-scaled"
    seconds: float = 0.0
    exclude: list[str] = field(default_factory=list)  # globs kept raw, outside the plan
    fixed_overhead: int = 0  # bound of the header bytes of the tensors not planned

    def to_dict(self) -> dict:
        """Plain JSON types (to solve for other targets later without measuring again)."""
        return {
            "fixed_bytes": self.fixed_bytes,
            "fixed_numel": self.fixed_numel,
            "fixed_overhead": self.fixed_overhead,
            "proxy": self.proxy,
            "seconds": self.seconds,
            "exclude": list(self.exclude),
            "tensors": [
                {
                    "name": t.name,
                    "numel": t.numel,
                    "scale": t.scale,
                    "kind": t.kind,
                    "copies": list(t.copies),
                    "candidates": [
                        [
                            c.option.codec,
                            c.option.config,
                            c.nbytes,
                            c.error,
                            c.measured_bytes,
                            c.fisher_error,
                            c.overhead,
                        ]
                        for c in t.candidates
                    ],
                }
                for t in self.tensors
            ],
        }

    def with_scales(self, power: float, proxy: str) -> Measured:
        """A copy whose per-tensor scales are the measured sensitivities raised to ``power`` (0: Hessian-weighted
        error alone; 1: as measured)."""
        doc = self.to_dict()
        for t, original in zip(doc["tensors"], self.tensors, strict=True):
            t["scale"] = original.scale**power
        doc["proxy"] = proxy
        return Measured.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: dict) -> Measured:
        tensors = [
            TensorCandidates(
                t["name"],
                t["numel"],
                [Candidate(Option.of(c[0], **c[1]), *c[2:]) for c in t["candidates"]],
                t["scale"],
                t["kind"],
                list(t.get("copies", [])),
            )
            for t in doc["tensors"]
        ]
        return cls(
            tensors,
            doc["fixed_bytes"],
            doc["fixed_numel"],
            doc["proxy"],
            doc.get("seconds", 0.0),
            doc.get("exclude", []),
            doc.get("fixed_overhead", UNKNOWN_OVERHEAD * len(doc["tensors"])),
        )


def fisher_diagonal(src: Path, batches: list[torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the model's output over ``batches``, per parameter of two or more dimensions, by the
    parameter's name. A causal LM: of its next-token loss, labels sampled from the model, averaged over predicted
    tokens (so ``sum F dW^2`` is about twice the KL a change ``dW`` adds). An encoder: the Gauss-Newton diagonal
    of its sentence embedding (the unit-normalised mean of the last hidden states), from :data:`ENCODER_PROBES`
    random Gaussian directions a window, averaged over windows (``sum F dW^2`` is about ``|du|^2``, twice one
    minus the cosine a change adds)."""
    from transformers import AutoModelForCausalLM

    model, cls = load_full_model(src)
    params = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    for p in model.parameters():
        p.requires_grad_(p.dim() >= 2)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    samples = 0

    def add(loss: torch.Tensor, retain: bool = False) -> None:
        grads = torch.autograd.grad(loss, list(params.values()), retain_graph=retain, allow_unused=True)
        for (n, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                acc[n].add_(g.pow(2))

    for batch in batches:
        for seq in batch:
            if cls is AutoModelForCausalLM:
                logits = model(input_ids=seq[None], use_cache=False).logits[0, :-1].to(torch.float32)
                logp = torch.log_softmax(logits, dim=-1)
                labels = torch.multinomial(logp.detach().exp(), 1, generator=gen)
                add(-logp.gather(1, labels).sum())
                samples += labels.shape[0]
                continue
            unit = sentence_units(model, seq[None])[0]
            for k in range(ENCODER_PROBES):
                probe = torch.randn(unit.shape, generator=gen)
                add((probe * unit).sum(), retain=k < ENCODER_PROBES - 1)
            samples += ENCODER_PROBES
    del model
    return {n: a / max(samples, 1) for n, a in acc.items()}


def sentence_units(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """An encoder's sentence embeddings of ``input_ids`` (the mean of the last hidden states over the tokens),
    unit-normalised, ``[batch, hidden]``."""
    output = model(input_ids=input_ids)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    pooled = hidden.to(torch.float32).mean(dim=1)
    return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _tied_copies(model: torch.nn.Module, source: WeightSource, planned: list[str]) -> set[str]:
    """Planned tensors that are the input embedding stored again under the name of a head tied to it (some
    checkpoints store a tied ``lm_head`` too): they must keep the embedding's setting, or the two decode to
    different values and transformers unties them on load. Call before any weight is loaded (loading gives every
    name its own parameter)."""
    embedding = model.get_input_embeddings().weight
    names = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is embedding:
            try:
                names.append(checkpoint_name(name, source, model))
            except EncodeError:  # not stored under this name (the usual tied head)
                continue
    if len(names) < 2 or names[0] not in planned:
        return set()
    first = source.get(names[0])
    return {n for n in names[1:] if n in planned and torch.equal(source.get(n), first)}


def measure_model(
    src: str | Path,
    choices: list[Option],
    calib: CalibOptions | None = None,
    exclude: list[str] | tuple[str, ...] = (),
    sensitivity: bool = True,
    report: Report | None = None,
) -> Measured:
    """Candidates of every planned tensor of the model folder ``src`` (module docstring)."""
    start = time.perf_counter()
    src = Path(src)
    calib = calib or CalibOptions()
    say = report or (lambda _: None)
    model, layout, tokenizer = load_model(src)
    source = WeightSource.open(src)
    planned = planned_tensors(source, exclude)
    if not planned:
        raise InputError(f"{src}: no tensor to plan (every tensor is a norm, a bias or excluded)")
    copies = _tied_copies(model, source, planned)
    fixed = [n for n in source.names if n not in set(planned)]
    fixed_bytes = sum(source.meta(n).numel() * source.meta(n).element_size() for n in fixed)
    fixed_numel = sum(source.meta(n).numel() for n in fixed)
    fixed_overhead = sum(_raw_overhead(n, source.get(n)) for n in fixed)
    fisher: dict[str, torch.Tensor] = {}
    if sensitivity:
        say("measuring the Fisher sensitivity on held-out calibration windows")
        held = heldout_batches(tokenizer, calib.text, FISHER_SAMPLES, calib.seqlen, calib.samples, calib.seed, skip=0)
        fisher = {checkpoint_name(n, source, model): f for n, f in fisher_diagonal(src, held, calib.seed).items()}
    batches = calibration_batches(tokenizer, calib.text, calib.samples, calib.seqlen, calib.batch_size, calib.seed)
    counts = torch.bincount(torch.cat([b.reshape(-1) for b in batches]))
    out: dict[str, TensorCandidates] = {}

    def measured(name: str, weight: ErrorWeight, kind: str) -> None:
        out[name] = measure(name, source.get(name), choices, weight, fisher.get(name), kind)
        if not out[name].candidates:
            raise InputError(f"{name}: none of the planner's codecs can encode it; add lossless to --plan-codecs")

    embedding = model.get_input_embeddings()
    embed_name = next((n for n, p in model.named_parameters() if p is embedding.weight), None)
    t0 = time.perf_counter()
    for i, hessians in block_hessians(model, layout, source, batches):
        for tensor, hessian in hessians.items():
            if tensor in planned:
                measured(tensor, ErrorWeight(hessian=hessian), "linear")
        del hessians
        say(f"block {i + 1}/{len(layout.blocks)} measured in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
    embed_tensor = checkpoint_name(embed_name, source, model) if embed_name else None
    for name in planned:
        if name in out or name in copies:
            continue
        if name == embed_tensor:
            rows = torch.ones(source.meta(name).shape[0], dtype=torch.float64)  # add-one: unseen tokens count too
            n = min(rows.numel(), counts.numel())
            rows[:n] += counts[:n].to(torch.float64)
            rows *= 2.0 / float(rows.sum())
            measured(name, ErrorWeight(rows=rows), "embedding")
        else:
            measured(name, ErrorWeight(), "other")
        say(f"{name} measured")
    if embed_tensor in out:
        out[embed_tensor].copies = [n for n in planned if n in copies]
    tensors = [out[n] for n in planned if n not in copies]
    if fisher:
        _scale_by_sensitivity(tensors)
    proxy = "fisher-scaled" if fisher else "hessian"
    seconds = time.perf_counter() - start
    return Measured(tensors, fixed_bytes, fixed_numel, proxy, seconds, list(exclude), fixed_overhead)


def block_hessians(
    model: torch.nn.Module, layout: BlockLayout, source: WeightSource, batches: list[torch.Tensor]
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Each block's index and the input Hessians of its Linears (by checkpoint name), the calibration ``batches``
    run through the full-precision model one block at a time (memory: one block and its activations)."""
    load_weights(layout.base, base_prefix(model, layout), source, model, skip=(layout.blocks,), required=False)
    load_weights(layout.blocks[0], layout.block_name(0), source, model)
    captured = capture_inputs(layout, batches)
    release_weights(layout.base)
    inputs = captured.inputs
    for i, block in enumerate(layout.blocks):
        load_weights(block, layout.block_name(i), source, model)
        linears = block_linears(block)
        with torch.no_grad(), HessianCollector(linears) as collector:
            inputs = [run_block(block, x, captured.kwargs[i]) for x in inputs]
        hessians = collector.hessians()
        yield i, {checkpoint_name(f"{layout.block_name(i)}.{n}.weight", source, model): hessians[n] for n in linears}
        release_weights(block)
        del hessians
        trim_heap()


def _scale_by_sensitivity(tensors: list[TensorCandidates]) -> None:
    """Each tensor's scale is its measured sensitivity; a tensor the measured output never uses (BERT's pooler
    under a mean-pooled sentence embedding) gets the median of the others rather than none, so that what other
    uses of the model need of it is not given away."""
    for t in tensors:
        t.scale = t.sensitivity()
    used = sorted(t.scale for t in tensors if t.scale > 0)
    for t in tensors:
        if t.scale == 0 and used:
            t.scale = used[len(used) // 2]


def _raw_overhead(name: str, tensor: torch.Tensor) -> int:
    codec, encoded = encode_tensor(name, tensor, "raw")
    return record_overhead(name, codec, encoded, tuple(tensor.shape), tensor.dtype)


__all__ = [
    "ENCODER_PROBES",
    "FISHER_SAMPLES",
    "Measured",
    "fisher_diagonal",
    "measure_model",
    "planned_tensors",
    "sentence_units",
]
