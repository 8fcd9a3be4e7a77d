"""Helpers the benchmark scripts share: running ``nwc``, data-free policies, rank correlation (benchmarks run as
scripts, so ``benchmarks/`` is on ``sys.path`` and they import this module as ``_common``)."""

from __future__ import annotations

import math
import random
import subprocess
import sys
import time


def nwc(*args: str) -> list[str]:
    """The command line of ``nwc ARGS`` in this interpreter."""
    return [sys.executable, "-m", "nwcfmt.cli.main", *args]


def run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``cmd`` to the end; (its completed process, its wall seconds). A failure raises RuntimeError with the
    command and the last lines of its stderr."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:6])}... failed: {proc.stderr.strip().splitlines()[-3:]}")
    return proc, time.perf_counter() - start


def measured(src, cache, ecsq_rates: tuple[float, ...] | None = None):
    """The planner's measurements of ``src`` with its defaults (``ecsq_rates``: other ``ecsq`` rates than the
    default ones), measured once and kept in ``cache`` (the file ``nwc plan --measurements`` reads and writes; one
    measured with other options or of a changed model is refused, not reused)."""
    from nwcfmt.calibration.pipeline import CalibOptions
    from nwcfmt.planner import options
    from nwcfmt.planner.store import measure_once

    choices = options() if ecsq_rates is None else options(ecsq_rates=ecsq_rates)
    cache.parent.mkdir(parents=True, exist_ok=True)
    return measure_once(cache, src, choices, CalibOptions(), report=lambda line: print(f"  {line}", flush=True))


def with_ecsq_params(doc: dict, **params) -> dict:
    """The policy ``doc`` with ``params`` added to its ecsq settings (the main one and every rule's)."""
    for part in [doc, *doc.get("rules", [])]:
        if part.get("codec") == "ecsq":
            part["params"] = {**part.get("params", {}), **params}
    return doc


def data_free(doc: dict) -> dict:
    """The policy ``doc`` with its ecsq settings data-free (calibrate=false)."""
    return with_ecsq_params(doc, calibrate=False)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` (no ties expected)."""

    def ranks(x: list[float]) -> list[float]:
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def random_plans(measured, n: int, target_bpw: float | None = None, target_size: int | None = None, seed: int = 0):
    """``n`` plans for the target from ``measured``, each tensor's proxy error times a random log-normal factor
    (sigma 1): the random plans of a rank study."""
    from nwcfmt.planner import make_plan
    from nwcfmt.planner.measure import Measured

    rng = random.Random(seed)
    plans = []
    for _ in range(n):
        noisy = Measured.from_dict(measured.to_dict())
        for t in noisy.tensors:
            t.scale *= math.exp(rng.gauss(0.0, 1.0))
        plans.append(make_plan(noisy, target_bpw, target_size=target_size))
    return plans


def proxy_ranking(measured, plans: list, losses: list[float]) -> dict:
    """Both proxies' predictions of ``plans`` (Fisher-scaled with ``measured``'s scales; Hessian-weighted alone)
    and Spearman's correlation of each with the measured ``losses``."""
    scale = {t.name: t.scale for t in measured.tensors}
    fisher = [sum(e.choice.error * scale.get(e.name, 0.0) for e in p.entries) for p in plans]  # tied copies: 0
    hessian = [sum(e.choice.error for e in p.entries) for p in plans]
    return {
        "predicted_fisher_scaled": fisher,
        "predicted_hessian": hessian,
        "spearman_fisher_scaled": spearman(fisher, losses),
        "spearman_hessian": spearman(hessian, losses),
    }
