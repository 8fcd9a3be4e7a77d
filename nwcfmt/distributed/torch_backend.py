"""The torch.distributed backend: the ranks started by ``torchrun`` (gloo on CPUs).

Every rank runs the same calibration pipeline on the same data. Where the work splits into independent items (the
Linears coded in one stage of a block), each item has one owner rank, chosen from its cost by a fixed rule
(largest first onto the least-loaded rank); owners compute their items and every rank receives every result. All
ranks therefore hold the same quantized block, and the result of each item is what an inline run computes: the
output does not depend on the number of ranks. Rank 0 writes the output.

Calibration batches are not split over ranks: summing partial Hessians across ranks would change the order of
floating-point additions with the number of ranks, and with it the output bits.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from nwcfmt.errors import EncodeError

R = TypeVar("R")


def launched_by_torchrun() -> bool:
    """Whether this process is one of several ranks started by ``torchrun``."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def owners(costs: Sequence[float], ranks: int) -> list[int]:
    """The owner rank of each item: largest cost first, onto the rank with the least work so far (ties: lower
    rank, then lower index), so the split is the same on every rank."""
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(ranks), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += costs[i]
    return owner


class TorchDistExecutor:
    """Each job is run by its owner rank; every rank gets every result (``all_gather_object``)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._owned = not dist.is_initialized()
        if self._owned:
            dist.init_process_group("gloo")
        self.rank = dist.get_rank()
        self.workers = dist.get_world_size()
        self.is_main = self.rank == 0

    def map(self, fn: Callable[..., R], jobs: Iterable[tuple], costs: Sequence[float] | None = None) -> Iterator[R]:
        jobs = list(jobs)
        owner = owners(costs if costs is not None else [1.0] * len(jobs), self.workers)
        mine: dict[int, tuple[bool, Any]] = {}
        for i, job in enumerate(jobs):
            if owner[i] == self.rank:
                try:
                    mine[i] = (True, fn(*job))
                except Exception as exc:  # every rank must reach the gather, or the others wait forever
                    mine[i] = (False, f"{type(exc).__name__}: {exc}")
        parts: list[dict[int, tuple[bool, Any]] | None] = [None] * self.workers
        self._dist.all_gather_object(parts, mine)
        merged = {i: r for part in parts for i, r in (part or {}).items()}
        results = []
        for i in range(len(jobs)):
            ok, value = merged[i]
            if not ok:
                raise EncodeError(f"rank {owner[i]}: {value}")
            results.append(value)
        return iter(results)  # eager: every rank must reach the gather whether or not its caller reads

    def barrier(self) -> None:
        self._dist.barrier()

    def close(self) -> None:
        if self._owned and self._dist.is_initialized():
            self._dist.destroy_process_group()
        self._owned = False


__all__ = ["TorchDistExecutor", "launched_by_torchrun", "owners"]
