"""Per-Linear input statistics: the Hessian ``H = 2/N sum x x^T`` and its damped inverse.

:class:`HessianCollector` attaches forward hooks to Linears; every call adds the rows of the input (reshaped to
``[-1, in]``) to a float64 running sum (each batch's product is computed in fp32, then accumulated in float64).
Linears that receive the very same input tensor in one forward pass (q/k/v, gate/up) share one product.
``N`` counts the rows of all batches. The diagonal ``2/N sum x_j^2`` is the per-input-channel importance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nwcfmt.errors import EncodeError

DEFAULT_PERCDAMP = 0.01
DAMP_RETRIES = 4  # 10x more damping each time


class HessianAccumulator:
    """Streaming ``2/N sum x x^T`` over rows of ``[..., cols]`` inputs."""

    def __init__(self, cols: int) -> None:
        self.cols = cols
        self.sum = torch.zeros(cols, cols, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor, xtx: torch.Tensor | None = None) -> torch.Tensor:
        """Add the rows of ``x``; ``xtx`` is their precomputed ``x^T x`` (fp32) if known. Returns ``x^T x``."""
        flat = x.detach().reshape(-1, self.cols)
        if xtx is None:
            flat32 = flat.to(torch.float32)
            xtx = flat32.T @ flat32
        self.sum += xtx.to(torch.float64)
        self.rows += flat.shape[0]
        return xtx

    def hessian(self) -> torch.Tensor:
        """``H = 2/N sum x x^T`` in fp32 (zeros when nothing was seen)."""
        scale = 2.0 / self.rows if self.rows else 0.0
        return (self.sum * scale).to(torch.float32)

    def importance(self) -> torch.Tensor:
        """The diagonal of :meth:`hessian`: ``2/N sum x_j^2`` per input channel."""
        return torch.diagonal(self.hessian()).clone()


class HessianCollector:
    """Forward hooks that accumulate the input Hessian of each named Linear. Use as a context manager."""

    def __init__(self, linears: dict[str, torch.nn.Linear]) -> None:
        self.accumulators = {name: HessianAccumulator(m.in_features) for name, m in linears.items()}
        self._linears = linears
        self._handles: list = []
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, x^T x) of the previous hook

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            shared = self._last[1] if self._last is not None and self._last[0] is x else None
            self._last = (x, self.accumulators[name].add(x, shared))

        return hook

    def __enter__(self) -> HessianCollector:
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._last = [], None

    @property
    def rows(self) -> int:
        return max((a.rows for a in self.accumulators.values()), default=0)

    def hessians(self) -> dict[str, torch.Tensor]:
        return {name: acc.hessian() for name, acc in self.accumulators.items()}


@dataclass
class DampedInverse:
    """The upper Cholesky factor ``U`` of ``(H + lambda I)^-1`` (``U^T U = H^-1``), as GPTQ uses it."""

    upper: torch.Tensor  # fp32 [cols, cols]
    dead: torch.Tensor  # bool [cols]: input channels that never saw a non-zero value (zero their weights)
    damp: float  # the lambda finally added to the diagonal


def dead_columns(hessian: torch.Tensor) -> torch.Tensor:
    """Input channels whose Hessian diagonal is zero."""
    return torch.diagonal(hessian) == 0


def damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP) -> DampedInverse:
    """``H`` with dead diagonals set to 1 and ``percdamp * mean(diag)`` added -> upper Cholesky of its inverse.

    Computed in float64. On a failed factorization the damping grows 10x (up to :data:`DAMP_RETRIES` times).
    """
    h = hessian.detach().to(torch.float64).clone()
    dead = dead_columns(h)
    h[dead, dead] = 1.0
    diag = torch.diagonal(h)
    base = percdamp * float(diag.mean())
    if not torch.isfinite(h).all():
        raise EncodeError("the Hessian holds inf or NaN (activations overflowed)")
    damp = base
    undamped = diag.clone()
    for _ in range(DAMP_RETRIES + 1):  # in place, freeing as it goes: about three [cols, cols] fp64 at a time
        torch.add(undamped, damp, out=diag)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0:
                return DampedInverse(upper.to(torch.float32), dead, damp)
        damp = damp * 10 if damp > 0 else 1e-6
    raise EncodeError(f"the damped Hessian is not positive definite even with damping {damp / 10:.3g}")


def importance(hessian: torch.Tensor) -> torch.Tensor:
    """The diagonal of a Hessian: ``2/N sum x_j^2``, the importance of input channel ``j``."""
    return torch.diagonal(hessian).clone()
