"""Model-level conversion: Hugging Face folder (or file) <-> NWC folder (or file).

Both directions stream tensor by tensor: shapes come from the headers, each tensor is read only when it is
encoded (peak memory about one tensor plus its encoding, whatever the model's size). Folder outputs are written
shard by shard into ``<dst>.nwc-partial/``: each shard holds whole decoder blocks (:func:`plan_shards`) and is
renamed into place as soon as it is complete, the index is written last, and the folder is renamed to ``dst``
only when everything is there. An interrupted run leaves its finished shards behind and the same command resumes
from them (a run with other settings is refused unless ``resume=False``). Single-file outputs are written to a
temporary sibling and renamed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nwcfmt.codecs.base import Codec, EncodeContext, EncodedTensor
from nwcfmt.constants import FORMAT_VERSION_STR, LOADER_NOTICE
from nwcfmt.container.reader import NwcReader
from nwcfmt.container.safetensors_io import StreamingWriter
from nwcfmt.container.writer import NwcWriter, encode_tensor, encoded_nbytes
from nwcfmt.distributed import INLINE, Executor, WireTensor, to_wire
from nwcfmt.errors import InputError, NwcError
from nwcfmt.policy import Policy
from nwcfmt.sources import INDEX_NAMES, WEIGHT_SUFFIXES, WeightSource, find_weight_files

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PARTIAL_SUFFIX = ".nwc-partial"  # an unfinished folder output: its finished shards and state.json
PARTIAL_STATE = "state.json"
DEFAULT_MAX_SHARD_SIZE = 2 * 1000**3  # source bytes per shard when --max-shard-size is not given
BLOCK_NAME = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")  # decoder blocks in tensor names
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

    def count(self, original: int, stored: int, codec_id: str) -> None:
        self.tensors += 1
        self.original_bytes += original
        self.stored_bytes += stored
        self.codecs[codec_id] += 1

    def add(self, name: str, source: WeightSource, codec_id: str, stored: int, progress: Progress | None) -> None:
        """Count tensor ``name`` of ``source``, stored in ``stored`` bytes, and report it."""
        self.count(source.sizes[name], stored, codec_id)
        if progress:
            progress(name, source.sizes[name])


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


def block_index(name: str) -> int | None:
    """The decoder block a tensor belongs to (``model.layers.12.mlp...`` -> 12), or None outside the blocks."""
    match = BLOCK_NAME.search(name)
    return int(match.group(1)) if match else None


def plan_shards(source: WeightSource, max_shard_size: int | None = None) -> list[list[str]]:
    """The tensor names of each output shard, in write order (model order), from the headers alone.

    A shard holds whole decoder blocks (and the runs of tensors between them), consecutive ones while their
    source bytes fit ``max_shard_size`` (default :data:`DEFAULT_MAX_SHARD_SIZE`); a larger group gets a shard of
    its own, so ``max_shard_size=1`` gives one shard per block. The plan depends on nothing but the source and the
    limit: an interrupted run plans the same shards again and resumes from the finished ones.
    """
    limit = max_shard_size or DEFAULT_MAX_SHARD_SIZE
    groups: list[list[str]] = []
    last: object = object()
    for name in source.names:
        key = block_index(name)
        if key != last or not groups:
            groups.append([])
            last = key
        groups[-1].append(name)
    shards: list[list[str]] = []
    size = 0
    for group in groups:
        nbytes = sum(source.sizes[n] for n in group)
        if shards and size + nbytes <= limit:
            shards[-1].extend(group)
            size += nbytes
        else:
            shards.append(list(group))
            size = nbytes
    return shards or [[]]


def shard_file_names(count: int) -> list[str]:
    return [SINGLE_FILE] if count == 1 else [shard_name(i, count) for i in range(1, count + 1)]


def planned_codecs(policy: Policy, source: WeightSource) -> list[Codec]:
    """The codec ``policy`` gives each tensor of ``source``, in order, chosen from the headers (nothing is read)."""
    return [policy.choose(name, source.meta(name)) for name in source.names]


def shared_claims(policy: Policy, source: WeightSource, shards: list[list[str]]) -> dict[str, int]:
    """Per tensor, how many records of its codec (the same instance) its shard holds: a shared segment (the
    ``neural`` network) is written once per file, so its bytes are amortised over exactly those records."""
    claims: dict[str, int] = {}
    for names in shards:
        chosen = {name: id(policy.choose(name, source.meta(name))) for name in names}
        counts = Counter(chosen.values())
        claims.update({name: counts[key] for name, key in chosen.items()})
    return claims


def encode_job(
    name: str, tensor: WireTensor, codec_id: str, config: dict, claims: int
) -> tuple[str, dict, dict[str, WireTensor], dict, dict]:
    """One tensor encoded by a data-free codec (run by any executor, in any process): the codec actually used
    (``raw`` when a lossless codec would not save space) as ``(id, config)``, and its record as segments, params
    and shared mapping. Tensors travel as :class:`~nwcfmt.distributed.WireTensor` both ways."""
    from nwcfmt.codecs.registry import get_codec

    codec = get_codec(codec_id).from_config(config)
    used, encoded = encode_tensor(name, tensor.tensor(), codec, EncodeContext(name=name, shared_claims=claims))
    segments = {k: to_wire(v) for k, v in encoded.segments.items()}
    return used.codec_id, used.get_config(), segments, encoded.params, encoded.shared


class _Codecs:
    """Codec instances by ``(id, config)``, made once."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, str], Codec] = {}

    def get(self, codec_id: str, config: dict) -> Codec:
        from nwcfmt.codecs.registry import get_codec

        key = (codec_id, json.dumps(config, sort_keys=True))
        if key not in self._made:
            self._made[key] = get_codec(codec_id).from_config(config)
        return self._made[key]


def _encoded_tensors(
    names: list[str],
    source: WeightSource,
    policy: Policy,
    claims: dict[str, int],
    encoder: TensorEncoder | None,
    executor: Executor,
) -> Iterator[tuple[str, Codec, EncodedTensor]]:
    """``(name, codec, record)`` for each of ``names`` in order; tensors are read one at a time, as jobs start."""
    if encoder is not None:  # the calibration pipeline's records (and its policy for the rest), in this process
        for name in names:
            codec, encoded = encoder(name, source.get(name))
            yield name, codec, encoded
        return

    def jobs() -> Iterable[tuple]:
        for name in names:
            codec = policy.choose(name, source.meta(name))
            yield name, to_wire(source.get(name)), codec.codec_id, codec.get_config(), claims[name]

    made = _Codecs()
    costs = [float(source.sizes[n]) for n in names]
    results = executor.map(encode_job, jobs(), costs)
    for name, (codec_id, config, segments, params, shared) in zip(names, results, strict=True):
        encoded = EncodedTensor({k: v.tensor() for k, v in segments.items()}, params, shared)
        yield name, made.get(codec_id, config), encoded


def _write_shard(
    path: Path,
    shard: tuple[int, int],
    tensors: Iterable[tuple[str, Codec, EncodedTensor]],
    source: WeightSource,
    report: ConversionReport,
    progress: Progress | None,
) -> None:
    """One NWC file (renamed into place at ``path`` when complete) from ``tensors``."""
    writer = NwcWriter(path, metadata=source.metadata, shard=shard, loader_notice=shard[0] == 1)
    try:
        for name, codec, encoded in tensors:
            writer.append(name, source.meta(name), codec, encoded)
            report.add(name, source, codec.codec_id, encoded_nbytes(encoded), progress)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _count_finished(path: Path, names: list[str], source: WeightSource, report: ConversionReport, progress) -> bool:
    """Count a shard finished by an earlier run; False (and the file removed) when it is not the planned one."""
    try:
        with NwcReader(path) as reader:
            if reader.names != names:
                raise InputError("other tensors")
            for name in names:
                report.add(name, source, reader.record(name).codec, reader.stored_bytes(name), progress)
        return True
    except NwcError:
        path.unlink(missing_ok=True)
        return False


class PartialOutput:
    """``<dst>.nwc-partial/``: a folder output being written, with the fingerprint of the run in ``state.json``.

    A rerun with the same fingerprint keeps the finished files; another fingerprint is refused unless
    ``resume=False``, which starts over. :meth:`finish` renames the folder to ``dst``.
    """

    def __init__(self, dst: Path, fingerprint: dict, *, overwrite: bool, resume: bool) -> None:
        self.dst = dst.absolute()
        if self.dst.exists() and not overwrite:
            raise InputError(f"{self.dst}: already exists (use --overwrite to replace it)")
        self.folder = self.dst.with_name(self.dst.name + PARTIAL_SUFFIX)
        doc = json.loads(json.dumps({"format": FORMAT_VERSION_STR, **fingerprint}))
        if self.folder.exists() and not resume:
            shutil.rmtree(self.folder)
        if self.folder.exists():
            try:
                old = json.loads((self.folder / PARTIAL_STATE).read_text())
            except (OSError, ValueError):
                old = None
            if old != doc:
                keys = sorted(k for k in doc if not isinstance(old, dict) or old.get(k) != doc[k]) or ["state"]
                raise InputError(
                    f"{self.folder}: holds an interrupted run with other settings ({', '.join(keys)} differ); "
                    "pass --no-resume to discard it and start over"
                )
            for leftover in self.folder.glob(".*"):  # temporary files of the interrupted run
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / PARTIAL_STATE).write_text(json.dumps(doc, indent=2) + "\n")

    def __enter__(self) -> PartialOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abandon()

    def finish(self) -> None:
        (self.folder / PARTIAL_STATE).unlink()
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
            os.replace(self.folder, self.dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(self.folder, self.dst)

    def abandon(self) -> None:
        """After a failure: keep the folder when a finished file is worth resuming from, else remove it."""
        if not any(p.suffix == ".safetensors" for p in self.folder.iterdir()):
            shutil.rmtree(self.folder, ignore_errors=True)


def partial_dir(dst: str | os.PathLike) -> Path:
    """Where an unfinished folder output into ``dst`` lives."""
    dst = Path(dst).absolute()
    return dst.with_name(dst.name + PARTIAL_SUFFIX)


def source_files(src: Path) -> list:
    """(name, size, mtime) of a source's weight files and config: what a resumable run's fingerprint holds."""
    files = [*find_weight_files(src), *([src / "config.json"] if src.is_dir() else [])]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


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
    resume: bool = True,
    executor: Executor | None = None,
    fingerprint: dict | None = None,
) -> ConversionReport:
    """Encode a model folder (or a single weight file) into an NWC folder (or file); see the module docstring.

    ``base_model``: the Hub repo id ``src`` was downloaded from, recorded in ``quantization_config``.
    ``encoder``: encodes each tensor instead of ``policy`` (the calibration pipeline's packed results);
    ``calibration``: how calibrated codecs were calibrated, recorded in ``quantization_config``;
    ``fingerprint``: what else the output depends on (the calibration's settings), for resuming.
    ``executor``: where the policy's per-tensor work runs (:mod:`nwcfmt.distributed`); the output is the same
    whatever it is.
    """
    src, dst = Path(src), Path(dst)
    policy = policy or Policy()
    executor = executor or INLINE
    source = WeightSource.open(src)
    report = ConversionReport()
    start = time.perf_counter()
    if src.is_file() and dst.suffix == ".safetensors":
        claims = shared_claims(policy, source, [source.names])
        with atomic_output(dst, overwrite, is_dir=False) as out:
            tensors = _encoded_tensors(source.names, source, policy, claims, encoder, executor)
            _write_shard(out, (1, 1), tensors, source, report, progress)
        report.files = [dst]
        report.seconds = time.perf_counter() - start
        return report
    shards = plan_shards(source, max_shard_size)
    claims = shared_claims(policy, source, shards)
    names = shard_file_names(len(shards))
    state = {
        "src": str(src.absolute()),
        "files": source_files(src),
        "policy": policy.to_dict(),
        "shards": [len(s) for s in shards],
        "max_shard_size": max_shard_size,
        **(fingerprint or {}),
    }
    with PartialOutput(dst, state, overwrite=overwrite, resume=resume) as out:
        for i, (file_name, shard) in enumerate(zip(names, shards, strict=True), start=1):
            path = out.folder / file_name
            if path.is_file() and _count_finished(path, shard, source, report, progress):
                continue
            tensors = _encoded_tensors(shard, source, policy, claims, encoder, executor)
            _write_shard(path, (i, len(shards)), tensors, source, report, progress)
        if len(shards) > 1:
            _write_index(out.folder, names, shards)
        if src.is_dir():
            _copy_companions(src, out.folder)
        config = _read_config(src) if src.is_dir() else None
        if config is not None:
            numel = sum(source.meta(n).numel() for n in source.names)
            config["quantization_config"] = quantization_config(report, numel, base_model, calibration)
            (out.folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report.files = sorted(p for p in dst.iterdir() if p.suffix == ".safetensors")
    report.seconds = time.perf_counter() - start
    return report


def _write_index(folder: Path, names: list[str], shards: list[list[str]]) -> None:
    """The shard index, written last (its presence says every shard is there)."""
    weight_map: dict[str, str] = {LOADER_NOTICE: names[0]}
    for file_name in names:
        with NwcReader(folder / file_name) as reader:
            for name in reader.names:
                for ref in reader.record(name).segments.values():
                    weight_map[ref.tensor] = file_name
    total = sum((folder / n).stat().st_size for n in names)
    index = {"metadata": {"total_size": total, "format": "nwc"}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def decode_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    resume: bool = True,
) -> ConversionReport:
    """Decode an NWC folder (or file) into plain safetensors with the original tensors, bit for bit: one output
    file per input file, each renamed into place when complete; an interrupted run resumes from them."""
    src, dst = Path(src), Path(dst)
    files = find_weight_files(src)
    report = ConversionReport()
    start = time.perf_counter()
    if src.is_file():
        with atomic_output(dst, overwrite, is_dir=False) as out:
            _decode_file(src, out, report, progress)
        report.files = [dst]
        report.seconds = time.perf_counter() - start
        return report
    with PartialOutput(
        dst,
        {"src": str(src.absolute()), "files": source_files(src), "decode": True},
        overwrite=overwrite,
        resume=resume,
    ) as out:
        weight_map: dict[str, str] = {}
        for file in files:
            target = out.folder / file.name
            names = _decoded_names(target) if target.is_file() else None
            if names is None:
                names = _decode_file(file, target, report, progress)
            else:
                _count_decoded(file, report, progress)
            weight_map.update(dict.fromkeys(names, file.name))
        if len(files) > 1:
            index = {"metadata": {"total_size": report.original_bytes}, "weight_map": weight_map}
            (out.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        _copy_companions(src, out.folder)
        config = _read_config(src)
        if config is not None:
            config.pop("quantization_config", None)
            (out.folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report.files = sorted(p for p in dst.iterdir() if p.suffix == ".safetensors")
    report.seconds = time.perf_counter() - start
    return report


def _decode_file(file: Path, target: Path, report: ConversionReport, progress: Progress | None) -> list[str]:
    """Decode one NWC file into the plain safetensors file ``target`` (renamed into place when complete)."""
    with NwcReader(file, allow_plain=True) as reader, StreamingWriter(target) as writer:
        for name in reader.names:
            tensor = reader.decode(name)
            writer.add(name, tensor)
            report.count(tensor.numel() * tensor.element_size(), reader.stored_bytes(name), reader.record(name).codec)
            if progress:
                progress(name, tensor.numel() * tensor.element_size())
        writer.finish(reader.metadata or {"format": "pt"})
        return list(reader.names)


def _decoded_names(target: Path) -> list[str] | None:
    """The tensors of an output file finished by an earlier run (None when it is unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(target), "pt") as f:
            return list(f.keys())
    except Exception:  # safetensors raises several types for a damaged file
        target.unlink(missing_ok=True)
        return None


def _count_decoded(file: Path, report: ConversionReport, progress: Progress | None) -> None:
    with NwcReader(file, allow_plain=True) as reader:
        for name in reader.names:
            record = reader.record(name)
            nbytes = record.numel * getattr(torch, record.dtype).itemsize
            report.count(nbytes, reader.stored_bytes(name), record.codec)
            if progress:
                progress(name, nbytes)
