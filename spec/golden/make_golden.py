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
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zstandard
from safetensors.torch import save_file

from nwcfmt import NwcWriter

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


BUILDERS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {
    "raw_dtypes.safetensors": build_raw_dtypes,
    "lossless_bf16.safetensors": build_lossless_bf16,
    "lossless_fp16.safetensors": build_lossless_fp16,
    "lossless_fp32.safetensors": build_lossless_fp32,
    "sharded": build_sharded,  # a folder
}


def expected_name(golden: str) -> str:
    return golden.removesuffix(".safetensors") + ".expected.safetensors"


def zstd_version() -> str:
    return ".".join(map(str, zstandard.ZSTD_VERSION))


def build(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Write every golden file (and its expected-values file) into ``out``; returns the expected tensors."""
    out.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, builder in BUILDERS.items():
        tensors = builder(out / name)
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / expected_name(name))
        expected[name] = tensors
    return expected


def golden_paths(root: Path) -> list[str]:
    """Every file the generator writes except golden.json: sorted POSIX paths relative to ``root``."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and (p.suffix in (".safetensors",) or p.name.endswith(".index.json"))
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
