"""Architecture ``nwc-mlp-1``: the chunk encoder and decoder of the ``neural`` codec, as pure torch functions.

A chunk is 16 row-normalised weights of one input column (16 consecutive output rows). With ``step`` the
tensor's latent step, ``s = log2(step)`` and ``l`` the column's importance level::

    encoder:  y     = x / step + ENCODER_BOUND * tanh(MLP_e([x, s, E_enc[l]]))        q = round(y)
    decoder:  x_hat = step * (q + MLP_d([q * step, s, E_dec[l]]))

``MLP_*`` is ``Linear(25, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, 16)`` in fp32, ``H = HIDDEN``.
The decoder's tensors are stored in model files (names and shapes: :data:`DECODER_TENSORS`) and referenced by
:func:`decoder_hash`; the encoder ships only with the package (:data:`ENCODER_TENSORS`).

Exact decode arithmetic (fp32 throughout): ``st = float32(step)``, ``qf = float32(q)``; the MLP input is
``cat([qf * st, full(torch.log2(st)), E_dec[l]])``; each layer is ``torch.nn.functional.linear``; the output
is ``st * (qf + MLP_d(...))``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from nwcfmt.errors import FormatError

ARCH_ID = "nwc-mlp-1"
CHUNK = 16
N_LEVELS = 4
EMBED = 8
HIDDEN = 64
IN_FEATURES = CHUNK + 1 + EMBED  # chunk, log2(step), level embedding
ENCODER_BOUND = 0.5  # the encoder moves x / step by less than half a cell: within one rounding cell of ECSQ
BATCH_CHUNKS = 1 << 16  # chunks per decoder batch: bounded memory whatever the tensor size

_LAYERS = (("l0", IN_FEATURES, HIDDEN), ("l1", HIDDEN, HIDDEN), ("l2", HIDDEN, CHUNK))


def _tensor_specs(prefix: str) -> dict[str, tuple[int, ...]]:
    specs: dict[str, tuple[int, ...]] = {f"{prefix}.emb": (N_LEVELS, EMBED)}
    for name, n_in, n_out in _LAYERS:
        specs[f"{prefix}.{name}.weight"] = (n_out, n_in)
        specs[f"{prefix}.{name}.bias"] = (n_out,)
    return specs


DECODER_TENSORS: dict[str, tuple[int, ...]] = _tensor_specs("dec")
ENCODER_TENSORS: dict[str, tuple[int, ...]] = _tensor_specs("enc")


# ------------------------------------------------------------------------------------------------ validation


def _validate(weights: Mapping[str, torch.Tensor], specs: Mapping[str, tuple[int, ...]], what: str) -> None:
    names = set(weights)
    missing, extra = sorted(set(specs) - names), sorted(names - set(specs))
    if missing or extra:
        raise FormatError(f"{ARCH_ID} {what}: missing tensors {missing}, unexpected tensors {extra}")
    for name, shape in specs.items():
        t = weights[name]
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"{ARCH_ID} {what}: {name} is not a tensor")
        if t.dtype != torch.float32:
            raise FormatError(f"{ARCH_ID} {what}: {name} has dtype {t.dtype}, expected torch.float32")
        if tuple(t.shape) != shape:
            raise FormatError(f"{ARCH_ID} {what}: {name} has shape {list(t.shape)}, expected {list(shape)}")
        if not bool(torch.isfinite(t).all()):
            raise FormatError(f"{ARCH_ID} {what}: {name} has non-finite values")


def validate_decoder(weights: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`FormatError` unless ``weights`` are exactly the decoder's tensors (names, shapes, fp32,
    finite)."""
    _validate(weights, DECODER_TENSORS, "decoder")


def validate_encoder(weights: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`FormatError` unless ``weights`` are exactly the encoder's tensors."""
    _validate(weights, ENCODER_TENSORS, "encoder")


def decoder_hash(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex of the decoder's canonical serialisation: for each name in sorted order, the UTF-8 name, the
    dtype name and the shape, each length-prefixed (uint32 little-endian; the shape as rank then uint64 dims),
    then the tensor's little-endian raw bytes (row-major)."""
    validate_decoder(weights)
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().to("cpu").contiguous()
        for field in (name.encode("utf-8"), b"float32"):
            h.update(struct.pack("<I", len(field)) + field)
        h.update(struct.pack("<I", t.dim()) + struct.pack(f"<{t.dim()}Q", *t.shape))
        h.update(t.numpy().astype("<f4", copy=False).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- the networks


def _mlp(inp: torch.Tensor, w: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    h = F.relu(F.linear(inp, w[f"{prefix}.l0.weight"], w[f"{prefix}.l0.bias"]))
    h = F.relu(F.linear(h, w[f"{prefix}.l1.weight"], w[f"{prefix}.l1.bias"]))
    return F.linear(h, w[f"{prefix}.l2.weight"], w[f"{prefix}.l2.bias"])


def encoder_latents(
    x: torch.Tensor, levels: torch.Tensor, step: torch.Tensor, weights: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Continuous latents ``y`` (before rounding), differentiable; ``step`` is a ``[n, 1]`` or 0-d fp32 tensor."""
    s = torch.log2(step).reshape(-1, 1)
    inp = torch.cat([x, s.expand(x.shape[0], 1), weights["enc.emb"][levels]], dim=1)
    return x / step.reshape(-1, 1) + ENCODER_BOUND * torch.tanh(_mlp(inp, weights, "enc"))


def decoder_output(
    q: torch.Tensor, levels: torch.Tensor, step: torch.Tensor, weights: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``x_hat`` from float latents ``q`` (integer-valued), differentiable; ``step`` ``[n, 1]`` or 0-d fp32."""
    st = step.reshape(-1, 1)
    s = torch.log2(st)
    inp = torch.cat([q * st, s.expand(q.shape[0], 1), weights["dec.emb"][levels]], dim=1)
    return st * (q + _mlp(inp, weights, "dec"))


def _check_chunks(t: torch.Tensor, levels: torch.Tensor, what: str) -> None:
    if t.dim() != 2 or t.shape[1] != CHUNK:
        raise ValueError(f"{what} must be [n, {CHUNK}], got {list(t.shape)}")
    if levels.shape != (t.shape[0],):
        raise ValueError(f"levels must be [{t.shape[0]}], got {list(levels.shape)}")
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) >= N_LEVELS):
        raise ValueError(f"levels must lie in [0, {N_LEVELS})")


def _step_tensor(step: float, device: torch.device) -> torch.Tensor:
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be finite and > 0, got {step}")
    return torch.tensor(step, dtype=torch.float32, device=device)


@torch.no_grad()
def decode_chunks(
    q: torch.Tensor, levels: torch.Tensor, step: float, weights: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """fp32 ``[n, 16]`` chunks rebuilt from integer latents ``q`` ``[n, 16]`` and levels ``[n]``, on ``q``'s
    device, in batches of :data:`BATCH_CHUNKS` chunks."""
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"q must be an integer tensor, got {q.dtype}")
    _check_chunks(q, levels, "q")
    dev = q.device
    w = {k: v.to(dev, torch.float32) for k, v in weights.items()}
    st = _step_tensor(step, dev)
    out = torch.empty(q.shape, dtype=torch.float32, device=dev)
    for a in range(0, q.shape[0], BATCH_CHUNKS):
        b = min(a + BATCH_CHUNKS, q.shape[0])
        out[a:b] = decoder_output(q[a:b].to(torch.float32), levels[a:b].to(dev, torch.long), st, w)
    return out


@torch.no_grad()
def encode_chunks(
    x: torch.Tensor, levels: torch.Tensor, step: float, enc_weights: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """int64 latents ``[n, 16]`` of fp32 chunks ``x`` ``[n, 16]`` (row-normalised weights) at ``step``."""
    _check_chunks(x, levels, "x")
    dev = x.device
    w = {k: v.to(dev, torch.float32) for k, v in enc_weights.items()}
    st = _step_tensor(step, dev)
    out = torch.empty(x.shape, dtype=torch.int64, device=dev)
    for a in range(0, x.shape[0], BATCH_CHUNKS):
        b = min(a + BATCH_CHUNKS, x.shape[0])
        y = encoder_latents(x[a:b].to(torch.float32), levels[a:b].to(dev, torch.long), st, w)
        out[a:b] = torch.round(y).to(torch.int64)
    return out
