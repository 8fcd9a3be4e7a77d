"""Experiment (not adopted): plans that count what calibration repairs, on SmolLM2.

    python benchmarks/bench_planner_repair.py --dry            # the repairs and the plans' mixes (about 4 min)
    python benchmarks/bench_planner_repair.py 4.0,4.5          # and each plan encoded calibrated, scored

The planner solves on data-free errors, yet ``nwc encode --target-bpw`` encodes its plan calibrated, and the
calibrated ``ecsq`` encoder (importance levels, LDLQ through the Hessian) repairs some Linears far more than
others. This measures each Linear's repair, its calibrated error over its data-free one at 4 bits (both
``tr(dW H dW^T)`` on the default calibration windows' Hessians, full-precision inputs, as the planner measures),
at 3 bits too on every fifth block (whether one rate stands for all), multiplies each Linear's ``ecsq``
candidates' errors by it in the kept measurements of ``bench_planner.py``, solves, and encodes each plan as that
benchmark's ``plan-T/cal`` rows are encoded (``finetune=false``), scored by its referee on the evaluation text.
Rows go to ``results/planner-repair.jsonl``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import bench_planner as bp
import torch
from _common import measured

from nwcfmt import data
from nwcfmt.calibration.data import calibration_batches
from nwcfmt.calibration.model import load_model
from nwcfmt.calibration.pipeline import CalibOptions
from nwcfmt.codecs.registry import get_codec
from nwcfmt.planner import make_plan
from nwcfmt.planner.candidates import ErrorWeight, TensorCandidates, weighted_error
from nwcfmt.planner.measure import Measured, block_hessians
from nwcfmt.sources import WeightSource


def repairs(src: Path, m: Measured) -> dict[str, dict[float, float]]:
    """Per Linear, per rate: calibrated ecsq error over the measurements' data-free one."""
    free = {t.name: {c.option.config["bits"]: c.error for c in t.candidates if c.option.codec == "ecsq"}
            for t in m.tensors}  # fmt: skip
    calib = CalibOptions()
    model, layout, tokenizer = load_model(src)
    source = WeightSource.open(src)
    batches = calibration_batches(tokenizer, calib.text, calib.samples, calib.seqlen, calib.batch_size, calib.seed)
    out: dict[str, dict[float, float]] = {}
    start = time.perf_counter()
    for i, hessians in block_hessians(model, layout, source, batches):
        for tensor, hessian in hessians.items():
            weight = source.get(tensor).to(torch.float32)
            out[tensor] = {}
            for bits in (4.0, 3.0) if i % 5 == 0 else (4.0,):
                codec = get_codec("ecsq")(bits=bits)
                draft = codec.encode_with_hessian(weight, hessian, codec.calibration)
                error = weighted_error(draft.values * draft.scale[:, None] - weight, ErrorWeight(hessian=hessian))
                out[tensor][bits] = error / free[tensor][bits]
        print(f"  block {i + 1}/{len(layout.blocks)}: {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
    return out


def with_repairs(m: Measured, repair: dict[str, dict[float, float]]) -> Measured:
    """``m`` with each repaired Linear's ``ecsq`` errors multiplied by its repair at 4 bits."""

    def scaled(t: TensorCandidates) -> TensorCandidates:
        if t.name not in repair:
            return t
        factor = repair[t.name][4.0]
        candidates = [replace(c, error=c.error * factor) if c.option.codec == "ecsq" else c for c in t.candidates]
        return replace(t, candidates=candidates)

    return replace(m, tensors=[scaled(t) for t in m.tensors])


def mix(policy: dict) -> dict[str, list]:
    kinds: dict[str, list[str]] = collections.defaultdict(list)
    for rule in policy["rules"]:
        kind = re.sub(r".*\.(\w+)\.weight$", r"\1", rule["match"])
        kinds[kind].append(f"{rule['codec']} {(rule.get('params') or {}).get('bits', '')}".strip())
    return {k: collections.Counter(v).most_common(4) for k, v in kinds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="?", default="4.0,4.5")
    parser.add_argument("--dry", action="store_true", help="repairs and mixes only, no encode")
    parser.add_argument("--json", type=Path, default=bp.HERE / "results" / "planner-repair.jsonl")
    args = parser.parse_args()
    src = data.smollm2_dir("float32")
    m = measured(src, bp.CACHE)
    repair = repairs(src, m)
    at4 = [r[4.0] for r in repair.values()]
    moved = [abs(r[3.0] / r[4.0] - 1) for r in repair.values() if 3.0 in r]
    by_kind = collections.defaultdict(list)
    for name, r in repair.items():
        by_kind[name.split(".")[-2]].append(r[4.0])
    summary = {
        "row": "repairs",
        "min": min(at4),
        "median": statistics.median(at4),
        "max": max(at4),
        "median_by_kind": {k: statistics.median(v) for k, v in by_kind.items()},
        "rate_3_vs_4_median": statistics.median(moved),
        "rate_3_vs_4_max": max(moved),
    }
    print(json.dumps(summary), flush=True)
    if not args.dry:
        with args.json.open("a") as f:
            f.write(json.dumps(summary) + "\n")
    aware = with_repairs(m, repair)
    referee = None if args.dry else bp.Referee(src, 8)
    for target in (float(t) for t in args.targets.split(",")):
        policy = bp.without_finetune(make_plan(aware, target).policy_dict())
        print(target, json.dumps(mix(policy)), flush=True)
        if referee is None:
            continue
        with tempfile.TemporaryDirectory(prefix="nwc-bench-repair-") as tmp:
            row = {"row": f"plan-{target}/cal-repair", **bp.encode_and_score(src, policy, referee, Path(tmp))}
        print(json.dumps(row), flush=True)
        with args.json.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
