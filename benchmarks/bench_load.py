"""Load time and peak memory of a 4-bit NWC SmolLM2 against the original safetensors model, in one run.

    python benchmarks/bench_load.py [--bits 4 --group-size 128 --repeat 5 --device cpu --dtype bfloat16]
    python benchmarks/bench_load.py --codecs rtn ecsq neural --target-bits 4

Encodes SmolLM2-135M (bf16) with each of ``--codecs`` (default ``rtn``) once, then loads each model
``--repeat`` times, every load in a fresh Python process (so peak memory is the load's own), with the files in
the page cache (one warm-up load each). Methods:

* ``transformers/original``: ``AutoModelForCausalLM.from_pretrained`` of the bf16 safetensors folder;
* ``transformers/<codec>``: the same call on the NWC folder (``import nwcfmt`` first);
* ``tensors/original``: ``safetensors.torch.load_file`` (``device=``) of the original weights;
* ``tensors/<codec>``: ``nwcfmt.load`` of the NWC folder (on CUDA, the staged stream of
  :mod:`nwcfmt.container.streaming`).

For each it prints the median load time (model construction included for transformers; interpreter and
imports excluded), the ratio to the original in the same run, and resident memory in MB over the process's
state after the imports: ``ΔRSS``, peak RSS (it counts file pages mapped by safetensors, which are page
cache); ``Δanon peak``, peak anonymous memory (sampled every 2 ms: what the load itself allocates); and
``Δanon end``, anonymous memory once loaded (what the weights hold). On a GPU, also peak CUDA memory.
Stored and decoded sizes are printed too, so memory can be read against the decoded model's size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    method, folder, device, dtype_name = sys.argv[1:5]
    import torch
    import transformers
    import safetensors.torch
    import nwcfmt
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    def rss_kb(field="VmRSS"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    import threading

    peak_anon = [0]
    done = threading.Event()

    def sample_anon():  # peak anonymous memory: what the load itself holds (file pages are page cache)
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], rss_kb("RssAnon"))
            done.wait(0.002)

    dtype = getattr(torch, dtype_name)
    base, base_anon = rss_kb(), rss_kb("RssAnon")
    sampler = threading.Thread(target=sample_anon, daemon=True)
    sampler.start()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if method.startswith("transformers"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
        n = sum(p.numel() * p.element_size() for p in model.parameters())
    else:
        if not method.endswith("original"):
            tensors = nwcfmt.load(folder, device=device, dtype=dtype)
        else:
            tensors = safetensors.torch.load_file(folder + "/model.safetensors", device=device)
            # load_file maps the file lazily: copy out, so both sides end with the weights in memory
            tensors = {k: v.to(dtype, copy=True) for k, v in tensors.items()}
        n = sum(t.numel() * t.element_size() for t in tensors.values())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "seconds": seconds,
        "peak_rss_mb": peak / 1024,
        "delta_rss_mb": (peak - base) / 1024,
        "peak_anon_mb": (peak_anon[0] - base_anon) / 1024,
        "anon_mb": (rss_kb("RssAnon") - base_anon) / 1024,
        "bytes": n,
    }
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))
    """
)


def methods(codecs: list[str]) -> list[str]:
    """``transformers/original``, ``transformers/<codec>``..., then the same with ``tensors/``."""
    return [f"{kind}/{name}" for kind in ("transformers", "tensors") for name in ("original", *codecs)]


def run_child(method: str, folder: Path, device: str, dtype: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(folder), device, dtype], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument(
        "--codecs", nargs="+", default=["rtn"], help="NWC folders to load: rtn (--bits, --group-size), ecsq, neural"
    )
    parser.add_argument("--target-bits", type=float, default=4.0, help="ecsq and neural: --bits of the encode")
    args = parser.parse_args(argv)

    from nwcfmt import data
    from nwcfmt.cli.main import cli

    original = data.smollm2_dir("bfloat16")
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"original": original}
        for codec in args.codecs:
            folders[codec] = Path(tmp) / f"smollm2-{codec}"
            options = (
                ["--bits", str(args.bits), "--group-size", str(args.group_size)]
                if codec == "rtn"
                else ["--bits", str(args.target_bits), "--param", "calibrate=false"]  # decode cost only
            )
            cli.main(
                ["encode", str(original), "-o", str(folders[codec]), "--codec", codec, *options, "-q"],
                standalone_mode=False,
            )
        all_methods = methods(args.codecs)
        results: dict[str, list[dict]] = {m: [] for m in all_methods}
        for method in all_methods:  # warm-up: page cache, lazy compilation caches
            run_child(method, folders[method.split("/")[1]], args.device, args.dtype)
        for _ in range(args.repeat):
            for method in all_methods:  # interleaved, so drift hits every method alike
                results[method].append(run_child(method, folders[method.split("/")[1]], args.device, args.dtype))
        stored = {k: folder_bytes(v) for k, v in folders.items()}

    print(
        f"== load SmolLM2-135M: original bf16 safetensors vs NWC {', '.join(args.codecs)} "
        f"(rtn {args.bits}-bit g{args.group_size}; ecsq/neural --bits {args.target_bits}) =="
    )
    print(
        f"device={args.device} dtype={args.dtype} cores={os.cpu_count()} torch={torch.__version__} "
        f"repeat={args.repeat} (median; one process per load; page cache warm)"
    )
    print("weights on disk: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in stored.items()))
    header = (
        f"{'method':24s} {'s':>7s} {'vs original':>12s} {'ΔRSS MB':>9s} {'Δanon peak':>11s} {'Δanon end':>10s} "
        f"{'decoded MB':>11s}"
    )
    print(header + (f" {'CUDA peak MB':>13s}" if args.device.startswith("cuda") else ""))
    for method in all_methods:
        runs = results[method]
        seconds = statistics.median(r["seconds"] for r in runs)
        base = statistics.median(r["seconds"] for r in results[method.split("/")[0] + "/original"])
        line = (
            f"{method:24s} {seconds:7.3f} {base / seconds:11.2f}x "
            f"{statistics.median(r['delta_rss_mb'] for r in runs):9.1f} "
            f"{statistics.median(r['peak_anon_mb'] for r in runs):11.1f} "
            f"{statistics.median(r['anon_mb'] for r in runs):10.1f} {runs[0]['bytes'] / 2**20:11.1f}"
        )
        if args.device.startswith("cuda"):
            line += f" {statistics.median(r['cuda_peak_mb'] for r in runs):13.1f}"
        print(line)
    print("'vs original' > 1 means the NWC load is faster than the original's, same method and run.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
