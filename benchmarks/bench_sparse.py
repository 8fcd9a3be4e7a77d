"""Sparse against dense at equal bits on SmolLM2: perplexity, bits per weight from file bytes, encode time.

    python benchmarks/bench_sparse.py                        # every row (about 1.5 hours on 2 cores)
    python benchmarks/bench_sparse.py --only wanda-50,gptq-3 --windows 2

Every row runs ``nwc encode <SmolLM2 fp32> -o <tmp> ARGS`` in its own process, then ``nwc eval --json`` (protocol
nwc-ppl-v1: the evaluation text, the first ``--windows`` windows of 2048 tokens; calibration text and evaluation
text never overlap) and ``nwc info --json``; sparse folders also pass ``nwc verify`` and ``check_sparse.py``
(every pruned weight decodes to +0, N:M groups hold, ``from_pretrained`` loads the same weights). Bits per weight
are the file bytes of the 210 Linear weights of the decoder blocks (mask, values, scales, tables: every segment
of their records) over their weights; the embedding (tied to the head) stays as it is in every row. Rows are
appended to ``--json`` as they finish, so an interrupted run keeps what it measured and a rerun skips those rows
(``--fresh`` runs them again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import nwc, run

from nwcfmt import data

HERE = Path(__file__).resolve().parent
CALIB = ["--calib-samples", "128", "--calib-seqlen", "256"]  # the project's defaults, spelled out
S50 = ["--sparsity", "0.5"]
NM24 = ["--sparsity-pattern", "2:4"]
G4 = ["--codec", "gptq", "--bits", "4"]
# name -> nwc encode arguments (after SRC -o OUT)
ROWS: dict[str, list[str]] = {
    "fp": [],
    # dense at about the bits of 50% sparse + 4-bit values (3.0-3.3 bits a weight)
    "gptq-3": ["--codec", "gptq", "--bits", "3"],
    "rtn-3": ["--codec", "rtn", "--bits", "3"],
    # 50% unstructured: values stored exactly (lossless), then with 4-bit gptq values
    "random-50": ["--prune", "random", *S50, "--codec", "lossless"],
    "magnitude-50": ["--prune", "magnitude", *S50, "--codec", "lossless"],
    "wanda-50": ["--prune", "wanda", *S50, "--codec", "lossless"],
    "sparsegpt-50": ["--prune", "sparsegpt", *S50, "--codec", "lossless"],
    "sparsegpt-50+gptq4": ["--prune", "sparsegpt", *S50, *G4],
    "wanda-50+gptq4": ["--prune", "wanda", *S50, *G4],
    # 2:4
    "magnitude-2:4": ["--prune", "magnitude", *NM24, "--codec", "lossless"],
    "wanda-2:4": ["--prune", "wanda", *NM24, "--codec", "lossless"],
    "sparsegpt-2:4": ["--prune", "sparsegpt", *NM24, "--codec", "lossless"],
    "sparsegpt-2:4+gptq4": ["--prune", "sparsegpt", *NM24, *G4],
    # reconstruction and self-generated calibration text
    "sparsegpt-50+recon": ["--prune", "sparsegpt", *S50, "--reconstruct", "--codec", "lossless"],
    "wanda-50/self": ["--prune", "wanda", *S50, "--codec", "lossless", "--calib", "self"],
    "gptq-3/self": ["--codec", "gptq", "--bits", "3", "--calib", "self"],
    "magnitude-global-50": ["--prune", "magnitude", "--prune-scope", "global", *S50, "--codec", "lossless"],
    # further rows, run when there is time
    "wanda-2:4+gptq4": ["--prune", "wanda", *NM24, *G4],
    "magnitude-2:4+gptq4": ["--prune", "magnitude", *NM24, *G4],
    "magnitude-50+gptq4": ["--prune", "magnitude", *S50, *G4],
    "sparsegpt-50+rtn4": ["--prune", "sparsegpt", *S50, "--codec", "rtn", "--bits", "4"],
    "wanda-50+recon": ["--prune", "wanda", *S50, "--reconstruct", "--codec", "lossless"],
    "sparsegpt-50/self": ["--prune", "sparsegpt", *S50, "--codec", "lossless", "--calib", "self"],
    "gptq-4": G4,
    "ecsq-3.1": ["--codec", "ecsq", "--bits", "3.1"],
}
CALIBRATED = ("--prune wanda", "--prune sparsegpt", "--codec gptq", "--codec ecsq", "--reconstruct")
# llm-compressor's pruning modifiers (benchmarks/peers.py llmc-prune, in llm-compressor's own venv) on the same
# calibration windows: name -> (method, sparsity, pattern). They store dense weights (compressed-tensors dropped
# its sparse formats), so these rows compare perplexity at equal sparsity, not bits.
PEER_ROWS: dict[str, tuple[str, float, str]] = {
    "llmc-sparsegpt-50": ("sparsegpt", 0.5, "unstructured"),
    "llmc-wanda-50": ("wanda", 0.5, "unstructured"),
    "llmc-sparsegpt-2:4": ("sparsegpt", 0.5, "2:4"),
    "llmc-wanda-2:4": ("wanda", 0.5, "2:4"),
}
DEFAULT_LLMC_PYTHON = Path.home() / ".cache" / "nwcfmt-bench" / "llmc-venv" / "bin" / "python"


def linear_bits(folder: Path) -> tuple[float, float, float]:
    """(bits per weight of the block Linears, mean mask bits per weight of the sparse ones, pruned fraction)."""
    doc = json.loads(run(nwc("info", str(folder), "--json"))[0].stdout)
    linears = [t for t in doc["tensors"] if ".layers." in t["name"] and t["name"].endswith("proj.weight")]
    numel = sum(t["numel"] for t in linears)
    bits = 8 * sum(t["stored_bytes"] for t in linears) / numel
    sparse = [t for t in linears if t["codec"] == "sparse"]
    mask = sum(t["details"]["mask_bits_per_weight"] * t["numel"] for t in sparse) / numel if sparse else 0.0
    pruned = sum(t["details"]["sparsity"] * t["numel"] for t in sparse) / numel if sparse else 0.0
    return bits, mask, pruned


def measure(name: str, args: list[str], src: Path, work: Path, windows: int) -> dict:
    if not args:
        folder, seconds = src, 0.0
        bits, mask, pruned = 16.0, 0.0, 0.0  # fp32 on disk; counted as the bf16 it derives from
        checked = 0
    else:
        folder = work / name.replace("/", "_").replace(":", "")
        calib = CALIB if any(c in " ".join(args) for c in CALIBRATED) else []
        _, seconds = run(nwc("encode", str(src), "-o", str(folder), *args, *calib, "-q", "--overwrite", "--no-resume"))
        bits, mask, pruned = linear_bits(folder)
        run(nwc("verify", str(folder), "-q"))
        checked = int(run([sys.executable, str(HERE / "check_sparse.py"), str(folder)])[0].stdout.split()[-1])
    proc, _ = run(nwc("eval", str(folder), "--json", "--no-save", "-q", "--windows", str(windows)))
    result = json.loads(proc.stdout)
    assert result["metric"] == "perplexity"
    ppl = result["value"]
    return {
        "row": name,
        "args": " ".join(args),
        "ppl": round(float(ppl), 3),
        "linear_bpw": round(bits, 4),
        "mask_bpw": round(mask, 4),
        "sparsity": round(pruned, 4),
        "file_bpw_all": result["bits_per_weight"]["all"],
        "encode_s": round(seconds, 1),
        "sparse_checked": checked,  # sparse tensors that verify, decode to their pattern and load alike
        "windows": windows,
    }


def measure_peer(name: str, src: Path, work: Path, windows: int, llmc_python: Path) -> dict:
    """One llm-compressor pruning row: prune in its venv on nwcfmt's calibration windows, then the same eval."""
    from bench_calibrated import calibration_tokens

    from nwcfmt.calibration.data import DEFAULT_SAMPLES, DEFAULT_SEQLEN

    method, sparsity, pattern = PEER_ROWS[name]
    tokens = work / "calib-tokens.pt"
    if not tokens.exists():
        calibration_tokens(src, DEFAULT_SAMPLES, DEFAULT_SEQLEN, tokens)
    folder, result = work / name.replace(":", ""), work / f"{name.replace(':', '')}.json"
    cmd = [str(llmc_python), str(HERE / "peers.py"), "llmc-prune", "--src", str(src), "--out", str(folder)]
    cmd += ["--method", method, "--sparsity", str(sparsity), "--pattern", pattern, "--tokens", str(tokens)]
    _, seconds = run([*cmd, "--result", str(result)])
    stats = json.loads(result.read_text())
    proc, _ = run(nwc("eval", str(folder), "--json", "--no-save", "-q", "--windows", str(windows)))
    record = json.loads(proc.stdout)
    return {
        "row": name,
        "args": f"llm-compressor {stats['version']} {stats['config']['modifier']} {pattern} (dense weights)",
        "ppl": round(float(record["value"]), 3),
        "linear_bpw": None,  # the peer stores dense weights
        "mask_bpw": 0.0,
        "sparsity": round(stats["sparsity"], 4),
        "file_bpw_all": record["bits_per_weight"]["all"],
        "encode_s": round(seconds - stats["eval_copy_s"], 1),
        "sparse_checked": 0,
        "windows": windows,
        "peer": stats,
    }


def table(rows: list[dict]) -> str:
    fp = next((r["ppl"] for r in rows if r["row"] == "fp"), None)
    lines = [
        "| row | nwc encode arguments | Linear bits/weight (file bytes) | of which mask | pruned | perplexity | x FP "
        "| encode s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def bits(value: float | None) -> str:
        return "dense" if value is None else f"{value:.3f}"

    for r in rows:
        ratio = f"{r['ppl'] / fp:.2f}" if fp else "-"
        lines.append(
            f"| {r['row']} | `{r['args']}` | {bits(r['linear_bpw'])} | {r['mask_bpw']:.3f} | {r['sparsity']:.3f} | "
            f"{r['ppl']:.2f} | {ratio} | {r['encode_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated row names")
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows (default 8, the protocol)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "sparse.jsonl")
    parser.add_argument("--fresh", action="store_true", help="rerun rows already in --json")
    parser.add_argument(
        "--llmc-python",
        type=Path,
        default=Path(os.environ.get("NWC_BENCH_LLMC_PYTHON", DEFAULT_LLMC_PYTHON)),
        help="interpreter that has llmcompressor, for the llmc-* rows (its own venv; see benchmarks/README.md)",
    )
    args = parser.parse_args(argv)
    known = {**ROWS, **PEER_ROWS}
    names = args.only.split(",") if args.only else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(known)}")
    done = {}
    if args.json.exists() and not args.fresh:
        for line in args.json.read_text().splitlines():
            row = json.loads(line)
            if row["windows"] == args.windows and known.get(row["row"]) is not None:
                done[row["row"]] = row
    args.json.parent.mkdir(parents=True, exist_ok=True)
    src = data.smollm2_dir("float32")
    print(f"SmolLM2-135M fp32; nwc-ppl-v1, {args.windows} windows; {os.cpu_count()} CPUs", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="nwc-bench-sparse-") as tmp:
        for name in names:
            if name in done:
                rows.append(done[name])
                continue
            try:
                if name in PEER_ROWS:
                    row = measure_peer(name, src, Path(tmp), args.windows, args.llmc_python)
                else:
                    row = measure(name, ROWS[name], src, Path(tmp), args.windows)
            except RuntimeError as exc:
                print(f"{name}: {exc}", flush=True)
                continue
            rows.append(row)
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
            for leftover in Path(tmp).iterdir():  # keep the disk clean between rows
                subprocess.run(["rm", "-rf", str(leftover)], check=False)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
