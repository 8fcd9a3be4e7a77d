"""Training and evaluation chunks: row normalisation and 16-row chunking, synthetic rows, MiniLM's weights."""

from __future__ import annotations

import math

import torch

from nwcfmt.neural.arch import CHUNK

SYNTHETIC_KINDS = ("gauss", "laplace", "student")
STUDENT_NU = 4.0


def row_normalize(w: torch.Tensor) -> torch.Tensor:
    """``w`` ``[out, in]`` divided row-wise by each row's std (rows with zero std are left as they are)."""
    w = w.to(torch.float32)
    std = w.std(dim=1, keepdim=True, unbiased=False)
    return w / torch.where(std > 0, std, torch.ones_like(std))


def to_chunks(w: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` -> ``[ceil(out / 16) * in, 16]``: 16 consecutive rows of one column per chunk, rows padded
    with zeros to a multiple of 16; chunk ``j * in + c`` holds rows ``16 j .. 16 j + 15`` of column ``c``."""
    out, cols = w.shape
    pad = -out % CHUNK
    if pad:
        w = torch.cat([w, w.new_zeros(pad, cols)])
    return w.reshape(-1, CHUNK, cols).permute(0, 2, 1).reshape(-1, CHUNK)


def synthetic_rows(kind: str, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """``[rows, cols]`` iid values of one distribution (Gaussian, Laplace or Student-t), not yet normalised."""
    if kind == "gauss":
        return torch.randn(rows, cols, generator=gen)
    u = torch.rand(rows, cols, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    if kind == "laplace":
        return (-torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())).to(torch.float32)
    if kind == "student":
        z = torch.randn(rows, cols, generator=gen)
        # chi-square with nu degrees of freedom as a Gamma(nu / 2, 2) draw, from nu standard normals (nu is 4)
        chi2 = torch.randn(rows, cols, int(STUDENT_NU), generator=gen).pow(2).sum(-1)
        return z / torch.sqrt(chi2 / STUDENT_NU)
    raise ValueError(f"unknown synthetic kind {kind!r}")


def synthetic_chunks(kind: str, n_chunks: int, gen: torch.Generator, cols: int = 256) -> torch.Tensor:
    """``[n_chunks, 16]`` chunks of row-normalised synthetic rows with ``cols`` values per row."""
    blocks = math.ceil(n_chunks / cols)
    w = row_normalize(synthetic_rows(kind, blocks * CHUNK, cols, gen))
    return to_chunks(w)[:n_chunks]


MINILM_HOLDOUT = ("encoder.layer.5.",)  # evaluation only: training never sees these tensors


def minilm_chunks(holdout: bool = False) -> dict[str, torch.Tensor]:
    """All-MiniLM-L6-v2's 2-D float weights, row-normalised and chunked (name -> ``[n, 16]``): the training
    tensors, or with ``holdout`` only the held-out ones (:data:`MINILM_HOLDOUT`). Never an evaluation model."""
    from safetensors import safe_open

    from nwcfmt.data import minilm_dir

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as f:
        for name in sorted(f.keys()):
            if name.startswith(MINILM_HOLDOUT) != holdout:
                continue
            t = f.get_tensor(name)
            if t.dim() == 2 and t.dtype.is_floating_point:
                out[name] = to_chunks(row_normalize(t)).contiguous()
    return out
