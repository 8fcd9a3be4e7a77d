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
