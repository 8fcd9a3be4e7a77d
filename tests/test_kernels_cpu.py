"""The native CPU dequantization kernel against the torch reference, bit for bit."""

from __future__ import annotations

import itertools

import pytest
import torch

from nwcfmt.kernels import cpu, reference

pytestmark = pytest.mark.skipif(
    not cpu.available(torch.bfloat16), reason="native CPU kernel not built (no C compiler at install)"
)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality, except that any NaN equals any NaN (the spec leaves NaN payloads open)."""
    view = torch.int16 if a.element_size() == 2 else torch.int32
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a.view(view)[~nan], b.view(view)[~nan])


CASES = list(
    itertools.product(
        range(1, 9),  # bits
        [(5, 37), (8, 256), (3, 1001)],  # shapes: odd columns, partial last groups, odd row bytes
        [32, 100, None],  # group size (None: one group per row)
        [False, True],  # symmetric
        [torch.bfloat16, torch.float16, torch.float32],
    )
)


@pytest.mark.parametrize(("bits", "shape", "group", "symmetric", "out_dtype"), CASES)
def test_native_matches_reference(bits, shape, group, symmetric, out_dtype):
    rows, cols = shape
    g = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int32).to(torch.uint8)
    packed = reference.pack_codes(codes, bits)
    group_size = cols if group is None else group
    n_groups = -(-cols // group_size)
    scale = (torch.randn(rows, n_groups, generator=g) * 0.01).to(torch.float16)
    zero = (
        (1 << (bits - 1)) if symmetric else torch.randint(0, 1 << bits, (rows, n_groups), generator=g).to(torch.uint8)
    )
    expected = reference.dequantize_packed(packed, scale, zero, bits, group_size, cols, out_dtype)
    got = cpu.dequantize_packed(packed, scale, zero, bits, group_size, cols, out_dtype)
    assert same_bits(expected, got)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_special_scales_and_rounding_ties(out_dtype):
    """NaN, inf and overflowing scales, per-tensor scale rows, and products exactly halfway between bf16 values."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(4, 4)  # 4 x 64
    packed = reference.pack_codes(codes, 4)
    scale = torch.tensor([[float("nan"), float("inf"), 6e4, 1.00390625]], dtype=torch.float32)  # 1 + 2**-8: ties
    for zero in (torch.zeros(1, 4, dtype=torch.uint8), 3):
        expected = reference.dequantize_packed(packed, scale, zero, 4, 16, 64, out_dtype)
        assert same_bits(expected, cpu.dequantize_packed(packed, scale, zero, 4, 16, 64, out_dtype))
