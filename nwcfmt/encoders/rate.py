"""Rate control: the finest quantizer step whose measured bits per weight stay within a target."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

from nwcfmt.errors import EncodeError

STEP_MIN, STEP_MAX = 2.0**-14, 2.0**6
T = TypeVar("T")


def gaussian_step(bits: float) -> float:
    """The step at which a unit Gaussian's uniform quantizer has entropy ``bits`` (high-rate approximation):
    a starting bracket for rate control."""
    return 2.0 ** (2.047 - bits)


def bisect_step(
    bits_at: Callable[[float], float],
    target: float,
    iters: int = 32,
    bracket: tuple[float, float] = (STEP_MIN, STEP_MAX),
    tol: float = 1e-3,
) -> float:
    """The smallest step (to ``tol`` in log2 scale) with ``bits_at(step) <= target`` within ``bracket``; ``bits_at``
    must fall as the step grows. Raises :class:`EncodeError` when even the coarsest step of the full range needs
    more than ``target``."""
    lo, hi = math.log2(bracket[0]), math.log2(bracket[1])
    if bits_at(2.0**hi) > target:
        if bracket[1] < STEP_MAX:
            return bisect_step(bits_at, target, iters, (bracket[1], STEP_MAX), tol)
        raise EncodeError(f"cannot reach {target} bits per weight: the side information alone costs more")
    if bits_at(2.0**lo) <= target:
        return 2.0**lo if bracket[0] <= STEP_MIN else bisect_step(bits_at, target, iters, (STEP_MIN, bracket[0]), tol)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if bits_at(2.0**mid) <= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < tol:
            break
    return 2.0**hi


def find_step(estimate_on: Callable[[T], Callable[[float], float]], sample: T, full: T, target: float) -> float:
    """Rate control in two passes: bisect ``estimate_on(sample)`` (a cheap subsample) from a Gaussian guess to
    1% of the step, then ``estimate_on(full)`` within 4% of that answer to 0.3% (widening if the answer lies
    outside): about 0.005 bit per weight, which :func:`meet_target` then checks on the real bytes."""
    guess = gaussian_step(target)
    rough = bisect_step(estimate_on(sample), target, bracket=(guess / 16, guess * 16), tol=0.015)
    return bisect_step(estimate_on(full), target, bracket=(rough / 1.04, rough * 1.04), tol=0.004)


def meet_target(encode_at: Callable[[float], tuple[float, object]], step: float, target: float, tries: int = 40):
    """Encode at ``step``; while the measured bits exceed ``target`` (the estimate was a little low), coarsen
    the step by 0.5% and encode again. Returns ``(step, result)`` of the first encode within the target."""
    for _ in range(tries):
        bits, result = encode_at(step)
        if bits <= target:
            return step, result
        step *= 1.005
    raise EncodeError(f"could not meet {target} bits per weight")


def secant_step(
    encode_at: Callable[[float], tuple[float, T]], start: float, target: float, tol: float = 0.004, iters: int = 8
) -> tuple[float, T]:
    """Rate control for encoders too costly to bisect (a calibrated sweep per try): secant steps on
    ``log2(step)`` from ``start`` (first assuming one bit per halving, as at high rate) until a try lands within
    ``tol`` bits per weight under ``target``; then coarsening by 1% until one fits. Returns ``(step, result)``
    of the finest try within the target."""
    tries: list[tuple[float, float, T]] = []  # (log2 step, bits, result)
    x = math.log2(start)
    for _ in range(iters):
        bits, result = encode_at(2.0**x)
        tries.append((x, bits, result))
        if target - tol <= bits <= target:
            break
        fits = [t for t in tries if t[1] <= target]
        over = [t for t in tries if t[1] > target]
        lo = max(over, key=lambda t: t[0]) if over else None  # the coarsest try still over the target
        hi = min(fits, key=lambda t: t[0]) if fits else None  # the finest try within it
        if lo is not None and hi is not None:
            slope = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] != lo[0] else -1.0
            slope = slope if slope < 0 else -1.0
            x_new = lo[0] + (target - tol / 2 - lo[1]) / slope
            x = min(max(x_new, lo[0] + 0.01 * (hi[0] - lo[0])), hi[0] - 0.01 * (hi[0] - lo[0]))
        else:
            x += bits - (target - tol / 2)
    fits = [t for t in tries if t[1] <= target]
    if fits:
        best = min(fits, key=lambda t: t[0])
        return 2.0 ** best[0], best[2]
    step = 2.0 ** max(t[0] for t in tries)
    return meet_target(encode_at, step * 1.01, target)
