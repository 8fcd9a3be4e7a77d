"""Rate-distortion of the network against entropy-coded scalar quantization, on held-out synthetic rows.

    python -m nwcfmt.neural.evaluate [--weights PATH] [--chunks N] [--seed S]

For each source (Gaussian and Laplace rows, row-normalised, drawn with a seed training never uses; ``minilm5``:
MiniLM's layer 5, which training never sees, its six tensors pooled as one) and each target rate, the step is
bisected separately for

* ``ecsq``: ``q = round(x / step)``, reconstructed at each cell's centroid (the mean of the values in it: an
  oracle the decoder would have to be sent), and the same ``q`` at the midpoints ``q * step`` (``mid``);
* ``net``: the network's encoder and decoder at level 0;
* with ``--ablations``: rounding to nearest + the network's decoder (``plain+dec``), and the network's encoder +
  oracle centroids (``enc+orc``), each as its SNR gain over ``ecsq`` at the target rate.

Rates are empirical entropies of ``q`` in bits per value (pooled over the 16 channels, as one table per level
codes them; ``ch`` is the mean of the 16 per-channel entropies). SNR is ``10 log10(var(x) / mse)``; at the target
rate it is interpolated linearly between the two bisection points that bracket the target. The Shannon bound
of a Gaussian is ``D(R) = sigma**2 2**(-2R)``, i.e. ``6.02 R`` dB.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from nwcfmt.neural.arch import decode_chunks, encode_chunks
from nwcfmt.neural.data import minilm_chunks, synthetic_chunks

TARGETS = (2.0, 3.0, 4.0, 5.0, 6.0)
SOURCES = ("gauss", "laplace", "minilm5")
EVAL_SEED = 20250917  # never used by training (training seeds are small integers)


def entropy_bits(q: torch.Tensor) -> float:
    """Empirical entropy (bits per value) of the integers ``q``."""
    counts = torch.unique(q.reshape(-1), return_counts=True)[1].to(torch.float64)
    p = counts / counts.sum()
    return float(-(p * torch.log2(p)).sum())


def channel_entropy(q: torch.Tensor) -> float:
    """Mean over the 16 channels of each channel's empirical entropy."""
    return sum(entropy_bits(q[:, c]) for c in range(q.shape[1])) / q.shape[1]


def ecsq(x: torch.Tensor, step: float) -> dict[str, float]:
    """ECSQ at ``step``: rate, centroid MSE and midpoint MSE."""
    q = torch.round(x / step).to(torch.int64).reshape(-1)
    flat = x.reshape(-1).to(torch.float64)
    idx = q - q.min()
    n_cells = int(idx.max()) + 1
    sums = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, idx, flat)
    counts = torch.zeros(n_cells, dtype=torch.float64).index_add_(0, idx, torch.ones_like(flat))
    centroid = sums / counts.clamp_min(1)
    return {
        "rate": entropy_bits(q),
        "ch": entropy_bits(q),
        "mse": float((centroid[idx] - flat).square().mean()),
        "mse_mid": float((q.to(torch.float64) * step - flat).square().mean()),
    }


def network(x: torch.Tensor, step: float, weights: Mapping[str, torch.Tensor], level: int = 0) -> dict[str, float]:
    """The network at ``step``: pooled and per-channel rate, MSE."""
    levels = torch.full((x.shape[0],), level, dtype=torch.long)
    enc = {k: v for k, v in weights.items() if k.startswith("enc.")}
    dec = {k: v for k, v in weights.items() if k.startswith("dec.")}
    q = encode_chunks(x, levels, step, enc)
    x_hat = decode_chunks(q, levels, step, dec)
    return {
        "rate": entropy_bits(q),
        "ch": channel_entropy(q),
        "mse": float((x_hat.to(torch.float64) - x.to(torch.float64)).square().mean()),
    }


def plain_decoder(x: torch.Tensor, step: float, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Rounding to nearest, rebuilt by the network's decoder."""
    levels = torch.zeros(x.shape[0], dtype=torch.long)
    q = torch.round(x / torch.tensor(step, dtype=torch.float32)).to(torch.int64)
    x_hat = decode_chunks(q, levels, step, {k: v for k, v in weights.items() if k.startswith("dec.")})
    return {"rate": entropy_bits(q), "mse": float((x_hat.to(torch.float64) - x.to(torch.float64)).square().mean())}


def encoder_centroids(x: torch.Tensor, step: float, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The network's encoder, rebuilt at each latent value's centroid (an oracle)."""
    levels = torch.zeros(x.shape[0], dtype=torch.long)
    q = encode_chunks(x, levels, step, {k: v for k, v in weights.items() if k.startswith("enc.")}).reshape(-1)
    flat = x.reshape(-1).to(torch.float64)
    idx = q - q.min()
    sums = torch.zeros(int(idx.max()) + 1, dtype=torch.float64).index_add_(0, idx, flat)
    counts = torch.zeros_like(sums).index_add_(0, idx, torch.ones_like(flat))
    return {"rate": entropy_bits(q), "mse": float(((sums / counts.clamp_min(1))[idx] - flat).square().mean())}


def ablations(weights: Mapping[str, torch.Tensor], n_chunks: int = 1 << 16, seed: int = EVAL_SEED) -> str:
    """SNR gains (dB) over ``ecsq`` at each target rate of ``plain+dec`` and ``enc+orc``, as text."""
    lines = [f"{'source':8} {'R*':>3} {'plain+dec':>9} {'enc+orc':>8} {'net':>7}"]
    for k, source in enumerate(SOURCES):
        x = source_chunks(source, n_chunks, seed + k)
        var = float(x.to(torch.float64).var())
        for target in TARGETS:
            ref = at_rate(lambda s, x=x: ecsq(x, s), target, var)["snr_at_target"]
            gains = [
                at_rate(lambda s, x=x, f=f: f(x, s, weights), target, var)["snr_at_target"] - ref
                for f in (plain_decoder, encoder_centroids, network)
            ]
            lines.append(f"{source:8} {target:3.0f} " + " ".join(f"{g:+9.3f}" for g in gains))
    return "\n".join(lines)


def at_rate(measure: Callable[[float], dict[str, float]], target: float, var: float, tol: float = 2e-3) -> dict:
    """Bisect log2(step) until the rate is within ``tol`` of ``target``; the SNR at exactly ``target`` is
    interpolated between the nearest points above and below it."""
    lo, hi = -12.0, 4.0  # rate falls as the step grows
    seen: list[tuple[float, float, dict[str, float]]] = []
    for _ in range(40):
        mid = (lo + hi) / 2
        m = measure(2.0**mid)
        seen.append((mid, m["rate"], m))
        if abs(m["rate"] - target) < tol:
            break
        lo, hi = (mid, hi) if m["rate"] > target else (lo, mid)
    best = min(seen, key=lambda t: abs(t[1] - target))
    above = min((t for t in seen if t[1] >= target), key=lambda t: t[1], default=best)
    below = max((t for t in seen if t[1] <= target), key=lambda t: t[1], default=best)

    def snr(m: dict[str, float]) -> float:
        return 10 * math.log10(var / m["mse"])

    if above[1] > below[1]:
        w = (target - below[1]) / (above[1] - below[1])
        snr_t = snr(below[2]) + w * (snr(above[2]) - snr(below[2]))
    else:
        snr_t = snr(best[2])
    return {"step": 2.0 ** best[0], **best[2], "snr": snr(best[2]), "snr_at_target": snr_t}


def source_chunks(source: str, n_chunks: int, seed: int) -> torch.Tensor:
    """Held-out chunks: synthetic rows with ``seed``, or ``minilm5`` (MiniLM's layer 5, which training never sees,
    all its tensors pooled as one; at most ``n_chunks`` of them, drawn with ``seed``)."""
    if source != "minilm5":
        return synthetic_chunks(source, n_chunks, torch.Generator().manual_seed(seed))
    x = torch.cat(list(minilm_chunks(holdout=True).values()))
    if x.shape[0] > n_chunks:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n_chunks]]
    return x


def evaluate(weights: Mapping[str, torch.Tensor], n_chunks: int = 1 << 16, seed: int = EVAL_SEED) -> list[dict]:
    """One row per (source, target rate) with the ECSQ and network figures."""
    rows = []
    for k, source in enumerate(SOURCES):
        x = source_chunks(source, n_chunks, seed + k)
        var = float(x.to(torch.float64).var())
        for target in TARGETS:
            e = at_rate(lambda s, x=x: ecsq(x, s), target, var)
            n = at_rate(lambda s, x=x: network(x, s, weights), target, var)
            e_mid = 10 * math.log10(var / e["mse_mid"])
            rows.append(
                {
                    "source": source,
                    "target": target,
                    "var": var,
                    "ecsq": e,
                    "net": n,
                    "ecsq_mid_snr": e_mid,
                    "shannon_snr": 10 * math.log10(4.0) * target if source == "gauss" else float("nan"),
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of :func:`evaluate`'s rows."""
    head = (
        f"{'source':8} {'R*':>3} | {'ecsq step':>9} {'H':>6} {'mse':>10} {'snr':>6} {'mid':>6} | "
        f"{'net step':>9} {'H':>6} {'H ch':>6} {'mse':>10} {'snr':>6} | {'ecsq@R*':>7} {'net@R*':>7} "
        f"{'gain':>6} {'D(R)':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        e, n = r["ecsq"], r["net"]
        lines.append(
            f"{r['source']:8} {r['target']:3.0f} | {e['step']:9.5f} {e['rate']:6.3f} {e['mse']:10.3e} {e['snr']:6.2f} "
            f"{r['ecsq_mid_snr']:6.2f} | {n['step']:9.5f} {n['rate']:6.3f} {n['ch']:6.3f} {n['mse']:10.3e} "
            f"{n['snr']:6.2f} | {e['snr_at_target']:7.2f} {n['snr_at_target']:7.2f} "
            f"{n['snr_at_target'] - e['snr_at_target']:+6.3f} {r['shannon_snr']:6.2f}"
        )
    lines.append(
        "SNR in dB; 'mid': ECSQ at midpoints (same step and rate); gain = net@R* - ecsq@R* (matched rate); "
        "D(R): Gaussian Shannon bound"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nwcfmt.neural.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=None, help="a weights file (default: the shipped one)")
    p.add_argument("--chunks", type=int, default=1 << 16, help="chunks per source (16 values each)")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ablations", action="store_true", help="also the encoder-only and decoder-only gains")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.weights is None:
        from nwcfmt.neural.weights import load_codec

        codec = load_codec()
        weights = {**codec.encoder, **codec.decoder}
    else:
        from safetensors.torch import load_file

        weights = load_file(str(a.weights))
    print(format_table(evaluate(weights, n_chunks=a.chunks, seed=a.seed)))
    if a.ablations:
        print(ablations(weights, n_chunks=a.chunks, seed=a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
