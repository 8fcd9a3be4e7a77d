"""Layer loss of the calibrated entropy-coded encoders on real SmolLM2 Linears: a quick way to compare stages.

    python benchmarks/sweep_layer_loss.py --codec ecsq --bits 3 --blocks 2,15 \
        --run feedback=false,levels=1 --run levels=1,act_order=false --run levels=1 --run importance=hdiag --run ""

Each block's Linears get the Hessian of their input on the default calibration text (``--samples`` windows of
256 tokens; full-precision inputs, the earlier blocks are not quantized). Each ``--run`` is a set of calibrated
stage overrides (``levels``, ``feedback``, ``act_order``, ``importance``, ``group``, ``percdamp``; ``""`` is the
defaults) on top of ``--bits``; ``data-free`` is the codec's data-free encoder at the same ``--bits``. The score is
``tr(dW H dW^T) / tr(W H W^T)`` per Linear and its geometric mean, with the record's real bits per weight (the
``neural`` network's share excluded). A training-set proxy: perplexity needs ``bench_nwc.py``. With
``--held-out-seed S`` every run is also scored with the Hessians of other calibration windows (seed ``S``), the
second case a default must hold on.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import torch

from nwcfmt.cli.main import parse_params
from nwcfmt.codecs.gptq import layer_loss
from nwcfmt.codecs.registry import get_codec
from nwcfmt.container.writer import decode_encoded


def hessians(
    blocks: list[int], samples: int, seeds: tuple[int, ...] = (0,)
) -> dict[int, dict[str, tuple[torch.Tensor, list[torch.Tensor]]]]:
    """Per block: Linear name -> (weight, [input Hessian on the calibration windows of each seed])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nwcfmt import data
    from nwcfmt.calibration.blocks import block_linears, capture_inputs, find_layout, run_block
    from nwcfmt.calibration.data import calibration_batches
    from nwcfmt.calibration.hessian import HessianCollector

    src = data.smollm2_dir("float32")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    layout = find_layout(model)
    tokenizer = AutoTokenizer.from_pretrained(src)
    out: dict[int, dict[str, tuple[torch.Tensor, list[torch.Tensor]]]] = {}
    for seed in seeds:
        captured = capture_inputs(layout, calibration_batches(tokenizer, None, samples, 256, seed=seed))
        inputs = captured.inputs
        for i, block in enumerate(layout.blocks[: max(blocks) + 1]):
            kwargs = captured.kwargs[i]
            linears = block_linears(block)
            with torch.no_grad(), HessianCollector(linears) as collector:
                inputs = [run_block(block, x, kwargs) for x in inputs]
            if i in blocks:
                h = collector.hessians()
                layer = out.setdefault(i, {})
                for name, lin in linears.items():
                    layer.setdefault(name, (lin.weight.detach().clone(), []))[1].append(h[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codec", choices=["ecsq", "neural"], default="ecsq")
    parser.add_argument("--bits", type=float, default=3.0)
    parser.add_argument("--blocks", default="2,15")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--run", action="append", default=None)
    parser.add_argument("--seed", type=int, default=0, help="calibration windows the Hessians come from")
    parser.add_argument(
        "--held-out-seed",
        type=int,
        default=None,
        help="also score every run with the Hessian of other calibration windows (a check against fitting the "
        "calibration windows instead of the layer)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = args.run if args.run is not None else ["feedback=false,levels=1", "levels=1", ""]
    codec = get_codec(args.codec)(bits=args.bits)
    seeds = (args.seed,) if args.held_out_seed is None else (args.seed, args.held_out_seed)
    layers = hessians([int(b) for b in args.blocks.split(",")], args.samples, seeds)
    scores: dict[str, list[float]] = {}
    for index, linears in layers.items():
        for name, (weight, (hessian, *held_out)) in linears.items():
            ref = layer_loss(weight, torch.zeros_like(weight), hessian)
            line = [f"block {index} {name:18s}"]
            encoded = codec.encode(weight)
            free = decode_encoded(name, codec, encoded, tuple(weight.shape), torch.float32)
            own = sum(s.numel() * s.element_size() for k, s in encoded.segments.items() if not k.startswith("net."))
            scores.setdefault("data-free", []).append(layer_loss(weight, free, hessian) / ref)
            for h in held_out:
                held = layer_loss(weight, free, h) / layer_loss(weight, torch.zeros_like(weight), h)
                scores.setdefault("data-free (held-out seed)", []).append(held)
            line.append(f"data-free {scores['data-free'][-1]:.5f} @ {8 * own / weight.numel():.3f}")
            for run in runs:
                overrides = parse_params(tuple(filter(None, run.split(","))))
                options = replace(codec.calibration, **overrides)
                start = time.perf_counter()
                draft = codec.encode_with_hessian(weight, hessian, options)
                record = draft.finish(draft.scale)
                own = sum(s.numel() * s.element_size() for k, s in record.segments.items() if not k.startswith("net."))
                loss = layer_loss(weight, draft.values * draft.scale[:, None], hessian) / ref
                scores.setdefault(run or "defaults", []).append(loss)
                took = time.perf_counter() - start
                line.append(f"{run or 'defaults'} {loss:.5f} @ {8 * own / weight.numel():.3f} ({took:.1f} s)")
                for h in held_out:
                    dw = draft.values * draft.scale[:, None]
                    held = layer_loss(weight, dw, h) / layer_loss(weight, torch.zeros_like(weight), h)
                    scores.setdefault(f"{run or 'defaults'} (held-out seed)", []).append(held)
            print(" | ".join(line), flush=True)
    for run, values in scores.items():
        geomean = math.exp(sum(math.log(v) for v in values) / len(values))
        print(f"{run:40s} geometric mean {geomean:.5f} over {len(values)} Linears")


if __name__ == "__main__":
    main()
