"""Peak anonymous memory of `nwc encode` / `nwc decode` on a synthetic Llama-shaped checkpoint (issue 15's baseline).

    python benchmarks/bench_memory.py --hidden 2048 --layers 8 --steps "encode rtn" "decode" "encode gptq"
    python benchmarks/bench_memory.py --hidden 4096 --layers 72 --drop-source   # 26.8 GB: larger than 24 GB of RAM

Writes a random bf16 LlamaForCausalLM checkpoint (sharded safetensors, SmolLM2's tokenizer so calibrated codecs
run; no transformers model is built, the tensors are written one at a time), then runs each step as a user
would (a ``python -m nwcfmt.cli.main`` subprocess) while the parent samples the child's ``RssAnon`` from
``/proc/PID/status`` every 20 ms. ``RssAnon`` leaves out mapped file pages, which reading a checkpoint through a
memory map touches without allocating. Prints the peak against the checkpoint's size and its largest tensor.
Calibrated steps use ``--calib-samples`` windows (default 8 x 128 tokens, issue 15's figure).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from nwcfmt.synthetic import baseline_mb, run_measured, write_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden, a multiple of 256")
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=128)
    parser.add_argument("--steps", nargs="+", default=["encode rtn", "decode"], help='"encode CODEC" or "decode"')
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--drop-source", action="store_true", help="delete the checkpoint after the last encode (disk)")
    parser.add_argument("--max-shard-size", default=None, help="passed to nwc encode")
    args = parser.parse_args()
    inter = args.intermediate or round(2.75 * args.hidden / 256) * 256
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nwc-mem-"))
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    total, largest = write_checkpoint(src, args.hidden, args.layers, inter, args.shard_mb << 20)
    print(f"checkpoint: {total / 2**20:.0f} MB bf16, largest tensor {largest / 2**20:.0f} MB "
          f"(hidden {args.hidden}, {args.layers} layers, intermediate {inter})", flush=True)  # fmt: skip
    floor = baseline_mb()
    print(f"floor (a process importing what nwc encode imports): {floor:.0f} MB anon", flush=True)
    print(f"{'step':<16} {'seconds':>8} {'peak anon MB':>13} {'x checkpoint':>13} {'(peak-floor)/largest':>21}")
    encoded = None
    last_encode = max((i for i, s in enumerate(args.steps) if s.startswith("encode")), default=-1)
    for i, step in enumerate(args.steps):
        verb, _, codec = step.partition(" ")
        if verb == "encode":
            encoded = work / f"enc-{codec}"
            extra = ["--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
            calibrated = codec in ("gptq", "flexround", "lrq", "ecsq", "neural")
            cmd = ["encode", str(src), "-o", str(encoded), "--codec", codec, "--bits", "4", "-q", "--overwrite"]
            cmd += ["--max-shard-size", args.max_shard_size] if args.max_shard_size else []
            seconds, peak = run_measured(cmd + (extra if calibrated else []))
            if args.drop_source and i == last_encode:
                shutil.rmtree(src)
        elif verb == "decode" and encoded is not None:
            seconds, peak = run_measured(["decode", str(encoded), "-o", str(work / "dec"), "-q", "--overwrite"])
        else:
            raise SystemExit(f"{step!r}: expected 'encode CODEC' or 'decode' after an encode")
        over = (peak - floor) * 2**20 / largest
        print(f"{step:<16} {seconds:8.1f} {peak:13.0f} {peak * 2**20 / total:13.2f} {over:21.2f}", flush=True)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
