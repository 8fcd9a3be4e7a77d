"""zstd frames as codecs use them: compressors per thread, and bounded decoding of untrusted frames.

Every frame a codec writes declares its decoded size; a reader checks that size against what the codec
expects before decompressing, and never lets zstd produce more.
"""

from __future__ import annotations

import threading

import numpy as np
import zstandard

from nwcfmt.errors import FormatError, LimitError

_local = threading.local()


def huffman_compressor() -> zstandard.ZstdCompressor:
    """zstd tuned to act as a Huffman coder on byte planes that have no useful LZ matches.

    A 128 KiB window keeps one Huffman table per 128 KiB block; a tiny hash table and min_match=7 keep zstd
    from spending bits on short matches.
    """
    comp = getattr(_local, "huffman", None)
    if comp is None:
        params = zstandard.ZstdCompressionParameters(
            window_log=17,
            chain_log=6,
            hash_log=6,
            search_log=1,
            min_match=7,
            target_length=0,
            strategy=zstandard.STRATEGY_FAST,
            write_content_size=True,
            write_checksum=False,
            write_dict_id=False,
        )
        comp = _local.huffman = zstandard.ZstdCompressor(compression_params=params)
    return comp


def general_compressor() -> zstandard.ZstdCompressor:
    """zstd level 3 with the content size recorded: for packed integer codes, where LZ matches do occur."""
    comp = getattr(_local, "general", None)
    if comp is None:
        comp = _local.general = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    return comp


def compress_frame(data: np.ndarray) -> bytes:
    return general_compressor().compress(np.ascontiguousarray(data).tobytes())


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def check_stream(data: memoryview, raw: bool, n: int, where: str) -> None:
    """Check a plane's size from its bytes or its zstd frame header alone (nothing is decompressed)."""
    if raw:
        if len(data) != n:
            raise FormatError(f"{where}: raw plane has {len(data)} bytes, expected {n}")
        return
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        raise FormatError(f"{where}: plane is not a zstd frame") from None
    if declared < 0:
        raise FormatError(f"{where}: zstd frame does not declare its decoded size")
    if declared != n:
        error = LimitError if declared > n else FormatError
        raise error(f"{where}: plane declares {declared} bytes, expected {n}")


def unpack_stream(data: memoryview, raw: bool, n: int, where: str) -> np.ndarray:
    check_stream(data, raw, n, where)
    if raw:
        return np.frombuffer(data, dtype=np.uint8)
    try:
        out = _decompressor().decompress(data, max_output_size=n, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError(f"{where}: corrupt zstd frame ({exc})") from None
    if len(out) != n:
        raise FormatError(f"{where}: plane decoded to {len(out)} bytes, expected {n}")
    return np.frombuffer(out, dtype=np.uint8)
