"""Speedup of 2 workers over 1 on this machine, measured in one run (issue 15).

    python benchmarks/bench_parallel.py torchrun --model smollm2 --codec gptq --blocks 30
    python benchmarks/bench_parallel.py ray --hidden 1024 --layers 8 --codec ecsq

``torchrun``: a calibrated encode of a model folder, once with one rank using every core (``OMP_NUM_THREADS`` =
the core count) and once with two ranks sharing the cores (``OMP_NUM_THREADS`` = half each): the same cores, so
the ratio is what ownership of Linears buys over torch's own intra-op threads. ``ray``: a data-free encode of a
synthetic checkpoint, inline (one process, every core) against a local Ray cluster of two one-CPU nodes (the
cluster's start-up is timed apart). Both check that the outputs are the same bytes.
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
    env1 = {**os.environ, "OMP_NUM_THREADS": str(cores)}
    env2 = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // 2))}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    t1 = timed([*run, "--nproc-per-node=1", *common, "-o", str(work / "one")], env1)
    t2 = timed([*run, "--nproc-per-node=2", *common, "-o", str(work / "two")], env2)
    print(f"torchrun {args.codec} on {src.name} ({cores} cores): 1 rank x {cores} threads {t1:.1f} s, "
          f"2 ranks x {max(1, cores // 2)} threads {t2:.1f} s, speedup {t1 / t2:.2f}x, "
          f"same bytes: {same_bytes(work / 'one', work / 'two')}")  # fmt: skip


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
    t1 = time.perf_counter() - start
    start = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    executor = RayExecutor(cluster.address)
    boot = time.perf_counter() - start
    try:
        start = time.perf_counter()
        encode_model(src, work / "ray", policy, executor=executor)
        t2 = time.perf_counter() - start
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"ray {args.codec} on a {total / 2**20:.0f} MB checkpoint: inline {t1:.1f} s, 2 Ray nodes x 1 CPU "
          f"{t2:.1f} s (+{boot:.1f} s cluster start), speedup {t1 / t2:.2f}x, nodes used "
          f"{len(executor.nodes_used)}, same bytes: {same_bytes(work / 'inline', work / 'ray')}")  # fmt: skip


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
