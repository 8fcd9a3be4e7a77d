"""Triton dequantization kernels: bit-exact with the torch reference, compiled for sm_80/sm_90 without spills.

Bit-exactness runs the kernels in Triton's interpreter on CPU tensors. ``TRITON_INTERPRET=1`` must be set before
triton itself is imported (triton's own ``@jit`` helpers are decorated at import), so it cannot be switched on
for one test module inside a pytest process without changing triton for every other test (and, on a GPU
machine, sending real CUDA decodes through the interpreter). The interpreter checks therefore run in worker
processes (this file, run as a script) with ``TRITON_INTERPRET=1`` in their environment only; the workers also
check that every load and store the kernels issue stays inside the tensors they were given, which the
interpreter itself does not. The compile checks run here, with the real (non-interpreted) compiler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
import warnings
import zlib
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from nwcfmt import kernels
from nwcfmt.kernels import reference

REPO = Path(__file__).resolve().parents[1]
HAS_TRITON = find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (it ships for Linux x86-64)")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


# ------------------------------------------------------------------------------------------------ the cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One interpreter comparison: a packed tensor, its scales and zeros, and the kernel to run."""

    kernel: str  # "words" or "generic"
    bits: int
    rows: int
    cols: int
    group: int | str  # a group size, "channel", "tensor", or "shared" (128, scale rows broadcast over rows)
    symmetric: bool
    scale: str  # fp16, bf16, fp32
    out: str  # bf16, fp16, fp32
    values: str = "random"  # random, ties (structured scales that make rounding ties), special (inf, nan, ...)
    block: tuple[int, int] | None = None

    @property
    def id(self) -> str:
        block = f"-blk{self.block[0]}x{self.block[1]}" if self.block else ""
        sym = "sym" if self.symmetric else "asym"
        return (
            f"{self.kernel}-b{self.bits}-{self.rows}x{self.cols}-g{self.group}-{sym}-s{self.scale}-o{self.out}"
            f"-{self.values}{block}"
        )


def _cases() -> list[Case]:
    groups: list[int | str] = [32, 128, "channel", "tensor"]
    shapes = [(37, 300), (19, 301)]  # neither divides the blocks; 300 and 301 leave partial last groups
    cases = []
    # every width x group kind x output, for both kernels; symmetry and scale dtype take turns
    for kernel, widths in (("words", (2, 3, 4, 8)), ("generic", (1, 2, 3, 4, 5, 6, 7, 8))):
        for i, (bits, group, out) in enumerate(itertools.product(widths, groups, DTYPES)):
            sym, scale = [(False, "fp16"), (True, "bf16"), (True, "fp16"), (False, "bf16")][(i + i // 3) % 4]
            cases.append(Case(kernel, bits, *shapes[i % 2], group, sym, scale, out))
    # rounding ties, both directions, and specials (overflow, subnormals, +-0, inf, nan) for every output
    for out, scale in itertools.product(("bf16", "fp16", "fp32"), ("fp16", "bf16")):
        cases.append(Case("words", 4, 37, 300, 32, False, scale, out, "ties"))
        cases.append(Case("words", 8, 19, 301, "channel", True, scale, out, "ties"))
        cases.append(Case("words", 3, 37, 300, 128, False, scale, out, "special"))
        cases.append(Case("generic", 5, 19, 301, 32, True, scale, out, "ties"))
        cases.append(Case("generic", 7, 37, 300, 128, False, scale, out, "special"))
    # fp32 scales, scale rows broadcast over all rows
    cases += [
        Case("words", 4, 37, 300, 128, False, "fp32", "bf16", "ties"),
        Case("generic", 6, 37, 300, 32, True, "fp32", "fp16", "ties"),
        Case("words", 2, 37, 300, "shared", False, "bf16", "bf16"),
        Case("generic", 3, 37, 300, "shared", True, "fp16", "fp32"),
    ]
    # groups looked up per word / per code (group sizes that are no multiple of 16, or forced wide blocks)
    for bits in (2, 3, 4, 8):
        cases.append(Case("words", bits, 37, 300, 32, bits % 2 == 0, "fp16", "bf16", block=(8, 64)))
    cases += [
        Case("words", 3, 37, 300, 12, False, "bf16", "bf16"),  # 8-code words straddle groups
        Case("words", 3, 37, 300, 20, True, "fp16", "fp16"),
        Case("words", 4, 37, 301, 20, False, "fp16", "fp32"),
        Case("words", 2, 37, 301, 6, False, "bf16", "bf16"),  # 4-code words straddle groups
        Case("words", 8, 37, 300, 5, False, "fp16", "bf16"),
        Case("generic", 5, 37, 300, 12, False, "fp16", "bf16"),
        Case("generic", 6, 37, 300, 32, False, "bf16", "fp16", block=(4, 64)),
    ]
    # many small blocks (partial in both directions), edge shapes, one larger matrix
    cases += [
        Case("words", 3, 37, 300, 32, False, "fp16", "bf16", block=(16, 32)),
        Case("generic", 7, 37, 300, "channel", False, "bf16", "bf16", block=(8, 32)),
        Case("words", 4, 1, 7, "tensor", False, "fp16", "bf16"),
        Case("words", 3, 5, 1, "channel", True, "bf16", "fp16"),
        Case("generic", 1, 3, 9, "channel", False, "fp16", "fp32"),
        Case("words", 8, 0, 16, 32, False, "fp16", "bf16"),
        Case("words", 4, 256, 1024, 128, False, "fp16", "bf16"),
    ]
    assert len({c.id for c in cases}) == len(cases)
    return cases


CASES = _cases()


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | int, int]:
    """(packed, scale, zero, group_size) for a case, from a generator seeded by its id."""
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    rows, cols, bits = case.rows, case.cols, case.bits
    if case.group == "tensor":
        scale_rows, n_groups, group_size = 1, 1, cols
    elif case.group == "channel":
        scale_rows, n_groups, group_size = rows, 1, cols
    else:
        group_size = 128 if case.group == "shared" else int(case.group)
        scale_rows, n_groups = (1 if case.group == "shared" else rows), -(-cols // group_size)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.int32)
    packed = reference.pack_codes(codes, bits)
    dtype = DTYPES[case.scale]
    shape = (scale_rows, n_groups)
    if case.values == "ties":
        # odd significands of `width` bits (one more than bf16 keeps, or all of fp16's 11; 7 or 8 for bf16
        # scales): products with small integers land exactly half-way between neighbours of the output type
        wide, narrow = (8, 7) if dtype == torch.bfloat16 else (11, 9)
        width = torch.where(torch.rand(shape, generator=g) < 0.5, narrow, wide)
        k = torch.randint(0, 1 << 20, shape, generator=g) % (1 << (width - 2))
        mant = (1 << (width - 1)) + 2 * k + 1
        exp = torch.randint(-10, -2, shape, generator=g)  # values in [2**(exp-1), 2**exp): fp16 normals
        sign = torch.where(torch.rand(shape, generator=g) < 0.2, -1.0, 1.0).double()
        scale32 = sign * mant.double() * torch.exp2((exp - width).double())
        scale = scale32.to(dtype)
        assert torch.equal(scale.double(), scale32), "tie scales must be exact in the scale dtype"
    else:
        scale = (torch.randn(shape, generator=g) * 0.02).to(dtype)
        if case.values == "special":
            finfo = torch.finfo(dtype)
            special = [finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 8, finfo.smallest_normal * 3, 0.0, -0.0]
            special += [float("inf"), -float("inf"), float("nan"), 1.0, 65504.0 / 255 * 1.5]
            flat = scale.reshape(-1)
            pick = torch.randperm(flat.numel(), generator=g)[: min(flat.numel(), 4 * len(special))]
            flat[pick] = torch.tensor(special * 4, dtype=torch.float32)[: pick.numel()].to(dtype)
    if case.symmetric:
        zero: torch.Tensor | int = 1 << (bits - 1)
    else:
        zero = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    return packed, scale, zero, group_size


def count_ties(values: torch.Tensor, out_dtype: torch.dtype) -> tuple[int, int]:
    """How many fp32 values lie exactly half-way between two neighbours of ``out_dtype``: (up, down)."""
    if out_dtype == torch.float32:
        return 0, 0
    x = values.double()
    finite = torch.isfinite(x) & (x != 0)
    mant, exp = torch.frexp(x.abs())  # |x| = mant * 2**exp, 0.5 <= mant < 1
    frac_bits = 8 if out_dtype == torch.bfloat16 else 11
    scaled = torch.ldexp(mant, torch.full_like(exp, frac_bits))
    if out_dtype == torch.float16:  # subnormal fp16 outputs have a fixed step of 2**-24
        scaled = torch.where(x.abs() < 2.0**-14, x.abs() * 2.0**24, scaled)
    tie = finite & (scaled - scaled.floor() == 0.5)
    rounded = x.to(out_dtype).double().abs()
    return int((tie & (rounded > x.abs())).sum()), int((tie & (rounded < x.abs())).sum())


# --------------------------------------------------------------------------------------- interpreter worker
@contextlib.contextmanager
def bounds_checked(loads: list[torch.Tensor], stores: list[torch.Tensor]):
    """Fail any interpreted load (store) of an unmasked address outside ``loads`` (``stores``)."""
    from triton.runtime import interpreter

    builder = type(interpreter.interpreter_builder)
    original_load, original_store = builder.create_masked_load, builder.create_masked_store

    def regions(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
        return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel()]

    def check(kind: str, ptrs, mask, allowed: list[tuple[int, int]]) -> None:
        addr = ptrs.data.astype("uint64")
        size = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
        live = mask.data.astype(bool) if mask is not None else True
        inside = False
        for lo, hi in allowed:
            inside = inside | ((addr >= lo) & (addr + size <= hi))
        bad = live & ~inside
        if bad.any():
            raise AssertionError(f"out-of-bounds {kind} of {int(bad.sum())} elements")

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask, regions(loads))
        return original_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check("store", ptrs, mask, regions(stores))
        return original_store(self, ptrs, value, mask, cache_policy)

    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        yield
    finally:
        builder.create_masked_load, builder.create_masked_store = original_load, original_store


def run_case(case: Case) -> dict:
    """Run one case in the interpreter; compare with the reference bit for bit."""
    from nwcfmt.kernels import triton_dequant

    packed, scale, zero, group_size = make_inputs(case)
    out_dtype = DTYPES[case.out]
    want = reference.dequantize_packed(packed, scale, zero, case.bits, group_size, case.cols, out_dtype)
    exact = reference.dequantize_packed(packed, scale, zero, case.bits, group_size, case.cols, torch.float32)
    got = torch.full((case.rows, case.cols), 7, dtype=out_dtype)  # not zeros: unwritten elements show up
    inputs = [packed, scale] + ([zero] if isinstance(zero, torch.Tensor) else [])
    start = time.perf_counter()
    with bounds_checked(loads=inputs, stores=[got]):
        triton_dequant.dequantize_packed(
            packed, scale, zero, case.bits, group_size, case.cols, out_dtype, kernel=case.kernel, block=case.block,
            out=got,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    nan_want, nan_got = torch.isnan(want), torch.isnan(got)
    want_bits, got_bits = want.view(INT_VIEW[out_dtype]), got.view(INT_VIEW[out_dtype])
    problems = []
    if not torch.equal(nan_want, nan_got):
        problems.append(f"NaN at {int((nan_want ^ nan_got).sum())} differing positions")
    differ = (want_bits != got_bits) & ~nan_want & ~nan_got
    if differ.any():
        r, c = (int(i) for i in differ.nonzero()[0])
        problems.append(
            f"{int(differ.sum())} values differ, first at [{r}, {c}]: reference {hex(int(want_bits[r, c]))} "
            f"kernel {hex(int(got_bits[r, c]))} (fp32 value {exact[r, c].item()!r})"
        )
    if out_dtype == torch.bfloat16 and nan_got.any() and not (got_bits[nan_got] == 0x7FFF).all():
        problems.append("bf16 NaN is not the canonical 0x7FFF")
    return {
        "problems": problems,
        "ties": count_ties(exact, out_dtype),
        "nan": int(nan_want.sum()),
        "inf": int(torch.isinf(want).sum()),
        "seconds": seconds,
    }


def worker_main(result_path: str) -> None:
    """Script entry: case ids on stdin (JSON), results written to ``result_path`` (JSON)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "the worker runs with TRITON_INTERPRET=1 only"
    by_id = {case.id: case for case in CASES}
    results = {}
    warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow / invalid-value notes on special values
    for case_id in json.load(sys.stdin):
        try:
            results[case_id] = run_case(by_id[case_id])
        except Exception as exc:
            results[case_id] = {"problems": [f"{type(exc).__name__}: {exc}"]}
    Path(result_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, dict]:
    """Run every case in interpreter workers (one per core, at most 4); results by case id."""
    n = max(1, min(4, os.cpu_count() or 1, len(CASES)))
    # spread the costly cases: sort by size, deal round robin
    ids = [c.id for c in sorted(CASES, key=lambda c: -c.rows * c.cols)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    tmp = tmp_path_factory.mktemp("interp")
    procs = []
    for w in range(n):
        result = tmp / f"results{w}.json"
        proc = subprocess.Popen(
            [sys.executable, __file__, str(result)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            text=True,
        )
        proc.stdin.write(json.dumps(ids[w::n]))
        proc.stdin.close()
        procs.append((proc, result))
    results: dict[str, dict] = {}
    for proc, result in procs:
        output = proc.stdout.read()
        if proc.wait(timeout=600) != 0 or not result.exists():
            raise AssertionError(f"interpreter worker failed ({proc.returncode}):\n{output[-4000:]}")
        results.update(json.loads(result.read_text()))
    return results


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_interpreter_bit_exact(interpreted, case):
    result = interpreted[case.id]
    assert not result["problems"], "\n".join(result["problems"])
    if case.values == "ties" and case.out != "fp32":
        up, down = result["ties"]
        assert up > 0 and down > 0, f"the case must round ties both ways, got {up} up and {down} down"
    if case.values == "special":
        assert result["inf"] > 0 and result["nan"] > 0, "the case must produce inf and NaN"


# ---------------------------------------------------------------------------------------------- dispatch
def test_import_and_cpu_decode_do_not_import_triton():
    code = (
        "import sys, torch, nwcfmt\n"
        "from nwcfmt import kernels\n"
        "from nwcfmt.codecs import quant\n"
        "p = kernels.pack_codes(torch.randint(0, 16, (3, 40)), 4)\n"
        "s = torch.rand(3, 2, dtype=torch.float16)\n"
        "kernels.dequantize_packed(p, s, 8, 4, 32, 40, torch.bfloat16)\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("mode", ["", "auto", "reference", "triton"])
def test_cpu_tensors_use_the_reference(monkeypatch, mode):
    monkeypatch.setenv("NWC_KERNELS", mode)
    g = torch.Generator().manual_seed(0)
    packed = reference.pack_codes(torch.randint(0, 8, (5, 70), generator=g), 3)
    scale = torch.rand(5, 3, generator=g).to(torch.bfloat16)
    zero = torch.randint(0, 8, (5, 3), generator=g).to(torch.uint8)
    assert kernels.backend_for(packed.device) == "reference"
    got = kernels.dequantize_packed(packed, scale, zero, 3, 32, 70, torch.bfloat16)
    want = reference.dequantize_packed(packed, scale, zero, 3, 32, 70, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_backend_for_cuda(monkeypatch):
    cuda = torch.device("cuda")  # a device object needs no GPU
    monkeypatch.setenv("NWC_KERNELS", "reference")
    assert kernels.backend_for(cuda) == "reference"
    monkeypatch.setenv("NWC_KERNELS", "nonsense")
    with pytest.raises(ValueError, match="NWC_KERNELS"):
        kernels.backend_for(cuda)
    monkeypatch.delenv("NWC_KERNELS")
    if HAS_TRITON:
        assert kernels.backend_for(cuda) == "triton"
        monkeypatch.setenv("NWC_KERNELS", "triton")
        assert kernels.backend_for(cuda) == "triton"


def test_backend_for_cuda_without_triton(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_triton_module", lambda: "ModuleNotFoundError: No module named 'triton'")
    monkeypatch.setattr(kernels, "_triton_broken", None)
    monkeypatch.setenv("NWC_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        kernels.backend_for("cuda")
    monkeypatch.setenv("NWC_KERNELS", "auto")
    assert kernels.backend_for("cuda") == "reference"
    assert "Triton dequantization disabled" in caplog.text


@needs_triton
def test_unsupported_arguments_are_named():
    from nwcfmt.kernels import triton_dequant

    packed = reference.pack_codes(torch.randint(0, 16, (4, 64)), 4)
    scale = torch.rand(4, 2, dtype=torch.float16)
    ok = (packed, scale, 8, 4, 32, 64, torch.bfloat16)
    assert triton_dequant.unsupported_reason(*ok) is None
    bad = {
        "bits=9": (packed, scale, 8, 9, 32, 64, torch.bfloat16),
        "bytes a row": (packed, scale, 8, 4, 32, 65, torch.bfloat16),
        "groups of": (packed, scale, 8, 4, 16, 64, torch.bfloat16),
        "scale torch.float64": (packed, scale.double(), 8, 4, 32, 64, torch.bfloat16),
        "zero [4, 3]": (packed, scale, torch.zeros(4, 3, dtype=torch.uint8), 4, 32, 64, torch.bfloat16),
        "implicit zero": (packed, scale, 1 << 30, 4, 32, 64, torch.bfloat16),
        "output dtype": (packed, scale, 8, 4, 32, 64, torch.float64),
    }
    for expected, args in bad.items():
        reason = triton_dequant.unsupported_reason(*args)
        assert reason is not None and expected in reason, (expected, reason)
        with pytest.raises(ValueError, match="do not support"):
            triton_dequant.dequantize_packed(*args)


# --------------------------------------------------------------------------------------------- compiling
@dataclasses.dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel, as a launch on a large, aligned tensor would compile it."""

    kernel: str
    bits: int
    out: str
    group_size: int  # 0: per channel
    symmetric: bool
    scale: str

    @property
    def id(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "channel"
        return f"{self.kernel}-b{self.bits}-o{self.out}-{group}-{'sym' if self.symmetric else 'asym'}-s{self.scale}"

    def constexprs(self) -> dict:
        from nwcfmt.kernels import triton_dequant as tdq

        n_groups = -(-4096 // self.group_size) if self.group_size else 1
        cpw, word_bytes = tdq.word_geometry(self.bits) if self.kernel == "words" else (1, 1)
        block_r, block_c = tdq.block_sizes(4096, 4096, self.group_size, n_groups, cpw)
        consts = {
            "BITS": self.bits,
            "GROUP_SIZE": self.group_size if n_groups > 1 else 0,
            "ROW_GROUP": n_groups == 1 or self.group_size % block_c == 0,
            "SCALE_BF16": self.scale == "bf16",
            "HAS_ZERO": not self.symmetric,
            "ZERO_POINT": 1 << (self.bits - 1) if self.symmetric else 0,
            "OUT_KIND": tdq.OUT_KINDS[DTYPES[self.out]],
            "BLOCK_R": block_r,
            "BLOCK_C": block_c,
        }
        if self.kernel == "words":
            consts |= {"CODES_PER_WORD": cpw, "WORD_BYTES": word_bytes}
        return consts


VARIANTS = [
    *(Variant("words", b, out, 128, False, "fp16") for b, out in itertools.product((2, 3, 4, 8), DTYPES)),
    *(Variant("words", b, "fp32", 12, False, "bf16") for b in (2, 3, 4, 8)),  # groups per word or per code
    *(Variant("words", b, "bf16", 0, True, "bf16") for b in (2, 3, 4, 8)),
    *(Variant("generic", b, "bf16", 128, False, "fp16") for b in (1, 5, 6, 7)),
    *(Variant("generic", b, "fp32", 12, True, "bf16") for b in (1, 5, 6, 7)),
]


def compile_and_count(variant: Variant, arch: int) -> tuple[int, int, int, str]:
    """Compile one variant for ``sm_<arch>`` without a GPU: (registers, spill store bytes, spill load bytes, PTX).

    triton 3.9 fills ``CompiledKernel.n_regs``/``n_spills`` only when it loads the binary on a device, so the
    counts come from the ``ptxas -v`` log of triton's own ptxas run (``TRITON_DUMP_PTXAS_LOG``; the cache is
    bypassed so that ptxas does run).
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nwcfmt.kernels import triton_dequant as tdq

    consts = variant.constexprs()
    fn = tdq._dequant_words_kernel if variant.kernel == "words" else tdq._dequant_generic_kernel
    out_ptr = {0: "*fp32", 1: "*fp16", 2: "*i16"}[consts["OUT_KIND"]]
    pointers = {
        "packed_ptr": "*u8",
        "scale_ptr": "*i16" if consts["SCALE_BF16"] else "*fp16",
        "zero_ptr": "*u8",
        "out_ptr": out_ptr,
    }
    signature = {name: "constexpr" if name in consts else pointers.get(name, "i32") for name in fn.arg_names}
    # what a launch with 16-byte aligned pointers and sizes divisible by 16 specialises to
    aligned = [i for i, name in enumerate(fn.arg_names) if name in pointers or name in ("cols", "row_bytes")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(
            ASTSource(fn, signature, consts, attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": tdq.NUM_WARPS, "enable_fp_fusion": False},
        )
    assert compiled.asm["cubin"], "no cubin"
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    assert regs and spills, f"unexpected ptxas log:\n{text}"
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), compiled.asm["ptx"]


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: kernels are not compiled")
@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
def test_compiles_without_spills(variant, arch):
    regs, spill_stores, spill_loads, ptx = compile_and_count(variant, arch)
    print(f"{variant.id} sm_{arch}: {regs} registers, {spill_stores}/{spill_loads} bytes spilled")
    assert spill_stores == 0 and spill_loads == 0, f"{variant.id} spills on sm_{arch} ({regs} registers)"
    # what bit-exactness on the GPU rests on: no fused multiply-add, no flush of subnormals to zero, fp16
    # rounded to nearest even
    assert not re.search(r"\bfma\.", ptx), "the kernel contains a fused multiply-add"
    assert ".ftz" not in ptx, "the kernel flushes subnormals"
    to_fp16 = re.findall(r"\bcvt(?:\.\w+)*\.f16(?:x2)?\.f32\b", ptx)
    assert all(cvt.startswith("cvt.rn.") for cvt in to_fp16), sorted(set(to_fp16))
    assert (len(to_fp16) > 0) == (variant.out == "fp16")


# ------------------------------------------------------------------------------------------------ on a GPU
GPU_CASES = [
    *(Case("words", b, 4096, 4096, 128, False, "fp16", "bf16") for b in (2, 3, 4, 8)),
    Case("words", 4, 4000, 4000, 128, True, "bf16", "fp16"),
    Case("generic", 5, 4096, 4096, 128, False, "fp16", "bf16"),
]


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bit_exact(monkeypatch):
    from nwcfmt.kernels import triton_dequant

    monkeypatch.setenv("NWC_KERNELS", "triton")
    dev = torch.device("cuda")
    failures = []
    for case in CASES + GPU_CASES:
        packed, scale, zero, group_size = make_inputs(case)
        out_dtype = DTYPES[case.out]
        want = reference.dequantize_packed(packed, scale, zero, case.bits, group_size, case.cols, out_dtype)
        zero_dev = zero.to(dev) if isinstance(zero, torch.Tensor) else zero
        args = (packed.to(dev), scale.to(dev), zero_dev, case.bits, group_size, case.cols, out_dtype)
        got = triton_dequant.dequantize_packed(*args, kernel=case.kernel, block=case.block).cpu()
        dispatched = kernels.dequantize_packed(*args).cpu()
        nan = torch.isnan(want)
        for result in (got, dispatched):
            same_bits = torch.equal(want.view(INT_VIEW[out_dtype])[~nan], result.view(INT_VIEW[out_dtype])[~nan])
            if not (same_bits and torch.equal(nan, torch.isnan(result))):
                failures.append(case.id)
    assert not failures, f"{len(failures)} cases differ: {failures[:10]}"


if __name__ == "__main__":
    worker_main(sys.argv[1])
