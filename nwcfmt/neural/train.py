"""Train the ``nwc-mlp-1`` encoder and decoder from scratch, deterministically.

    python -m nwcfmt.neural.train --out nwcfmt/neural/nwc-mlp-1.safetensors [--steps N] [--minutes M] [--seed 0]

Data: row-normalised Gaussian, Laplace and Student-t (nu = 4) rows, and all-MiniLM-L6-v2's 2-D weights, cut
into 16-row chunks of one column (:mod:`nwcfmt.neural.data`). Each batch is ``groups`` tensors of ``chunks``
chunks; each group has one latent step, drawn log-uniformly in ``[step_min, step_max]`` (about 7 to 1.3 bits
per value for a Gaussian), and each chunk an importance level.

Loss per group, with ``w_l = 2**l`` the level's distortion weight::

    mean(w_l * (x_hat - x)**2) / step**2 + beta * rate_bits_per_value

At high rate ECSQ gives ``D = step**2 / 12`` and ``R = h - log2(step)``, so ``dD/dR = -ln(2) step**2 / 6``: with
``beta = ln(2) / 6 = 2 ln(2) / 12`` (about 0.1155) the Lagrangian ``D / step**2 + beta R`` is stationary at the
step the tensor was given. The network therefore has no reason to shift the rate a step means (the bisection
on the step already sets the rate) and spends its freedom on a better trade at that rate, at every step. The
rate is the soft-histogram entropy of :mod:`nwcfmt.neural.rate`; the decoder sees the hard latents through a
straight-through estimator. The last layers start at zero, so training starts from plain ECSQ (rounding to
nearest, midpoint reconstruction).

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
    N_LEVELS,
    decoder_hash,
    decoder_output,
    encoder_latents,
)
from nwcfmt.neural.data import SYNTHETIC_KINDS, minilm_chunks, synthetic_chunks
from nwcfmt.neural.rate import hard_rate, soft_rate

BETA = 2 * math.log(2) / 12


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (written to the JSON next to the weights)."""

    steps: int = 3000
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
    minutes: float = 10.0
    grad_clip: float = 1.0


# ------------------------------------------------------------------------------------------------ parameters


def init_params(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Encoder and decoder tensors: Kaiming-uniform hidden layers, small embeddings, zero last layers."""
    params: dict[str, torch.Tensor] = {}
    for name, shape in {**ENCODER_TENSORS, **DECODER_TENSORS}.items():
        if name.endswith(".emb"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif ".l2." in name:
            t = torch.zeros(shape)
        elif name.endswith(".weight"):
            bound = 1 / math.sqrt(shape[1])
            t = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        else:
            fan_in = DECODER_TENSORS[name.replace("enc.", "dec.").replace(".bias", ".weight")][1]
            t = (torch.rand(shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)
        params[name] = t.to(torch.float32).requires_grad_()
    return params


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

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``[G, n, 16]``, levels ``[G, n]``, steps ``[G]``."""
        cfg, gen = self.cfg, self.gen
        x = torch.stack([self._source() for _ in range(cfg.groups)])
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
    y = encoder_latents(x.reshape(-1, CHUNK), lv, st, params)
    q = y + (torch.round(y) - y).detach()  # straight through: the decoder sees the integers
    x_hat = decoder_output(q, lv, st, params)
    weight = torch.tensor(cfg.level_weights, dtype=torch.float32)[lv].reshape(-1, 1)
    dist = (weight * (x_hat - x.reshape(-1, CHUNK)).square() / st.square()).reshape(groups, -1).mean(dim=1)
    y_g = y.reshape(groups, n, CHUNK)
    rate = soft_rate(y_g, levels, N_LEVELS)
    loss = (dist + cfg.beta * rate).mean()
    parts = {
        "dist": float(dist.detach().mean()),
        "rate": float(rate.detach().mean()),
        "rate_hard": float(hard_rate(y_g.detach(), levels, N_LEVELS).mean()),
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
    params = init_params(gen)
    sampler = Sampler(cfg, gen)
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    start, done, cut = time.monotonic(), 0, False
    running: dict[str, float] = {}
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
    weights = {k: v.detach().clone().contiguous() for k, v in params.items()}
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
        "hidden": str(HIDDEN),
        "encoder_bound": repr(ENCODER_BOUND),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata=meta)
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
    p.add_argument("--synthetic-only", action="store_true", help="no MiniLM weights (tests, offline)")
    p.add_argument("--eval-chunks", type=int, default=1 << 15, help="chunks per final evaluation set (0: none)")
    a = p.parse_args(argv)
    cfg = TrainConfig(
        steps=a.steps,
        seed=a.seed,
        threads=a.threads,
        groups=a.groups,
        chunks=a.chunks,
        minutes=a.minutes,
        minilm=not a.synthetic_only,
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
