"""Build the NWC v1 golden test vectors (deterministic; run from anywhere).

    python spec/golden/make_golden.py            # rewrite the committed files in spec/golden/
    python spec/golden/make_golden.py OUT_DIR    # write them somewhere else

Every golden file is written by the reference writer (:class:`nwcfmt.NwcWriter`). Beside each one,
``NAME.expected.safetensors`` is a *plain* safetensors file (written with the ``safetensors`` library, no
NWC manifest) holding the tensors the golden file must decode to, bit for bit. ``golden.json`` records the
SHA-256 of every file plus the producer and the libzstd version that wrote them (zstd output is only
reproducible byte for byte with the same libzstd version; see spec/golden/README.md).

All "random" data comes from SHAKE-256 of a fixed seed string and is turned into float bit patterns with
integer arithmetic only, so the inputs do not depend on numpy's or torch's random generators or on their
float-conversion routines.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import save, save_file

import nwcfmt
from nwcfmt import NwcWriter
from nwcfmt.codecs.base import EncodedTensor
from nwcfmt.codecs.flexround import FlexRoundCodec
from nwcfmt.codecs.gptq import GptqCodec
from nwcfmt.codecs.lrq import LrqCodec
from nwcfmt.codecs.quant import GroupQuantCodec

HERE = Path(__file__).resolve().parent
ALIGNMENT = 64

# --------------------------------------------------------------------------------------- deterministic data


def random_bytes(seed: str, n: int) -> np.ndarray:
    return np.frombuffer(hashlib.shake_256(seed.encode()).digest(n), dtype=np.uint8)


def random_u16(seed: str, n: int) -> np.ndarray:
    return random_bytes(seed, 2 * n).view("<u2").astype(np.uint16)


def random_u32(seed: str, n: int) -> np.ndarray:
    return random_bytes(seed, 4 * n).view("<u4").astype(np.uint32)


def gaussian_f32_bits(seed: str, n: int, std: float) -> np.ndarray:
    """float32 bit patterns of roughly N(0, std^2) values (Irwin-Hall sum of 4 uniforms), as uint32."""
    u = random_u32(seed, 4 * n).reshape(n, 4).astype(np.float64) / 2.0**32
    values = (u.sum(axis=1) - 2.0) * np.sqrt(3.0) * std  # variance of the sum of 4 U(0,1) is 1/3
    return values.astype(np.float32).view(np.uint32)  # float64 -> float32 is IEEE round-to-nearest-even


def f32_bits_to_bf16_bits(u: np.ndarray) -> np.ndarray:
    """Round float32 bit patterns to bfloat16 (round to nearest, ties to even); inputs must be finite."""
    u = u.astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16(words) -> torch.Tensor:
    return torch.from_numpy(np.asarray(words, dtype=np.uint16).view(np.int16).copy()).view(torch.bfloat16)


def f16(words) -> torch.Tensor:
    return torch.from_numpy(np.asarray(words, dtype=np.uint16).view(np.int16).copy()).view(torch.float16)


def f32(words) -> torch.Tensor:
    return torch.from_numpy(np.asarray(words, dtype=np.uint32).view(np.int32).copy()).view(torch.float32)


def with_prefixes(seed: str, exponents, mant_top: int, *, word_bits: int, mant_bits: int, n: int) -> np.ndarray:
    """n words cycling through every (exponent, top `mant_top` mantissa bits) pair; sign and low bits random."""
    pairs = [(e, m) for e in exponents for m in range(1 << mant_top)]
    low_bits = mant_bits - mant_top
    rnd = random_u32(seed, n)
    out = np.empty(n, dtype=np.uint64)
    for i in range(n):
        e, m = pairs[i % len(pairs)]
        r = int(rnd[i])
        sign = r >> 31
        low = r & ((1 << low_bits) - 1)
        out[i] = (sign << (word_bits - 1)) | (e << mant_bits) | (m << low_bits) | low
    return out.astype(np.uint16 if word_bits == 16 else np.uint32)


# Special values: +-0, +-inf, quiet and signalling NaNs with payloads, subnormals, extremes, ordinary values.
BF16_SPECIAL = [
    0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7FC1, 0xFFFF, 0x7F81, 0xFF81, 0x7FA5,
    0x0001, 0x8001, 0x007F, 0x807F, 0x0040, 0x0080, 0x8080, 0x7F7F, 0xFF7F, 0x3F80, 0xBF80, 0xC0B3, 0x3C23,
]  # fmt: skip
F16_SPECIAL = [
    0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE00, 0x7E01, 0xFFFF, 0x7C01, 0xFC01, 0x7D55,
    0x0001, 0x8001, 0x03FF, 0x83FF, 0x0200, 0x0400, 0x8400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00, 0xC59A, 0x2E66,
]  # fmt: skip
F32_SPECIAL = [
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FC00001, 0xFFFFFFFF,
    0x7F800001, 0xFF800001, 0x7FA5A5A5, 0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x00400000,
    0x00800000, 0x80800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F800000, 0xBF800000, 0xC0B3C0B3, 0x3C23D70A,
]  # fmt: skip

# --------------------------------------------------------------------------------------------- golden files
# Each builder writes one golden file and returns the tensors it must decode to.


def build_raw_dtypes(path: Path) -> dict[str, torch.Tensor]:
    """Every dtype the raw codec must carry, odd sizes (so padding tensors appear), 0-d, empty, metadata."""
    t = {
        "f32": f32([0x3F800000, 0x80000000, 0x7F800000, 0x7FC00001, 0x00000001, 0xC0490FDB]).reshape(2, 3),
        "bf16": bf16([0x3F80, 0x8000, 0xFF80, 0x7FC1, 0x0001]),
        "f16": f16([0x3C00, 0x7BFF, 0x0001]),
        "f64": torch.from_numpy(np.array([0x3FF0000000000000, 0x7FF8000000000001], dtype=np.uint64).view(np.float64)),
        "i64": torch.tensor([-1, 1 << 62, -(1 << 63)], dtype=torch.int64),
        "i32": torch.tensor([[-2, 2147483647], [-2147483648, 7]], dtype=torch.int32),
        "i16": torch.tensor([-32768, 32767, 1], dtype=torch.int16),
        "i8": torch.tensor([-128, 127, 0, -1, 5], dtype=torch.int8),
        "u8": torch.tensor([0, 1, 2, 127, 128, 254, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, False, True]),
        "f8_e4m3fn": torch.tensor([0x00, 0x38, 0x7E, 0xFE, 0x7F, 0x01], dtype=torch.uint8).view(torch.float8_e4m3fn),
        "f8_e5m2": torch.tensor([0x00, 0x3C, 0x7B, 0x7C, 0xFE, 0x01], dtype=torch.uint8).view(torch.float8_e5m2),
        "scalar": f32([0x40490FDB]).reshape(()),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
    }
    with NwcWriter(path, metadata={"note": "nwc golden vector", "format": "pt"}) as w:
        for name, tensor in t.items():
            w.write(name, tensor, "raw")
    return t


def build_lossless_bf16(path: Path) -> dict[str, torch.Tensor]:
    weight = bf16(f32_bits_to_bf16_bits(gaussian_f32_bits("bf16.weight", 800, 0.02)))
    # fallback: chunk 0 has 300 distinct 10-bit prefixes but 150 distinct 9-bit ones (k = 1); chunk 1 has
    # 280 distinct 9-bit prefixes but 140 exponents (k = 0); chunk 2 (partial, 300 values) holds all 256
    # exponents and random bits (k = 0 with a full 256-entry table; its planes do not compress: stored raw).
    c0 = with_prefixes("bf16.fb.0", range(100, 175), 2, word_bits=16, mant_bits=7, n=600)
    c1 = with_prefixes("bf16.fb.1", range(60, 200), 1, word_bits=16, mant_bits=7, n=600)
    c2 = random_u16("bf16.fb.2", 300)
    c2[:256] = (c2[:256] & 0x807F) | (np.arange(256, dtype=np.uint16) << 7)
    fallback = bf16(np.concatenate([c0, c1, c2]))
    # 259 values in chunks of 256: the last chunk holds 3 values (1, 2^10, 2^-10) whose prefixes are far apart
    short_tail = bf16(
        np.concatenate([f32_bits_to_bf16_bits(gaussian_f32_bits("bf16.short", 256, 0.02)), [0x3F80, 0x4480, 0x3A80]])
    )
    t = {
        "model.layers.0.mlp.weight": weight.reshape(4, 200),
        "model.layers.0.fallback": fallback.reshape(3, 500),
        "model.layers.0.short_tail": short_tail,
        "model.layers.0.special": bf16(BF16_SPECIAL).reshape(2, 12),
        "model.layers.0.scalar": bf16([0xC0B3]).reshape(()),
        "model.layers.0.empty": bf16([]).reshape(0, 4),
        "model.layers.0.tiny": bf16([0x3F80, 0x4000, 0x4040]),
    }
    with NwcWriter(path) as w:
        w.write("model.layers.0.mlp.weight", t["model.layers.0.mlp.weight"], "lossless", chunk_elems=256)
        w.write(
            "model.layers.0.fallback", t["model.layers.0.fallback"], "lossless", raw_if_larger=False, chunk_elems=600
        )
        w.write("model.layers.0.short_tail", short_tail, "lossless", raw_if_larger=False, chunk_elems=256)
        for name in ("special", "scalar", "empty"):
            w.write(f"model.layers.0.{name}", t[f"model.layers.0.{name}"], "lossless", raw_if_larger=False)
        # requested lossless, but not smaller than raw: the writer stores it with the raw codec
        w.write("model.layers.0.tiny", t["model.layers.0.tiny"], "lossless")
    return t


def build_lossless_fp16(path: Path) -> dict[str, torch.Tensor]:
    weight = f32_bits_to_f16(gaussian_f32_bits("f16.weight", 700, 0.05))
    t = {
        "w": f16(weight),
        "special": f16(F16_SPECIAL),
        "random": f16(random_u16("f16.random", 256)),
    }
    with NwcWriter(path) as w:
        # 256-value chunks of fp16 do not beat raw (the table costs up to 512 bytes per chunk): keep lossless
        w.write("w", t["w"], "lossless", raw_if_larger=False, chunk_elems=256)
        w.write("special", t["special"], "lossless", raw_if_larger=False, chunk_elems=256)
        w.write("random", t["random"], "lossless", raw_if_larger=False, chunk_elems=256)
    return t


def f32_bits_to_f16(u: np.ndarray) -> np.ndarray:
    return u.view(np.float32).astype(np.float16).view(np.uint16)  # IEEE conversion, round to nearest even


def build_lossless_fp32(path: Path) -> dict[str, torch.Tensor]:
    c0 = with_prefixes("f32.fb.0", range(90, 165), 2, word_bits=32, mant_bits=23, n=450)  # k = 1
    c1 = random_u32("f32.fb.1", 450)  # k = 0, every plane raw
    t = {
        "w": f32(gaussian_f32_bits("f32.weight", 700, 0.02)).reshape(2, 350),
        "fallback": f32(np.concatenate([c0, c1])),
        "special": f32(F32_SPECIAL).reshape(4, 3, 2),
    }
    with NwcWriter(path) as w:
        w.write("w", t["w"], "lossless", raw_if_larger=False, chunk_elems=256)
        w.write("fallback", t["fallback"], "lossless", raw_if_larger=False, chunk_elems=450)
        w.write("special", t["special"], "lossless", raw_if_larger=False)
    return t


def build_sharded(folder: Path) -> dict[str, torch.Tensor]:
    """Two shards plus model.safetensors.index.json (each shard carries its own manifest)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = [
        {
            "model.embed_tokens.weight": f32(gaussian_f32_bits("shard.embed", 16, 1.0)).reshape(4, 4),
            "model.layers.0.weight": bf16(f32_bits_to_bf16_bits(gaussian_f32_bits("shard.l0", 300, 0.02))),
        },
        {
            "model.layers.1.weight": f16(f32_bits_to_f16(gaussian_f32_bits("shard.l1", 300, 0.05))),
            "model.norm.weight": bf16([0x3F80] * 8),
        },
    ]
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with NwcWriter(folder / name, shard=(i, len(shards))) as w:
            for tname, tensor in tensors.items():
                codec = "raw" if tname.endswith(("embed_tokens.weight", "norm.weight")) else "lossless"
                config = {"raw_if_larger": False, "chunk_elems": 256} if codec == "lossless" else {}
                record = w.write(tname, tensor, codec, **config)
                for ref in record.segments.values():
                    weight_map[ref.tensor] = name
        total += (folder / name).stat().st_size
    index = {"metadata": {"total_size": total, "format": "nwc"}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {k: v for tensors in shards for k, v in tensors.items()}


# ------------------------------------------------------------------------------- quantized layout (quant.md)
# rtn is the first codec id of the shared integer-code layout. Hand-built records (codes, scales and zeros
# chosen here) pin the layout and the arithmetic; the rtn files show what the encoder itself writes. The
# values a quantized golden tensor must decode to are what the reference decoder makes of the stored
# segments (tests/test_golden.py checks them against an independent decoder and exact arithmetic).


class HandBuilt(GroupQuantCodec):
    """Stores given codes, scales and zeros with the reference packer, under the codec id ``rtn``."""

    codec_id = "rtn"

    def quantize(self, weight, layout):
        raise NotImplementedError("hand-built records are packed from explicit codes")


def decode_all(path: Path) -> dict[str, torch.Tensor]:
    """What the reference decoder makes of every tensor of a file (the expected values of a lossy file)."""
    with nwcfmt.open(path) as reader:
        return {name: reader.decode(name) for name in reader.names}


def write_codes(
    w: NwcWriter,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    codes,
    scale_words,
    zero=None,
    *,
    bits: int,
    group_size: int,
    scale_dtype: str = "float16",
    codec_class: type[GroupQuantCodec] = HandBuilt,
    **config,
) -> None:
    """Append a record holding exactly ``codes`` ([rows, cols]), the scale bit patterns and the zeros.

    Symmetric when ``zero`` is None. ``scale_words`` and ``zero`` are [scale_rows, n_groups]. ``codec_class``
    (and its extra ``config``) gives the codec id and the params its encoder records.
    """
    codec = codec_class(bits=bits, group_size=group_size, symmetric=zero is None, scale_dtype=scale_dtype, **config)
    like = torch.empty(shape, dtype=dtype)
    layout = codec.layout(like)
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64)).reshape(layout.rows, layout.cols)
    words = np.asarray(scale_words, dtype=np.uint16).reshape(layout.scale_rows, layout.n_groups)
    scale = (f16 if scale_dtype == "float16" else bf16)(words)
    zeros = None if zero is None else torch.as_tensor(np.asarray(zero, dtype=np.uint8))
    w.append(name, like, codec, codec.pack(codes, scale, zeros, layout))


def permutations(seed: str, rows: int, n: int) -> np.ndarray:
    """``rows`` permutations of ``range(n)`` drawn from SHAKE-256 (a sort by random keys, ties by position)."""
    keys = random_u32(seed, rows * n).reshape(rows, n)
    return np.argsort(keys, axis=1, kind="stable")


# Per-channel rows of the arithmetic tensors: (scale bit pattern, zero). Every row holds every 8-bit code once,
# so each row decodes (code - zero) * scale for all 256 codes.
ARITH_BF16_FROM_F16 = [
    (0x3E00, 0),  # 1.5: half-integers, ties to even in bfloat16 (8 significant bits)
    (0x3E00, 255),  # the same, negative
    (0x3C01, 128),  # 1 + 2^-10: rounds down to the integer
    (0x7BFF, 100),  # 65504, the largest float16
    (0x0001, 128),  # 2^-24, the smallest float16 subnormal
    (0x03FF, 7),  # the largest float16 subnormal
    (0x0400, 200),  # 2^-14, the smallest float16 normal
    (0x2E66, 131),  # 0.0999755859375
]
ARITH_F16_FROM_BF16 = [
    (0x3FFF, 0),  # 1.9921875 (8 significant bits): 16-bit products, rounded to 11 bits, ties to even
    (0x3FFF, 255),
    (0x43A0, 40),  # 320: codes >= 245 overflow float16 (> 65504 + 16) to +inf
    (0x7F7F, 128),  # the largest bfloat16: every code but the zero is +-inf in float16
    (0x0001, 128),  # 2^-133: every product underflows to +0 or -0 in float16
    (0x3340, 100),  # 1.5 * 2^-25: float16 subnormal results, ties to even on the 2^-24 grid
    (0x3C23, 131),  # 0.00994873046875
    (0x0080, 0),  # 2^-126, the smallest bfloat16 normal: underflows to +0
]
ARITH_BF16_FROM_BF16 = [
    (0x3FC0, 0),  # 1.5: ties to even in bfloat16
    (0x0001, 128),  # 2^-133: bfloat16 subnormal results (exact below 2^-126), no flush to zero
    (0x0003, 60),  # 3 * 2^-133: subnormal results, rounded once above 2^-126
    (0x7F7F, 126),  # the largest bfloat16: +-1 stay finite, larger |code - zero| overflow to +-inf
]
ARITH_F32_FROM_BF16 = [
    (0x7F7F, 128),  # the largest bfloat16: +-1 stay finite, every larger |code - zero| overflows to +-inf
    (0x7F00, 127),  # 2^127: code 128 gives 2^127, code 129 overflows
    (0x0001, 128),  # 2^-133: float32 subnormal results, exact (no flush to zero)
    (0x0080, 0),  # 2^-126
    (0x3FFF, 77),
    (0x3C23, 255),
]


def build_quant_layout(path: Path) -> dict[str, torch.Tensor]:
    """Hand-built records: the worked examples of quant.md, every width with every code and padding bits,
    zeros at both ends of the range, and the arithmetic corner cases (ties, subnormals, overflow)."""
    with NwcWriter(path) as w:
        # quant.md worked example, 4 bits: two groups per row, the second a partial group of 2 values
        write_codes(
            w, "example.w4", (2, 6), torch.float16,
            [[3, 12, 0, 15, 7, 9], [15, 14, 1, 2, 8, 8]],
            [[0x3400, 0x3800], [0x2E66, 0x3E00]], [[8, 3], [1, 15]],
            bits=4, group_size=4,
        )  # fmt: skip
        # 3 bits: 8 codes in 3 bytes; symmetric (implicit zero 4), one scale for the tensor
        write_codes(w, "example.w3", (8,), torch.bfloat16, [5, 0, 7, 2, 1, 6, 3, 4], [[0x3E00]],
                    bits=3, group_size=-1, scale_dtype="bfloat16")  # fmt: skip
        # 5 bits: 3 codes in 15 bits, 1 padding bit per row; per channel, bfloat16 scales
        write_codes(
            w, "example.w5", (2, 3), torch.float32, [[31, 1, 16], [0, 30, 17]], [[0x3E80], [0x3F80]],
            [[16], [0]], bits=5, group_size=0, scale_dtype="bfloat16",
        )  # fmt: skip
        # every width: row r holds every code 0 .. 2^bits - 1 plus 3 more (so that most rows end in padding
        # bits); zero 0, 2^bits - 1 and the middle; group_size 0, scale 0.5, 0.25, 0.125
        for bits in range(1, 9):
            q = (1 << bits) - 1
            cols = q + 4
            codes = [[(i + r) % (q + 1) for i in range(cols)] for r in range(3)]
            write_codes(w, f"widths.b{bits}", (3, cols), torch.bfloat16, codes, [[0x3800], [0x3400], [0x3000]],
                        [[0], [q], [(q + 1) // 2]], bits=bits, group_size=0)  # fmt: skip
        # symmetric 1 bit: the implicit zero is 1, codes decode to -scale and 0
        write_codes(w, "widths.b1.symmetric", (9,), torch.float16, [0, 1, 1, 0, 1, 0, 0, 0, 1], [[0x3C00]],
                    bits=1, group_size=-1)  # fmt: skip
        for name, dtype, scale_dtype, rows in (
            ("arith.bf16_from_f16", torch.bfloat16, "float16", ARITH_BF16_FROM_F16),
            ("arith.f16_from_bf16", torch.float16, "bfloat16", ARITH_F16_FROM_BF16),
            ("arith.bf16_from_bf16", torch.bfloat16, "bfloat16", ARITH_BF16_FROM_BF16),
            ("arith.f32_from_bf16", torch.float32, "bfloat16", ARITH_F32_FROM_BF16),
        ):
            codes = permutations(name, len(rows), 256)
            write_codes(w, name, (len(rows), 256), dtype, codes, [[s] for s, _ in rows], [[z] for _, z in rows],
                        bits=8, group_size=0, scale_dtype=scale_dtype)  # fmt: skip
    return decode_all(path)


def build_quant_ids(path: Path) -> dict[str, torch.Tensor]:
    """The calibrated codec ids of quant.md section 1 (gptq, flexround, lrq) with the params their encoders
    record: the same layout as rtn, so the same codes, scales and zeros decode to the same values."""
    example = dict(
        shape=(2, 6), dtype=torch.float16, codes=[[3, 12, 0, 15, 7, 9], [15, 14, 1, 2, 8, 8]],
        scale_words=[[0x3400, 0x3800], [0x2E66, 0x3E00]], zero=[[8, 3], [1, 15]], bits=4, group_size=4,
    )  # fmt: skip
    codes3 = [[(5 * i + r) % 8 for i in range(10)] for r in range(3)]
    with NwcWriter(path) as w:
        for codec_class, config in (
            (GptqCodec, {"act_order": True}),
            (FlexRoundCodec, {}),
            (LrqCodec, {"rank": 8}),
        ):
            codec_id = codec_class.codec_id
            write_codes(w, f"{codec_id}.example.w4", **example, codec_class=codec_class, **config)
            # 3 bits per channel, bfloat16 scales, bfloat16 tensor; symmetric (implicit zero 4) for gptq
            zero = None if codec_class is GptqCodec else [[0], [7], [4]]
            write_codes(w, f"{codec_id}.w3", (3, 10), torch.bfloat16, codes3, [[0x3C80], [0x3B00], [0x3D20]], zero,
                        bits=3, group_size=0, scale_dtype="bfloat16", codec_class=codec_class, **config)  # fmt: skip
    return decode_all(path)


def weights(seed: str, shape: tuple[int, ...], dtype: torch.dtype, std: float = 0.02) -> torch.Tensor:
    return f32(gaussian_f32_bits(seed, math.prod(shape), std)).reshape(shape).to(dtype)


def build_rtn(path: Path) -> dict[str, torch.Tensor]:
    """The rtn encoder over a grid of params: widths, groupings, symmetric or not, scale dtypes, tensor
    dtypes and ranks, the clipping search, special groups, and the zstd entropy stage with one chunk."""
    bf, hf, ff = torch.bfloat16, torch.float16, torch.float32
    special = weights("rtn.special", (4, 24), ff)
    special[0] = 0.0  # an all-zero row: scale is the smallest normal, every code the zero
    special[1] = special[1].abs() + 0.01  # all positive: lo is 0, the zero point is 0
    special[2] = -special[2].abs() - 0.01  # all negative: the zero point is 2^bits - 1
    cases = [
        # name, shape, dtype, config
        ("rtn.b1.g8", (3, 20), bf, {"bits": 1, "group_size": 8}),
        ("rtn.b2.g16", (6, 40), bf, {"bits": 2, "group_size": 16}),
        ("rtn.b2.g1", (2, 5), hf, {"bits": 2, "group_size": 1, "scale_dtype": "bfloat16"}),
        ("rtn.b3.g32.sym", (4, 72), hf, {"bits": 3, "group_size": 32, "symmetric": True, "scale_dtype": "bfloat16"}),
        ("rtn.b4.g32.clip", (4, 64), bf, {"bits": 4, "group_size": 32, "clip_search": True}),
        ("rtn.b4.channel.sym", (5, 48), ff, {"bits": 4, "group_size": 0, "symmetric": True, "scale_dtype": "bfloat16"}),
        ("rtn.b5.g24", (3, 50), ff, {"bits": 5, "group_size": 24}),
        ("rtn.b6.g16.sym", (2, 40), bf, {"bits": 6, "group_size": 16, "symmetric": True}),
        ("rtn.b7.tensor", (3, 30), hf, {"bits": 7, "group_size": -1}),
        ("rtn.b8.tensor", (5, 33), bf, {"bits": 8, "group_size": -1, "scale_dtype": "bfloat16"}),
        ("rtn.b8.g64.sym", (5, 33), bf, {"bits": 8, "group_size": 64, "symmetric": True}),
        ("rtn.1d.b4.g16", (37,), bf, {"bits": 4, "group_size": 16}),
        ("rtn.1d.b3.channel.sym", (21,), ff, {"bits": 3, "group_size": 0, "symmetric": True}),
        ("rtn.3d.b4.g8", (3, 4, 10), hf, {"bits": 4, "group_size": 8, "scale_dtype": "bfloat16"}),
        ("rtn.3d.b2.tensor.sym", (2, 3, 5), bf, {"bits": 2, "group_size": -1, "symmetric": True}),
    ]
    # the zstd stage pays on sparse weights: 3 values in 4 are 0, so most codes are the zero point
    sparse = weights("rtn.zstd.b4.g32", (32, 64), ff)
    sparse *= torch.from_numpy(random_bytes("rtn.zstd.mask", sparse.numel()).copy()).reshape(sparse.shape) < 64
    with NwcWriter(path) as w:
        for name, shape, dtype, config in cases:
            w.write(name, weights(name, shape, dtype), "rtn", **config)
        w.write("rtn.special.b4.g8", special.to(bf), "rtn", bits=4, group_size=8)
        w.write("rtn.zstd.b4.g32", sparse.to(bf), "rtn", bits=4, group_size=32, entropy="zstd")
    return decode_all(path)


def build_rtn_zstd_chunks(path: Path) -> dict[str, torch.Tensor]:
    """The zstd entropy stage over several chunks: packed codes above 2^20 bytes (so the decoded tensors are
    large; their expected-values file is stored zstd-compressed). The rows repeat, so the frames are small."""
    # 7 bits, 100 columns: 88 bytes a row (4 padding bits), 11 915 rows a chunk; 2 full chunks and 3 rows
    pool = weights("rtn_zstd.a", (7, 100), torch.float32)
    a = pool[torch.arange(2 * 11915 + 3) % 7].to(torch.bfloat16)
    # 8 bits, rows of 2^20 + 1 bytes: longer than a chunk, so each row is a chunk of its own
    pattern = weights("rtn_zstd.b", (2, 997), torch.float32)
    b = pattern.repeat(1, 1052)[:, : (1 << 20) + 1].contiguous().to(torch.float16)
    with NwcWriter(path) as w:
        w.write("zstd.a.b7.tensor", a, "rtn", bits=7, group_size=-1, entropy="zstd")
        w.write("zstd.b.b8.tensor.sym", b, "rtn", bits=8, group_size=-1, symmetric=True, scale_dtype="bfloat16",
                entropy="zstd")  # fmt: skip
    return decode_all(path)


def write_ecsq_levels(w: NwcWriter, version: int) -> None:
    """A hand-built ``ecsq`` record with 3 column levels: one table and one row of ``recon`` per level (level 2
    uses only symbols 0 and 1), two lanes of 1024 symbols and a short third, fp16 row scales. Version 2 packs
    the levels 4 to a byte (502 columns: the last byte is half padding); version 1 stores a byte a column."""
    from nwcfmt.codecs.ecsq import EcsqCodec
    from nwcfmt.codecs.latent import pack_levels
    from nwcfmt.encoders.latents import encode_stream, table_counts, tables_for
    from nwcfmt.entropy.rans import Context

    rows, cols, alphabet = 5, 502 if version >= 2 else 500, 5
    levels = (random_bytes(f"latent.levels.v{version}", cols) % 3).astype(np.uint8)
    symbols = (random_bytes(f"latent.symbols.v{version}", rows * cols) % alphabet).astype(np.int64)
    col_level = np.tile(levels, rows)
    symbols[col_level == 2] %= 2
    context = Context(channels=1, levels=levels, level_run=1, n_levels=3)
    freqs = tables_for(table_counts(symbols, alphabet, context))
    stream = encode_stream(symbols, freqs, context, 1024)
    recon = torch.tensor([[-1.5, -0.5, 0.0, 0.5, 1.5], [-3.0, -1.0, 0.0, 1.0, 3.0], [-0.125, 0.375, 0.0, 0.0, 0.0]])
    scale = f16(random_u16(f"latent.scale.v{version}", rows) & 0x3FFF | 0x2000)  # positive, normal
    encoded = EncodedTensor(
        {
            "data": torch.from_numpy(stream.words),
            "lanes": torch.from_numpy(stream.lanes),
            "tables": torch.from_numpy(freqs),
            "recon": recon,
            "scale": scale,
            "levels": torch.from_numpy(pack_levels(levels) if version >= 2 else levels),
        },
        {"levels": 3, "lane_symbols": 1024, "scale_dtype": "float16"},
    )
    codec = EcsqCodec()
    codec.version = version  # this instance writes records of that version
    w.append(f"ecsq.levels3.v{version}.fp16", torch.empty(rows, cols, dtype=torch.float16), codec, encoded)


def build_latent(path: Path) -> dict[str, torch.Tensor]:
    """The entropy-coded latent layout of codecs/latent.md: what the ``ecsq`` encoder writes (several lanes with
    a short last one, one lane, a one-symbol alphabet with no words, rank 1, 2 and 3, all three dtypes, both
    scale dtypes, midpoint reconstruction) and hand-built records with column levels, in both versions."""
    bf, hf, ff = torch.bfloat16, torch.float16, torch.float32
    with NwcWriter(path) as w:
        w.write("ecsq.b4.fp32", weights("latent.a", (40, 64), ff), "ecsq", bits=4, lane_symbols=1024)
        w.write("ecsq.b2.5.bf16", weights("latent.b", (3, 700), bf), "ecsq", bits=2.5, lane_symbols=1024)
        w.write("ecsq.b6.fp16.1d", weights("latent.c", (1500,), hf), "ecsq", bits=6, lane_symbols=2048,
                scale_dtype="bfloat16")  # fmt: skip
        w.write("ecsq.b3.mid.3d", weights("latent.d", (2, 8, 64), bf), "ecsq", bits=3, centroids=False)
        w.write("ecsq.constant", torch.full((4, 300), -0.5, dtype=ff), "ecsq", bits=4, lane_symbols=1024)
        write_ecsq_levels(w, 2)
        write_ecsq_levels(w, 1)
        # neural: two records sharing the decoder network (stored once); 16 channel tables and one table; rows
        # that are not a multiple of 16 (padded chunks)
        w.write("neural.b4.fp32", weights("latent.e", (48, 64), ff), "neural", bits=4, lane_symbols=1024,
                net_share=1 << 10, channels=16)  # fmt: skip
        w.write("neural.b3.bf16.pad", weights("latent.f", (21, 100), bf), "neural", bits=3, lane_symbols=1024,
                net_share=1 << 10, channels=1)  # fmt: skip
    return decode_all(path)


def column_skewed_mask(seed: str, rows: int, cols: int) -> torch.Tensor:
    """A mask whose columns have very different keep rates (what Wanda's input norms give, exaggerated so that a
    small tensor pays for its mask levels): column c is kept where a SHAKE-256 byte is below 4 (c even) or 252
    (c odd), so the even columns are almost always pruned and the odd ones almost always kept."""
    u = torch.from_numpy(random_bytes(seed, rows * cols).astype(np.int64)).reshape(rows, cols)
    limits = torch.where(torch.arange(cols) % 2 == 0, 4, 252)
    return u < limits


def build_sparse(path: Path) -> dict[str, torch.Tensor]:
    """codecs/sparse.md: masks stored as plain bits and as rANS symbols (unstructured with one and several mask
    levels and several lanes, 2:4, 4:8 and 1:3 group symbols), values coded by raw, lossless, rtn and ecsq, ragged
    rows (a values matrix whose rows straddle tensor rows, zero padding), per-row counts ([rows, kept] values),
    1-D and 3-D tensors, nothing kept (``nnz = 0``) and everything kept. (Values coded by ``neural`` are left to
    the unit tests: its network alone would take 27 kB here.)"""
    from nwcfmt.codecs.mask import Pattern
    from nwcfmt.codecs.sparse import encode_values, sparse_encoded

    bf, hf, ff = torch.bfloat16, torch.float16, torch.float32
    with NwcWriter(path) as w:
        w.write("mag50.raw.bf16", weights("sparse.a", (24, 40), bf), "sparse", values_codec="raw")
        w.write("mag70.raw.fp32", weights("sparse.b", (12, 50), ff), "sparse", sparsity=0.7, values_codec="raw")
        w.write("rand60.lossless.bf16", weights("sparse.c", (32, 64), bf), "sparse", prune="random", sparsity=0.6,
                values_codec="lossless")  # fmt: skip
        w.write("nm24.rtn4.fp16", weights("sparse.d", (16, 64), hf), "sparse", pattern="2:4", values_codec="rtn",
                values={"bits": 4, "group_size": 16})  # fmt: skip
        w.write("nm48.raw.bf16.3d", weights("sparse.e", (2, 6, 32), bf), "sparse", pattern="4:8", values_codec="raw")
        w.write("nm13.rtn3.bf16", weights("sparse.f", (8, 48), bf), "sparse", pattern="1:3", values_codec="rtn",
                values={"bits": 3, "group_size": 0, "symmetric": True})  # fmt: skip
        w.write("mag50.ecsq.fp32.1d", weights("sparse.g", (1200,), ff), "sparse", values_codec="ecsq",
                values={"bits": 3, "lane_symbols": 1024})  # fmt: skip
        w.write("one_kept.bf16", weights("sparse.i", (4, 8), bf), "sparse", sparsity=0.99, values_codec="raw")
        w.write("none_pruned.fp16", weights("sparse.j", (5, 7), hf), "sparse", sparsity=0.0, values_codec="raw")
        # hand-built masks: column-skewed (several mask levels, rANS, two lanes), and nothing kept
        for name, rows, cols, dtype, values in (
            ("levels.raw.bf16", 48, 64, bf, ("raw", {})),
            ("levels.rtn4.fp32", 24, 64, ff, ("rtn", {"bits": 4, "group_size": 8})),
            ("none_kept.fp32", 3, 5, ff, ("raw", {})),
        ):
            tensor = weights(f"sparse.{name}", (rows, cols), dtype)
            keep = column_skewed_mask(f"sparse.mask.{name}", rows, cols) if rows > 3 else torch.zeros(rows, cols) > 0
            codec = nwcfmt.codecs.get_codec(values[0])(**values[1])
            inner, encoded = encode_values(name, tensor.float(), keep, dtype, codec, None)
            record = sparse_encoded(keep, Pattern(), inner, encoded, {"prune": "hand-built"}, lane_symbols=1024)
            w.append(name, tensor, nwcfmt.codecs.get_codec("sparse")(), record)
    return decode_all(path)


BUILDERS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    "raw_dtypes.safetensors": build_raw_dtypes,
    "lossless_bf16.safetensors": build_lossless_bf16,
    "lossless_fp16.safetensors": build_lossless_fp16,
    "lossless_fp32.safetensors": build_lossless_fp32,
    "sharded": build_sharded,  # a folder
    "quant_layout.safetensors": build_quant_layout,
    "quant_ids.safetensors": build_quant_ids,
    "rtn.safetensors": build_rtn,
    "rtn_zstd_chunks.safetensors": build_rtn_zstd_chunks,
    "latent.safetensors": build_latent,
    "sparse.safetensors": build_sparse,
}
# expected-values files too large to commit as they are (megabytes of repeated values): stored zstd-compressed
COMPRESSED_EXPECTED = {"rtn_zstd_chunks.safetensors"}


def expected_name(golden: str) -> str:
    suffix = ".zst" if golden in COMPRESSED_EXPECTED else ""
    return golden.removesuffix(".safetensors") + ".expected.safetensors" + suffix


def zstd_version() -> str:
    return ".".join(map(str, zstandard.ZSTD_VERSION))


def build(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Write every golden file (and its expected-values file) into ``out``; returns the expected tensors."""
    out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, builder in BUILDERS.items():
        tensors = builder(out / name)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        if name in COMPRESSED_EXPECTED:
            blob = zstandard.ZstdCompressor(level=19).compress(save(tensors))
            (out / expected_name(name)).write_bytes(blob)
        else:
            save_file(tensors, out / expected_name(name))
        expected[name] = tensors
    return expected


def golden_paths(root: Path) -> list[str]:
    """Every file the generator writes except golden.json: sorted POSIX paths relative to ``root``."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.name.endswith((".safetensors", ".safetensors.zst", ".index.json"))
    )


def write_listing(root: Path) -> None:
    from nwcfmt.container.writer import producer_info

    listing = {
        "producer": producer_info(),
        "zstd_version": zstd_version(),
        "files": {
            p: {"bytes": (root / p).stat().st_size, "sha256": hashlib.sha256((root / p).read_bytes()).hexdigest()}
            for p in golden_paths(root)
        },
    }
    (root / "golden.json").write_text(json.dumps(listing, indent=2) + "\n")


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else HERE
    build(out)
    write_listing(out)
    for p in golden_paths(out):
        print(f"{(out / p).stat().st_size:7d}  {p}")


if __name__ == "__main__":
    main(sys.argv[1:])
