"""Spending a byte budget over tensors: per-tensor Pareto frontiers, Lagrangian relaxation, then a greedy fill.

Each tensor has candidates ``(bytes, error)``; a plan picks one per tensor, and its error is the sum of theirs
(an additive proxy; ``nwc plan --kl`` measures the real end-to-end KL). :func:`allocate`:

1. keeps each tensor's Pareto frontier (no other candidate is both smaller and better) and its lower convex
   hull;
2. solves the Lagrangian relaxation ``min sum error + lambda * bytes`` for the smallest ``lambda`` whose plan
   fits: starting from every tensor's cheapest candidate, hull upgrades are taken in order of error saved per
   byte while they fit (exactly the plans the relaxation gives as ``lambda`` falls);
3. fills what is left of the budget greedily with any frontier point (hull or not) that saves the most error per
   extra byte and still fits, until none does.

A dynamic program over the budget (in :data:`DP_BINS` units, costs rounded up) is solved too, then filled the
same way; the better of the two plans is kept. With many tensors they agree closely; with a few large ones
(a small model's embedding) the relaxation can miss the best combination by far, and the program does not.

The result never exceeds the budget; it is within one upgrade's bytes of it.
"""

from __future__ import annotations

import itertools
import math

from nwcfmt.errors import InputError

Point = tuple[int, float]  # (bytes, error)
DP_BINS = 8192  # budget units of the dynamic program


def frontier(points: list[Point]) -> list[int]:
    """Indices of the Pareto-optimal points, by bytes ascending (error strictly falling); ties keep the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    kept: list[int] = []
    for i in order:
        if not kept or points[i][1] < points[kept[-1]][1]:
            if kept and points[i][0] == points[kept[-1]][0]:
                kept[-1] = i
            else:
                kept.append(i)
    return kept


def lower_hull(points: list[Point], front: list[int]) -> list[int]:
    """The frontier points on the lower convex hull (error against bytes), by bytes ascending."""
    hull: list[int] = []
    for i in front:
        while len(hull) >= 2:
            (x1, y1), (x2, y2), (x3, y3) = points[hull[-2]], points[hull[-1]], points[i]
            if (y2 - y1) * (x3 - x1) >= (y3 - y1) * (x2 - x1):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(tables: list[list[Point]], budget: int) -> list[int]:
    """One candidate index per table whose bytes sum to at most ``budget`` and whose summed error is the lower of
    what the relaxation and the dynamic program find, each followed by the fill (module docstring);
    :class:`InputError` when even the cheapest plan does not fit."""
    relaxed = lagrangian(tables, budget)
    programmed = dynamic_program(tables, budget)
    if programmed is None:  # the rounded-up costs no longer fit
        return relaxed
    return min((relaxed, _fill(tables, programmed, budget)), key=lambda c: total(tables, c)[1])


def dynamic_program(tables: list[list[Point]], budget: int, bins: int = DP_BINS) -> list[int] | None:
    """The multiple-choice knapsack solved exactly on a grid of ``bins`` budget units, each candidate's bytes
    rounded up to whole units (so the plan fits; the rounding leaves a little for the fill); None when nothing
    fits once rounded."""
    import numpy as np

    fronts = [frontier(t) for t in tables]
    unit = max(1.0, budget / bins)
    size = int(budget // unit) + 1
    best = np.zeros(size)
    picks = np.zeros((len(tables), size), dtype=np.int32)
    for k, (t, f) in enumerate(zip(tables, fronts, strict=True)):
        new = np.full(size, np.inf)
        for i in f:
            cost = math.ceil(t[i][0] / unit)
            if cost >= size:
                continue
            cand = np.full(size, np.inf)
            cand[cost:] = best[: size - cost] + t[i][1]
            better = cand < new
            new[better], picks[k, better] = cand[better], i
        best = new
    if not np.isfinite(best[-1]):
        return None
    chosen, left = [0] * len(tables), size - 1
    for k in range(len(tables) - 1, -1, -1):
        i = int(picks[k, left])
        chosen[k] = i
        left -= math.ceil(tables[k][i][0] / unit)
    return chosen


def lagrangian(tables: list[list[Point]], budget: int) -> list[int]:
    """The relaxation's plan (hull upgrades by slope while they fit), then the fill."""
    fronts = [frontier(t) for t in tables]
    if any(not f for f in fronts):
        raise InputError("a tensor has no candidate setting")
    hulls = [lower_hull(t, f) for t, f in zip(tables, fronts, strict=True)]
    chosen = [h[0] for h in hulls]
    used = sum(t[c][0] for t, c in zip(tables, chosen, strict=True))
    if used > budget:
        raise InputError(f"the budget of {budget} bytes is below the smallest plan ({used} bytes)")
    # 2. hull upgrades by slope; within a tensor the slopes fall, so taking them in order keeps each tensor on its
    # hull. An upgrade that does not fit blocks the later ones of its tensor (they would skip a hull point).
    steps = []
    for k, (t, h) in enumerate(zip(tables, hulls, strict=True)):
        for a, b in itertools.pairwise(h):
            steps.append(((t[a][1] - t[b][1]) / (t[b][0] - t[a][0]), k, a, b))
    steps.sort(key=lambda s: (-s[0], s[1]))
    blocked: set[int] = set()
    for _, k, a, b in steps:
        if k in blocked or chosen[k] != a:
            blocked.add(k)
            continue
        extra = tables[k][b][0] - tables[k][a][0]
        if used + extra <= budget:
            chosen[k], used = b, used + extra
        else:
            blocked.add(k)
    return _fill(tables, chosen, budget)


def _fill(tables: list[list[Point]], chosen: list[int], budget: int) -> list[int]:
    """Greedy: move a tensor to the frontier point saving the most error per extra byte that still fits, until
    none does."""
    chosen = list(chosen)
    fronts = [frontier(t) for t in tables]
    used = total(tables, chosen)[0]
    while True:
        best = None
        for k, (t, f) in enumerate(zip(tables, fronts, strict=True)):
            now = t[chosen[k]]
            for i in f:
                extra, saved = t[i][0] - now[0], now[1] - t[i][1]
                if saved <= 0 or used + extra > budget:
                    continue
                gain = saved / extra if extra > 0 else float("inf")
                if best is None or gain > best[0]:
                    best = (gain, k, i, extra)
        if best is None:
            return chosen
        _, k, i, extra = best
        chosen[k], used = i, used + extra


def total(tables: list[list[Point]], chosen: list[int]) -> Point:
    """(bytes, error) of a plan."""
    return (
        sum(t[c][0] for t, c in zip(tables, chosen, strict=True)),
        sum(t[c][1] for t, c in zip(tables, chosen, strict=True)),
    )


__all__ = ["DP_BINS", "allocate", "dynamic_program", "frontier", "lagrangian", "lower_hull", "total"]
