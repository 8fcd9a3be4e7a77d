"""The worker threads nwcfmt uses for CPU work that releases the GIL (zstd, zlib, native kernels).

``NWC_THREADS`` sets their number (default: the CPU count, at most 16).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def num_threads() -> int:
    env = os.environ.get("NWC_THREADS", "")
    return max(1, int(env)) if env.isdigit() else min(os.cpu_count() or 1, 16)


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nwc-worker")


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]``, spread over the worker threads (inline for one item or one thread).

    ``fn`` must not itself call ``parallel_map`` (the pool is shared and bounded).
    """
    workers = num_threads()
    if workers == 1 or len(items) < 2:
        return [fn(x) for x in items]
    return list(_pool(workers).map(fn, items))
