"""Quality of ``rtn`` on SmolLM2: perplexity against effective bits per weight, with a fake-quant cross-check.

    python benchmarks/bench_rtn_quality.py                      # the full grid (~30 min on 2 cores)
    python benchmarks/bench_rtn_quality.py --quick              # 4-bit and 3-bit g128 only
    python benchmarks/bench_rtn_quality.py --windows 2 --json out.json

Protocol: ``nwc eval``'s (SmolLM2 fp32 folder from ``nwcfmt.data``, the evaluation text, the first
``--windows`` windows of 2048 tokens). Each configuration is encoded with ``nwc``'s own code path (every
Linear of the decoder layers quantized; embeddings, norms and the tied ``lm_head`` stay raw), evaluated from
the NWC folder, and, without the clipping search and for ``--cross-check-groups`` (default: per channel and
g128), cross-checked against an independent fake quantization of the same weights
(``nwcfmt.eval.fakequant`` with fp16 scales): both perplexities must be equal.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from nwcfmt import data
from nwcfmt.convert import encode_model
from nwcfmt.eval.fakequant import fake_quantize_linear_weights
from nwcfmt.eval.loading import load_for_eval
from nwcfmt.eval.perplexity import perplexity
from nwcfmt.eval.report import evaluate_folder, resolve_text
from nwcfmt.policy import Policy

FULL_GRID = [(bits, group) for bits in (8, 4, 3, 2) for group in (0, 128)] + [
    (bits, group) for bits in (4, 3) for group in (64, 32)
]
QUICK_GRID = [(4, 128), (3, 128)]


def label(bits: int, group: int) -> str:
    return f"{bits}-bit {'per-channel' if group == 0 else f'g{group}'}"


def fake_quant_perplexity(src: Path, bits: int, group: int, text: str, windows: int) -> float:
    loaded = load_for_eval(src)
    fake_quantize_linear_weights(loaded.model, bits, None if group == 0 else group, scale_dtype=torch.float16)
    return perplexity(loaded.model, loaded.tokenizer, text, windows=windows).perplexity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="only 4-bit and 3-bit g128")
    parser.add_argument("--no-clip", action="store_true", help="skip the clipping-search variants")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument(
        "--cross-check-groups",
        type=int,
        nargs="*",
        default=[0, 128],
        help="group sizes (0: per channel) whose configs are cross-checked against fake quantization",
    )
    args = parser.parse_args(argv)

    src = data.smollm2_dir("float32")
    text = resolve_text()
    rows = []
    fp = evaluate_folder(src, text=text, windows=args.windows)
    rows.append({"config": "FP (fp32)", "ppl": fp.value, "bits": 32.0, "encode_s": 0.0, "fake_ppl": None})
    print(f"FP: perplexity {fp.value:.3f} ({args.windows} windows)", flush=True)
    grid = QUICK_GRID if args.quick else FULL_GRID
    with tempfile.TemporaryDirectory(prefix="nwc-rtn-") as tmp:
        for bits, group in grid:
            for clip in (False,) if args.no_clip else (False, True):
                folder = Path(tmp) / f"rtn-{bits}-{group}-{int(clip)}"
                policy = Policy(codec="rtn", params={"bits": bits, "group_size": group, "clip_search": clip})
                start = time.perf_counter()
                encode_model(src, folder, policy)
                encode_s = time.perf_counter() - start
                record = evaluate_folder(folder, text=text, windows=args.windows)
                cross_check = not clip and group in args.cross_check_groups
                fake = fake_quant_perplexity(src, bits, group, text.text, args.windows) if cross_check else None
                row = {
                    "config": label(bits, group) + (" +clip" if clip else ""),
                    "ppl": record.value,
                    "bits": record.bits_linear,
                    "encode_s": encode_s,
                    "fake_ppl": fake,
                }
                rows.append(row)
                same = "equal" if fake == record.value else "DIFFERENT"
                check = "" if fake is None else f", fake-quant {fake:.3f} ({same})"
                print(
                    f"{row['config']}: perplexity {record.value:.3f} at {record.bits_linear:.4f} bits/weight "
                    f"(quantized Linear weights), encode {encode_s:.1f} s{check}",
                    flush=True,
                )
                shutil.rmtree(folder)
    print()
    print(f"{'config':24s} {'bits/w':>8s} {'ppl':>9s} {'vs FP':>7s} {'encode s':>9s} {'fake-quant ppl':>15s}")
    for row in rows:
        fake = "" if row["fake_ppl"] is None else f"{row['fake_ppl']:.3f}"
        print(
            f"{row['config']:24s} {row['bits']:8.4f} {row['ppl']:9.3f} {row['ppl'] / fp.value:7.3f} "
            f"{row['encode_s']:9.1f} {fake:>15s}"
        )
    mismatches = [r["config"] for r in rows if r["fake_ppl"] is not None and r["fake_ppl"] != r["ppl"]]
    print(
        f"cross-check: NWC perplexity == fake-quant perplexity for every config without clipping: "
        f"{'yes' if not mismatches else 'NO: ' + ', '.join(mismatches)}"
    )
    if args.json:
        args.json.write_text(json.dumps({"windows": args.windows, "rows": rows}, indent=2))
    return 0 if not mismatches else 1


if __name__ == "__main__":
    raise SystemExit(main())
