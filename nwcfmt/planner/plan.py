"""A plan: the setting chosen for each planned tensor under a bit budget, as a policy file that ``--policy`` reads.

:func:`make_plan` solves a :class:`~nwcfmt.planner.measure.Measured` model for a target (bits per weight over the
planned tensors, or over every tensor with ``budget="whole"``). :meth:`Plan.policy` is an ordinary
:class:`~nwcfmt.policy.Policy` with one exact-name rule per planned tensor; its main codec is the plan's
calibrated codec when it has one (``ecsq`` or ``gptq``), so ``nwc encode --policy plan.json`` calibrates those
tensors, each at its own rate. The policy file also holds the plan itself under ``"plan"`` (target, achieved
bits, proxy, and per tensor the choice, its bytes and predicted error), which ``--policy`` ignores.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nwcfmt.container.writer import HEADER_ALLOWANCE
from nwcfmt.errors import InputError
from nwcfmt.planner.candidates import CALIBRATED_FAMILIES, Candidate, Option, TensorCandidates
from nwcfmt.planner.measure import Measured
from nwcfmt.planner.solver import allocate
from nwcfmt.policy import Policy

BUDGETS = ("planned", "whole")
PLAN_KEY = "plan"
MAX_RATE = 8.0  # the highest ecsq rate the fill extrapolates to
RATE_DIGITS = 32  # header bytes a real-valued rate may add to a measured ecsq record's (its longer "bits")


def glob_escape(name: str) -> str:
    """``name`` as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


@dataclass
class PlanEntry:
    name: str
    numel: int
    choice: Candidate
    scale: float
    kind: str

    @property
    def predicted(self) -> float:
        return self.choice.error * self.scale


@dataclass
class Plan:
    entries: list[PlanEntry]
    target_bpw: float
    budget: str  # "planned" or "whole"
    proxy: str
    fixed_bytes: int = 0
    fixed_numel: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    exclude: list[str] = field(default_factory=list)  # globs kept raw (written into the policy)
    fixed_overhead: int = 0  # bound of the header bytes of the tensors not planned
    shards: int = 1  # files the bound of the file bytes allows a header for

    @property
    def planned_bytes(self) -> int:
        return sum(e.choice.nbytes for e in self.entries)

    @property
    def planned_numel(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight the plan counts, over the budget's tensors."""
        if self.budget == "whole":
            return 8 * (self.planned_bytes + self.fixed_bytes) / (self.planned_numel + self.fixed_numel)
        return 8 * self.planned_bytes / self.planned_numel

    @property
    def file_bytes(self) -> int:
        """A bound of the bytes of the weight files: every record, the bound of its header bytes, and a header
        allowance per file."""
        headers = sum(e.choice.overhead for e in self.entries) + self.fixed_overhead + self.shards * HEADER_ALLOWANCE
        return self.planned_bytes + self.fixed_bytes + headers

    @property
    def predicted_error(self) -> float:
        return sum(e.predicted for e in self.entries)

    def main_codec(self) -> tuple[str, dict[str, Any]]:
        """The calibrated codec the plan uses (with the config its rules vary from), else ``lossless``."""
        calibrated = [e.choice.option for e in self.entries if e.choice.option.codec in CALIBRATED_FAMILIES]
        if not calibrated:
            return "lossless", {}
        common = Counter(o.params for o in calibrated).most_common(1)[0][0]
        return calibrated[0].codec, dict(common)

    def policy_dict(self) -> dict[str, Any]:
        codec, params = self.main_codec()
        rules = [
            {"match": glob_escape(e.name), "codec": e.choice.option.codec, "params": e.choice.option.config}
            for e in self.entries
        ]
        doc = {"codec": codec, "params": params, "rules": rules, PLAN_KEY: self.summary()}
        if self.exclude:
            doc["exclude"] = list(self.exclude)
        return doc

    def policy(self) -> Policy:
        doc = self.policy_dict()
        doc.pop(PLAN_KEY)
        return Policy.from_dict(doc)

    def summary(self) -> dict[str, Any]:
        return {
            "target_bpw": self.target_bpw,
            "budget": self.budget,
            "bits_per_weight": round(self.bits_per_weight, 6),
            "planned_bytes": self.planned_bytes,
            "planned_weights": self.planned_numel,
            "fixed_bytes": self.fixed_bytes,
            "fixed_weights": self.fixed_numel,
            "file_bytes_bound": self.file_bytes,
            "proxy": self.proxy,
            "predicted_error": self.predicted_error,
            **self.notes,
            "tensors": {
                e.name: {
                    "choice": e.choice.option.label,
                    "bytes": e.choice.nbytes,
                    "bits_per_weight": round(8 * e.choice.nbytes / e.numel, 4),
                    "error": e.choice.error,
                    "scale": e.scale,
                    "predicted": e.predicted,
                }
                for e in self.entries
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.policy_dict(), indent=1)

    def mix(self) -> dict[str, float]:
        """Share of the planned weights per chosen setting."""
        counts: Counter[str] = Counter()
        for e in self.entries:
            counts[e.choice.option.label] += e.numel
        total = self.planned_numel
        return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}

    def table(self) -> str:
        """A readable table: one line per tensor, then the mix and the totals."""
        width = max(len(e.name) for e in self.entries)
        lines = [f"{'tensor':<{width}}  {'choice':<12} {'bits':>6} {'predicted':>11}"]
        for e in self.entries:
            bits = 8 * e.choice.nbytes / e.numel
            lines.append(f"{e.name:<{width}}  {e.choice.option.label:<12} {bits:6.3f} {e.predicted:11.4g}")
        mix = ", ".join(f"{k} {100 * v:.1f}%" for k, v in self.mix().items())
        lines.append(f"mix of weights: {mix}")
        target = f"{self.notes['target_size']} bytes" if "target_size" in self.notes else f"{self.target_bpw:g}"
        lines.append(
            f"{self.bits_per_weight:.4f} bits per weight over the {self.budget} tensors (target {target}); "
            f"at most {self.file_bytes} bytes of weight files; predicted error {self.predicted_error:.4g} "
            f"({self.proxy})"
        )
        return "\n".join(lines)


def make_plan(
    measured: Measured,
    target_bpw: float | None,
    budget: str = "planned",
    target_size: int | None = None,
    shards: int = 1,
) -> Plan:
    """The plan for ``target_bpw`` bits per weight over the planned tensors (``budget="planned"``) or over every
    tensor, the unplanned ones at their raw bytes (``"whole"``); or, with ``target_size``, for weight files of at
    most that many bytes (``shards`` of them), headers included (their bounds: :attr:`Plan.file_bytes`)."""
    if budget not in BUDGETS:
        raise InputError(f"budget must be one of {', '.join(BUDGETS)}, not {budget!r}")
    tensors: list[TensorCandidates] = measured.tensors
    numel = sum(t.total_numel for t in tensors)
    headers = target_size is not None
    if headers:
        if not (target_size > 0 and shards >= 1):
            raise InputError(f"--target-size must be a positive number of bytes, not {target_size}")
        budget = "whole"
        target_bpw = 8 * target_size / (numel + measured.fixed_numel)
        budget_bytes = target_size - shards * HEADER_ALLOWANCE - measured.fixed_bytes - measured.fixed_overhead
    elif not (target_bpw is not None and target_bpw > 0 and math.isfinite(target_bpw)):
        raise InputError(f"--target-bpw must be a positive number of bits, not {target_bpw}")
    elif budget == "whole":
        budget_bytes = math.floor(target_bpw * (numel + measured.fixed_numel) / 8) - measured.fixed_bytes
    else:
        budget_bytes = math.floor(target_bpw * numel / 8)
    tables = [t.costs(headers) for t in tensors]
    try:
        chosen = allocate(tables, budget_bytes)
    except InputError:
        least = sum(min(c[0] for c in t) for t in tables)
        if headers:
            smallest = least + target_size - budget_bytes
            raise InputError(
                f"--target-size {target_size} bytes is below the smallest plan the candidates allow ({smallest} bytes)"
            ) from None
        total = numel + (measured.fixed_numel if budget == "whole" else 0)
        floor = 8 * (least + (measured.fixed_bytes if budget == "whole" else 0)) / total
        raise InputError(
            f"--target-bpw {target_bpw:g} is below the smallest plan the candidates allow ({floor:.3f} bits per "
            f"weight over the {budget} tensors)"
        ) from None
    entries = [
        PlanEntry(t.name, t.numel, t.candidates[c], t.scale, t.kind) for t, c in zip(tensors, chosen, strict=True)
    ]
    left = budget_bytes - sum(table[c][0] for table, c in zip(tables, chosen, strict=True))
    _spend_on_a_rate(entries, tensors, left, headers)
    for k in reversed(range(len(tensors))):  # tied copies take their tensor's setting; their error is in its Fisher
        e = entries[k]
        entries[k + 1 : k + 1] = [PlanEntry(c, e.numel, e.choice, 0.0, "tied") for c in tensors[k].copies]
    notes = {"target_size": target_size, "shards": shards} if headers else {}
    return Plan(
        entries, target_bpw, budget, measured.proxy, measured.fixed_bytes, measured.fixed_numel, notes,
        measured.exclude, measured.fixed_overhead, shards,
    )  # fmt: skip


def _spend_on_a_rate(entries: list[PlanEntry], tensors: list[TensorCandidates], left: int, headers: bool) -> None:
    """Give what the discrete choices left of the budget to one tensor coded by ``ecsq`` at a real-valued rate:
    the tensor whose predicted error falls most when its bytes grow by ``left`` (in steps of 1/1000 bit), whatever
    it had. The error at that rate is interpolated geometrically between the measured rates around it (above the
    highest, up to :data:`MAX_RATE`, it falls 4x per bit, the high-rate law). Brings the plan within a few bytes
    of its budget (``headers``: counting the bounds of the records' header bytes)."""
    best = None
    for k, (e, t) in enumerate(zip(entries, tensors, strict=True)):
        ecsq = [c for c in t.candidates if c.option.codec == "ecsq"]
        if not ecsq:
            continue
        curve = sorted((c.option.config["bits"], c.error) for c in ecsq)
        record_overhead = max(c.overhead for c in ecsq) + RATE_DIGITS
        overhead = record_overhead if headers else 0
        share = left // (1 + len(t.copies)) - overhead + e.choice.overhead * headers  # its tied copies follow it
        bits = min(math.floor(1000 * 8 * (e.choice.nbytes + share) / e.numel) / 1000, MAX_RATE)
        if bits < curve[0][0]:
            continue
        error = error_at_rate(curve, bits)
        gain = (e.choice.error - error) * e.scale
        if gain > 0 and (best is None or gain > best[0]):
            best = (gain, k, bits, error, overhead, record_overhead)
    if best is None:
        return
    _, k, bits, error, overhead, record_overhead = best
    e = entries[k]
    option = Option.of("ecsq", bits=bits)
    nbytes = math.ceil(bits * e.numel / 8)
    grows = nbytes + overhead - e.choice.nbytes - e.choice.overhead * headers
    if grows * (1 + len(tensors[k].copies)) <= left:
        candidate = Candidate(option, nbytes, error, 0, None, record_overhead)
        entries[k] = PlanEntry(e.name, e.numel, candidate, e.scale, e.kind)


def error_at_rate(curve: list[tuple[float, float]], bits: float) -> float:
    """A tensor's ecsq error at ``bits`` from its measured ``(rate, error)`` points (rates ascending)."""
    for (b0, e0), (b1, e1) in itertools.pairwise(curve):
        if b0 <= bits <= b1:
            if e0 <= 0 or e1 <= 0:
                return e0 + (e1 - e0) * (bits - b0) / (b1 - b0)
            return e0 * (e1 / e0) ** ((bits - b0) / (b1 - b0))
    top_bits, top_error = curve[-1]
    return top_error * 4.0 ** -(bits - top_bits)


RERANK_VARIANTS = {"fisher-scaled": 1.0, "fisher-half": 0.5, "hessian": 0.0}  # proxy -> power of the sensitivity


def rerank(
    src, measured: Measured, target_bpw: float | None, budget: str = "planned", calib=None,
    target_size: int | None = None, shards: int = 1,
) -> Plan:  # fmt: skip
    """Plans for the same budget under each proxy of :data:`RERANK_VARIANTS` (when sensitivities were measured),
    each measured end to end (:func:`~nwcfmt.planner.check.plan_loss`: held-out KL, or one minus cosine for an
    encoder); the lowest wins, and the plan notes every variant's loss."""
    from nwcfmt.planner.check import HELDOUT_NOTES, plan_loss

    if measured.proxy != "fisher-scaled":
        raise InputError("re-ranking compares sensitivity-scaled proxies: it needs the measured sensitivity")
    plans = {name: make_plan(measured.with_scales(power, name), target_bpw, budget, target_size, shards)
             for name, power in RERANK_VARIANTS.items()}  # fmt: skip
    metric, values = plan_loss(src, list(plans.values()), calib)
    losses = dict(zip(plans, values, strict=True))
    best = min(losses, key=losses.get)
    chosen = plans[best]
    value_key, all_key = HELDOUT_NOTES[metric]
    chosen.notes.update({value_key: losses[best], all_key: losses})
    return chosen


__all__ = ["BUDGETS", "PLAN_KEY", "RERANK_VARIANTS", "Plan", "PlanEntry", "glob_escape", "make_plan", "rerank"]
