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
3. With ``sensitivity`` (causal LMs), the diagonal Fisher of the model's next-token loss is measured once on
   held-out calibration windows (labels sampled from the model, so it is the Fisher of the KL to the model), and
   each tensor's errors are scaled by its measured sensitivity: Fisher-weighted over Hessian-weighted error of
   its candidates (:meth:`TensorCandidates.sensitivity`). That puts every tensor, embeddings included, in one
   unit (about twice the KL it adds). It needs the whole model in memory once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nwcfmt.calibration.blocks import block_linears, capture_inputs, run_block
from nwcfmt.calibration.data import calibration_batches, heldout_batches
from nwcfmt.calibration.hessian import HessianCollector
from nwcfmt.calibration.pipeline import (
    CalibOptions,
    _base_prefix,
    _checkpoint_name,
    _load_model,
    _quiet_transformers,
    load_weights,
    release_weights,
    trim_heap,
)
from nwcfmt.errors import InputError
from nwcfmt.planner.candidates import Candidate, ErrorWeight, Option, TensorCandidates, measure
from nwcfmt.policy import Policy
from nwcfmt.sources import WeightSource

FISHER_SAMPLES = 16  # held-out windows for the Fisher
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

    def to_dict(self) -> dict:
        """Plain JSON types (to solve for other targets later without measuring again)."""
        return {
            "fixed_bytes": self.fixed_bytes,
            "fixed_numel": self.fixed_numel,
            "proxy": self.proxy,
            "seconds": self.seconds,
            "exclude": list(self.exclude),
            "tensors": [
                {
                    "name": t.name,
                    "numel": t.numel,
                    "scale": t.scale,
                    "kind": t.kind,
                    "candidates": [
                        [c.option.codec, c.option.config, c.nbytes, c.error, c.measured_bytes, c.fisher_error]
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
                [Candidate(Option.of(c[0], **c[1]), c[2], c[3], c[4], c[5]) for c in t["candidates"]],
                t["scale"],
                t["kind"],
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
        )


def fisher_diagonal(src: Path, batches: list[torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of a causal LM's next-token loss over ``batches`` (labels sampled from the model), per
    parameter of two or more dimensions, by the parameter's name; averaged over predicted tokens."""
    from transformers import AutoModelForCausalLM

    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    params = {n: p for n, p in model.named_parameters() if p.dim() >= 2}
    for p in model.parameters():
        p.requires_grad_(p.dim() >= 2)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    tokens = 0
    for batch in batches:
        for seq in batch:
            logits = model(input_ids=seq[None], use_cache=False).logits[0, :-1].to(torch.float32)
            logp = torch.log_softmax(logits, dim=-1)
            labels = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            loss = -logp.gather(1, labels).sum()
            grads = torch.autograd.grad(loss, list(params.values()))
            for (n, _), g in zip(params.items(), grads, strict=True):
                acc[n].add_(g.pow(2))
            tokens += labels.shape[0]
    del model
    return {n: a / max(tokens, 1) for n, a in acc.items()}


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
    model, layout, tokenizer = _load_model(src)
    source = WeightSource.open(src)
    planned = planned_tensors(source, exclude)
    if not planned:
        raise InputError(f"{src}: no tensor to plan (every tensor is a norm, a bias or excluded)")
    fixed = [n for n in source.names if n not in set(planned)]
    fixed_bytes = sum(source.meta(n).numel() * source.meta(n).element_size() for n in fixed)
    fixed_numel = sum(source.meta(n).numel() for n in fixed)
    causal = any(a.endswith("ForCausalLM") for a in getattr(model.config, "architectures", None) or ())
    fisher: dict[str, torch.Tensor] = {}
    if sensitivity and causal:
        say("measuring the Fisher sensitivity on held-out calibration windows")
        held = heldout_batches(tokenizer, calib.text, FISHER_SAMPLES, calib.seqlen, calib.samples, calib.seed, skip=0)
        fisher = {_checkpoint_name(n, source, model): f for n, f in fisher_diagonal(src, held, calib.seed).items()}
    batches = calibration_batches(tokenizer, calib.text, calib.samples, calib.seqlen, calib.batch_size, calib.seed)
    counts = torch.bincount(torch.cat([b.reshape(-1) for b in batches]))
    out: dict[str, TensorCandidates] = {}

    def measured(name: str, weight: ErrorWeight, kind: str) -> None:
        out[name] = measure(name, source.get(name), choices, weight, fisher.get(name), kind)
        if not out[name].candidates:
            raise InputError(f"{name}: none of the planner's codecs can encode it; add lossless to --plan-codecs")

    base = _base_prefix(model, layout)
    load_weights(layout.base, base, source, model, skip=(layout.blocks,), required=False)
    embedding = model.get_input_embeddings()
    embed_name = next((n for n, p in model.named_parameters() if p is embedding.weight), None)
    load_weights(layout.blocks[0], layout.block_name(0), source, model)
    captured = capture_inputs(layout, batches)
    release_weights(layout.base)
    inputs = captured.inputs
    for i, block in enumerate(layout.blocks):
        t0 = time.perf_counter()
        load_weights(block, layout.block_name(i), source, model)
        linears = block_linears(block)
        with torch.no_grad(), HessianCollector(linears) as collector:
            inputs = [run_block(block, x, captured.kwargs[i]) for x in inputs]
        hessians = collector.hessians()
        for name in linears:
            tensor = _checkpoint_name(f"{layout.block_name(i)}.{name}.weight", source, model)
            if tensor in planned:
                measured(tensor, ErrorWeight(hessian=hessians[name]), "linear")
        release_weights(block)
        del hessians
        trim_heap()
        say(f"block {i + 1}/{len(layout.blocks)} measured in {time.perf_counter() - t0:.1f} s")
    del inputs, captured
    embed_tensor = _checkpoint_name(embed_name, source, model) if embed_name else None
    for name in planned:
        if name in out:
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
    tensors = [out[n] for n in planned]
    if fisher:
        for t in tensors:
            t.scale = t.sensitivity()
    proxy = "fisher-scaled" if fisher else "hessian"
    return Measured(tensors, fixed_bytes, fixed_numel, proxy, time.perf_counter() - start, list(exclude))


__all__ = ["FISHER_SAMPLES", "Measured", "fisher_diagonal", "measure_model", "planned_tensors"]
