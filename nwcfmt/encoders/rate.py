"""Rate control: the finest quantizer step whose measured bits per weight stay within a target."""

from __future__ import annotations

import math
from collections.abc import Callable

from nwcfmt.errors import EncodeError

STEP_MIN, STEP_MAX = 2.0**-14, 2.0**6


def bisect_step(bits_at: Callable[[float], float], target: float, iters: int = 32) -> float:
    """The smallest step (to ~0.1% in log scale) with ``bits_at(step) <= target``; ``bits_at`` must fall as the
    step grows. Raises :class:`EncodeError` when even the coarsest step needs more than ``target``."""
    lo, hi = math.log2(STEP_MIN), math.log2(STEP_MAX)
    if bits_at(2.0**hi) > target:
        raise EncodeError(f"cannot reach {target} bits per weight: the side information alone costs more")
    if bits_at(2.0**lo) <= target:
        return 2.0**lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        if bits_at(2.0**mid) <= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-3:
            break
    return 2.0**hi


def meet_target(encode_at: Callable[[float], tuple[float, object]], step: float, target: float, tries: int = 40):
    """Encode at ``step``; while the measured bits exceed ``target`` (the estimate was a little low), coarsen
    the step by 0.5% and encode again. Returns ``(step, result)`` of the first encode within the target."""
    for _ in range(tries):
        bits, result = encode_at(step)
        if bits <= target:
            return step, result
        step *= 1.005
    raise EncodeError(f"could not meet {target} bits per weight")
