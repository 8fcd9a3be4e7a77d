"""Train the ``nwc-mlp-1`` encoder and decoder from scratch, deterministically.

    python -m nwcfmt.neural.train --out nwcfmt/neural/nwc-mlp-1.safetensors [--steps N] [--minutes M] [--seed 0]

Data: row-normalised Gaussian, Laplace and Student-t (nu = 4) rows, and all-MiniLM-L6-v2's 2-D weights but
layer 5 (held out for evaluation), cut into 16-row chunks of one column (:mod:`nwcfmt.neural.data`). Each batch
is ``groups`` tensors of ``chunks`` chunks; each group has one latent step, drawn log-uniformly in
``[step_min, step_max]`` (about 7 to 1.3 bits per value for a Gaussian), and each chunk an importance level.
In a quarter of the groups, 5% of the chunks get one value of magnitude 8 to 256 (log-uniform): without them
the decoder, a ReLU network, extrapolates linearly and one 30-sigma weight spoils its whole chunk.

Loss per group, with ``w_l = 2**l`` the level's distortion weight (level 0 is the data-free default; a higher
level is a column whose errors cost more; the latent grid is the tensor's step at every level, so a level can
only move the rounding thresholds and the reconstruction points)::

    mean(w_l * (x_hat - x)**2) / step**2 + beta * rate_bits_per_value

At high rate ECSQ gives ``D = step**2 / 12`` and ``R = h - log2(step)``, so ``dD/dR = -ln(2) step**2 / 6``: with
``beta = ln(2) / 6 = 2 ln(2) / 12`` (about 0.1155) the Lagrangian ``D / step**2 + beta R`` is stationary at the
step the tensor was given. The network therefore has no reason to shift the rate a step means (the bisection
on the step already sets the rate) and spends its freedom on a better trade at that rate, at every step (half
that beta measured far worse: encoder and decoder drift into a shifted latent code).

Gradients: the decoder is trained on the hard latents ``q = round(y)``. The encoder gets the expected loss of
dithered rounding ``round(y + u)``: the rate is the soft-histogram entropy of :mod:`nwcfmt.neural.rate`, the
distortion ``(1 - f) e_lo + f e_hi`` with ``f = y - floor(y)`` and ``e_lo``, ``e_hi`` the decoder's squared
errors at the two integers around ``y`` (a second, gradient-free decoder pass): each value is pushed towards
the integer with the better distortion + rate, which is rate-distortion optimised rounding (``--encoder-grad
ste`` uses a straight-through estimator instead; it measured the same). The last layers start at zero, so
training starts from plain ECSQ (rounding to nearest, midpoint reconstruction).

Determinism: fixed seed, one generator for the data, one CPU thread by default, deterministic algorithms; a
run stops after ``--steps`` (the shipped default); ``--minutes`` is only a safety cap (a run it cuts short is not
reproducible, and it says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from nwcfmt.neural.arch import (
    ARCH_ID,
    CHUNK,
    DECODER_TENSORS,
    ENCODER_BOUND,
    ENCODER_TENSORS,
    HIDDEN,
    IN_FEATURES,
    N_LEVELS,
    decoder_hash,
    decoder_output,
    encoder_latents,
)
from nwcfmt.neural.data import SYNTHETIC_KINDS, minilm_chunks, synthetic_chunks
from nwcfmt.neural.rate import soft_rate
from nwcfmt.neural.weights import METADATA_KEY

BETA = 2 * math.log(2) / 12


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (written to the JSON next to the weights)."""

    steps: int = 5000
    seed: int = 0
    groups: int = 8
    chunks: int = 512
    lr: float = 2e-3
    lr_final: float = 2e-5
    warmup: int = 100
    beta: float = BETA
    step_min: float = 0.015
    step_max: float = 1.5
    level_probs: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    level_weights: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    synthetic_frac: float = 0.5
    minilm: bool = True
    threads: int = 1
    minutes: float = 9.5
    grad_clip: float = 1.0
    encoder_grad: str = "rdo"
    outlier_groups: float = 0.25  # share of groups where chunks get one large value (robustness to outliers)
    outlier_chunks: float = 0.05  # share of such a group's chunks that get one
    outlier_range: tuple[float, float] = (8.0, 256.0)  # magnitudes, log-uniform (row-normalised values)
    ema: float = 0.0  # > 0: ship an exponential moving average of the second half of training
    separable: str = "none"  # "none", "init" (per-channel paths at the start) or "mask" (kept all along)


# ------------------------------------------------------------------------------------------------ parameters


def channel_masks() -> dict[str, torch.Tensor]:
    """0/1 masks that split each MLP into 16 per-channel paths (``HIDDEN / 16`` units per channel per layer);
    ``log2(step)`` and the level embedding reach every unit."""
    per = HIDDEN // CHUNK
    unit = torch.arange(HIDDEN) // per
    m0 = torch.ones(HIDDEN, IN_FEATURES)
    m0[:, :CHUNK] = (unit.reshape(-1, 1) == torch.arange(CHUNK)).float()
    m1 = (unit.reshape(-1, 1) == unit.reshape(1, -1)).float()
    m2 = (torch.arange(CHUNK).reshape(-1, 1) == unit.reshape(1, -1)).float()
    return {"l0": m0, "l1": m1, "l2": m2}


def init_params(gen: torch.Generator, separable: bool = False) -> dict[str, torch.Tensor]:
    """Encoder and decoder tensors: Kaiming-uniform hidden layers (on the per-channel paths only when
    ``separable``), small embeddings, zero last layers (the network starts as plain ECSQ)."""
    masks = channel_masks()
    params: dict[str, torch.Tensor] = {}
    for name, shape in {**ENCODER_TENSORS, **DECODER_TENSORS}.items():
        layer = name.split(".")[1]
        if name.endswith(".emb"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif layer == "l2":
            t = torch.zeros(shape)
        else:
            mask = masks[layer] if separable else torch.ones(shape[0], _fan_in(layer))
            bound = 1 / math.sqrt(float(mask.sum(dim=1).max()))
            t = (torch.rand(shape, generator=gen) * 2 - 1) * bound
            if name.endswith(".weight"):
                t = t * mask
        params[name] = t.to(torch.float32).requires_grad_()
    return params


def _fan_in(layer: str) -> int:
    return DECODER_TENSORS[f"dec.{layer}.weight"][1]


# ------------------------------------------------------------------------------------------------------ data


class Sampler:
    """Draws training groups (one source, one step, per-chunk levels) from one seeded generator."""

    def __init__(self, cfg: TrainConfig, gen: torch.Generator) -> None:
        self.cfg, self.gen = cfg, gen
        self.real = list(minilm_chunks().values()) if cfg.minilm else []
        self.level_probs = torch.tensor(cfg.level_probs, dtype=torch.float64)

    def _source(self) -> torch.Tensor:
        cfg, gen = self.cfg, self.gen
        if not self.real or float(torch.rand((), generator=gen)) < cfg.synthetic_frac:
            kind = SYNTHETIC_KINDS[int(torch.randint(len(SYNTHETIC_KINDS), (), generator=gen))]
            return synthetic_chunks(kind, cfg.chunks, gen)
        t = self.real[int(torch.randint(len(self.real), (), generator=gen))]
        return t[torch.randint(t.shape[0], (cfg.chunks,), generator=gen)]

    def _outliers(self, x: torch.Tensor) -> torch.Tensor:
        """Put one log-uniform large value of random sign into some chunks (``x`` is modified in place)."""
        cfg, gen = self.cfg, self.gen
        if float(torch.rand((), generator=gen)) >= cfg.outlier_groups:
            return x
        rows = torch.nonzero(torch.rand(x.shape[0], generator=gen) < cfg.outlier_chunks).reshape(-1)
        cols = torch.randint(CHUNK, (rows.numel(),), generator=gen)
        lo, hi = (math.log(v) for v in cfg.outlier_range)
        mag = torch.exp(lo + (hi - lo) * torch.rand(rows.numel(), generator=gen))
        sign = torch.randint(2, (rows.numel(),), generator=gen) * 2 - 1
        x[rows, cols] = mag * sign
        return x

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``[G, n, 16]``, levels ``[G, n]``, steps ``[G]``."""
        cfg, gen = self.cfg, self.gen
        x = torch.stack([self._outliers(self._source().clone()) for _ in range(cfg.groups)])
        lo, hi = math.log2(cfg.step_min), math.log2(cfg.step_max)
        steps = torch.exp2(lo + (hi - lo) * torch.rand(cfg.groups, generator=gen))
        levels = torch.multinomial(self.level_probs, cfg.groups * cfg.chunks, replacement=True, generator=gen)
        return x, levels.reshape(cfg.groups, cfg.chunks), steps


# ---------------------------------------------------------------------------------------------------- losses


def forward(
    params: dict[str, torch.Tensor], x: torch.Tensor, levels: torch.Tensor, steps: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch and its parts (distortion in step**2 units, soft and hard rate)."""
    groups, n, _ = x.shape
    st = steps.repeat_interleave(n).reshape(-1, 1)
    lv = levels.reshape(-1)
    xf = x.reshape(-1, CHUNK)
    weight = torch.tensor(cfg.level_weights, dtype=torch.float32)[lv].reshape(-1, 1) / st.square()
    y = encoder_latents(xf, lv, st, params)
    if cfg.encoder_grad == "ste":
        q = y + (torch.round(y) - y).detach()  # straight through: the decoder sees the integers
        dist = (weight * (decoder_output(q, lv, st, params) - xf).square()).reshape(groups, -1).mean(dim=1)
        dist_enc = torch.zeros_like(dist)
    else:
        lo = torch.floor(y.detach())
        q = torch.round(y.detach())
        x_hat = decoder_output(q, lv, st, params)
        err = (x_hat - xf).square()
        dist = (weight * err).reshape(groups, -1).mean(dim=1)
        with torch.no_grad():  # the other candidate: the other integer next to y, in every channel at once
            up = q == lo
            err_alt = (decoder_output(torch.where(up, lo + 1, lo), lv, st, params) - xf).square()
            err_lo = torch.where(up, err.detach(), err_alt)
            err_hi = torch.where(up, err_alt, err.detach())
        frac = y - lo
        dist_enc = (weight * ((1 - frac) * err_lo + frac * err_hi)).reshape(groups, -1).mean(dim=1)
    y_g = y.reshape(groups, n, CHUNK)
    rate = soft_rate(y_g, levels, N_LEVELS)
    loss = (dist + dist_enc + cfg.beta * rate).mean()
    parts = {
        "dist": float(dist.detach().mean()),
        "rate": float(rate.detach().mean()),
    }
    return loss, parts


def _lr_at(i: int, cfg: TrainConfig) -> float:
    if i < cfg.warmup:
        return cfg.lr * (i + 1) / cfg.warmup
    t = (i - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * t))


def train(cfg: TrainConfig, log=print) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Train from scratch; returns the tensors (encoder and decoder) and a run summary."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    params = init_params(gen, separable=cfg.separable != "none")
    masks = channel_masks() if cfg.separable == "mask" else {}
    sampler = Sampler(cfg, gen)
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    start, done, cut = time.monotonic(), 0, False
    running: dict[str, float] = {}
    ema: dict[str, torch.Tensor] = {}
    for i in range(cfg.steps):
        if time.monotonic() - start > cfg.minutes * 60:
            cut = True
            log(f"stopped by --minutes {cfg.minutes} after {i} steps: this run is NOT reproducible")
            break
        for g in opt.param_groups:
            g["lr"] = _lr_at(i, cfg)
        x, levels, steps = sampler.batch()
        loss, parts = forward(params, x, levels, steps, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
        opt.step()
        if cfg.ema > 0 and i >= cfg.steps // 2:
            with torch.no_grad():
                if not ema:
                    ema.update({k: v.detach().clone() for k, v in params.items()})
                for k, v in params.items():
                    ema[k].lerp_(v.detach(), 1 - cfg.ema)
        if masks:
            with torch.no_grad():
                for name, t in params.items():
                    if name.endswith(".weight"):
                        t.mul_(masks[name.split(".")[1]])
        done = i + 1
        parts["loss"] = float(loss.detach())
        for k, v in parts.items():
            running[k] = v if i == 0 else 0.98 * running[k] + 0.02 * v
        if done % max(1, cfg.steps // 20) == 0 or done == cfg.steps:
            log(
                f"step {done:6d}/{cfg.steps}  "
                + "  ".join(f"{k} {v:.4f}" for k, v in running.items())
                + f"  {time.monotonic() - start:.0f}s"
            )
    weights = {k: v.detach().clone().contiguous() for k, v in (ema or params).items()}
    summary = {
        "steps_done": done,
        "cut_by_minutes": cut,
        "wall_s": round(time.monotonic() - start, 1),
        "final_running": {k: round(v, 5) for k, v in running.items()},
    }
    return weights, summary


# ------------------------------------------------------------------------------------------------------ files


def save(weights: dict[str, torch.Tensor], out: Path, cfg: TrainConfig, summary: dict[str, object]) -> str:
    """Write the safetensors file and the JSON beside it; returns the file's sha256."""
    from safetensors.torch import save_file

    dec = {k: v for k, v in weights.items() if k in DECODER_TENSORS}
    meta = {
        "arch": ARCH_ID,
        "decoder_sha256": decoder_hash(dec),
        "encoder_bound": ENCODER_BOUND,
        "hidden": HIDDEN,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    # one metadata key holding canonical JSON: safetensors writes a metadata map in no fixed order
    save_file(weights, str(out), metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    info = {
        "arch": ARCH_ID,
        "file": out.name,
        "sha256": sha,
        "decoder_sha256": meta["decoder_sha256"],
        "config": dataclasses.asdict(cfg),
        "torch": torch.__version__,
        **summary,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return sha


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nwcfmt.neural.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write (a .json goes beside it)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--minutes", type=float, default=TrainConfig.minutes, help="safety cap on the wall time")
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)
    p.add_argument("--groups", type=int, default=TrainConfig.groups, help="tensors per batch")
    p.add_argument("--chunks", type=int, default=TrainConfig.chunks, help="chunks per tensor in a batch")
    p.add_argument("--encoder-grad", choices=("rdo", "ste"), default=TrainConfig.encoder_grad)
    p.add_argument("--beta", type=float, default=TrainConfig.beta, help="rate weight (default 2 ln 2 / 12)")
    p.add_argument("--outlier-groups", type=float, default=TrainConfig.outlier_groups)
    p.add_argument("--ema", type=float, default=TrainConfig.ema, help="weight averaging decay (0: off)")
    p.add_argument("--separable", choices=("none", "init", "mask"), default=TrainConfig.separable)
    p.add_argument("--synthetic-only", action="store_true", help="no MiniLM weights (tests, offline)")
    p.add_argument("--eval-chunks", type=int, default=1 << 14, help="chunks per final evaluation set (0: none)")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        steps=a.steps,
        seed=a.seed,
        threads=a.threads,
        groups=a.groups,
        chunks=a.chunks,
        minutes=a.minutes,
        minilm=not a.synthetic_only,
        encoder_grad=a.encoder_grad,
        separable=a.separable,
        ema=a.ema,
        beta=a.beta,
        outlier_groups=a.outlier_groups,
    )
    weights, summary = train(cfg)
    sha = save(weights, a.out, cfg, summary)
    print(f"wrote {a.out} ({a.out.stat().st_size} bytes, sha256 {sha}) in {summary['wall_s']} s")
    if a.eval_chunks > 0:
        from nwcfmt.neural.evaluate import evaluate, format_table

        print(format_table(evaluate(weights, n_chunks=a.eval_chunks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
