"""What ``nwc info`` and ``nwc verify`` report: per-tensor storage statistics and integrity checks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from nwcfmt.codecs.registry import get_codec
from nwcfmt.container.reader import NwcReader
from nwcfmt.errors import NwcError
from nwcfmt.sources import find_weight_files


@dataclass(frozen=True)
class TensorStat:
    name: str
    file: str
    codec: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    original_bytes: int
    stored_bytes: int
    details: dict = field(default_factory=dict)  # codec-specific (Codec.describe)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / self.numel if self.numel else 0.0

    @property
    def note(self) -> str:
        """A short human summary of the codec details, e.g. ``4b g128 asym, zstd -7.9%``."""
        d = self.details
        if "mask" in d:  # sparse: the pattern and mask, then the values codec's own note
            inner = {k.removeprefix("values_"): v for k, v in d.items() if k.startswith("values_")}
            if "latents" in inner:
                values = f"target {inner['bits_target']:g}" if inner.get("bits_target") is not None else ""
            else:
                values = replace(self, details=inner).note
            how = f" {d['prune']}" if "prune" in d else ""
            return (
                f"{d['pattern']}{how} {100 * d['sparsity']:.1f}% sparse, mask {d['mask']} "
                f"{d['mask_bits_per_weight']:.3f} b/w; values {d['values_codec']} {values}".rstrip()
            )
        if "latents" in d:  # entropy-coded latents: the target and where the bytes go
            total = max(sum(d["bytes"].values()), 1)
            parts = " ".join(f"{k} {100 * v / total:.1f}%" for k, v in d["bytes"].items())
            target = f"target {d['bits_target']:g}, " if d.get("bits_target") is not None else ""
            return f"{target}{d['alphabet']} symbols; {parts}"
        if "bits" not in d:
            return ""
        text = f"{d['bits']}b {d['group']} {'sym' if d['symmetric'] else 'asym'}"
        if d.get("entropy_saved_bytes"):
            text += f", zstd -{100 * d['entropy_saved_bytes'] / d['packed_bytes']:.1f}%"
        return text

    def to_json(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "bits_per_weight": round(self.bits_per_weight, 4)}


@dataclass(frozen=True)
class Summary:
    tensors: list[TensorStat]
    file_bytes: int  # everything on disk: headers, manifests, padding included

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def original_bytes(self) -> int:
        return sum(t.original_bytes for t in self.tensors)

    @property
    def stored_bytes(self) -> int:
        return sum(t.stored_bytes for t in self.tensors)

    def to_json(self) -> dict:
        numel = self.numel or 1
        # "encoded": the tensors a lossy codec stores when there are any (the exact ones beside them, such as the
        # embeddings a quantized file keeps lossless, are what the file keeps), else every tensor not raw
        encoded = [t for t in self.tensors if not _exact(t.codec)] or [t for t in self.tensors if t.codec != "raw"]
        return {
            "tensors": [t.to_json() for t in self.tensors],
            "totals": {
                "tensors": len(self.tensors),
                "numel": self.numel,
                "original_bytes": self.original_bytes,
                "stored_bytes": self.stored_bytes,
                "file_bytes": self.file_bytes,
                "ratio": round(self.stored_bytes / max(self.original_bytes, 1), 6),
                "bits_per_weight": round(8 * self.stored_bytes / numel, 4),
                "entropy_saved_bytes": sum(t.details.get("entropy_saved_bytes", 0) for t in self.tensors),
                "encoded_tensors": len(encoded),
                "encoded_bits_per_weight": round(
                    8 * sum(t.stored_bytes for t in encoded) / max(sum(t.numel for t in encoded), 1), 4
                ),
                "file_bits_per_weight": round(8 * self.file_bytes / numel, 4),
            },
        }


def _exact(codec_id: str) -> bool:
    from nwcfmt.codecs.registry import available_codecs, get_codec

    return codec_id in available_codecs() and get_codec(codec_id).exact


def summarize(path: str | os.PathLike) -> Summary:
    """Per-tensor statistics of an NWC (or plain safetensors) file or folder; reads headers only."""
    stats, file_bytes = [], 0
    for file in find_weight_files(Path(path)):
        with NwcReader(file, allow_plain=True) as reader:
            file_bytes += reader.header.file_size
            for name in reader.names:
                record = reader.record(name)
                details = get_codec(record.codec).describe(record, reader.segment_infos(name))
                if "bytes" in details:  # where the bytes go, shared segments by their share
                    shares: dict[str, float] = {}
                    for seg, n in reader.segment_bytes(name).items():
                        key = "net" if seg.startswith("net.") else seg
                        shares[key] = shares.get(key, 0.0) + n
                    details["bytes"] = {k: round(v) for k, v in shares.items()}
                stats.append(
                    TensorStat(
                        name,
                        file.name,
                        record.codec,
                        record.dtype,
                        record.shape,
                        record.numel,
                        record.nbytes,
                        reader.stored_bytes(name),
                        details,
                    )
                )
    return Summary(stats, file_bytes)


@dataclass(frozen=True)
class Failure:
    file: str
    tensor: str | None
    error: str


def verify(path: str | os.PathLike, progress: Callable[[str, int], None] | None = None) -> list[Failure]:
    """Check every checksum and decode every tensor; returns the failures in file order (empty: all good)."""
    failures: list[Failure] = []
    for file in find_weight_files(Path(path)):
        try:
            reader = NwcReader(file)
        except NwcError as exc:
            failures.append(Failure(str(file), None, str(exc)))
            continue
        with reader:
            for name in reader.names:
                try:
                    reader.decode(name, verify=True)
                except NwcError as exc:
                    failures.append(Failure(str(file), name, str(exc)))
                if progress:
                    progress(name, reader.record(name).nbytes)
    return failures
