"""The NWC codecs (``ecsq``, ``neural``), data-free and calibrated (``cal-ecsq``, ``cal-neural``): rate-distortion
on Gaussian rows, SmolLM2 perplexity and MiniLM cosine against measured bits per weight beside rtn and HQQ (and
bench_calibrated.py's gptq, flexround, lrq rows in the plot), encode time and peak memory, and speed.

    python benchmarks/bench_nwc.py gaussian                    # RD on Gaussian rows vs D(R) and ECSQ theory (~1 min)
    python benchmarks/bench_nwc.py smollm2 [--bits 2.5 3 3.5 4 5] [--codecs ecsq neural rtn rtn-clip hqq]
    python benchmarks/bench_nwc.py minilm  [--bits ...]        # embedding cosine against the fp32 original
    python benchmarks/bench_nwc.py speed                       # encode, CPU decode, entropy stage vs constriction
    python benchmarks/bench_nwc.py smollm2 --codecs ecsq:refit=false --bits 2.5 4   # an ablation: codec:k=v,...
    python benchmarks/bench_nwc.py smollm2 --codecs cal-neural:finetune=false --bits 3.25 --keep /tmp/kept
    python benchmarks/bench_nwc.py report --plot rd.png        # tables (markdown) and the RD plot

Each model encode runs in a fresh process (its peak anonymous memory sampled every 0.2 s, and its peak RSS).
Rows go to ``benchmarks/results/nwc.json`` (``--json``) as they are measured; a row already there for the same
protocol is kept (``--fresh`` re-measures). Bits per weight are file bytes over the encoded Linear weights
(``nwc info``'s figure: every segment, shared decoder weights amortised), for every codec; rtn and HQQ are at
their integer widths (g128), their scales and zeros included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "nwc.json"
LATENT_CODECS = ("ecsq", "neural")


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------ results file
def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"rows": []}


def save_row(path: Path, row: dict) -> None:
    doc = load_results(path)
    doc["rows"] = [r for r in doc["rows"] if r["key"] != row["key"]] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def have(path: Path, key: str, fresh: bool) -> bool:
    return not fresh and any(r["key"] == key for r in load_results(path)["rows"])


# ------------------------------------------------------------------------------------------ Gaussian rows
def ecsq_theory(bits: float) -> float:
    """Distortion of a uniform-threshold quantizer with centroid reconstruction of N(0,1) at entropy ``bits``."""
    from math import erf, pi, sqrt

    def at(step: float) -> tuple[float, float]:
        k = np.arange(-int(12 / step) - 2, int(12 / step) + 3)
        lo, hi = (k - 0.5) * step, (k + 0.5) * step
        cdf = lambda x: 0.5 * (1 + np.vectorize(erf)(x / sqrt(2)))  # noqa: E731
        pdf = lambda x: np.exp(-x * x / 2) / sqrt(2 * pi)  # noqa: E731
        p = cdf(hi) - cdf(lo)
        m1 = pdf(lo) - pdf(hi)  # integral of x phi(x)
        m2 = (cdf(hi) - cdf(lo)) + (lo * pdf(lo) - hi * pdf(hi))  # integral of x^2 phi(x)
        ok = p > 1e-300
        rate = float(-(p[ok] * np.log2(p[ok])).sum())
        dist = float((m2[ok] - m1[ok] ** 2 / p[ok]).sum())
        return rate, dist

    lo, hi = 1e-3, 10.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if at(mid)[0] > bits else (lo, mid)
    return at(hi)[1]


def run_gaussian(args) -> None:
    import nwcfmt
    from nwcfmt import NwcReader

    g = torch.Generator().manual_seed(1234)
    w = torch.randn(1024, 2048, generator=g)  # held out: not a seed any training used
    with tempfile.TemporaryDirectory() as tmp:
        for codec in args.codecs:
            if codec not in LATENT_CODECS:
                continue
            for bits in args.bits:
                key = f"gaussian/{codec}/{bits}"
                if have(args.json, key, args.fresh):
                    continue
                path = Path(tmp) / "g.safetensors"
                start = time.perf_counter()
                nwcfmt.save({"w": w}, path, codec=codec, bits=bits)
                encode_s = time.perf_counter() - start
                rate = 8 * NwcReader(path).stored_bytes("w") / w.numel()
                mse = float(((nwcfmt.load(path)["w"] - w) ** 2).mean())
                row = {
                    "key": key,
                    "section": "gaussian",
                    "codec": codec,
                    "bits_target": bits,
                    "bits": rate,
                    "mse": mse,
                    "shannon_mse": 2.0 ** (-2 * rate),
                    "ecsq_theory_mse": ecsq_theory(rate),
                    "gap_to_shannon_bits": 0.5 * math.log2(1 / mse) - rate,
                    "encode_s": encode_s,
                    "shape": list(w.shape),
                    "machine": machine(),
                }
                save_row(args.json, row)
                print(
                    f"{codec} target {bits}: {rate:.4f} bits/w, mse {mse:.4e} (D(R) {row['shannon_mse']:.4e}, "
                    f"ECSQ theory {row['ecsq_theory_mse']:.4e}), gap to D(R) {-row['gap_to_shannon_bits']:.3f} bit",
                    flush=True,
                )


# ------------------------------------------------------------------------------------------ models
def split_codec(codec: str) -> tuple[str, dict]:
    """``"ecsq:refit=false,centroids=true"`` -> ``("ecsq", {"refit": False, "centroids": True})``."""
    name, _, extra = codec.partition(":")
    params = {}
    for item in filter(None, extra.split(",")):
        key, _, value = item.partition("=")
        params[key] = json.loads(value)
    return name, params


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _anon_kb() -> int:
    return _status_kb("RssAnon")


def _encode_child(src: str, dst: str, codec: str, bits: float, queue) -> None:
    import threading

    torch.set_num_threads(os.cpu_count() or 1)
    peak = [_anon_kb()]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _anon_kb())

    threading.Thread(target=watch, daemon=True).start()
    seconds = encode_folder(Path(src), Path(dst), codec, bits)
    done.set()
    peak[0] = max(peak[0], _anon_kb())
    queue.put((seconds, peak[0] / 1024, _status_kb("VmHWM") / 1024))


def encode_measured(src: Path, dst: Path, codec: str, bits: float) -> tuple[float, float, float]:
    """Encode in a fresh process: (seconds, peak anonymous memory in MB sampled every 0.2 s, peak RSS in MB
    (``VmHWM``: bench_calibrated's figure, which also counts mapped file pages))."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_encode_child, args=(str(src), str(dst), codec, bits, queue))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"encode of {codec} at {bits} failed (exit {child.exitcode})")
    return queue.get()


def encode_folder(src: Path, dst: Path, codec: str, bits: float) -> float:
    from nwcfmt.convert import encode_model
    from nwcfmt.policy import Policy

    name, extra = split_codec(codec)
    if name.startswith("cal-"):  # calibrated (the pipeline's default calibration text and settings)
        from nwcfmt.calibration import get_method
        from nwcfmt.calibration.pipeline import encode_calibrated

        quantizer = get_method(name.removeprefix("cal-"))({"bits": bits, **extra})
        start = time.perf_counter()
        encode_calibrated(src, dst, quantizer, overwrite=True)
        return time.perf_counter() - start
    if name in LATENT_CODECS:
        policy = Policy(codec=name, params={"bits": bits, **extra})
    else:
        policy = Policy(codec="rtn", params={"bits": int(bits), "group_size": 128, "clip_search": codec == "rtn-clip"})
    start = time.perf_counter()
    encode_model(src, dst, policy, overwrite=True)
    return time.perf_counter() - start


def run_models(args, model: str) -> None:
    import sys

    from nwcfmt import data
    from nwcfmt.eval.report import evaluate_folder, resolve_text

    sys.path.insert(0, str(HERE))
    from peers import quantize_hqq

    src = data.smollm2_dir("float32") if model == "smollm2" else data.minilm_dir()
    text = resolve_text()
    reference = None if model == "smollm2" else src
    kwargs = {"windows": args.windows} if model == "smollm2" else {"reference": reference}
    key = f"{model}/fp"
    if not have(args.json, key, args.fresh):
        rec = evaluate_folder(src, text=text, **kwargs)
        save_row(args.json, {"key": key, "section": model, "codec": "fp32", "bits": 32.0, "metric": rec.metric,
                             "value": rec.value, "machine": machine()})  # fmt: skip
        print(f"{model} fp32: {rec.metric} {rec.value:.4f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="nwc-bench-") as tmp:
        for codec in args.codecs:
            latent = split_codec(codec)[0].removeprefix("cal-") in LATENT_CODECS
            bits_list = args.bits if latent else sorted({int(b) for b in args.bits if b >= 2})
            for bits in bits_list:
                key = f"{model}/{codec}/{bits}"
                if have(args.json, key, args.fresh):
                    continue
                folder = (args.keep or Path(tmp)) / f"{model}-{codec}-{bits}".replace(":", "_").replace(",", "_")
                peak_anon_mb = peak_rss_mb = None
                if codec == "hqq":
                    stats = quantize_hqq(src, folder, int(bits), 128)
                    encode_s, bits_linear = stats["quantize_s"], stats["bits_per_weight"]
                    rec = evaluate_folder(folder, text=text, **kwargs)
                else:
                    encode_s, peak_anon_mb, peak_rss_mb = encode_measured(src, folder, codec, bits)
                    rec = evaluate_folder(folder, text=text, **kwargs)
                    bits_linear = rec.bits_linear
                row = {
                    "key": key,
                    "section": model,
                    "codec": codec,
                    "bits_target": bits,
                    "bits": bits_linear,
                    "metric": rec.metric,
                    "value": rec.value,
                    "encode_s": encode_s,
                    "encode_peak_anon_mb": peak_anon_mb,
                    "encode_peak_rss_mb": peak_rss_mb,
                    "load_s": rec.load_seconds,
                    "windows": args.windows if model == "smollm2" else None,
                    "machine": machine(),
                }
                save_row(args.json, row)
                print(f"{model} {codec} {bits}: {rec.metric} {rec.value:.4f} at {bits_linear:.4f} bits/w "
                      f"(encode {encode_s:.1f} s)", flush=True)  # fmt: skip
                if args.keep is None:
                    shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------ speed
def run_speed(args) -> None:
    import constriction

    import nwcfmt
    from nwcfmt.codecs import get_codec
    from nwcfmt.codecs.ecsq import EcsqCodec
    from nwcfmt.container.reader import NwcReader
    from nwcfmt.entropy import rans
    from nwcfmt.parallel import num_threads

    g = torch.Generator().manual_seed(7)
    w = (torch.randn(4096, 4096, generator=g) * 0.02).bfloat16()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for codec in [c for c in args.codecs if c in LATENT_CODECS]:
            path = Path(tmp) / f"{codec}.safetensors"
            start = time.perf_counter()
            nwcfmt.save({"w": w}, path, codec=codec, bits=4.0)
            encode_s = time.perf_counter() - start
            reader = NwcReader(path)
            reader.decode("w")  # warm
            times = []
            for _ in range(3):
                start = time.perf_counter()
                reader.decode("w")
                times.append(time.perf_counter() - start)
            decode_s = min(times)
            record, segments = reader.record("w"), reader.segments("w")
            stream = EcsqCodec.stream(segments)
            freqs = segments["tables"].numpy()
            cls = get_codec(codec)
            lay = cls.layout(record)
            ctx = lay.context(None)
            entropy_times = {}
            for threads in sorted({1, num_threads()}):
                os.environ["NWC_THREADS"] = str(threads)
                start = time.perf_counter()
                rans.decode(stream, freqs, ctx, lay.n_symbols, lay.lane_symbols)
                entropy_times[threads] = time.perf_counter() - start
            os.environ.pop("NWC_THREADS", None)
            symbols = cls.decode_symbols(record, segments).numpy().astype(np.int32)
            # constriction: one categorical model (the same integer table), one coder, the same symbols
            probs = (freqs[0].astype(np.float64) + 0) / (1 << 15)
            used = probs > 0
            model = constriction.stream.model.Categorical(probs[used], perfect=False)
            remap = np.cumsum(used) - 1
            sym_c = remap[symbols].astype(np.int32)
            coder = constriction.stream.stack.AnsCoder()
            start = time.perf_counter()
            coder.encode_reverse(sym_c, model)
            c_encode_s = time.perf_counter() - start
            compressed = coder.get_compressed()
            decoder = constriction.stream.stack.AnsCoder(compressed)
            start = time.perf_counter()
            out = decoder.decode(model, sym_c.size)
            c_decode_s = time.perf_counter() - start
            assert (out == sym_c).all()
            n = symbols.size
            row = {
                "key": f"speed/{codec}",
                "section": "speed",
                "codec": codec,
                "shape": list(w.shape),
                "dtype": "bfloat16",
                "encode_s": encode_s,
                "decode_s": decode_s,
                "weights_per_s": w.numel() / decode_s,
                "entropy_msym_s": {str(t): n / s / 1e6 for t, s in entropy_times.items()},
                "constriction_decode_msym_s": n / c_decode_s / 1e6,
                "constriction_encode_msym_s": n / c_encode_s / 1e6,
                "bits_rans": 8 * stream.nbytes / n,
                "bits_constriction": 32 * compressed.size / n,
                "threads": num_threads(),
                "machine": machine(),
            }
            save_row(args.json, row)
            rows.append(row)
            print(json.dumps(row, indent=1), flush=True)


# ------------------------------------------------------------------------------------------ report
def calibrated_peers(path: Path, methods: tuple[str, ...] = ("gptq", "flexround", "lrq", "hqq")) -> dict:
    """bench_calibrated.py's rows (same perplexity protocol): "method grouping" -> [(bits per weight, ppl)]."""
    if not path.exists():
        return {}
    out: dict[str, list[tuple[float, float]]] = {}
    for r in json.loads(path.read_text())["rows"]:
        if r["method"] in methods and r["status"] == "ok" and r["ppl"] < 200:  # keep the axis readable
            grouping = "g128" if r["config"].endswith("g128") else "per channel"
            out.setdefault(f"{r['method']} {grouping}", []).append((r["bits_linear"], r["ppl"]))
    return out


def run_report(args) -> None:
    rows = load_results(args.json)["rows"]
    for section in ("gaussian", "smollm2", "minilm"):
        sel = sorted((r for r in rows if r["section"] == section), key=lambda r: (r["codec"], r["bits"]))
        if not sel:
            continue
        print(f"\n### {section}\n")
        if section == "gaussian":
            print("| codec | target | bits/w | MSE | D(R) | ECSQ theory | gap to D(R), bits |")
            print("|---|---|---|---|---|---|---|")
            for r in sel:
                print(f"| {r['codec']} | {r['bits_target']} | {r['bits']:.4f} | {r['mse']:.4e} | {r['shannon_mse']:.4e}"
                      f" | {r['ecsq_theory_mse']:.4e} | {-r['gap_to_shannon_bits']:.3f} |")  # fmt: skip
        else:
            print("| codec | target | bits/w | metric | encode s | peak anon / RSS MB |\n|---|---|---|---|---|---|")
            for r in sel:
                enc = f"{r['encode_s']:.1f}" if "encode_s" in r else ""
                mem = r.get("encode_peak_anon_mb")
                mem = f"{mem:.0f} / {r.get('encode_peak_rss_mb') or 0:.0f}" if mem else ""
                print(f"| {r['codec']} | {r.get('bits_target', '')} | {r['bits']:.3f} | {r['value']:.4f} | {enc} "
                      f"| {mem} |")  # fmt: skip
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(18, 6))
        for ax, section in zip(axes, ("gaussian", "smollm2", "minilm"), strict=True):
            sel = [r for r in rows if r["section"] == section and r["codec"] != "fp32"]
            for codec in sorted({r["codec"] for r in sel}):
                pts = sorted((r["bits"], r["mse"] if section == "gaussian" else r["value"]) for r in sel
                             if r["codec"] == codec)  # fmt: skip
                style = {"marker": "o"} if len(pts) > 1 else {"marker": "x", "linestyle": "none"}  # ablations
                ax.plot(*zip(*pts, strict=True), label=codec, **style)
            if section == "smollm2":
                for method, pts in calibrated_peers(args.json.parent / "calibrated-smollm2.json").items():
                    dash = "--" if method.endswith("g128") else ":"
                    ax.plot(*zip(*sorted(pts), strict=True), marker="s", linestyle=dash, label=method)
            if section == "gaussian" and sel:
                xs = np.linspace(1.8, 6.2, 50)
                ax.plot(xs, 2.0 ** (-2 * xs), "k--", label="D(R)")
                ax.plot(xs, [ecsq_theory(x) for x in xs], "k:", label="ECSQ theory")
                ax.set_yscale("log")
                ax.set_ylabel("MSE")
            elif section == "smollm2":
                ax.set_yscale("log")
                ax.set_ylabel("perplexity (nwc eval)")
                ax.set_ylim(20, 400)  # rtn 2-bit (7e6) and HQQ 3-bit (554) are off the chart; room for the legend
                fp = [r["value"] for r in rows if r["key"] == "smollm2/fp"]
                if fp:
                    ax.axhline(fp[0], color="gray", lw=0.8, label="fp32")
            else:
                ax.set_ylabel("mean cosine vs fp32")
            ax.set_xlabel("bits per weight (file bytes)")
            ax.set_title(section)
            corner = "lower right" if section == "minilm" else "upper right"
            ax.legend(fontsize=6, ncol=2 if section == "smollm2" else 1, loc=corner)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"\nplot: {args.plot}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("section", choices=["gaussian", "smollm2", "minilm", "speed", "report"])
    parser.add_argument("--bits", type=float, nargs="+", default=None)
    parser.add_argument("--codecs", nargs="+", default=["ecsq", "neural", "rtn", "rtn-clip", "hqq"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--keep", type=Path, default=None, help="keep the encoded folders here (for nwc verify)")
    args = parser.parse_args(argv)
    if args.bits is None:
        args.bits = [2.0, 3.0, 4.0, 5.0, 6.0] if args.section == "gaussian" else [2.5, 3.0, 3.5, 4.0, 5.0]
    if args.section == "gaussian":
        run_gaussian(args)
    elif args.section in ("smollm2", "minilm"):
        run_models(args, args.section)
    elif args.section == "speed":
        run_speed(args)
    else:
        run_report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
