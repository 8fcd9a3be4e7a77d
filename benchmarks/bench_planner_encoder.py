"""The bit-budget planner on an encoder (all-MiniLM-L6-v2): planned files against uniform ``ecsq`` of the same size,
scored by sentence-embedding cosine to the original (protocol nwc-cos-v1). The second case beside SmolLM2.

    python benchmarks/bench_planner_encoder.py                  # measure once, every row, the rank study (~30 min)
    python benchmarks/bench_planner_encoder.py --only plan-9MB,ecsq-9MB --rank 0

1. The planner measures MiniLM once (:func:`nwcfmt.planner.measure.measure_model` on the default calibration
   windows; the sensitivity is the Gauss-Newton Fisher of the sentence embedding) and keeps it in ``--cache``.
2. Rows, data-free (``ecsq calibrate=false``) so that plan and uniform codec use the same encoder: ``plan-S``
   (``--target-size S``), ``plan-hessian-S`` (the same on Hessian-weighted error alone, the planner's proxy for
   encoders before the sensitivity), ``ecsq-S`` (one ``ecsq`` rate for every planned tensor, the embeddings
   included, the largest whose file fits ``S``); and ``plan-9MB/cal``, ``ecsq-9MB/cal``, the same pair with the
   Linears' ``ecsq`` calibrated (each at its planned rate; the embeddings stay data-free).
3. Each row's folder is scored by ``nwc eval --reference`` (mean and minimum cosine over the evaluation text's
   first 256 sentences, which the planner never sees); ``file bytes`` are the weight file's size.

``--rank N`` draws N plans at the smallest size (each tensor's proxy error times a random log-normal factor),
encodes and scores each, and prints Spearman's rank correlation of both proxies' predictions with the measured
``1 - cosine``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from _common import data_free, measured, nwc, proxy_ranking, random_plans, run

from nwcfmt import data
from nwcfmt.container.writer import HEADER_ALLOWANCE
from nwcfmt.planner import make_plan
from nwcfmt.planner.measure import Measured
from nwcfmt.planner.plan import RATE_DIGITS

HERE = Path(__file__).resolve().parent
SIZES = {"9MB": 9_000_000, "12MB": 12_000_000}
CACHE = Path(os.environ.get("NWC_BENCH_CACHE", Path.home() / ".cache" / "nwcfmt-bench")) / "planner-minilm.json"


def hessian_only(m: Measured) -> Measured:
    return m.with_scales(0.0, "hessian")


def uniform_ecsq(m: Measured, size: int) -> dict:
    """One ecsq rate for every planned tensor (embeddings included), the largest in thousandths of a bit whose
    bound, with the records' header bounds, fits ``size``."""
    numel = sum(t.total_numel for t in m.tensors)
    headers = sum(max(c.overhead for c in t.candidates if c.option.codec == "ecsq") + RATE_DIGITS for t in m.tensors)
    budget = size - HEADER_ALLOWANCE - m.fixed_bytes - m.fixed_overhead - headers
    bits = math.floor(1000 * 8 * budget / numel) / 1000
    while sum(math.ceil(bits * t.numel / 8) for t in m.tensors) > budget:
        bits -= 0.001
    params = {"bits": round(bits, 3), "calibrate": False}
    rules = [{"match": t.name, "codec": "ecsq", "params": params} for t in m.tensors]
    return {"codec": "ecsq", "params": params, "rules": rules}


def rows(m: Measured) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for label, size in SIZES.items():
        out[f"plan-{label}"] = data_free(make_plan(m, None, target_size=size).policy_dict())
        out[f"plan-hessian-{label}"] = data_free(make_plan(hessian_only(m), None, target_size=size).policy_dict())
        out[f"ecsq-{label}"] = uniform_ecsq(m, size)
    calibrated = min(SIZES, key=SIZES.get)  # the same pair with ecsq calibrated (embeddings stay data-free)
    out[f"plan-{calibrated}/cal"] = make_plan(m, None, target_size=SIZES[calibrated]).policy_dict()
    out[f"ecsq-{calibrated}/cal"] = calibrate(uniform_ecsq(m, SIZES[calibrated]))
    return out


def calibrate(policy: dict) -> dict:
    """The policy with its ecsq settings calibrated (the codec's default)."""
    for part in [policy, *policy["rules"]]:
        part["params"] = {k: v for k, v in part["params"].items() if k != "calibrate"}
    return policy


def score(src: Path, policy: dict, work: Path, extra: tuple[str, ...] = ()) -> dict:
    """Encode ``src`` with ``policy`` (and ``extra`` arguments) and score it: file bytes, mean and minimum cosine,
    encode seconds."""
    path, out = work / "policy.json", work / "out"
    path.write_text(json.dumps(policy))
    _, seconds = run(nwc("encode", str(src), "-o", str(out), "--policy", str(path), "-q", "--overwrite", *extra))
    run(nwc("verify", str(out), "-q"))
    doc = json.loads(run(nwc("eval", str(out), "--reference", str(src), "--json", "--no-save", "-q"))[0].stdout)
    record = doc[0] if isinstance(doc, list) else doc
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    run(["rm", "-rf", str(out)])
    cosine, least = record["value"], record["details"]["min_cosine"]
    return {"file_bytes": size, "cosine": cosine, "cosine_min": least, "encode_s": round(seconds, 1)}


def rank_study(src: Path, m: Measured, n: int, size: int, work: Path, seed: int = 0) -> dict:
    losses = []
    plans = random_plans(m, n, target_size=size, seed=seed)
    for plan in plans:
        losses.append(1.0 - score(src, data_free(plan.policy_dict()), work)["cosine"])
        print(f"  random plan {len(losses)}: 1 - cosine {losses[-1]:.5f}", flush=True)
    return {"plans": n, "size": size, "one_minus_cosine": losses, **proxy_ranking(m, plans, losses)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated row names")
    parser.add_argument("--cache", type=Path, default=CACHE, help="the planner's measurements of MiniLM")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "planner-minilm.jsonl")
    parser.add_argument("--rank", type=int, default=8, help="random plans for the rank study (0: none)")
    args = parser.parse_args(argv)
    src = data.minilm_dir()
    print(f"all-MiniLM-L6-v2 fp32; {os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)
    m = measured(src, args.cache)
    table = rows(m)
    names = args.only.split(",") if args.only else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(table)}")
    done = set()
    if args.json.exists():
        done = {json.loads(line)["row"] for line in args.json.read_text().splitlines()}
    with tempfile.TemporaryDirectory(prefix="nwc-bench-plan-enc-") as tmp:
        for name in names:
            if name in done:
                continue
            policy = table[name]
            # a uniform calibrated row: --codec runs the calibration pipeline (plan files are routed to it alone)
            uniform_cal = name.startswith("ecsq-") and name.endswith("/cal")
            extra = ("--codec", "ecsq", "--bits", str(policy["params"]["bits"])) if uniform_cal else ()
            row = {"row": name, **score(src, policy, Path(tmp), extra)}
            plan = policy.get("plan", {})
            label = name.split("/")[0].rsplit("-", 1)[1]
            row |= {"target_size": SIZES[label], "predicted": plan.get("predicted_error")}
            row |= {"bound": plan.get("file_bytes_bound"), "params": None if plan else policy["params"]}
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
        if args.rank and "rank-study" not in done:
            result = rank_study(src, m, args.rank, min(SIZES.values()), Path(tmp))
            print(json.dumps(result), flush=True)
            with args.json.open("a") as f:
                f.write(json.dumps({"row": "rank-study", **result}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
