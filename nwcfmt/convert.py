"""Model-level conversion: Hugging Face folder (or file) <-> NWC folder (or file).

Both directions stream tensor by tensor (peak memory about one tensor plus its encoding) and are atomic:
output goes to a temporary sibling that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nwcfmt.codecs.base import Codec, EncodeContext, EncodedTensor
from nwcfmt.constants import FORMAT_VERSION_STR, LOADER_NOTICE
from nwcfmt.container.reader import NwcReader
from nwcfmt.container.safetensors_io import StreamingWriter
from nwcfmt.container.writer import NwcWriter, encode_tensor, encoded_nbytes
from nwcfmt.errors import InputError
from nwcfmt.policy import Policy
from nwcfmt.sources import INDEX_NAMES, WEIGHT_SUFFIXES, WeightSource, find_weight_files

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
Progress = Callable[[str, int], None]  # (tensor name, original bytes) after each tensor
TensorEncoder = Callable[[str, torch.Tensor], tuple[Codec, EncodedTensor]]  # name, tensor -> codec used, output


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


@dataclass
class ConversionReport:
    tensors: int = 0
    original_bytes: int = 0
    stored_bytes: int = 0
    codecs: Counter = field(default_factory=Counter)
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.original_bytes if self.original_bytes else 1.0


@contextmanager
def atomic_output(dst: Path, overwrite: bool, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``dst``; on success it replaces ``dst``, on failure it is removed."""
    dst = dst.absolute()
    if dst.exists() and not overwrite:
        raise InputError(f"{dst}: already exists (use --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


class _ShardedNwcWriter:
    """Splits tensors over shards of at most ``max_shard_size`` stored bytes (a larger tensor gets its own).

    Headers are written when all shards are known, so every manifest records ``(index, count)``.
    """

    def __init__(self, folder: Path, max_shard_size: int | None, metadata: dict[str, str]) -> None:
        self.folder = folder
        self.max = max_shard_size
        self.metadata = metadata
        self.writers: list[NwcWriter] = []

    def _current(self, incoming: int) -> NwcWriter:
        if self.writers:
            last = self.writers[-1]
            if self.max is None or last.bytes_written == 0 or last.bytes_written + incoming <= self.max:
                return last
        part = self.folder / f"shard-{len(self.writers) + 1}.partial"
        writer = NwcWriter(part, metadata=self.metadata, loader_notice=not self.writers)
        self.writers.append(writer)
        return writer

    def append(self, name, tensor, codec, encoded) -> None:
        self._current(encoded_nbytes(encoded)).append(name, tensor, codec, encoded)

    def close(self, single_path: Path) -> list[Path]:
        """Finish all shards; a single shard is written to ``single_path``."""
        count = len(self.writers)
        if count <= 1:
            if not self.writers:  # no tensors: still a valid (empty) NWC file
                self.writers.append(NwcWriter(single_path, metadata=self.metadata, loader_notice=True))
            writer = self.writers[0]
            return [writer.close(single_path)]
        paths = []
        weight_map: dict[str, str] = {}
        for i, writer in enumerate(self.writers, start=1):
            name = shard_name(i, count)
            writer.manifest.shard = (i, count)
            paths.append(writer.close(self.folder / name))
            if i == 1:
                weight_map[LOADER_NOTICE] = name
            for record in writer.manifest.tensors:
                for ref in record.segments.values():
                    weight_map[ref.tensor] = name
        total = sum(p.stat().st_size for p in paths)
        index = {"metadata": {"total_size": total, "format": "nwc"}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return paths

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()


# Files that describe one set of weights and must not follow the weights through a conversion.
WEIGHT_SPECIFIC = ("config.json", "nwc_eval.json")  # config.json is rewritten; eval results would be stale


def _copy_companions(src: Path, dst: Path) -> None:
    """Copy tokenizer, generation config and other non-weight files."""
    for item in src.iterdir():
        if item.name.startswith(".") or item.name in WEIGHT_SPECIFIC:
            continue
        if item.is_file() and (item.suffix in WEIGHT_SUFFIXES or item.name in INDEX_NAMES):
            continue
        if item.is_dir():
            shutil.copytree(item, dst / item.name, ignore=shutil.ignore_patterns(".*"))
        elif item.is_file():
            shutil.copy2(item, dst / item.name)


def _read_config(src: Path) -> dict | None:
    path = src / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError:
        raise InputError(f"{path}: not valid JSON") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: must be a JSON object")
    return config


def quantization_config(
    report: ConversionReport, numel: int, base_model: str | None = None, calibration: dict | None = None
) -> dict:
    config = {
        "quant_method": "nwc",
        "format_version": FORMAT_VERSION_STR,
        "codecs": dict(sorted(report.codecs.items())),
        "bits_per_weight": round(8 * report.stored_bytes / numel, 4) if numel else 0.0,
    }
    if base_model:
        config["base_model"] = base_model  # the Hub repo id the weights came from (model cards name it)
    if calibration:
        config["calibration"] = calibration  # calibrated codecs: text, samples, sequence length
    return config


def planned_codecs(policy: Policy, source: WeightSource) -> list[Codec]:
    """The codec ``policy`` gives each tensor of ``source``, in order, chosen from the headers (nothing is read):
    how many records each codec will write, so that its shared segments are amortised exactly."""
    return [policy.choose(name, source.meta(name)) for name in source.names]


def _policy_encoder(policy: Policy, source: WeightSource) -> TensorEncoder:
    """Encodes each tensor with the codec ``policy`` chooses, telling each codec instance how many records of
    the output it encodes (:func:`planned_codecs`)."""
    claims = Counter(id(codec) for codec in planned_codecs(policy, source))

    def encode(name: str, tensor: torch.Tensor) -> tuple[Codec, EncodedTensor]:
        codec = policy.choose(name, tensor)
        return encode_tensor(name, tensor, codec, EncodeContext(name=name, shared_claims=claims[id(codec)]))

    return encode


def encode_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    policy: Policy | None = None,
    *,
    max_shard_size: int | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    base_model: str | None = None,
    encoder: TensorEncoder | None = None,
    calibration: dict | None = None,
) -> ConversionReport:
    """Encode a model folder (or a single weight file) into an NWC folder (or file).

    ``base_model``: the Hub repo id ``src`` was downloaded from, recorded in ``quantization_config``.
    ``encoder``: encodes each tensor instead of ``policy`` (the calibration pipeline's packed results);
    ``calibration``: how calibrated codecs were calibrated, recorded in ``quantization_config``.
    """
    src, dst = Path(src), Path(dst)
    policy = policy or Policy()
    source = WeightSource.open(src)
    encoder = encoder or _policy_encoder(policy, source)
    report = ConversionReport()
    numel = 0
    start = time.perf_counter()
    to_file = src.is_file() and dst.suffix == ".safetensors"
    with atomic_output(dst, overwrite, is_dir=not to_file) as out:
        folder = out.parent if to_file else out
        writer = _ShardedNwcWriter(folder, None if to_file else max_shard_size, source.metadata)
        # a single-file output lives in the user's folder: its parts get unique temp names there
        try:
            for name, tensor in source:
                codec, encoded = encoder(name, tensor)
                writer.append(name, tensor, codec, encoded)
                nbytes = tensor.numel() * tensor.element_size()
                report.tensors += 1
                report.original_bytes += nbytes
                report.stored_bytes += encoded_nbytes(encoded)
                report.codecs[codec.codec_id] += 1
                numel += tensor.numel()
                if progress:
                    progress(name, nbytes)
            writer.close(out if to_file else out / SINGLE_FILE)
        except BaseException:
            writer.abort()
            raise
        if not to_file:
            if src.is_dir():
                _copy_companions(src, out)
            config = _read_config(src) if src.is_dir() else None
            if config is not None:
                config["quantization_config"] = quantization_config(report, numel, base_model, calibration)
                (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report.files = [dst] if to_file else sorted(p for p in dst.iterdir() if p.suffix == ".safetensors")
    report.seconds = time.perf_counter() - start
    return report


def decode_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ConversionReport:
    """Decode an NWC folder (or file) into plain safetensors with the original tensors, bit for bit."""
    src, dst = Path(src), Path(dst)
    files = find_weight_files(src)
    report = ConversionReport()
    start = time.perf_counter()
    to_file = src.is_file()
    with atomic_output(dst, overwrite, is_dir=not to_file) as out:
        weight_map: dict[str, str] = {}
        for file in files:
            target = out if to_file else out / file.name
            with NwcReader(file, allow_plain=True) as reader, StreamingWriter(target) as writer:
                for name in reader.names:
                    tensor = reader.decode(name)
                    writer.add(name, tensor)
                    weight_map[name] = file.name
                    nbytes = tensor.numel() * tensor.element_size()
                    report.tensors += 1
                    report.original_bytes += nbytes
                    report.stored_bytes += reader.stored_bytes(name)
                    report.codecs[reader.record(name).codec] += 1
                    if progress:
                        progress(name, nbytes)
                writer.finish(reader.metadata or {"format": "pt"})
        if not to_file:
            if len(files) > 1:
                index = {"metadata": {"total_size": report.original_bytes}, "weight_map": weight_map}
                (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            _copy_companions(src, out)
            config = _read_config(src)
            if config is not None:
                config.pop("quantization_config", None)
                (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report.files = [dst] if to_file else sorted(p for p in dst.iterdir() if p.suffix == ".safetensors")
    report.seconds = time.perf_counter() - start
    return report
