"""The referee of a plan: end-to-end KL from the full-precision model to the planned one on held-out text.

The planned model is the full-precision one with each planned tensor replaced by what its chosen setting decodes
to, data-free (``gptq`` as ``rtn`` in the same layout; a calibrated encode after planning does at least as well
in the proxy). The text is calibration-text windows that share nothing with the calibration windows
(:func:`~nwcfmt.calibration.data.heldout_batches`); the evaluation text is never used. Causal LMs only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nwcfmt.calibration.data import heldout_batches
from nwcfmt.calibration.pipeline import CalibOptions, _checkpoint_name, _quiet_transformers
from nwcfmt.errors import InputError, NwcError
from nwcfmt.planner.candidates import ErrorWeight, encode_option
from nwcfmt.planner.measure import FISHER_SAMPLES
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


def plan_kl(
    src: str | Path, plans: list[Plan], calib: CalibOptions | None = None, samples: int = CHECK_SAMPLES
) -> list[float]:
    """Held-out KL of each plan (module docstring), one full-precision pass shared by all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, calib = Path(src), calib or CalibOptions()
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    if not any(a.endswith("ForCausalLM") for a in getattr(model.config, "architectures", None) or ()):
        raise InputError("--kl measures causal language models only")
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    batches = heldout_batches(
        tokenizer, calib.text, samples, calib.seqlen, calib.samples, calib.seed, skip=FISHER_SAMPLES
    )  # after the Fisher's windows
    reference = _log_probs(model, batches)
    source = WeightSource.open(src)
    params = {}
    for n, p in model.named_parameters():
        try:
            params[_checkpoint_name(n, source, model)] = p
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
                _, decoded = encode_option(e.name, source.get(e.name), e.choice.option, ErrorWeight())
                params[e.name].copy_(decoded.reshape(params[e.name].shape))
        out.append(kl_to_model(reference, model, batches))
        with torch.no_grad():
            for n, value in original.items():
                params[n].copy_(value)
    return out


__all__ = ["CHECK_SAMPLES", "kl_to_model", "plan_kl"]
