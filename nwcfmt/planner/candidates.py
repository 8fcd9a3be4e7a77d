"""The settings a planner may give one tensor, each with the exact bytes the format writes for it and its error.

An :class:`Option` is a codec id and its config. :func:`measure` encodes the tensor with every option (data-free,
or GPTQ from the Hessian where the option is ``gptq`` and one is given), decodes it, and keeps a
:class:`Candidate`: the record's bytes (every segment: codes, scales, zero points, tables, streams) and the
weighted squared error of the decoded weight, :func:`weighted_error`.

The cost of an ``ecsq`` option is its rate-control bound, ``ceil(bits * numel / 8)`` bytes: the encoder keeps
every record within it, data-free or calibrated, so a plan's bytes are an upper bound on the file's whatever
encoder runs after planning (the data-free bytes are kept in ``Candidate.measured_bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from nwcfmt.codecs.registry import get_codec
from nwcfmt.container.writer import decode_encoded, encode_tensor, encoded_nbytes, record_overhead
from nwcfmt.errors import InputError, NwcError

FAMILIES = ("ecsq", "gptq", "rtn", "lossless")
CALIBRATED_FAMILIES = ("ecsq", "gptq")  # a plan holds at most one: the calibration pipeline runs one encoder
DEFAULT_FAMILIES = ("ecsq", "rtn", "lossless")
ECSQ_RATES = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0)
INTEGER_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZE = 128
UNKNOWN_OVERHEAD = 4096  # header bytes assumed for a record measured before headers were (older measurements)


@dataclass(frozen=True)
class Option:
    """One setting: a codec id and its config (what a policy rule holds)."""

    codec: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, codec: str, **params: Any) -> Option:
        return cls(codec, tuple(sorted(params.items())))

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        """Short and readable: ``ecsq 3.5``, ``rtn 4 g128``, ``lossless``."""
        cfg = self.config
        if self.codec == "ecsq":
            return f"ecsq {cfg['bits']:g}"
        if "bits" in cfg:
            return f"{self.codec} {cfg['bits']} g{cfg.get('group_size', GROUP_SIZE)}"
        return self.codec


def options(families: tuple[str, ...] = DEFAULT_FAMILIES, ecsq_rates: tuple[float, ...] = ECSQ_RATES) -> list[Option]:
    """Every setting of the given codec families the planner considers (``ecsq`` at ``ecsq_rates``)."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise InputError(f"the planner knows the codecs {', '.join(FAMILIES)}, not {', '.join(unknown)}")
    calibrated = [f for f in families if f in CALIBRATED_FAMILIES]
    if len(calibrated) > 1:
        raise InputError(f"a plan holds one calibrated codec, not {' and '.join(calibrated)}")
    out: list[Option] = []
    for family in families:
        if family == "ecsq":
            out += [Option.of("ecsq", bits=b) for b in ecsq_rates]
        elif family in ("rtn", "gptq"):
            out += [Option.of(family, bits=b, group_size=GROUP_SIZE) for b in INTEGER_BITS]
        else:
            out.append(Option.of(family))
    return out


@dataclass
class ErrorWeight:
    """How a weight error is weighed: by the Hessian of the Linear's input (``[cols, cols]``), by a weight per row
    (an embedding: how often each token occurs), or plainly (neither)."""

    hessian: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def weighted_error(delta: torch.Tensor, weight: ErrorWeight) -> float:
    """``tr(dW H dW^T)`` (the increase of the layer's output squared error, summed over outputs), ``sum_r w_r
    |dW_r|^2``, or ``|dW|^2``; products in fp32, sums in float64."""
    d = delta.reshape(delta.shape[0], -1).to(torch.float32) if delta.dim() > 1 else delta.to(torch.float32)[None]
    if weight.hessian is not None:
        return float(((d @ weight.hessian.to(torch.float32)) * d).double().sum())
    d = d.double()
    if weight.rows is not None:
        return float((d.pow(2).sum(dim=1) * weight.rows.to(torch.float64)).sum())
    return float(d.pow(2).sum())


@dataclass
class Candidate:
    option: Option
    nbytes: int  # what the plan counts (the ecsq bound; the record's exact bytes for the others)
    error: float  # weighted squared error of the decoded weight
    measured_bytes: int = 0  # the data-free record's bytes
    fisher_error: float | None = None  # sum F dW^2 with F the diagonal Fisher of the model's loss, when measured
    overhead: int = UNKNOWN_OVERHEAD  # bound of the header bytes of its record (container.writer.record_overhead)


@dataclass
class TensorCandidates:
    """Every candidate of one tensor, and the reference error used to scale them (``scale``: a per-tensor
    sensitivity, 1 when none is measured)."""

    name: str
    numel: int
    candidates: list[Candidate]
    scale: float = 1.0
    kind: str = "other"  # "linear" (Hessian-weighted), "embedding" (token-weighted), "other" (plain)
    copies: list[str] = field(default_factory=list)  # tied copies stored under other names: same data, same choice

    @property
    def total_numel(self) -> int:
        return self.numel * (1 + len(self.copies))

    def costs(self, headers: bool = False) -> list[tuple[int, float]]:
        """(bytes, scaled error) of each candidate, what the solver trades (``headers``: with the bound of its
        header bytes); a tensor's tied copies take the same setting, so they add their bytes (and nothing to the
        error, which the shared parameter's Fisher covers)."""
        copies = 1 + len(self.copies)
        return [((c.nbytes + c.overhead * headers) * copies, c.error * self.scale) for c in self.candidates]

    def sensitivity(self) -> float:
        """The measured sensitivity of this tensor: Fisher-weighted over weighted error, summed over the lossy
        candidates (1.0 when no Fisher was measured or every candidate is exact)."""
        lossy = [c for c in self.candidates if c.error > 0 and c.fisher_error is not None]
        total = sum(c.error for c in lossy)
        return sum(c.fisher_error for c in lossy) / total if lossy and total > 0 else 1.0


def _codec(option: Option, weight: ErrorWeight):
    config = option.config
    if option.codec == "ecsq":
        config["calibrate"] = False
    if option.codec == "gptq" and weight.hessian is None:  # nothing calibrates it: the same layout, data-free
        return get_codec("rtn").from_config(config)
    return get_codec(option.codec).from_config(config)


def encode_option(
    name: str, tensor: torch.Tensor, option: Option, weight: ErrorWeight
) -> tuple[int, torch.Tensor, int]:
    """(record bytes, decoded fp32 weight, bound of the record's header bytes) of ``tensor`` under ``option``."""
    codec = _codec(option, weight)
    if option.codec == "gptq" and weight.hessian is not None:
        result = codec.quantize_with_hessian(tensor.to(torch.float32), weight.hessian)
        encoded, decoded = result.encoded, result.weight
    else:
        codec, encoded = encode_tensor(name, tensor, codec)
        decoded = decode_encoded(name, codec, encoded, tuple(tensor.shape), tensor.dtype)
    overhead = record_overhead(name, codec, encoded, tuple(tensor.shape), tensor.dtype)
    return encoded_nbytes(encoded), decoded.to(torch.float32), overhead


def measure(
    name: str,
    tensor: torch.Tensor,
    choices: list[Option],
    weight: ErrorWeight,
    fisher: torch.Tensor | None = None,
    kind: str = "other",
) -> TensorCandidates:
    """Every option of ``choices`` that the tensor supports, encoded, decoded and weighed (and weighed by the
    diagonal Fisher ``fisher`` too, when given)."""
    ref = tensor.to(torch.float32)
    out = TensorCandidates(name, tensor.numel(), [], kind=kind)
    for option in choices:
        if not _codec(option, weight).supports(tensor):
            continue
        try:
            nbytes, decoded, overhead = encode_option(name, tensor, option, weight)
        except NwcError:  # e.g. a rate below what the tensor's scales alone cost: not a candidate
            continue
        delta = decoded - ref
        cost = math.ceil(option.config["bits"] * tensor.numel() / 8) if option.codec == "ecsq" else nbytes
        fisher_error = None if fisher is None else float((fisher.double() * delta.double().pow(2)).sum())
        error = weighted_error(delta, weight)
        out.candidates.append(Candidate(option, max(cost, nbytes), error, nbytes, fisher_error, overhead))
    return out


__all__ = [
    "CALIBRATED_FAMILIES",
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "Candidate",
    "ErrorWeight",
    "Option",
    "TensorCandidates",
    "encode_option",
    "measure",
    "options",
    "weighted_error",
]
