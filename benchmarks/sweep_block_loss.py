"""Block-output loss of calibrated encoders on single SmolLM2 blocks: a quick way to tune their settings.

    python benchmarks/sweep_block_loss.py --bits 4 --group-size 0 --blocks 3,20 \
        --run gptq --run flexround --run lrq --run "lrq:lr=0.01,scale_lr=0.01"

Each ``--run`` is ``CODEC[:KEY=VALUE,...]``, on top of ``--bits`` and ``--group-size``; values are read as
``nwc encode --param`` reads them (JSON, else a string). Every block listed gets the full-precision inputs of
the calibration batches (the previous blocks are not quantized, unlike ``nwc encode``), and each run
quantizes the block's Linears with the calibrated encoder of its codec. The score is the mean squared error
between the block's output with the decoded weights and its full-precision output, on the same evenly spaced
calibration batches the learned rounding encoders check themselves on (so it is a training-set loss), also
shown relative to ``rtn``'s (``x rtn``, with the ``rtn`` settings learned rounding starts from; at a fractional
``--bits``, for ``ecsq``/``neural``, relative to the first run). With ``--held-out-seed S`` every run is also
scored on ``--samples`` windows drawn with another seed (the held-out column; random windows of the same text,
so a small overlap with the calibration windows is possible). A minute or so per learned-rounding run and
block on 2 cores; perplexity needs ``bench_calibrated.py``.

    python benchmarks/sweep_block_loss.py --bits 3.25 --blocks 3,15 --held-out-seed 1 \
        --run ecsq --run ecsq:tune_uncoded=true
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import click
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nwcfmt import data
from nwcfmt.calibration import get_method
from nwcfmt.calibration.blocks import block_linears, capture_inputs, find_layout, run_block
from nwcfmt.calibration.data import DEFAULT_SAMPLES, DEFAULT_SEQLEN, calibration_batches
from nwcfmt.calibration.hessian import HessianCollector
from nwcfmt.calibration.method import BlockData
from nwcfmt.calibration.reconstruction import block_mse, guard_batches, split_batches
from nwcfmt.cli.main import parse_params


def parse_run(text: str) -> tuple[str, dict[str, Any]]:
    """``CODEC[:KEY=VALUE,...]`` -> (codec id, config overrides), values read as ``nwc encode --param`` reads them."""
    codec, _, rest = text.partition(":")
    try:
        return codec, parse_params(tuple(filter(None, rest.split(","))))
    except click.BadParameter as exc:
        raise SystemExit(f"--run {text!r}: {exc.message}") from None


def weight_params(block: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The block's own parameters with the Linear ``weights`` substituted."""
    params = {name: p.detach() for name, p in block.named_parameters()}
    return {**params, **{f"{name}.weight": w for name, w in weights.items()}}


def run_on_block(block, index: int, inputs, kwargs, runs, args, held=None) -> None:
    """Quantize block ``index`` with every run and print one line per run; ``held``: (inputs, kwargs) of held-out
    windows, scored too."""
    linears = block_linears(block)
    with torch.no_grad(), HessianCollector(linears) as collector:
        outputs = [run_block(block, x, kwargs) for x in inputs]
    block_data = BlockData(index, inputs, kwargs, outputs, collector.hessians(), collector.rows)
    check = guard_batches(split_batches(block_data, 1))
    held_batches = None
    if held is not None:
        with torch.no_grad():
            held_out = [run_block(block, x, held[1]) for x in held[0]]
        held_batches = split_batches(BlockData(index, held[0], held[1], held_out, {}, 0), 1)
    baseline = None
    # The baseline: learned rounding's starting point (no training steps), rtn with the weighted clipping search
    # (integer bits); at a fractional rate the first run is the baseline.
    first = [("rtn", "flexround", {"iters": 0})] if float(args.bits).is_integer() else []
    for label, codec, overrides in [*first, *runs]:
        bits = int(args.bits) if float(args.bits).is_integer() else args.bits
        config = {"bits": bits, **({"group_size": args.group_size} if codec != "ecsq" and codec != "neural" else {})}
        config.update(overrides)
        start = time.perf_counter()
        factory = get_method(codec)
        if factory is None:
            raise SystemExit(f"{codec}: not a calibrated codec")
        method = factory(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(index)
            results = method.quantize_block(block, linears, block_data)
        weights = {n: r.weight.reshape(linears[n].weight.shape) for n, r in results.items()}
        seconds = time.perf_counter() - start
        loss = block_mse(block, weight_params(block, weights), check)
        baseline = loss if baseline is None else baseline
        line = f"{index:>5}  {label:<40} {loss:12.6g} {loss / baseline:7.3f} {seconds:8.1f}"
        if held_batches is not None:
            line += f" {block_mse(block, weight_params(block, weights), held_batches):14.6g}"
        print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=float, default=4, help="integer for gptq/flexround/lrq; any for ecsq/neural")
    parser.add_argument("--group-size", type=int, default=0, help="0: per output channel (default)")
    parser.add_argument("--blocks", default="3,20", help="comma-separated block indices (default: 3,20)")
    parser.add_argument("--run", action="append", default=[], help="CODEC[:KEY=VALUE,...]; repeat")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    parser.add_argument("--seqlen", type=int, default=DEFAULT_SEQLEN)
    parser.add_argument(
        "--held-out-seed", type=int, help="also score on --samples other calibration windows (this seed)"
    )
    args = parser.parse_args(argv)
    runs = [(text, *parse_run(text)) for text in args.run or ["gptq", "flexround", "lrq"]]
    wanted = sorted({int(b) for b in args.blocks.split(",")})

    src = data.smollm2_dir("float32")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    layout = find_layout(model)
    if wanted[-1] >= len(layout.blocks):
        raise SystemExit(f"SmolLM2 has {len(layout.blocks)} blocks (0-{len(layout.blocks) - 1})")
    captured = capture_inputs(layout, calibration_batches(tokenizer, None, args.samples, args.seqlen, 1, 0))
    print(
        f"SmolLM2-135M fp32, {args.bits}-bit, group size {args.group_size or 'per channel'}, "
        f"calibration {args.samples} x {args.seqlen} tokens"
    )
    held = None
    if args.held_out_seed is not None:
        held = capture_inputs(
            layout, calibration_batches(tokenizer, None, args.samples, args.seqlen, 1, args.held_out_seed)
        )
    base = "x rtn" if float(args.bits).is_integer() else "x 1st"
    extra = f" {'held-out MSE':>14}" if held is not None else ""
    print(f"{'block':>5}  {'run':<40} {'block MSE':>12} {base:>7} {'seconds':>8}{extra}")
    inputs, held_inputs = captured.inputs, held.inputs if held is not None else None
    for index, block in enumerate(layout.blocks[: wanted[-1] + 1]):
        kwargs = captured.kwargs[index]
        held_now = (held_inputs, held.kwargs[index]) if held is not None else None
        if index in wanted:
            run_on_block(block, index, inputs, kwargs, runs, args, held_now)
        with torch.no_grad():
            inputs = [run_block(block, x, kwargs) for x in inputs]
            if held is not None:
                held_inputs = [run_block(block, x, held.kwargs[index]) for x in held_inputs]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
