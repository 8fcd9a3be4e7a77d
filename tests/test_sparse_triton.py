"""The Triton scatter kernel of sparse records: bit for bit the torch reference in Triton's interpreter, compiled
for sm_80/sm_90 without spills, and (on a GPU) a sparse record decoded on CUDA equal to the CPU decode.

``TRITON_INTERPRET=1`` must be set before triton is imported, so the interpreter runs in a worker process (this
file run as a script), as in tests/test_kernels.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nwcfmt.kernels import reference

REPO = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (elements, keep probability, dtype): partial last blocks, nothing kept, everything kept, one block exactly
CASES = [
    (1, 1.0, "fp32"),
    (1000, 0.5, "bf16"),
    (1024, 0.0, "fp16"),
    (1024, 1.0, "bf16"),
    (3000, 0.3, "fp32"),
    (5000, 0.9, "fp16"),
    (64 * 1024 + 7, 0.5, "bf16"),
]


def make_case(n: int, p: float, dtype: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A keep mask and its values: random bit patterns (NaN payloads, signed zeros, subnormals included)."""
    gen = torch.Generator().manual_seed(seed + n)
    keep = torch.rand(n, generator=gen) < p
    nnz = int(keep.sum())
    view = INT_VIEW[DTYPES[dtype]]
    info = torch.iinfo(view)
    bits = torch.randint(info.min, info.max, (nnz + 5,), generator=gen, dtype=torch.int64).to(view)
    return keep, bits.view(DTYPES[dtype]), nnz


def worker_main() -> None:
    from nwcfmt.kernels import triton_scatter

    failures = []
    for n, p, dtype in CASES:
        keep, values, nnz = make_case(n, p, dtype)
        want = reference.scatter_kept(keep, values, DTYPES[dtype], nnz)
        got = triton_scatter.scatter_kept(keep, values, DTYPES[dtype], nnz)
        view = INT_VIEW[DTYPES[dtype]]
        if not torch.equal(want.view(view), got.view(view)):
            failures.append([n, p, dtype])
    print(json.dumps({"failures": failures, "cases": len(CASES)}))


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs the interpreter in its own process")
def test_interpreter_bit_exact():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, cwd=REPO, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"failures": [], "cases": len(CASES)}


def test_reference_scatter_contract():
    keep = torch.tensor([True, False, True, True, False])
    values = torch.tensor([1.5, -0.0, float("nan"), 9.0])
    out = reference.scatter_kept(keep, values, torch.float32, 3)
    assert out.view(torch.int32).tolist() == [
        torch.tensor(1.5).view(torch.int32).item(),
        0,
        torch.tensor(-0.0).view(torch.int32).item(),
        values[2:3].view(torch.int32).item(),
        0,
    ]


@needs_triton
def test_unsupported_arguments_are_named():
    from nwcfmt.kernels import triton_scatter

    keep = torch.ones(4, dtype=torch.bool)
    assert "output dtype" in triton_scatter.unsupported_reason(keep, torch.ones(4, dtype=torch.int32), torch.int32)
    assert "keep" in triton_scatter.unsupported_reason(keep.view(2, 2), torch.ones(4), torch.float32)
    assert "values" in triton_scatter.unsupported_reason(keep, torch.ones(4, dtype=torch.float16), torch.float32)
    assert triton_scatter.unsupported_reason(keep, torch.ones(4), torch.float32) is None


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: kernels are not compiled")
@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("value_type", ["*i32", "*i16"])
def test_compiles_without_spills(arch, value_type):
    import contextlib
    import io
    import re

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nwcfmt.kernels import triton_scatter

    fn = triton_scatter._scatter_kernel
    types = {"keep_ptr": "*u8", "offsets_ptr": "*i64", "values_ptr": value_type, "out_ptr": value_type, "n": "i64"}
    signature = {name: "constexpr" if name == "BLOCK" else types[name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if name.endswith("_ptr")}
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        compiled = triton.compile(
            ASTSource(fn, signature, {"BLOCK": triton_scatter.BLOCK}, attrs), target=GPUTarget("cuda", arch, 32)
        )
    assert compiled.asm["cubin"]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    assert spills and spills.group(1) == "0" and spills.group(2) == "0", log.getvalue()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "config",
    [
        {"values_codec": "rtn", "values": {"bits": 4}, "pattern": "2:4"},
        {"values_codec": "raw"},
        {"values_codec": "ecsq", "sparsity": 0.7},
    ],
    ids=["rtn-24", "raw", "ecsq-70"],
)
def test_cuda_decode_equals_cpu(tmp_path, monkeypatch, config):
    """A sparse record decoded on CUDA (mask and values decoded there, Triton scatter) equals the CPU decode."""
    import nwcfmt

    monkeypatch.setenv("NWC_KERNELS", "triton")
    path = tmp_path / "s.safetensors"
    nwcfmt.save({"w": (torch.randn(512, 1024) * 0.02).to(torch.bfloat16)}, path, codec="sparse", **config)
    with nwcfmt.open(path) as reader:
        on_gpu, on_cpu = reader.decode("w", device="cuda").cpu(), reader.decode("w")
    assert torch.equal(on_gpu.view(torch.int16), on_cpu.view(torch.int16))


if __name__ == "__main__":
    worker_main()
