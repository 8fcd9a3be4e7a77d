"""The bit-budget planner on SmolLM2: planned mixes against uniform codecs at equal bits, on held-out text.

    python benchmarks/bench_planner.py                      # measure once, then every row (about 1.5 h, 2 cores)
    python benchmarks/bench_planner.py --only plan-3.5,ecsq-3.5
    python benchmarks/bench_planner.py --rank 8             # the proxies' rank correlation with held-out KL
    python benchmarks/bench_planner.py --table              # results/planner.jsonl as a markdown table

1. The planner measures SmolLM2 once (:func:`nwcfmt.planner.measure.measure_model`: every candidate of every
   planned tensor, embedding included; Hessians from the default calibration windows; the Fisher sensitivity
   from held-out calibration windows) and keeps the measurements in ``--cache``.
2. Each row is an ``nwc encode`` of the fp32 checkpoint with a policy file: a plan for a target (``plan-T``:
   Fisher-scaled proxy; ``plan-hessian-T``: Hessian-weighted error alone), a uniform codec over the same tensors
   (``ecsq-T``, ``neural-T``, ``rtn-B``, ``gptq-B/cal``: the embedding coded like the rest; GPTQ's embedding,
   which has no Hessian, RTN at the same setting), or a Q4_K_M-like rule set (``q4km-like``). Rows marked
   ``/cal`` are calibrated (``ecsq`` tensors each at its planned rate, without the row-scale fine-tuning,
   ``finetune=false``, in plans and uniform rows alike; ``gptq-B/cal``: GPTQ g128); the others are data-free.
3. Every row is evaluated on the evaluation text (protocol nwc-ppl-v1: the first ``--windows`` windows of 2048
   tokens, which the planner never sees): perplexity, and the mean KL(FP || row) per token against the
   full-precision model's distributions on the same windows. Bits per weight are file bytes of the planned
   tensors (every Linear, the tied embedding) over their weights; ``file bpw`` counts every tensor.

``--rank N`` draws N plans at 3.5 bits (each tensor's proxy error multiplied by a random log-normal factor, then
solved), measures each plan's KL on held-out calibration windows (:func:`nwcfmt.planner.check.plan_kl`), and
prints Spearman's rank correlation of both proxies' predictions with it (and the planner's own plan's KL there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path

import torch
from _common import data_free, measured, nwc, proxy_ranking, random_plans, run, with_ecsq_params

from nwcfmt import data
from nwcfmt.planner import make_plan
from nwcfmt.planner.candidates import Option
from nwcfmt.planner.measure import Measured
from nwcfmt.planner.plan import error_at_rate

HERE = Path(__file__).resolve().parent
TARGETS = (3.0, 3.5, 4.0, 4.5)
CACHE = Path(os.environ.get("NWC_BENCH_CACHE", Path.home() / ".cache" / "nwcfmt-bench")) / "planner-smollm2.json"
EMBED = "model.embed_tokens.weight"


def uniform(codec: str, **params) -> dict:
    """One codec for every planned tensor, the embedding included."""
    return {"codec": codec, "params": params, "rules": [{"match": "*embed_tokens*", "codec": codec, "params": params}]}


def q4km_like(blocks: int) -> dict:
    """llama.cpp's Q4_K_M rules in this project's codecs: Q4_K (4-bit, 32 per scale, asymmetric) everywhere;
    Q6_K (6-bit g32 here) for attn_v and ffn_down in the first and last eighth of the blocks and every third
    block between, and for the output head (tied to the embedding here, so the embedding gets 6 bits)."""
    more = [i for i in range(blocks) if i < blocks // 8 or i >= 7 * blocks // 8 or (i - blocks // 8) % 3 == 2]
    q6 = {"bits": 6, "group_size": 32}
    rules = [{"match": EMBED, "codec": "rtn", "params": q6}]
    for i in more:
        for name in ("self_attn.v_proj", "mlp.down_proj"):
            rules.append({"match": f"model.layers.{i}.{name}.weight", "codec": "rtn", "params": q6})
    return {"codec": "rtn", "params": {"bits": 4, "group_size": 32}, "rules": rules}


def uniform_gptq(bits: int) -> dict:
    """GPTQ (4 or 3 bits, 128 per scale) for every Linear; the embedding (no Hessian) RTN at the same setting."""
    params = {"bits": bits, "group_size": 128}
    return {"codec": "gptq", "params": params, "rules": [{"match": "*embed_tokens*", "codec": "rtn", "params": params}]}


def without_finetune(doc: dict) -> dict:
    """``doc`` with its ecsq settings calibrated without the row-scale fine-tuning (``finetune=false``): the
    calibrated rows' setting, four times faster to encode, the same for plans and uniform codecs."""
    return with_ecsq_params(doc, finetune=False)


def rows(m: Measured, targets: tuple[float, ...]) -> dict[str, dict]:
    plain = m.with_scales(0.0, "hessian")  # the Hessian-weighted error alone
    out: dict[str, dict] = {}
    for t in targets:
        out[f"plan-{t}"] = data_free(make_plan(m, t).policy_dict())
        out[f"plan-hessian-{t}"] = data_free(make_plan(plain, t).policy_dict())
        out[f"ecsq-{t}"] = uniform("ecsq", bits=t, calibrate=False)
        out[f"plan-{t}/cal"] = without_finetune(make_plan(m, t).policy_dict())
        # the embedding data-free: no block calibrates it
        out[f"ecsq-{t}/cal"] = without_finetune(uniform("ecsq", bits=t))
    out["neural-3.5"] = uniform("neural", bits=3.5, calibrate=False)
    out["neural-4.0"] = uniform("neural", bits=4.0, calibrate=False)
    out["rtn-3"] = uniform("rtn", bits=3, group_size=128)
    out["rtn-4"] = uniform("rtn", bits=4, group_size=128)
    out["gptq-3/cal"] = uniform_gptq(3)
    out["gptq-4/cal"] = uniform_gptq(4)
    out["q4km-like"] = q4km_like(30)
    return out


ENCODER_ONLY = ("calibrate", "finetune")  # params that change how a setting is encoded, not what is stored


def predictions(m: Measured, doc: dict) -> tuple[float, float] | None:
    """(Fisher-scaled proxy, Hessian-weighted proxy) the measurements give the policy ``doc``: each planned
    tensor's data-free candidate for the setting the policy gives it (an ``ecsq`` rate between the measured ones
    interpolated as the planner does); None where a setting is not measured (a Q4_K_M-like group of 32)."""
    scaled = plain = 0.0
    for t in m.tensors:
        rule = next((r for r in doc.get("rules", []) if fnmatchcase(t.name, r["match"])), doc)
        params = {k: v for k, v in (rule.get("params") or {}).items() if k not in ENCODER_ONLY}
        option = Option.of(rule["codec"], **params)
        found = next((c.error for c in t.candidates if c.option == option), None)
        if found is None and option.codec == "ecsq":  # a real-valued rate, as the planner predicts it
            curve = sorted((c.option.config["bits"], c.error) for c in t.candidates if c.option.codec == "ecsq")
            found = error_at_rate(curve, params["bits"]) if curve and params["bits"] >= curve[0][0] else None
        if found is None:
            return None
        scaled += found * t.scale
        plain += found
    return scaled, plain


def table(m: Measured, results: list[dict]) -> str:
    """The markdown table of ``results`` (rows of the jsonl), with each row's proxies (data-free candidates:
    calibrated rows are predicted as their data-free settings, which they beat)."""
    policies = rows(m, TARGETS)
    lines = [
        "| row | planned tensors: bits/weight (file bytes) | every tensor | perplexity | KL to FP (nats/token) "
        "| predicted KL (Fisher-scaled proxy / 2) | Hessian-weighted proxy | encode s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = ["fp", *policies]  # by target, then the other uniform rows
    for r in sorted(results, key=lambda r: order.index(r["row"]) if r["row"] in order else len(order)):
        if "ppl" not in r:
            continue
        guess = predictions(m, policies[r["row"]]) if r["row"] in policies else None
        scaled, plain = (f"{guess[0] / 2:.4f}", f"{guess[1]:.1f}") if guess else ("-", "-")
        every = f"{r['file_bpw']:.4f}" if r.get("file_bpw") else "-"
        seconds = f"{r['encode_s']:.0f}" if r.get("encode_s") else "-"
        lines.append(
            f"| {r['row']} | {r['planned_bpw']:.4f} | {every} | {r['ppl']:.2f} | {r['kl']:.4f} | {scaled} | {plain} "
            f"| {seconds} |"
        )
    return "\n".join(lines)


class Referee:
    """The full-precision model's log-probabilities on the evaluation windows, kept (fp16) to score rows."""

    def __init__(self, src: Path, windows: int) -> None:
        from nwcfmt.eval.loading import load_for_eval
        from nwcfmt.eval.perplexity import DEFAULT_SEQLEN, tokenize_text

        loaded = load_for_eval(src)
        ids = tokenize_text(loaded.tokenizer, data.eval_text())
        self.windows = [ids[i * DEFAULT_SEQLEN : (i + 1) * DEFAULT_SEQLEN] for i in range(windows)]
        self.reference = [self._logp(loaded.model, w).half() for w in self.windows]

    @staticmethod
    def _logp(model, window: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(model(input_ids=window[None], use_cache=False).logits[0, :-1].float(), -1)

    def from_pretrained_gap(self, folder: Path) -> float:
        """Max |logit difference| on the first 256 evaluation tokens between ``from_pretrained`` (the transformers
        quantizer ``import nwcfmt`` registers) and the evaluation loader (``nwcfmt.load``): 0 when the plan loads
        into transformers as it decodes."""
        from transformers import AutoModelForCausalLM

        from nwcfmt.eval.loading import load_for_eval

        ids = self.windows[0][None, :256]
        logits = []
        for model in (
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
            load_for_eval(folder, tokenizer=False).model,
        ):
            with torch.inference_mode():
                logits.append(model(input_ids=ids, use_cache=False).logits.float())
            del model
        return float((logits[0] - logits[1]).abs().max())

    def score(self, folder: Path) -> tuple[float, float]:
        """(perplexity, mean KL(FP || model) in nats per token) of the folder's model."""
        from nwcfmt.eval.loading import load_for_eval

        model = load_for_eval(folder, tokenizer=False).model
        nll = kl = 0.0
        count = 0
        for window, ref in zip(self.windows, self.reference, strict=True):
            logq = self._logp(model, window)
            nll -= float(logq.gather(1, window[1:, None]).double().sum())
            p = ref.float()
            kl += float((p.exp() * (p - logq)).double().sum())
            count += logq.shape[0]
        return math.exp(nll / count), kl / count


def planned_bits(folder: Path) -> tuple[float, float]:
    doc = json.loads(run(nwc("info", str(folder), "--json"))[0].stdout)
    planned = [t for t in doc["tensors"] if len(t["shape"]) >= 2 and "norm" not in t["name"]]
    bits = 8 * sum(t["stored_bytes"] for t in planned) / sum(t["numel"] for t in planned)
    every = 8 * sum(t["stored_bytes"] for t in doc["tensors"]) / sum(t["numel"] for t in doc["tensors"])
    return bits, every


def encode_and_score(src: Path, policy: dict, referee: Referee, tmp: Path, extra: Sequence[str] = ()) -> dict:
    """``nwc encode`` of ``src`` with the policy ``policy`` (and the options ``extra``), ``nwc verify``, and the
    row's measured fields: bits per weight (planned tensors, every tensor), perplexity, KL, encode seconds, and for
    a plan whether it loads with ``from_pretrained`` as it decodes. RuntimeError when a command fails."""
    path, out = tmp / "policy.json", tmp / "out"
    path.write_text(json.dumps(policy))
    try:
        _, seconds = run(nwc("encode", str(src), "-o", str(out), "--policy", str(path), "-q", "--overwrite",
                             "--no-resume", *extra))  # fmt: skip
        run(nwc("verify", str(out), "-q"))
        bits, every = planned_bits(out)
        ppl, kl = referee.score(out)
        row = {"planned_bpw": round(bits, 4), "file_bpw": round(every, 4), "ppl": round(ppl, 3), "kl": round(kl, 5),
               "encode_s": round(seconds, 1)}  # fmt: skip
        if "plan" in policy:
            row["from_pretrained_gap"] = referee.from_pretrained_gap(out)
        return row
    finally:
        shutil.rmtree(out, ignore_errors=True)


def rank_study(src: Path, m: Measured, n: int, seed: int = 0) -> dict:
    from nwcfmt.planner.check import plan_kl

    plans = random_plans(m, n, target_bpw=3.5, seed=seed)
    planned, *kls = plan_kl(src, [make_plan(m, 3.5), *plans])  # the planner's own plan, for scale
    bits = [round(p.bits_per_weight, 4) for p in plans]
    return {"plans": n, "bits": bits, "heldout_kl": kls, "plan_heldout_kl": planned, **proxy_ranking(m, plans, kls)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated row names")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--cache", type=Path, default=CACHE, help="the planner's measurements of SmolLM2")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "planner.jsonl")
    parser.add_argument("--rank", type=int, default=0, help="run the rank-correlation study with this many plans")
    parser.add_argument("--table", action="store_true", help="print the results in --json as a markdown table")
    parser.add_argument(
        "--calib-seed", type=int, default=0, help="calibrated rows: another calibration seed (rows NAME@seedN)"
    )
    parser.add_argument(
        "--ecsq-rates", default=None, help="comma-separated ecsq rates the planner may choose (default: its own)"
    )
    args = parser.parse_args(argv)
    rates = tuple(float(r) for r in args.ecsq_rates.split(",")) if args.ecsq_rates else None
    src = data.smollm2_dir("float32")
    print(f"SmolLM2-135M fp32; {os.cpu_count()} CPUs; torch {torch.__version__}", flush=True)
    m = measured(src, args.cache, rates)
    if args.table:
        print(table(m, [json.loads(line) for line in args.json.read_text().splitlines()]))
        return 0
    if args.rank:
        result = rank_study(src, m, args.rank)
        print(json.dumps(result), flush=True)
        with args.json.open("a") as f:
            f.write(json.dumps({"row": "rank-study", **result}) + "\n")
        return 0
    policies = rows(m, TARGETS)
    names = args.only.split(",") if args.only else list(policies)
    unknown = [n for n in names if n not in policies]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(policies)}")
    done = set()
    if args.json.exists():
        done = {json.loads(line)["row"] for line in args.json.read_text().splitlines()}
    referee = Referee(src, args.windows)
    if "fp" not in done:
        ppl, kl = referee.score(src)
        row = {"row": "fp", "planned_bpw": 16.0, "ppl": round(ppl, 3), "kl": round(kl, 5), "windows": args.windows}
        with args.json.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    with tempfile.TemporaryDirectory(prefix="nwc-bench-plan-") as tmp:
        for name in names:
            label = f"{name}@seed{args.calib_seed}" if args.calib_seed and name.endswith("/cal") else name
            if label in done:
                continue
            # a uniform calibrated row: --codec runs the calibration pipeline (plan files are routed to it alone)
            uniform_cal = name.endswith("/cal") and "plan" not in policies[name]
            params = policies[name]["params"]
            extra = ["--codec", policies[name]["codec"], "--bits", str(params["bits"])] if uniform_cal else []
            if uniform_cal and "finetune" in params:
                extra += ["--param", f"finetune={str(params['finetune']).lower()}"]
            if label != name:
                extra += ["--calib-seed", str(args.calib_seed)]
            try:
                scored = encode_and_score(src, policies[name], referee, Path(tmp), extra)
            except RuntimeError as exc:
                print(f"{name}: {exc}", flush=True)
                continue
            plan = policies[name].get("plan", {})
            row = {"row": label, **scored, "target": plan.get("target_bpw"), "plan_bpw": plan.get("bits_per_weight"),
                   "windows": args.windows}  # fmt: skip
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
