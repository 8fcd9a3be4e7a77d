"""The Ray backend: each job is a Ray task (one CPU), spread over the cluster's nodes by Ray's scheduler.

Jobs are read lazily by the driver and travel through Ray's object store, so workers need no shared
filesystem, only the same nwcfmt installed. At most ``2 * workers`` jobs are in flight; results are yielded
in job order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from nwcfmt.errors import InputError

R = TypeVar("R")


def _run(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """A task: ``fn(*args)`` and the id of the node that ran it."""
    import ray

    return ray.get_runtime_context().get_node_id(), fn(*args)


class RayExecutor:
    """Jobs as Ray tasks on the cluster at ``address`` (``auto``: the running cluster, else a local one)."""

    is_main = True

    def __init__(self, address: str = "auto") -> None:
        try:
            import ray
        except ImportError:
            raise InputError("--ray needs Ray: pip install 'nwcfmt[ray]'") from None
        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
            except ConnectionError as exc:
                if address != "auto":
                    raise InputError(f"--ray {address}: cannot connect to a Ray cluster ({exc})") from None
                ray.init(log_to_driver=False, configure_logging=False)  # none running: a local one
            self._started = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.nodes_used: set[str] = set()  # ids of the nodes that ran at least one job
        self._task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD", max_retries=2)(_run)

    def map(self, fn: Callable[..., R], jobs: Iterable[tuple], costs: Sequence[float] | None = None) -> Iterator[R]:
        ray = self._ray
        pending: deque = deque()
        limit = 2 * self.workers

        def first() -> R:
            node, result = ray.get(pending.popleft())
            self.nodes_used.add(node)
            return result

        for job in jobs:
            if len(pending) >= limit:
                yield first()
            pending.append(self._task.remote(fn, *job))
        while pending:
            yield first()

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


__all__ = ["RayExecutor"]
