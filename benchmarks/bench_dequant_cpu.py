"""CPU dequantization throughput of the integer-code layout, against a plain memory copy in the same run.

    python benchmarks/bench_dequant_cpu.py [--rows 4096 --cols 4096 --bits 4 --group-size 128 --repeat 20]

Prints, for a ``rows x cols`` tensor quantized with ``bits`` and ``group_size`` and decoded into bf16:
output GB/s and the ratio to ``torch`` copying the same number of output bytes, for the native kernel, the
torch reference and the whole ``NwcReader.decode`` path (file read, CRC, dequantization). Goal (issue 3):
the decode path reaches at least 0.25 of the memory-copy bandwidth.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import nwcfmt
from nwcfmt.kernels import cpu, reference
from nwcfmt.parallel import num_threads

GOAL = 0.25


def best_of(fn: Callable[[], object], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.rows, args.cols, generator=g) * 0.02).to(torch.bfloat16)
    out_bytes = weight.numel() * 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        with nwcfmt.NwcWriter(path) as writer:
            writer.write("w", weight, "rtn", bits=args.bits, group_size=args.group_size)
        reader = nwcfmt.open(path)
        segments = reader.segments("w")
        from nwcfmt.codecs.quant import layout_of

        layout = layout_of(reader.record("w"))
        packed = segments["data"].view(layout.rows, layout.row_bytes)
        scale, zero = segments["scale"], segments["zero"]
        kernel_args = (packed, scale, zero, layout.bits, layout.group_size, layout.cols, torch.bfloat16)

        source = torch.empty(weight.numel(), dtype=torch.bfloat16).fill_(1)
        target = torch.empty_like(source)
        timings = {
            "memcpy (torch copy_, preallocated)": best_of(lambda: target.copy_(source), args.repeat),
            "memcpy (torch clone, fresh output)": best_of(source.clone, args.repeat),
            "torch reference kernel": best_of(
                lambda: reference.dequantize_packed(*kernel_args), max(3, args.repeat // 5)
            ),
            "NwcReader.decode (CRC on)": best_of(lambda: reader.decode("w"), args.repeat),
            "NwcReader.decode (CRC off)": best_of(lambda: reader.decode("w", verify=False), args.repeat),
        }
        if cpu.available(torch.bfloat16):
            timings["native kernel (fresh output)"] = best_of(lambda: cpu.dequantize_packed(*kernel_args), args.repeat)
            out = torch.empty(layout.rows, layout.cols, dtype=torch.bfloat16)
            timings["native kernel (preallocated output)"] = best_of(
                lambda: cpu.dequantize_packed(*kernel_args, out=out), args.repeat
            )
        reader.close()

    print(f"== CPU dequantization: {args.rows}x{args.cols}, {args.bits}-bit, group {args.group_size} -> bf16 ==")
    print(
        f"cores={os.cpu_count()}, nwcfmt threads={num_threads()} (NWC_THREADS), "
        f"torch threads={torch.get_num_threads()}, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"native kernel: {'built' if cpu.available(torch.bfloat16) else 'NOT built (numpy/torch path)'}")
    memcpy = timings["memcpy (torch copy_, preallocated)"]
    print(f"{'method':40s} {'ms':>8s} {'GB/s out':>9s} {'vs memcpy':>10s}")
    for name, seconds in timings.items():
        print(f"{name:40s} {seconds * 1e3:8.2f} {out_bytes / seconds / 1e9:9.2f} {memcpy / seconds:10.3f}")
    fresh = timings["memcpy (torch clone, fresh output)"]
    for what, seconds, baseline, base_name in (
        ("decode path", timings["NwcReader.decode (CRC on)"], memcpy, "preallocated copy"),
        ("decode path", timings["NwcReader.decode (CRC on)"], fresh, "copy into fresh memory, as a decode must"),
        (
            "kernel, preallocated",
            timings.get("native kernel (preallocated output)", float("inf")),
            memcpy,
            "preallocated copy",
        ),
    ):
        ratio = baseline / seconds
        print(f"goal >= {GOAL}: {what} vs {base_name}: {ratio:.3f} {'MET' if ratio >= GOAL else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
