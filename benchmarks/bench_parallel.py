"""Speedup of 2 workers over 1 on this machine, measured in one run (issue 15).

    python benchmarks/bench_parallel.py torchrun --model smollm2 --codec gptq --blocks 30
    python benchmarks/bench_parallel.py ray --hidden 1024 --layers 8 --codec ecsq

Three runs of the same encode: inline (one process using every core through torch's threads, the default), one
worker and two workers of the engine, each worker on one core. ``2 vs 1`` is the engine's scaling; ``2 vs
inline`` is what it buys on this machine over the default. ``torchrun``: a calibrated encode of a model folder
(ranks of one thread each). ``ray``: a data-free encode of a synthetic checkpoint on local clusters of one and two
one-CPU nodes (start-up timed apart). The outputs are compared byte for byte.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".safetensors")
    return names == sorted(p.name for p in b.iterdir() if p.suffix == ".safetensors") and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names
    )


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def bench_torchrun(args, work: Path) -> None:
    from nwcfmt import data

    src = data.smollm2_dir("float32") if args.model == "smollm2" else Path(args.model)
    cores = os.cpu_count() or 2
    common = ["-m", "nwcfmt.cli.main", "encode", str(src), "--codec", args.codec, "--bits", str(args.bits), "-q",
              "--calib-samples", str(args.calib_samples)]  # fmt: skip
    common += [x for p in args.param for x in ("--param", p)]
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    t0 = timed([sys.executable, *common, "-o", str(work / "inline")], {**os.environ, "OMP_NUM_THREADS": str(cores)})
    t1 = timed([*run, "--nproc-per-node=1", *common, "-o", str(work / "one")], one_thread)
    t2 = timed([*run, "--nproc-per-node=2", *common, "-o", str(work / "two")], one_thread)
    print(f"torchrun {args.codec} on {src.name}: inline ({cores} threads) {t0:.1f} s, 1 rank {t1:.1f} s, "
          f"2 ranks {t2:.1f} s (1 thread each); 2 vs 1: {t1 / t2:.2f}x, 2 vs inline: {t0 / t2:.2f}x")  # fmt: skip
    print(f"same bytes: 2 vs 1 {same_bytes(work / 'one', work / 'two')}, inline vs 2 "
          f"{same_bytes(work / 'inline', work / 'two')}")  # fmt: skip


def bench_ray(args, work: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from nwcfmt.cli.main import parse_params
    from nwcfmt.convert import encode_model
    from nwcfmt.distributed.ray_backend import RayExecutor
    from nwcfmt.policy import Policy
    from nwcfmt.synthetic import write_checkpoint

    src = work / "src"
    src.mkdir()
    inter = round(2.75 * args.hidden / 256) * 256
    total, _ = write_checkpoint(src, args.hidden, args.layers, inter, 300 << 20, vocab=args.vocab)
    params = {"bits": args.bits, **parse_params(tuple(args.param))}
    if args.codec in ("ecsq", "neural"):
        params["calibrate"] = False
    policy = Policy.from_dict({"codec": args.codec, "params": params})
    start = time.perf_counter()
    encode_model(src, work / "inline", policy)
    times = {"inline": time.perf_counter() - start}
    for nodes in (1, 2):
        start = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        executor = RayExecutor(cluster.address)
        boot = time.perf_counter() - start
        try:
            start = time.perf_counter()
            encode_model(src, work / f"ray{nodes}", policy, executor=executor)
            times[nodes] = time.perf_counter() - start
        finally:
            ray.shutdown()
            cluster.shutdown()
        print(f"  {nodes} node(s): {times[nodes]:.1f} s (+{boot:.1f} s start), nodes used {len(executor.nodes_used)}")
    print(f"ray {args.codec} on a {total / 2**20:.0f} MB checkpoint: inline {times['inline']:.1f} s, 1 worker "
          f"{times[1]:.1f} s, 2 workers {times[2]:.1f} s; 2 vs 1: {times[1] / times[2]:.2f}x, 2 vs inline: "
          f"{times['inline'] / times[2]:.2f}x; same bytes: {same_bytes(work / 'inline', work / 'ray2')} (inline vs 2), "
          f"{same_bytes(work / 'ray1', work / 'ray2')} (1 vs 2)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=["torchrun", "ray"])
    parser.add_argument("--model", default="smollm2", help="torchrun: smollm2 or a model folder")
    parser.add_argument("--codec", default=None, help="default: gptq (torchrun), ecsq (ray)")
    parser.add_argument("--bits", type=float, default=4)
    parser.add_argument("--param", action="append", default=[], help="KEY=VALUE codec parameter (repeatable)")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    args.codec = args.codec or ("gptq" if args.engine == "torchrun" else "ecsq")
    if args.codec in ("gptq", "flexround", "lrq", "rtn"):
        args.bits = int(args.bits)
    work = Path(tempfile.mkdtemp(prefix="nwc-par-"))
    try:
        (bench_torchrun if args.engine == "torchrun" else bench_ray)(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
