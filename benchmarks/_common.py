"""Helpers the benchmark scripts share: running ``nwc``, data-free policies, rank correlation (benchmarks run as
scripts, so ``benchmarks/`` is on ``sys.path`` and they import this module as ``_common``)."""

from __future__ import annotations

import math
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


def data_free(doc: dict) -> dict:
    """The policy ``doc`` with its ecsq settings data-free (calibrate=false)."""
    for part in [doc, *doc.get("rules", [])]:
        if part.get("codec") == "ecsq":
            part["params"] = {**part.get("params", {}), "calibrate": False}
    return doc


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
