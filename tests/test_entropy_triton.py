"""Triton rANS decoder: symbol for symbol the numpy reference's output, the CPU decoder's errors, and a clean
compile for sm_80/sm_90 without a GPU.

As in ``tests/test_kernels.py``, the interpreter runs in worker processes (this file, run as a script) with
``TRITON_INTERPRET=1`` in their environment only, and the workers fail any load or store outside the tensors
handed to the kernel. The interpreter costs about 10 ms per decode step of a program (more on a loaded
machine) whatever its width, so each case puts all its lanes in one program (except the case that tests
several), only one case has lanes of 1024 symbols, and the others use shorter lanes than a layout would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
import zlib
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

from nwcfmt.entropy import gpu, rans
from nwcfmt.entropy.tables import cumulative, normalize_counts, slot_lookup
from nwcfmt.errors import FormatError

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (it ships for Linux x86-64)")


# ------------------------------------------------------------------------------------------------ the cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One stream to decode in the interpreter (and, with ``corrupt``, to damage first)."""

    name: str
    n: int
    alphabet: int
    channels: int = 1
    levels: tuple[int, ...] | None = None
    level_run: int = 1
    lane_symbols: int = 1024
    block: int | None = None  # lanes per program; None: all lanes in one program
    corrupt: str = ""  # flip, truncate, extra, start, state, counts, lanes
    dtypes: str = "native"  # native (uint16 words, uint32 lanes) or views (int16 words, int32 lanes) or int64 lanes

    @property
    def n_lanes(self) -> int:
        return rans.n_lanes(self.n, self.lane_symbols)

    @property
    def cost(self) -> int:
        """Interpreted decode steps."""
        block = self.block or max(1, self.n_lanes)
        return -(-self.n_lanes // block) * min(self.n, self.lane_symbols) if self.corrupt != "lanes" else 0


SMALL = {"n": 32 * 20 + 10, "alphabet": 40, "channels": 16, "lane_symbols": 32}  # 21 lanes, the last of 10
CASES = [
    # long lanes with a short last one, 16 channels of 300 symbols
    Case("k300-c16-lane1024", 1024 * 70 + 357, 300, 16),
    # 16 channels x 3 levels of 40 symbols, many lanes in one program
    Case("k40-c16-levels-lane256", 256 * 230 + 100, 40, 16, (0, 2, 1, 1, 0, 2, 2), 100, lane_symbols=256),
    # tiny alphabets (no state change for K=1; long runs without words for a skewed K=2)
    Case("k2-c1-lane128", 128 * 100 + 77, 2, lane_symbols=128),
    Case("k1-c1-lane128", 128 * 11 + 5, 1, lane_symbols=128),
    # per-position levels; lanes that start mid-channel and mid-run, spread over several partial programs
    Case("k300-c1-levels-run1-lane128", 128 * 30 + 13, 300, 1, (1, 0, 0, 1, 1), 1, lane_symbols=128),
    Case("k40-c16-levels-lane50-blocks", 50 * 37 + 41, 40, 16, (0, 1, 1), 7, lane_symbols=50, block=16),
    Case("k40-c3-one-symbol", 1, 40, 3),
    Case("k40-c3-empty", 0, 40, 3),
    Case("k40-c16-lane32-views", **SMALL, dtypes="views"),
    Case("k40-c16-lane32-int64", **SMALL, dtypes="int64"),
    # damaged streams: FormatError, worded as the CPU decoder words it
    *(Case(f"k40-c16-lane32-{c}", **SMALL, corrupt=c) for c in ("flip", "truncate", "extra", "start", "state")),
    *(Case(f"k40-c16-lane32-{c}", **SMALL, corrupt=c) for c in ("counts", "lanes")),
]
BY_NAME = {case.name: case for case in CASES}
assert len(BY_NAME) == len(CASES)


def make_stream(case: Case) -> tuple[np.ndarray, np.ndarray, rans.Context, rans.RansStream]:
    """(symbols, freqs, context, stream) of a case, from a generator seeded by its name."""
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    levels = None if case.levels is None else np.array(case.levels, dtype=np.uint8)
    n_levels = 1 if levels is None else int(levels.max()) + 1
    context = rans.Context(case.channels, levels, case.level_run, n_levels)
    k = case.alphabet
    # skewed, table-dependent distributions: Zipf-like with a random order, some symbols absent
    ranks = np.argsort(rng.random((context.n_tables, k)), axis=1) + 1.0
    probs = ranks ** -rng.uniform(0.8, 2.5, (context.n_tables, 1))
    if k == 2:
        probs = np.array([[0.97, 0.03]]).repeat(context.n_tables, 0)
    probs /= probs.sum(axis=1, keepdims=True)
    tid = context.table_ids(0, case.n)
    cdf = probs.cumsum(axis=1)
    symbols = np.minimum((rng.random(case.n)[:, None] > cdf[tid]).sum(axis=1), k - 1).astype(np.uint16)
    counts = np.zeros((context.n_tables, k), dtype=np.int64)
    np.add.at(counts, (tid, symbols.astype(np.int64)), 1)
    counts[:, 0] += counts.sum(axis=1) == 0  # tables no symbol uses still need a valid row
    freqs = np.stack([normalize_counts(row) for row in counts])
    return symbols, freqs, context, rans.encode(symbols, freqs, context, case.lane_symbols)


def damage(case: Case, stream: rans.RansStream) -> rans.RansStream:
    """The stream with the case's damage."""
    words, lanes = stream.words.copy(), stream.lanes.copy()
    if case.corrupt == "flip":
        words[words.size // 2] ^= 0x0420
    elif case.corrupt == "truncate":
        words = words[:-2]
    elif case.corrupt == "extra":
        words = np.append(words, np.uint16(7))
    elif case.corrupt == "start":
        lanes[3, 0] = 1000
    elif case.corrupt == "state":
        lanes[4, 0] ^= 1
    elif case.corrupt == "counts":  # same total, another split
        lanes[2, 1] -= 1
        lanes[5, 1] += 1
    elif case.corrupt == "lanes":
        lanes = lanes[:-1]
    return rans.RansStream(words, lanes)


# --------------------------------------------------------------------------------------- interpreter worker
@contextlib.contextmanager
def bounds_checked():
    """Fail any interpreted load (store) of the decode kernel outside its tensor arguments (its outputs)."""
    from triton.runtime import interpreter

    from nwcfmt.entropy import triton_rans

    builder = type(interpreter.interpreter_builder)
    original_load, original_store = builder.create_masked_load, builder.create_masked_store
    kernel = triton_rans._rans_decode_kernel
    allowed: dict[str, list[tuple[int, int]]] = {"load": [], "store": []}

    def regions(tensors) -> list[tuple[int, int]]:
        return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel()]

    def check(kind: str, ptrs, mask) -> None:
        addr = ptrs.data.astype("uint64")
        size = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
        live = mask.data.astype(bool) if mask is not None else True
        inside = False
        for lo, hi in allowed[kind]:
            inside = inside | ((addr >= lo) & (addr + size <= hi))
        bad = live & ~inside
        if bad.any():
            raise AssertionError(f"out-of-bounds {kind} of {int(bad.sum())} elements")

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask)
        return original_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check("store", ptrs, mask)
        return original_store(self, ptrs, value, mask, cache_policy)

    class Checked:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                allowed["load"] = regions(a for a in args if isinstance(a, torch.Tensor))
                allowed["store"] = regions(args[6:8])  # out_ptr, ok_ptr
                return kernel[grid](*args, **kwargs)

            return launch

    builder.create_masked_load, builder.create_masked_store = load, store
    triton_rans._rans_decode_kernel = Checked()
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store = original_load, original_store
        triton_rans._rans_decode_kernel = kernel


def as_tensors(case: Case, stream: rans.RansStream) -> tuple[torch.Tensor, torch.Tensor]:
    words, lanes = torch.from_numpy(stream.words), torch.from_numpy(stream.lanes)
    if case.dtypes == "views":
        return words.view(torch.int16), lanes.view(torch.int32)
    if case.dtypes == "int64":
        return words, lanes.to(torch.int64)
    return words, lanes


def run_case(case: Case) -> dict:
    """Decode one case in the interpreter; compare with the reference (or the CPU decoder's error)."""
    from nwcfmt.entropy import triton_rans

    symbols, freqs, context, stream = make_stream(case)
    problems = []
    want_error = None
    if case.corrupt:
        stream = damage(case, stream)
        try:
            rans.decode(stream, freqs, context, case.n, case.lane_symbols)
        except FormatError as exc:
            want_error = str(exc)
        if want_error is None:
            problems.append("the damaged stream decodes on the CPU: the case does not test anything")
    else:
        want = rans.decode_reference(stream, freqs, context, case.n, case.lane_symbols)
        if not np.array_equal(want, symbols):
            problems.append("the reference does not decode the encoded symbols")
    words, lanes = as_tensors(case, stream)
    start = time.perf_counter()
    got, error = None, None
    with bounds_checked():
        try:
            block = case.block or max(1, 1 << (case.n_lanes - 1).bit_length())
            got = triton_rans.decode_stream(words, lanes, freqs, context, case.n, case.lane_symbols, block=block)
        except FormatError as exc:
            error = str(exc)
    seconds = time.perf_counter() - start
    if case.corrupt:
        if error != want_error:
            problems.append(f"expected FormatError {want_error!r}, got {error!r}")
    elif error is not None:
        problems.append(f"FormatError on a valid stream: {error}")
    else:
        assert got is not None
        if got.dtype != torch.uint16 or got.shape != (case.n,):
            problems.append(f"symbols {got.dtype}{list(got.shape)}, expected uint16[{case.n}]")
        differ = np.flatnonzero(got.numpy() != want)
        if differ.size:
            i = int(differ[0])
            problems.append(f"{differ.size} symbols differ, first at {i}: reference {want[i]}, kernel {got[i]}")
    return {"problems": problems, "seconds": seconds, "words": int(stream.words.size)}


def worker_main(result_path: str, names: str) -> None:
    """Script entry: case names (a JSON list) in, results written to ``result_path`` (JSON)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker runs with TRITON_INTERPRET=1 only"
    results = {}
    for name in json.loads(names):
        try:
            results[name] = run_case(BY_NAME[name])
        except Exception as exc:
            results[name] = {"problems": [f"{type(exc).__name__}: {exc}"]}
    Path(result_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, dict]:
    """Run every case in interpreter workers (one per core, at most 2); results by case name."""
    n = max(1, min(2, os.cpu_count() or 1))
    loads = [0] * n
    shares: list[list[str]] = [[] for _ in range(n)]
    for case in sorted(CASES, key=lambda c: -c.cost):  # the longest first, each to the least loaded worker
        w = loads.index(min(loads))
        shares[w].append(case.name)
        loads[w] += case.cost + 50
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    tmp = tmp_path_factory.mktemp("interp")
    procs = []
    for w in range(n):
        result, log = tmp / f"results{w}.json", tmp / f"log{w}.txt"
        with log.open("w") as out:
            argv = [sys.executable, __file__, str(result), json.dumps(shares[w])]
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        procs.append((proc, result, log))
    results: dict[str, dict] = {}
    for proc, result, log in procs:
        try:
            proc.wait(timeout=600)  # a decode that does not terminate fails here
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode != 0 or not result.exists():
            raise AssertionError(f"interpreter worker failed ({proc.returncode}):\n{log.read_text()[-4000:]}")
        results.update(json.loads(result.read_text()))
    return results


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_interpreter_bit_exact(interpreted, case):
    result = interpreted[case.name]
    assert not result["problems"], "\n".join(result["problems"])


def test_cases_cover_the_brief():
    """Alphabets 1, 2, ~40, ~300; 1 and 16 channels; levels or not; 1024-symbol lanes with a short last one."""
    valid = [c for c in CASES if not c.corrupt]
    assert {1, 2, 40, 300} <= {c.alphabet for c in valid}
    assert {1, 16} <= {c.channels for c in valid}
    assert {True, False} == {c.levels is not None for c in valid}
    assert any(c.lane_symbols == 1024 and c.n % 1024 for c in valid)
    assert sum(c.n for c in CASES) <= 200_000


# ---------------------------------------------------------------------------------------------- dispatch
def small_stream(seed: int = 0) -> tuple[np.ndarray, np.ndarray, rans.Context, rans.RansStream]:
    case = Case(f"dispatch-{seed}", 3000, 40, 4, (0, 1), 5, lane_symbols=1024)
    return make_stream(case)


def test_import_and_cpu_decode_do_not_import_triton():
    code = (
        "import os, sys, numpy as np, torch, nwcfmt\n"
        "from nwcfmt.entropy import gpu, rans\n"
        "from nwcfmt.entropy.tables import normalize_counts\n"
        "sym = np.arange(5000, dtype=np.uint16) % 7\n"
        "freqs = normalize_counts(np.bincount(sym))[None]\n"
        "s = rans.encode(sym, freqs, rans.Context(), 1024)\n"
        "w, l = torch.from_numpy(s.words), torch.from_numpy(s.lanes)\n"
        "for mode in ('auto', 'triton', 'reference'):\n"
        "    os.environ['NWC_KERNELS'] = mode\n"
        "    got = gpu.decode_on_device(w, l, freqs, rans.Context(), 5000, 1024, 'cpu')\n"
        "    assert np.array_equal(got.numpy(), sym)\n"
        "    assert gpu.backend_for('cpu') == 'cpu'\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120, env=env)


@pytest.mark.parametrize("mode", ["", "auto", "reference", "triton"])
@pytest.mark.parametrize("dtypes", ["native", "views", "int64"])
def test_cpu_device_decodes_like_rans_decode(monkeypatch, mode, dtypes):
    monkeypatch.setenv("NWC_KERNELS", mode)
    symbols, freqs, context, stream = small_stream()
    words, lanes = as_tensors(Case("x", 0, 1, dtypes=dtypes), stream)
    got = gpu.decode_on_device(words, lanes, freqs, context, symbols.size, 1024, "cpu")
    assert got.dtype == torch.uint16 and got.device.type == "cpu"
    assert np.array_equal(got.numpy(), symbols)
    bad = damage(Case("x", 0, 1, corrupt="flip"), stream)
    with pytest.raises(FormatError) as cpu_error:
        rans.decode(bad, freqs, context, symbols.size, 1024, "tensor w")
    with pytest.raises(FormatError) as error:
        gpu.decode_on_device(*as_tensors(Case("x", 0, 1), bad), freqs, context, symbols.size, 1024, "cpu", "tensor w")
    assert str(error.value) == str(cpu_error.value)


def test_bad_stream_dtypes():
    symbols, freqs, context, stream = small_stream()
    words, lanes = as_tensors(Case("x", 0, 1), stream)
    with pytest.raises(ValueError, match="uint16"):
        gpu.decode_on_device(words.to(torch.int32), lanes, freqs, context, symbols.size, 1024, "cpu")
    with pytest.raises(ValueError, match="uint32"):
        gpu.decode_on_device(words, lanes.to(torch.float32), freqs, context, symbols.size, 1024, "cpu")


def test_backend_for_cuda(monkeypatch):
    cuda = torch.device("cuda")  # a device object needs no GPU
    monkeypatch.setattr(gpu, "_triton_broken", None)
    monkeypatch.setenv("NWC_KERNELS", "reference")
    assert gpu.backend_for(cuda) == "cpu"
    monkeypatch.setenv("NWC_KERNELS", "nonsense")
    with pytest.raises(ValueError, match="NWC_KERNELS"):
        gpu.backend_for(cuda)
    monkeypatch.delenv("NWC_KERNELS")
    if HAS_TRITON:
        assert gpu.backend_for(cuda) == "triton"
        monkeypatch.setenv("NWC_KERNELS", "triton")
        assert gpu.backend_for(cuda) == "triton"


def test_backend_for_cuda_without_triton(monkeypatch, caplog):
    monkeypatch.setattr(gpu, "_triton_module", lambda: "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(gpu, "_triton_broken", None)
    monkeypatch.setenv("NWC_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        gpu.backend_for("cuda")
    monkeypatch.setenv("NWC_KERNELS", "auto")
    assert gpu.backend_for("cuda") == "cpu"
    assert "Triton rANS decoding disabled" in caplog.text


class FakeTriton:
    """Stands in for :mod:`triton_rans`: its decode raises ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def unsupported_reason(self, *args) -> None:
        return None

    def decode_stream(self, *args) -> torch.Tensor:
        self.calls += 1
        raise self.error


@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_kernel_failures(monkeypatch, caplog, mode):
    """A compiler or driver failure falls back to the CPU decoder in auto mode (once, with a warning) and
    raises in triton mode; a FormatError is never a reason to fall back."""
    symbols, freqs, context, stream = small_stream()
    args = (*as_tensors(Case("x", 0, 1), stream), freqs, context, symbols.size, 1024, "cpu")
    monkeypatch.setenv("NWC_KERNELS", mode)
    monkeypatch.setattr(gpu, "_triton_broken", None)
    monkeypatch.setattr(gpu, "backend_for", lambda device: "triton" if not gpu._triton_broken else "cpu")
    broken = FakeTriton(RuntimeError("ptxas fatal"))
    monkeypatch.setattr(gpu, "_triton_module", lambda: broken)
    if mode == "triton":
        with pytest.raises(RuntimeError, match="ptxas fatal"):
            gpu.decode_on_device(*args)
    else:
        with caplog.at_level(logging.WARNING):
            assert np.array_equal(gpu.decode_on_device(*args).numpy(), symbols)
            assert np.array_equal(gpu.decode_on_device(*args).numpy(), symbols)
        assert broken.calls == 1 and "ptxas fatal" in caplog.text
    monkeypatch.setattr(gpu, "_triton_broken", None)
    corrupt = FakeTriton(FormatError("stream: lane 3 does not decode"))
    monkeypatch.setattr(gpu, "_triton_module", lambda: corrupt)
    with pytest.raises(FormatError, match="lane 3"):
        gpu.decode_on_device(*args)
    assert gpu._triton_broken is None


@needs_triton
def test_device_tables_match_the_host_tables():
    from nwcfmt.entropy import triton_rans

    _, freqs, _, _ = small_stream()
    f, cum, lut = triton_rans.device_tables(freqs, "cpu")
    assert np.array_equal(f.numpy(), freqs) and np.array_equal(cum.numpy(), cumulative(freqs))
    assert np.array_equal(lut.numpy(), slot_lookup(freqs))
    table = triton_rans.slot_table(f, cum, lut).reshape(freqs.shape[0], -1).numpy()
    rows = np.arange(freqs.shape[0])[:, None]
    s = slot_lookup(freqs).astype(np.int64)
    assert np.array_equal(table & 0xFFFF, s)
    assert np.array_equal((table >> 16) & 0xFFFF, freqs[rows, s])
    assert np.array_equal(table >> 32, np.arange(1 << 15) - cumulative(freqs)[rows, s])
    bad = freqs.copy()
    bad[1, 0] += 1
    with pytest.raises(FormatError, match="frequency table 1 sums to"):
        triton_rans.device_tables(bad, "cpu")


@needs_triton
def test_unsupported_and_malformed_arguments():
    from nwcfmt.entropy import triton_rans

    symbols, freqs, context, stream = small_stream()
    words, lanes = as_tensors(Case("x", 0, 1), stream)
    n = symbols.size
    assert triton_rans.unsupported_reason(words, lanes, freqs.shape, n, 1024) is None
    bad = {
        "words torch.int32": (words.to(torch.int32), lanes, freqs.shape, n, 1024),
        "lanes torch.float32": (words, lanes.float(), freqs.shape, n, 1024),
        "tables of 70000 symbols": (words, lanes, (4, 70000), n, 1024),
        "symbols in lanes of 0": (words, lanes, freqs.shape, n, 0),
    }
    for expected, args in bad.items():
        reason = triton_rans.unsupported_reason(*args)
        assert reason is not None and expected in reason, (expected, reason)
    with pytest.raises(FormatError, match="needs 12 tables, the stream has 8"):
        triton_rans.decode_stream(words, lanes, freqs, rans.Context(4, np.array([2], np.uint8)), n, 1024)
    with pytest.raises(FormatError, match="expected 3 lanes, found 2"):
        triton_rans.decode_stream(words, lanes[:2], freqs, context, n, 1024)


# --------------------------------------------------------------------------------------------- compiling
@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: kernels are not compiled")
@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("has_levels", [False, True], ids=["plain", "levels"])
def test_compiles_without_spills(arch, has_levels):
    from nwcfmt.entropy import triton_rans

    result = triton_rans.compile_for(arch, has_levels)
    regs, stores, loads = result["registers"], result["spill_stores"], result["spill_loads"]
    print(f"sm_{arch} levels={has_levels}: {regs} registers, {stores}/{loads} bytes spilled")
    assert stores == 0 and loads == 0, f"the decoder spills on sm_{arch} ({regs} registers)"
    assert regs <= 64, f"{regs} registers: fewer lanes fit an SM"
    # the state stays 32-bit: one 32-bit multiply per symbol, no 64-bit one in the loop
    assert "mad.lo.s32" in result["ptx"] or "mul.lo.s32" in result["ptx"]


# ------------------------------------------------------------------------------------------------ on a GPU
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bit_exact(monkeypatch):
    monkeypatch.setenv("NWC_KERNELS", "triton")
    failures = []
    for case in CASES:
        _, freqs, context, stream = make_stream(case)
        if case.corrupt:
            stream = damage(case, stream)
        words, lanes = (t.cuda() for t in as_tensors(case, stream))
        try:
            want = rans.decode(stream, freqs, context, case.n, case.lane_symbols)
        except FormatError as exc:
            with pytest.raises(FormatError) as error:
                gpu.decode_on_device(words, lanes, freqs, context, case.n, case.lane_symbols, "cuda")
            if str(error.value) != str(exc):
                failures.append(case.name)
            continue
        got = gpu.decode_on_device(words, lanes, freqs, context, case.n, case.lane_symbols, "cuda")
        if not np.array_equal(got.cpu().numpy(), want):
            failures.append(case.name)
    assert not failures, f"{len(failures)} cases differ: {failures}"


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
