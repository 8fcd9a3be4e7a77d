"""Executors: where per-tensor and per-Linear encoding work runs.

One small interface, :class:`Executor`, with three backends:

- :class:`InlineExecutor`: this process, one item at a time (the default).
- :class:`~nwcfmt.distributed.ray_backend.RayExecutor` (``nwc encode --ray auto|ADDRESS``): Ray tasks, for the
  per-tensor work of data-free codecs.
- :class:`~nwcfmt.distributed.torch_backend.TorchDistExecutor` (``torchrun``): the ranks of a torch.distributed
  group; every rank runs the calibration pipeline, each Linear of a block is coded by one owner rank and its
  result is shared with the others.

Every backend returns results in the order of its inputs, so the output does not depend on the number of
workers or on the order in which they finish. Scheduling is the engine's own (Ray's, torch.distributed's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

R = TypeVar("R")


class Executor(Protocol):
    """Runs ``fn(*args)`` for each ``args`` and yields the results in input order."""

    workers: int  # how many run at once
    is_main: bool  # whether this process writes the output (False on torch.distributed ranks other than 0)

    def map(self, fn: Callable[..., R], jobs: Iterable[tuple], costs: Sequence[float] | None = None) -> Iterator[R]:
        """``fn(*job)`` for each job, in order. ``jobs`` is consumed lazily: at most a few per worker are
        materialised ahead of the results (a job may hold a tensor read from disk). ``costs``: the relative
        work of each job, where a backend balances owners by it."""
        ...

    def barrier(self) -> None:
        """Wait for every worker process (a no-op where there is one)."""
        ...

    def close(self) -> None: ...


class InlineExecutor:
    """Everything in this process, in order."""

    workers = 1
    is_main = True

    def map(self, fn: Callable[..., R], jobs: Iterable[tuple], costs: Sequence[float] | None = None) -> Iterator[R]:
        for job in jobs:
            yield fn(*job)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


INLINE = InlineExecutor()


@dataclass(frozen=True)
class WireTensor:
    """A tensor as plain bytes (a numpy ``uint8`` array, which Ray moves without copying or pickling torch
    storages) with its dtype and shape: :func:`to_wire` / :meth:`tensor`."""

    data: np.ndarray
    dtype: str
    shape: tuple[int, ...]

    def tensor(self) -> torch.Tensor:
        flat = torch.from_numpy(self.data.copy() if not self.data.flags.writeable else self.data)
        return flat.view(getattr(torch, self.dtype)).reshape(self.shape)


def to_wire(tensor: torch.Tensor) -> WireTensor:
    t = tensor.detach().cpu().contiguous()
    return WireTensor(t.view(torch.uint8).reshape(-1).numpy(), str(t.dtype).removeprefix("torch."), tuple(t.shape))


def open_executor(ray: str | None = None) -> Executor:
    """The executor for a run: Ray when ``ray`` names a cluster (``auto``: the running one, or a local one),
    torch.distributed when this process is a ``torchrun`` rank, else inline."""
    if ray:
        from nwcfmt.distributed.ray_backend import RayExecutor

        return RayExecutor(ray)
    from nwcfmt.distributed.torch_backend import TorchDistExecutor, launched_by_torchrun

    if launched_by_torchrun():
        return TorchDistExecutor()
    return INLINE


__all__ = ["INLINE", "Executor", "InlineExecutor", "WireTensor", "open_executor", "to_wire"]
