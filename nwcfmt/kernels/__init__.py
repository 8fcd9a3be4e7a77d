"""Dequantization kernels: a torch reference (CPU path, test oracle) and Triton kernels for CUDA tensors."""

from nwcfmt.kernels.reference import dequantize, dequantize_packed, pack_codes, row_bytes, unpack_codes

__all__ = ["dequantize", "dequantize_packed", "pack_codes", "row_bytes", "unpack_codes"]
