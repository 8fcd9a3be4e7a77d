"""CRC-32 (zlib's polynomial) of segment payloads, computed in parallel pieces for large segments.

CRC-32 is linear over GF(2): ``crc(A + B) = Z(len(B)) @ crc(A) ^ crc(B)``, where ``Z(n)`` is the 32x32 bit
matrix that appends ``n`` zero bytes (zlib's ``crc32_combine``). Pieces of one fixed size need one cached
matrix, so combining costs a matrix-vector product per piece.
"""

from __future__ import annotations

import zlib
from functools import cache

from nwcfmt.parallel import num_threads, parallel_map

PIECE_BYTES = 1 << 22  # 4 MiB pieces: large enough that zlib runs at full speed with the GIL released
_POLY = 0xEDB88320


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _gf2_times(matrix: tuple[int, ...], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(_gf2_times(matrix, matrix[n]) for n in range(32))


@cache
def _zeros_operator(log2_bytes: int) -> tuple[int, ...]:
    """Z(2**log2_bytes): the operator that appends 2**log2_bytes zero bytes to a CRC register."""
    op = (_POLY, *(1 << n for n in range(31)))  # one zero bit
    for _ in range(3 + log2_bytes):  # 2, 4, 8 bits = 1 byte, then 2, 4, ... bytes
        op = _gf2_square(op)
    return op


def crc32_parallel(data: memoryview, piece: int = PIECE_BYTES) -> int:
    """CRC-32 of ``data`` (a byte memoryview), identical to :func:`crc32`, using the worker threads."""
    n = len(data)
    if n < 2 * piece or num_threads() == 1:
        return crc32(data)
    assert piece & (piece - 1) == 0, "piece must be a power of two"
    head = n % piece or piece
    parts = [data[:head]] + [data[s : s + piece] for s in range(head, n, piece)]
    crcs = parallel_map(crc32, parts)
    shift = _zeros_operator(piece.bit_length() - 1)
    crc = crcs[0]
    for part_crc in crcs[1:]:
        crc = _gf2_times(shift, crc) ^ part_crc
    return crc
