"""Calibrated quantizers on SmolLM2 side by side with RTN and the peers: perplexity, bits/weight, encode time, memory.

    python benchmarks/bench_calibrated.py                                   # every method, 4 configs (hours)
    python benchmarks/bench_calibrated.py --only fp,rtn,hqq --configs 4g128,3g128
    python benchmarks/bench_calibrated.py --only gptq,gptq-no-grid --windows 2 --json out.json

Rows are method x config; configs are ``4g128``, ``4pc``, ``3g128``, ``3pc`` (``pc``: per output channel).
nwcfmt methods run ``nwc encode <smollm2> -o <tmp> --codec C --bits B --group-size G [--param ...]`` in a
process of their own; peers run ``benchmarks/peers.py`` (HQQ here, llm-compressor from its own virtual
environment, ``--llmc-python``), which writes a plain fp32 folder of the weights the peer stores. Every model is
then scored by ``nwc eval --json`` on the same protocol (nwc-ppl-v1: SmolLM2 fp32, the evaluation text, the
first ``--windows`` windows of 2048 tokens). A method whose codec is not registered, or whose encoder fails, gets
a row saying why. Columns (see ``benchmarks/README.md``): perplexity, x FP, bits per weight of the quantized
Linears (codes and grid; ``nwc info --json`` for nwcfmt, the peer's own stored tensors for peers), encode
seconds (wall time of the encoding process; for peers minus the time spent writing the dense evaluation copy)
and its peak RSS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nwcfmt import data
from nwcfmt.calibration.data import DEFAULT_SAMPLES, DEFAULT_SEQLEN, calibration_batches

HERE = Path(__file__).resolve().parent
CONFIGS: dict[str, tuple[int, int]] = {"4g128": (4, 128), "4pc": (4, 0), "3g128": (3, 128), "3pc": (3, 0)}
DEFAULT_LLMC_VENV = Path.home() / ".cache" / "nwcfmt-bench" / "llmc-venv"


@dataclass(frozen=True)
class Method:
    """One row family: an nwcfmt codec with parameters, a peer adapter, or the unquantized model."""

    name: str
    kind: str  # "fp" | "nwc" | "peer"
    codec: str = ""  # nwc: codec id; peer: adapter name in peers.py
    params: dict = field(default_factory=dict)  # nwc: --param KEY=VALUE; peer: extra adapter options
    options: tuple[str, ...] = ()  # nwc: extra ``nwc encode`` flags


METHODS = {
    m.name: m
    for m in (
        Method("fp", "fp"),
        Method("rtn", "nwc", "rtn"),
        Method("gptq", "nwc", "gptq"),
        Method("gptq-no-init", "nwc", "gptq", {"grid_init": False}),
        Method("gptq-no-refine", "nwc", "gptq", {"grid_refine": False}),
        Method("gptq-no-grid", "nwc", "gptq", {"grid_init": False, "grid_refine": False}),
        Method("flexround", "nwc", "flexround"),
        Method("lrq", "nwc", "lrq"),
        Method("hqq", "peer", "hqq"),
        Method("llmc-gptq", "peer", "llmcompressor"),
        # not in the default set: run them with --only
        Method("rtn-clip", "nwc", "rtn", options=("--clip-search",)),
        Method("hqq-axis0", "peer", "hqq", {"axis": 0}),
    )
}
DEFAULT_METHODS = [
    "fp",
    "rtn",
    "gptq",
    "gptq-no-init",
    "gptq-no-refine",
    "gptq-no-grid",
    "flexround",
    "lrq",
    "hqq",
    "llmc-gptq",
]
CALIBRATED = {"gptq", "flexround", "lrq"}


@dataclass
class Row:
    """One line of the table (``status`` is ``ok``, ``not available`` or ``failed``)."""

    method: str
    config: str
    status: str = "ok"
    reason: str = ""
    ppl: float | None = None
    vs_fp: float | None = None
    bits_linear: float | None = None
    encode_s: float | None = None
    peak_rss_mb: float | None = None
    eval_s: float | None = None
    details: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)  # when and where: date, CPU, cores, load average, versions


@dataclass
class Measured:
    """A finished child process: exit code, wall time, peak RSS (``ru_maxrss`` from ``wait4``) and its output."""

    rc: int
    wall_s: float
    peak_rss_mb: float
    stdout: str
    stderr: str


def run_measured(cmd: list[str], *, cwd: Path | None = None) -> Measured:
    """Run ``cmd`` to completion; time it and read its own peak RSS (not the parent's, not other children's)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, wall, usage.ru_maxrss / 1024, out.read(), err.read())


_ERROR_LINE = re.compile(r"^(nwc: error: .*|(\w+\.)*\w*(Error|Exception)\b.*|peers: .*)$")


def failure_reason(m: Measured) -> str:
    """The most telling line of a failed child's stderr: ``nwc: error: ...``, the exception line, or the last."""
    lines = [line.strip() for line in (m.stderr or m.stdout).splitlines() if line.strip()]
    chosen = [line for line in lines if _ERROR_LINE.match(line)]
    text = (chosen or lines or [f"exit status {m.rc}"])[-1]
    return text if len(text) <= 300 else text[:297] + "..."


def nwc_cmd(*args: str) -> list[str]:
    """The ``nwc`` command, run with this interpreter (the console script may not be on PATH)."""
    return [sys.executable, "-c", "from nwcfmt.cli.main import main; main()", *args]


def evaluate(folder: Path, windows: int) -> tuple[dict, float]:
    """``nwc eval --json`` of ``folder``: the record and the wall time."""
    m = run_measured(nwc_cmd("eval", str(folder), "--json", "--no-save", "-q", "--windows", str(windows)))
    if m.rc != 0:
        raise RuntimeError(f"nwc eval failed: {failure_reason(m)}")
    return json.loads(m.stdout), m.wall_s


def linear_bits_from_info(folder: Path, linears: list[str]) -> tuple[float, dict]:
    """Bits per weight over the protocol's Linear weights, from ``nwc info --json``, and the codecs used."""
    m = run_measured(nwc_cmd("info", str(folder), "--json"))
    if m.rc != 0:
        raise RuntimeError(f"nwc info failed: {failure_reason(m)}")
    wanted = {f"{name}.weight" for name in linears}
    chosen = [t for t in json.loads(m.stdout)["tensors"] if t["name"] in wanted]
    if len(chosen) != len(wanted):
        raise RuntimeError(f"nwc info lists {len(chosen)} of the {len(wanted)} protocol Linear weights")
    codecs = sorted({t["codec"] for t in chosen})
    bits = 8 * sum(t["stored_bytes"] for t in chosen) / sum(t["numel"] for t in chosen)
    return bits, {"codecs": codecs, "note": chosen[0]["details"]}


def calibration_tokens(src: Path, samples: int, seqlen: int, path: Path) -> Path:
    """The calibration windows nwcfmt's pipeline draws (same text, sampler and seed) as one int64 tensor."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    windows = torch.cat(calibration_batches(tokenizer, samples=samples, seqlen=seqlen, batch_size=samples))
    torch.save(windows, path)
    return path


def python_has(python: str, module: str) -> str | None:
    """None when ``python`` can import ``module``, else why not."""
    if python == sys.executable:
        return None if importlib.util.find_spec(module) else f"{module} is not installed for {python}"
    if not Path(python).exists():
        return f"{python} does not exist"
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True)
    if probe.returncode == 0:
        return None
    why = failure_reason(Measured(probe.returncode, 0.0, 0.0, probe.stdout, probe.stderr))
    return f"{module} does not import in {python}: {why}"


class Bench:
    """Runs the rows and keeps the results (written to ``--json`` after every row)."""

    def __init__(self, args: argparse.Namespace, src: Path, work: Path, kept: list[Row] | None = None) -> None:
        self.args = args
        self.src = src
        self.work = work
        self.rows: list[Row] = list(kept or [])
        fp = self.find("fp", "fp32")
        self.fp_ppl: float | None = fp.ppl if fp else None
        self._linears: list[str] | None = None
        self._tokens: Path | None = None

    @property
    def linears(self) -> list[str]:
        if self._linears is None:
            from peers import protocol_linears

            self._linears = protocol_linears(self.src)
        return self._linears

    def tokens(self) -> Path:
        if self._tokens is None:
            samples, seqlen = self.calib_shape()
            self._tokens = calibration_tokens(self.src, samples, seqlen, self.work / "calib-tokens.pt")
        return self._tokens

    def calib_shape(self) -> tuple[int, int]:
        return calib_shape(self.args)

    def find(self, method: str, config: str) -> Row | None:
        """The measured (``ok``) row of ``method`` x ``config``, if there is one."""
        return next((r for r in self.rows if (r.method, r.config, r.status) == (method, config, "ok")), None)

    def add(self, row: Row) -> None:
        if row.ppl is not None and self.fp_ppl:
            row.vs_fp = row.ppl / self.fp_ppl
        row.measured = {"date": now(), **machine()}
        self.rows = [r for r in self.rows if (r.method, r.config) != (row.method, row.config)] + [row]
        self.rows.sort(key=row_order)
        print(format_row(row), flush=True)
        if self.args.json:
            self.args.json.write_text(json.dumps(self.document(), indent=2) + "\n")

    def document(self) -> dict:
        samples, seqlen = self.calib_shape()
        return {
            "benchmark": "bench_calibrated",
            "date": now(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            **comparable(self.args.windows, samples, seqlen),
            "model": self.src.name,
            "rows": [asdict(r) for r in self.rows],
        }

    def run_fp(self) -> None:
        record, eval_s = evaluate(self.src, self.args.windows)
        self.fp_ppl = record["value"]
        self.add(Row("fp", "fp32", ppl=record["value"], bits_linear=record["bits_per_weight"]["linear"], eval_s=eval_s))

    def run_nwc(self, method: Method, config: str) -> None:
        from nwcfmt.codecs.registry import available_codecs

        bits, group = CONFIGS[config]
        if method.codec not in available_codecs():
            self.add(Row(method.name, config, "not available", f"codec {method.codec!r} is not registered"))
            return
        out = self.work / f"{method.name}-{config}"
        cmd = nwc_cmd(
            "encode",
            str(self.src),
            "-o",
            str(out),
            "--codec",
            method.codec,
            "--bits",
            str(bits),
            "--group-size",
            str(group),
            "-q",
            *method.options,
        )
        for key, value in method.params.items():
            cmd += ["--param", f"{key}={json.dumps(value)}"]
        if method.codec in CALIBRATED:
            if self.args.calib_samples:
                cmd += ["--calib-samples", str(self.args.calib_samples)]
            if self.args.calib_seqlen:
                cmd += ["--calib-seqlen", str(self.args.calib_seqlen)]
        m = run_measured(cmd)
        if m.rc != 0:
            reason = failure_reason(m)
            unknown = "unknown codec" in reason or "is not one of" in reason or "Invalid value for '--codec'" in reason
            self.add(
                Row(
                    method.name,
                    config,
                    "not available" if unknown else "failed",
                    reason,
                    encode_s=m.wall_s,
                    peak_rss_mb=m.peak_rss_mb,
                )
            )
            return
        try:
            bits_linear, info = linear_bits_from_info(out, self.linears)
            record, eval_s = evaluate(out, self.args.windows)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        self.add(
            Row(
                method.name,
                config,
                ppl=record["value"],
                bits_linear=bits_linear,
                encode_s=m.wall_s,
                peak_rss_mb=m.peak_rss_mb,
                eval_s=eval_s,
                details={**info, "eval_bits_linear": record["bits_per_weight"]["linear"]},
            )
        )

    def run_peer(self, method: Method, config: str) -> None:
        bits, group = CONFIGS[config]
        python = self.args.llmc_python if method.codec == "llmcompressor" else sys.executable
        module = "llmcompressor" if method.codec == "llmcompressor" else "hqq"
        missing = python_has(python, module)
        if missing:
            self.add(Row(method.name, config, "not available", missing))
            return
        out = self.work / f"{method.name}-{config}"
        result = self.work / f"{method.name}-{config}.json"
        cmd = [
            python,
            str(HERE / "peers.py"),
            method.codec,
            "--src",
            str(self.src),
            "--out",
            str(out),
            "--bits",
            str(bits),
            "--group-size",
            str(group),
            "--result",
            str(result),
        ]
        if "axis" in method.params:
            cmd += ["--axis", str(method.params["axis"])]
        if method.codec == "llmcompressor":
            cmd += ["--tokens", str(self.tokens())]
        m = run_measured(cmd, cwd=HERE)
        if m.rc != 0:
            self.add(
                Row(method.name, config, "failed", failure_reason(m), encode_s=m.wall_s, peak_rss_mb=m.peak_rss_mb)
            )
            shutil.rmtree(out, ignore_errors=True)
            return
        stats = json.loads(result.read_text())
        try:
            record, eval_s = evaluate(out, self.args.windows)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        self.add(
            Row(
                method.name,
                config,
                ppl=record["value"],
                bits_linear=stats["bits_per_weight"],
                encode_s=m.wall_s - stats["eval_copy_s"],
                peak_rss_mb=m.peak_rss_mb,
                eval_s=eval_s,
                details={k: v for k, v in stats.items() if k not in ("bits_per_weight",)},
            )
        )


def calib_shape(args: argparse.Namespace) -> tuple[int, int]:
    """Calibration windows and tokens per window: the options, or nwcfmt's pipeline defaults."""
    return args.calib_samples or DEFAULT_SAMPLES, args.calib_seqlen or DEFAULT_SEQLEN


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


def comparable(windows: int, samples: int, seqlen: int) -> dict:
    """What two runs must share for their rows to sit in one table."""
    return {
        "protocol": {"name": "nwc-ppl-v1", "windows": windows, "seqlen": 2048, "text": "sotu-eval"},
        "calibration": {"samples": samples, "seqlen": seqlen, "text": "sotu-calib (speeches before 2000)"},
    }


def row_order(row: Row) -> tuple[int, int]:
    """Table order: methods as in ``METHODS``, then configs as in ``CONFIGS``; the FP row first."""
    methods, configs = list(METHODS), list(CONFIGS)
    return (
        methods.index(row.method) if row.method in methods else len(methods),
        configs.index(row.config) if row.config in configs else -1,
    )


def load_rows(path: Path, windows: int, samples: int, seqlen: int) -> list[Row]:
    """The rows of an earlier ``--json`` file, refused when measured under another protocol or calibration."""
    document = json.loads(path.read_text())
    wanted = comparable(windows, samples, seqlen)
    found = {key: document.get(key) for key in wanted}
    if found != wanted:
        raise SystemExit(f"{path} holds rows of another protocol or calibration ({found}): another --json, or --fresh")
    earlier = {"date": document.get("date"), **document.get("machine", {})}  # files from before per-row records
    return [Row(**{"measured": earlier, **row}) for row in document.get("rows", [])]


def markdown(rows: list[Row], configs: list[str]) -> str:
    """Two markdown tables, methods x configs: perplexity (x FP), then bits/weight, encode s and peak MB."""
    methods = list(dict.fromkeys(r.method for r in rows if r.method != "fp"))

    def table(title: str, cell) -> list[str]:
        lines = [f"| {title} | " + " | ".join(configs) + " |", "|---" * (len(configs) + 1) + "|"]
        for method in methods:
            found = [next((r for r in rows if (r.method, r.config) == (method, c)), None) for c in configs]
            cells = ["not run" if r is None else r.status if r.status != "ok" else cell(r) for r in found]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return lines

    fp = next((r for r in rows if r.method == "fp"), None)
    out = [f"FP32 perplexity: {fp.ppl:.3f}", ""] if fp else []
    out += table("perplexity (x FP)", lambda r: f"{r.ppl:.2f} ({r.vs_fp:.3f})")
    out += [
        "",
        *table("bits/w, encode s, peak MB", lambda r: f"{r.bits_linear:.3f}, {r.encode_s:.0f}, {r.peak_rss_mb:.0f}"),
    ]
    return "\n".join(out)


def machine() -> dict:
    """CPU, cores, load average and the versions that matter."""
    import transformers

    import nwcfmt

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "nwcfmt": nwcfmt.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


HEAD = f"{'method':16s} {'config':7s} {'ppl':>9s} {'x FP':>7s} {'bits/w':>7s} {'encode s':>9s} {'peak MB':>8s}  note"


def format_row(r: Row) -> str:
    """One fixed-width table line."""

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    note = r.reason if r.status != "ok" else ""
    if r.status != "ok":
        note = f"{r.status}: {note}"
    return (
        f"{r.method:16s} {r.config:7s} {num(r.ppl, '.3f'):>9s} {num(r.vs_fp, '.3f'):>7s} "
        f"{num(r.bits_linear, '.4f'):>7s} {num(r.encode_s, '.1f'):>9s} {num(r.peak_rss_mb, '.0f'):>8s}  {note}"
    ).rstrip()


def parse_list(text: str, known: list[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in items if t not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_METHODS),
        metavar="METHOD[,METHOD]",
        help=f"methods to run (default: all but rtn-clip, hqq-axis0; known: {', '.join(METHODS)})",
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        metavar="CFG[,CFG]",
        help=f"configs to run (default: {','.join(CONFIGS)})",
    )
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows (default 8, the protocol)")
    parser.add_argument(
        "--calib-samples",
        type=int,
        default=None,
        help="calibration windows for gptq/flexround/lrq and llm-compressor (default: nwcfmt's)",
    )
    parser.add_argument("--calib-seqlen", type=int, default=None, help="tokens per calibration window (nwcfmt's)")
    parser.add_argument(
        "--llmc-python",
        default=os.environ.get("NWC_BENCH_LLMC_PYTHON", str(DEFAULT_LLMC_VENV / "bin" / "python")),
        help="interpreter that has llmcompressor (its own venv)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="results file, rewritten after every row; rows it already holds (same protocol and calibration) "
        "are kept and not run again",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore the rows already in --json and run all")
    parser.add_argument(
        "--report", action="store_true", help="print the --json file's rows as a markdown table and exit"
    )
    args = parser.parse_args(argv)
    methods = parse_list(args.only, list(METHODS), "method")
    configs = parse_list(args.configs, list(CONFIGS), "config")
    samples, seqlen = calib_shape(args)
    kept: list[Row] = []
    if args.json and args.json.exists() and not args.fresh:
        kept = load_rows(args.json, args.windows, samples, seqlen)
    if args.report:
        if not kept:
            raise SystemExit("--report needs an existing --json file")
        print(markdown(kept, configs))
        return 0

    src = data.smollm2_dir("float32")
    info = machine()
    print(f"SmolLM2-135M fp32 ({src}); nwc-ppl-v1, {args.windows} windows x 2048 tokens")
    print(
        f"{info['cpu']}, {info['cores']} cores, load average {info['loadavg']}; torch {info['torch']}, "
        f"transformers {info['transformers']}, nwcfmt {info['nwcfmt']}"
    )
    print(HEAD, flush=True)
    with tempfile.TemporaryDirectory(prefix="nwc-bench-cal-") as tmp:
        bench = Bench(args, src, Path(tmp), kept)
        for row in kept:
            print(format_row(row) + ("  (kept from --json)" if row.status == "ok" else ""), flush=True)
        if bench.fp_ppl is None:
            bench.run_fp()  # the x FP column needs it
        for config in configs:
            for name in methods:
                method = METHODS[name]
                if bench.find(name, config) is not None:
                    continue
                if method.kind == "nwc":
                    bench.run_nwc(method, config)
                elif method.kind == "peer":
                    bench.run_peer(method, config)
    print()
    print(HEAD)
    for row in bench.rows:
        print(format_row(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
