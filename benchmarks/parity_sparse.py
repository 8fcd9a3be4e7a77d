"""Parity of nwcfmt's pruning with the reference implementations of SparseGPT and Wanda, on the same data.

    python benchmarks/parity_sparse.py --sparsegpt-repo DIR --wanda-repo DIR

Inputs: SmolLM2-135M fp32 (``nwcfmt.data.smollm2_dir``), the Linears ``q_proj``, ``o_proj``, ``up_proj`` and
``down_proj`` of blocks 0 and 5, and their inputs on 16 windows of 128 tokens of nwcfmt's calibration text
(collected once with forward hooks on the transformers model).

* **SparseGPT**: the authors' ``sparsegpt.py`` (IST-DASLab/sparsegpt) is imported from ``--sparsegpt-repo`` (a
  checkout, or a bare git dir: ``sparsegpt.py`` and ``quant.py`` are exported from its HEAD with ``git show`` into
  a temporary folder). Its ``SparseGPT.add_batch`` builds ``H = 2/N sum x x^T`` from the hooked inputs; a copy of
  that ``H`` is given to nwcfmt's :func:`nwcfmt.encoders.prune.sparsegpt`, and ``fasterprune`` runs for 50%
  unstructured and 2:4 (``prunen=2, prunem=4``: 2 *pruned* of 4, which is nwcfmt's ``Pattern(2, 4)``: 2 *kept* of
  4), block size 128, ``percdamp`` 0.01. The reference runs on the CPU as written; only its closing
  ``torch.cuda.synchronize()`` is replaced by a no-op for the call (this torch has no CUDA), and its prints are
  silenced. Its mask is read back as the non-zero entries of the weight it writes into the layer.
* **Wanda**: the reference keeps its metric inside ``prune_wanda`` (a model loop), so the running mean of squared
  input norms is taken from the reference's own ``lib/layerwrapper.py`` (``WrappedGPT.add_batch``, imported from
  ``--wanda-repo`` like above) and only the few lines of the metric and mask are mirrored, line for line, in
  :func:`wanda_reference_mask` (``lib/prune.py`` lines 166-200 at commit 8e8fc87). nwcfmt's
  :func:`nwcfmt.encoders.prune.wanda_mask` gets the SparseGPT reference's ``H`` (``diag H = 2 * scaler_row``).

Reported per Linear and pattern: mask agreement (fraction of equal entries), the agreement over the first block of
128 columns (where both start from the same weights, so only numerics differ), the first column where the masks
differ, the sparsity of each, max ``|dW|`` / max ``|W|`` over entries both keep, the same for nwcfmt run with the
reference's mask fixed (``keep=``: numerics only, no mask decisions), and the layer loss
``tr((W - W^) H (W - W^)^T)`` of each. Prints a markdown table; writes ``benchmarks/results/parity_sparse.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from nwcfmt.codecs.gptq import layer_loss
from nwcfmt.codecs.mask import Pattern
from nwcfmt.encoders.prune import sparsegpt, wanda_mask

HERE = Path(__file__).resolve().parent
BLOCKS = (0, 5)
LINEARS = {
    "q_proj": "self_attn.q_proj",
    "o_proj": "self_attn.o_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
BLOCKSIZE, PERCDAMP, SPARSITY = 128, 0.01, 0.5
PATTERNS = {"50%": (Pattern(), 0, 0), "2:4": (Pattern(2, 4), 2, 4)}  # name -> (nwcfmt pattern, prunen, prunem)


# ------------------------------------------------------------------------------------------ reference code
def _git(repo: Path, *args: str) -> str:
    for flag in (["-C", str(repo)], [f"--git-dir={repo}"]):
        done = subprocess.run(["git", *flag, *args], capture_output=True, text=True)
        if done.returncode == 0:
            return done.stdout
    raise SystemExit(f"{repo}: not a git checkout or git dir ({' '.join(args)} failed)")


def reference_files(repo: Path, files: list[str], tmp: Path) -> tuple[Path, str | None]:
    """The folder holding ``files`` of ``repo`` (a checkout as it is; a bare git dir: exported from HEAD) and the
    commit (None for a checkout that is not a git repository)."""
    if all((repo / f).is_file() for f in files):
        try:
            return repo, _git(repo, "rev-parse", "HEAD").strip()
        except SystemExit:
            return repo, None
    commit = _git(repo, "rev-parse", "HEAD").strip()
    out = tmp / repo.name
    for f in files:
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        (out / f).write_text(_git(repo, "show", f"{commit}:{f}"))
    return out, commit


def load_module(name: str, path: Path, search: Path):
    """Import ``path`` as ``name`` with ``search`` on ``sys.path`` (for the reference's own imports)."""
    sys.path.insert(0, str(search))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(search))
    return module


def wanda_reference_mask(weight: torch.Tensor, scaler_row: torch.Tensor, prune_n: int, prune_m: int) -> torch.Tensor:
    """MIRROR of locuslab/wanda ``lib/prune.py`` (commit 8e8fc87b), ``prune_wanda``, lines 166-176 and 199-200
    (``args.use_variant`` off): returns the reference's ``W_mask`` (True = pruned)."""
    W_metric = torch.abs(weight) * torch.sqrt(scaler_row.reshape((1, -1)))  # line 166
    W_mask = torch.zeros_like(W_metric) == 1  # line 168
    if prune_n != 0:  # lines 169-174: structured n:m sparsity
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii : (ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    else:  # lines 175-176 and 197-200: unstructured
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, : int(W_metric.shape[1] * SPARSITY)]
        W_mask.scatter_(1, indices, True)
    return W_mask


# -------------------------------------------------------------------------------------------------- inputs
def collect(samples: int, seqlen: int) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
    """The weights of the chosen Linears and their inputs per calibration batch (``[b, seqlen, cols]``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nwcfmt import data
    from nwcfmt.calibration.data import calibration_batches

    folder = data.smollm2_dir("float32")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batches = calibration_batches(tokenizer, samples=samples, seqlen=seqlen)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    weights, inputs, handles = {}, {}, []
    for b in BLOCKS:
        block = model.model.layers[b]
        for short, path in LINEARS.items():
            name = f"{b}.{short}"
            module = block.get_submodule(path)
            weights[name] = module.weight.detach().clone()
            inputs[name] = []
            handles.append(module.register_forward_hook(lambda _m, inp, _o, n=name: inputs[n].append(inp[0].clone())))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return weights, inputs


# ---------------------------------------------------------------------------------------------- comparison
def linear_of(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.clone()
    return layer


def reference_sparsegpt(ref, weight: torch.Tensor, hessian: torch.Tensor, prunen: int, prunem: int) -> torch.Tensor:
    """The reference ``fasterprune`` on a fresh layer, from a copy of ``hessian``; returns the pruned weight."""
    gpt = ref.SparseGPT(linear_of(weight))
    gpt.H = hessian.clone()
    with mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None), contextlib.redirect_stdout(io.StringIO()):
        gpt.fasterprune(SPARSITY, prunen=prunen, prunem=prunem, blocksize=BLOCKSIZE, percdamp=PERCDAMP)
    return gpt.layer.weight.data.clone()


def compare(weight, hessian, keep_ref, w_ref, keep_nwc, w_nwc, w_fixed) -> dict:
    wmax = float(weight.abs().max())
    both = keep_ref & keep_nwc
    differ = (keep_ref != keep_nwc).any(0).nonzero()
    return {
        "mask_agree": float((keep_ref == keep_nwc).float().mean()),
        "block0_agree": float((keep_ref[:, :BLOCKSIZE] == keep_nwc[:, :BLOCKSIZE]).float().mean()),
        "first_diff_col": int(differ[0]) if differ.numel() else None,
        "sparsity_ref": 1 - float(keep_ref.float().mean()),
        "sparsity_nwc": 1 - float(keep_nwc.float().mean()),
        "dw_rel": float((w_ref - w_nwc)[both].abs().max()) / wmax if both.any() else 0.0,
        "dw_rel_fixed_mask": float((w_ref - w_fixed)[keep_ref].abs().max()) / wmax,
        "loss_ref": layer_loss(weight, w_ref, hessian),
        "loss_nwc": layer_loss(weight, w_nwc, hessian),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sparsegpt-repo", type=Path, required=True, help="IST-DASLab/sparsegpt checkout or git dir")
    p.add_argument("--wanda-repo", type=Path, required=True, help="locuslab/wanda checkout or git dir")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=HERE / "results" / "parity_sparse.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()

    with tempfile.TemporaryDirectory() as tmp:
        sg_dir, sg_commit = reference_files(args.sparsegpt_repo, ["sparsegpt.py", "quant.py"], Path(tmp))
        wd_dir, wd_commit = reference_files(args.wanda_repo, ["lib/layerwrapper.py"], Path(tmp))
        ref = load_module("ref_sparsegpt", sg_dir / "sparsegpt.py", sg_dir)
        ref_wanda = load_module("ref_wanda_layerwrapper", wd_dir / "lib" / "layerwrapper.py", wd_dir / "lib")

    weights, inputs = collect(args.samples, args.seqlen)
    rows = []
    for name, weight in weights.items():
        layer = linear_of(weight)
        gpt, wrapped = ref.SparseGPT(layer), ref_wanda.WrappedGPT(layer)
        for x in inputs[name]:
            gpt.add_batch(x, None)
            wrapped.add_batch(x, None)
        hessian = gpt.H.clone()  # the reference's H, before fasterprune modifies it
        for pname, (pattern, prunen, prunem) in PATTERNS.items():
            w_ref = reference_sparsegpt(ref, weight, hessian, prunen, prunem)
            keep_ref = w_ref != 0
            res = sparsegpt(
                weight, hessian, sparsity=SPARSITY, pattern=pattern, block_size=BLOCKSIZE, percdamp=PERCDAMP
            )
            fixed = sparsegpt(weight, hessian, keep=keep_ref, block_size=BLOCKSIZE, percdamp=PERCDAMP)
            row = {"method": "sparsegpt", "linear": name, "pattern": pname, "shape": list(weight.shape)}
            row.update(compare(weight, hessian, keep_ref, w_ref, res.keep, res.weight, fixed.weight))
            rows.append(row)

            keep_ref = ~wanda_reference_mask(weight, wrapped.scaler_row, prunen, prunem)
            keep_nwc = wanda_mask(weight, hessian, SPARSITY, pattern)
            w_ref, w_nwc = weight * keep_ref, weight * keep_nwc
            row = {"method": "wanda", "linear": name, "pattern": pname, "shape": list(weight.shape)}
            row.update(compare(weight, hessian, keep_ref, w_ref, keep_nwc, w_nwc, w_ref))
            row["mask_disagree"] = int((keep_ref != keep_nwc).sum())
            rows.append(row)
        print(f"{name} done ({time.time() - start:.0f} s)", file=sys.stderr)

    print(
        "| method | linear | pattern | mask agree | block-0 agree | 1st diff col | sparsity ref / nwc "
        "| max dW/max W | same, ref mask | loss ref | loss nwc | nwc/ref |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = "-" if r["first_diff_col"] is None else r["first_diff_col"]
        print(
            f"| {r['method']} | {r['linear']} | {r['pattern']} | {r['mask_agree']:.5f} | {r['block0_agree']:.5f} "
            f"| {first} | {r['sparsity_ref']:.4f} / {r['sparsity_nwc']:.4f} | {r['dw_rel']:.2e} "
            f"| {r['dw_rel_fixed_mask']:.2e} | {r['loss_ref']:.5g} | {r['loss_nwc']:.5g} "
            f"| {r['loss_nwc'] / r['loss_ref']:.4f} |"
        )
    result = {
        "protocol": {
            "model": "SmolLM2-135M fp32 (nwcfmt.data.smollm2_dir)",
            "blocks": list(BLOCKS),
            "linears": list(LINEARS),
            "calibration": {"samples": args.samples, "seqlen": args.seqlen, "text": "nwcfmt default", "seed": 0},
            "sparsity": SPARSITY,
            "blocksize": BLOCKSIZE,
            "percdamp": PERCDAMP,
            "hessian": "reference SparseGPT.add_batch (fp32), shared by both",
            "sparsegpt_ref": {"repo": "IST-DASLab/sparsegpt", "commit": sg_commit},
            "wanda_ref": {"repo": "locuslab/wanda", "commit": wd_commit, "mirrored": "lib/prune.py:166-200"},
            "torch": torch.__version__,
            "threads": args.threads,
            "seconds": round(time.time() - start, 1),
        },
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
