"""The referee of a plan: the end-to-end loss of the planned model against the full-precision one on held-out
text: KL of the next-token distributions (causal LMs), one minus the cosine of the sentence embeddings (encoders).

The planned model is the full-precision one with each planned tensor replaced by what its chosen setting decodes
to, data-free (``gptq`` as ``rtn`` in the same layout; a calibrated encode after planning does at least as well
in the proxy). The text is calibration-text windows that share nothing with the calibration windows
(:func:`~nwcfmt.calibration.data.heldout_batches`); the evaluation text is never used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nwcfmt.calibration.data import heldout_batches
from nwcfmt.calibration.model import checkpoint_name, load_full_model
from nwcfmt.calibration.pipeline import CalibOptions
from nwcfmt.errors import InputError, NwcError
from nwcfmt.planner.candidates import ErrorWeight, encode_option
from nwcfmt.planner.measure import FISHER_SAMPLES, sentence_units
from nwcfmt.planner.plan import Plan
from nwcfmt.sources import WeightSource

CHECK_SAMPLES = 16


def _log_probs(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(input_ids=b, use_cache=False).logits.float(), dim=-1) for b in batches]


def kl_to_model(reference: list[torch.Tensor], model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean over predicted tokens of ``KL(p_ref || p_model)`` in nats; ``reference``: the reference's log-probs."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ref, batch in zip(reference, batches, strict=True):
            logq = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
            total += float((ref.exp() * (ref - logq)).sum())
            count += ref.shape[0] * ref.shape[1]
    return total / count


HELDOUT_NOTES = {  # metric -> (the plan note of the chosen plan's value, of every re-ranked variant's)
    "kl": ("heldout_kl", "rerank_heldout_kl"),
    "1-cosine": ("heldout_1_minus_cosine", "rerank_heldout_1_minus_cosine"),
}


def _units(model: torch.nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [sentence_units(model, b) for b in batches]


def plan_loss(
    src: str | Path, plans: list[Plan], calib: CalibOptions | None = None, samples: int = CHECK_SAMPLES
) -> tuple[str, list[float]]:
    """(metric, the held-out loss of each plan) (module docstring), one full-precision pass shared by all: a causal
    LM's mean KL per predicted token (``"kl"``, nats), an encoder's mean one minus the cosine of its sentence
    embeddings (``"1-cosine"``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, calib = Path(src), calib or CalibOptions()
    model, cls = load_full_model(src)
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    batches = heldout_batches(
        tokenizer, calib.text, samples, calib.seqlen, calib.samples, calib.seed, skip=FISHER_SAMPLES
    )  # after the Fisher's windows
    if cls is AutoModelForCausalLM:
        metric, reference = "kl", _log_probs(model, batches)

        def loss() -> float:
            return kl_to_model(reference, model, batches)
    else:
        metric, units = "1-cosine", _units(model, batches)

        def loss() -> float:
            now = _units(model, batches)
            cosines = torch.cat([(a * b).sum(dim=-1) for a, b in zip(units, now, strict=True)])
            return float(1.0 - cosines.double().mean())

    source = WeightSource.open(src)
    params = {}
    for n, p in model.named_parameters(remove_duplicate=False):  # a tied head's tensor, when stored, included
        try:
            params[checkpoint_name(n, source, model)] = p
        except NwcError:  # not in the checkpoint (a tied head): never planned
            continue
    planned = {e.name for plan in plans for e in plan.entries}
    original = {n: p.detach().clone() for n, p in params.items() if n in planned}
    out = []
    for plan in plans:
        with torch.no_grad():
            for e in plan.entries:
                if e.name not in params:
                    raise InputError(f"{e.name}: the model has no parameter for this tensor")
                _, decoded, _ = encode_option(e.name, source.get(e.name), e.choice.option, ErrorWeight())
                params[e.name].copy_(decoded.reshape(params[e.name].shape))
        out.append(loss())
        with torch.no_grad():
            for n, value in original.items():
                params[n].copy_(value)
    return metric, out


def plan_kl(
    src: str | Path, plans: list[Plan], calib: CalibOptions | None = None, samples: int = CHECK_SAMPLES
) -> list[float]:
    """Held-out KL of each plan of a causal LM (:func:`plan_loss`)."""
    metric, values = plan_loss(src, plans, calib, samples)
    if metric != "kl":
        raise InputError("held-out KL is measured on causal language models only")
    return values


__all__ = ["CHECK_SAMPLES", "HELDOUT_NOTES", "kl_to_model", "plan_kl", "plan_loss"]
