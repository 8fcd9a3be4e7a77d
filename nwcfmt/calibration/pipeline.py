"""The calibration pipeline: a model folder + a :class:`BlockQuantizer` -> an NWC folder, one block at a time.

1. The model is built by transformers with its parameters on the ``meta`` device (nothing allocated, buffers
   such as rotary tables real); weights are read from the checkpoint only for the part being run, in fp32, and
   put back on ``meta`` when it is done, so memory holds about one block whatever the model's size. The
   calibration text becomes ``samples`` windows of ``seqlen`` tokens (:mod:`nwcfmt.calibration.data`).
2. The pre-block part (embeddings, masks, rotary tables) runs once to capture block 0's inputs
   (:mod:`nwcfmt.calibration.blocks`); the output head is never loaded.
3. For each block ``i``: one forward pass over the cached inputs collects the Hessian of every selected Linear
   (and the full-precision outputs when the encoder wants targets); ``quantize_block`` runs (with the torch
   RNG seeded from ``seed + i``); its results (:class:`~nwcfmt.calibration.method.LinearResult`: the encoded
   record and the weight it decodes to) are checked, saved for resuming, and their weights (rounded to the
   checkpoint's dtype) replace the block's weights; a second pass through the quantized block gives block
   ``i + 1``'s inputs. Only the cached activations (and targets) live beside the model.
4. The NWC folder is written by :func:`nwcfmt.convert.encode_model`: tensors in the checkpoint's order and
   dtype, calibrated Linears as the encoder's records, everything else through the :class:`Policy` (norms
   and embeddings raw), shard by shard (resumable too).

Under ``torchrun`` (:class:`~nwcfmt.distributed.torch_backend.TorchDistExecutor`) every rank runs this pipeline;
encoders hand the Linears of a block (or of a coding stage) to ``data.executor``, which gives each one an owner
rank and shares the results, and rank 0 writes. The bits are those of an inline run.

The pipeline never knows a codec's stored layout: it uses the encoder's codec only through the
:class:`~nwcfmt.codecs.base.Codec` interface (its id and config, and its ``validate``/``check``/``decode`` on
the records, :func:`~nwcfmt.container.writer.check_encoded` and ``decode_encoded``), so any codec can be
calibrated.

Resuming: finished blocks are saved in ``<dst>.nwc-resume/`` with a fingerprint of the source files, the codec
config and the calibration options; each result as its record's segments (safetensors tensors
``{linear}.{segment}``) with its params, shared mapping and stats in the file's metadata. A rerun with the same
fingerprint reloads them, rebuilds their weights by decoding the records, recomputes the activations through
them (forward passes only) and continues; it produces the same bits as an uninterrupted run. A different
fingerprint (or a state of an older version) is an error unless ``resume=False`` (``--no-resume``), which
discards the old state. The state folder is deleted once the output is written.

Blocks' Linears are selected through the policy: a Linear whose weight the policy gives to the encoder's codec
is calibrated; others (``--exclude``, rules for other codecs) keep their full-precision weights during
calibration and are encoded by the policy. Tensors outside the blocks follow the policy too; those it gives to
the calibrated codec (BERT's pooler, GPT-Neo's ``wte``/``wpe``, which the default keep-raw globs do not name) have
nothing to calibrate them and are coded data-free (:func:`data_free_codec`): ``ecsq`` and ``neural`` by their
data-free encoders, ``gptq``, ``flexround`` and ``lrq`` by ``rtn`` in the same layout, so ``--bits`` covers them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nwcfmt.calibration.blocks import (
    BlockLayout,
    block_linears,
    capture_inputs,
    run_block,
)
from nwcfmt.calibration.data import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SAMPLES,
    DEFAULT_SEQLEN,
    calibration_batches,
    generated_batches,
)
from nwcfmt.calibration.hessian import HessianCollector
from nwcfmt.calibration.method import BlockData, BlockQuantizer, LinearResult
from nwcfmt.calibration.model import (
    base_prefix,
    checkpoint_name,
    load_model,
    load_weights,
    release_weights,
    trim_heap,
)
from nwcfmt.codecs.base import Codec, EncodeContext, EncodedTensor
from nwcfmt.container.writer import check_encoded, decode_encoded, encode_tensor
from nwcfmt.convert import ConversionReport, Progress, encode_model, plan_shards, shared_claims, source_files
from nwcfmt.distributed import INLINE, Executor
from nwcfmt.errors import EncodeError, InputError, NwcError
from nwcfmt.policy import Policy
from nwcfmt.sources import WeightSource

RESUME_SUFFIX = ".nwc-resume"
STATE_FILE = "state.json"
STATE_VERSION = 2  # 2: results as encoded records (1: group-quant codes, scale, zero)
RESULTS_KEY = "results"  # resume file metadata: per Linear, its segment names, params, shared mapping, stats
STOP_ENV = "NWC_CALIB_STOP_AFTER"  # testing the resumable run: stop after this many blocks are finished


@dataclass(frozen=True)
class CalibOptions:
    """Where the calibration tokens come from. ``text=None`` is the project's calibration text."""

    text: str | None = None
    text_name: str = "sotu-calib"  # recorded in quantization_config
    samples: int = DEFAULT_SAMPLES
    seqlen: int = DEFAULT_SEQLEN
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    generate: bool = False  # ``--calib self``: the model writes its own calibration windows

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.text.encode()).hexdigest() if self.text is not None else "default"
        return {
            "text_sha256": "self-generated" if self.generate else digest,
            "samples": self.samples,
            "seqlen": self.seqlen,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


@dataclass
class BlockEvent:
    """Progress of a calibrated encode, reported after each step."""

    stage: str  # "prepare" (inputs captured), "replay" (a saved block reloaded), "block" (quantized), "write"
    done: int  # blocks finished
    total: int  # blocks in the model
    elapsed: float  # seconds since the start
    eta: float | None  # estimated seconds left for the remaining blocks (mean time of the blocks quantized)
    block_seconds: float = 0.0
    stats: dict[str, dict[str, float]] = field(default_factory=dict)  # per Linear, from the encoder


BlockProgress = Callable[[BlockEvent], None]


class CalibrationStopped(NwcError):
    """The run stopped on purpose after ``stop_after_blocks`` blocks (to test resuming)."""


@dataclass
class _Target:
    """One calibrated Linear: where it lives in the model and in the checkpoint."""

    block: int
    name: str  # within the block
    linear: torch.nn.Linear
    tensor: str  # checkpoint tensor name
    dtype: torch.dtype  # checkpoint dtype
    codec: Codec  # the encoder's codec with this Linear's config (per-Linear settings: :func:`_targets`)


def _targets(
    model: torch.nn.Module, layout: BlockLayout, source: WeightSource, policy: Policy, quantizer: BlockQuantizer
) -> list[list[_Target]]:
    """Per block, the Linears the policy gives to the encoder's codec, each with its own config: a policy rule may
    change the config keys the encoder lists in ``per_linear_keys`` (a planned mix of rates, ``nwc plan``), and
    nothing else."""
    codec = quantizer.codec
    varying = set(getattr(quantizer, "per_linear_keys", ()))
    main = codec.get_config()
    out: list[list[_Target]] = []
    for i, block in enumerate(layout.blocks):
        selected = []
        for name, linear in block_linears(block).items():
            tensor = checkpoint_name(f"{layout.block_name(i)}.{name}.weight", source, model)
            chosen = policy.choose(tensor, linear.weight)
            if chosen.codec_id != codec.codec_id:
                continue
            config = chosen.get_config()
            differ = sorted(k for k in set(config) | set(main) if config.get(k) != main.get(k))
            if set(differ) - varying:
                allowed = f" (it may vary {', '.join(sorted(varying))} per tensor)" if varying else ""
                raise EncodeError(
                    f"{tensor}: per-tensor params {', '.join(differ)} of the calibrated codec {codec.codec_id} "
                    f"differ from its main config{allowed}"
                )
            selected.append(_Target(i, name, linear, tensor, source.specs[tensor][1], chosen))
        out.append(selected)
    return out


def _per_linear_configs(targets: list[list[_Target]], codec: Codec) -> dict[str, dict[str, Any]]:
    """The configs of the Linears whose settings differ from the encoder's main config (for the fingerprint)."""
    main = codec.get_config()
    return {t.tensor: t.codec.get_config() for b in targets for t in b if t.codec.get_config() != main}


# ---------------------------------------------------------------------------------------------- resume


def resume_dir(dst: Path) -> Path:
    """The folder that holds the finished blocks of an interrupted encode into ``dst``."""
    dst = dst.absolute()
    return dst.with_name(dst.name + RESUME_SUFFIX)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ResumeState:
    """Finished blocks' results in ``folder``, valid for one fingerprint."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], resume: bool, writer: bool = True) -> None:
        """``writer=False``: a torch.distributed rank other than 0, which reads what rank 0 saves."""
        self.folder = folder
        self.writer = writer
        if not writer:
            return
        doc = {"version": STATE_VERSION, "fingerprint": fingerprint}
        if folder.exists() and not resume:
            shutil.rmtree(folder)
        if folder.exists():
            self._check(doc)
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / STATE_FILE, lambda p: p.write_text(json.dumps(doc, indent=2) + "\n"))

    def _check(self, doc: dict[str, Any]) -> None:
        try:
            old = json.loads((self.folder / STATE_FILE).read_text())
        except (OSError, ValueError):
            old = {}
        if old == doc:
            return
        theirs = old.get("fingerprint", {}) if isinstance(old, dict) else {}
        keys = sorted(k for k in doc["fingerprint"] if theirs.get(k) != doc["fingerprint"][k]) or ["version"]
        raise InputError(
            f"{self.folder}: holds an interrupted encode with other settings ({', '.join(keys)} differ); "
            "pass --no-resume to discard it and start over"
        )

    def path(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def finished(self) -> int:
        """Blocks saved, counted from block 0 without a gap."""
        count = 0
        while self.path(count).is_file():
            count += 1
        return count

    def save(self, index: int, results: dict[str, LinearResult]) -> None:
        """Store block ``index``'s results: each record's segments as tensors ``{linear}.{segment}`` (copies, so
        no two share memory), their names in order, params, shared mapping and stats as JSON metadata."""
        from safetensors.torch import save_file

        if not self.writer:
            return
        tensors: dict[str, torch.Tensor] = {}
        docs = {}
        for name, r in results.items():
            for seg_name, seg in r.encoded.segments.items():
                key = f"{name}.{seg_name}"
                if key in tensors:
                    raise EncodeError(f"{name}: segment {seg_name!r} collides with another in the resume state")
                tensors[key] = seg.detach().cpu().clone(memory_format=torch.contiguous_format)
            docs[name] = {
                "segments": list(r.encoded.segments),
                "params": r.encoded.params,
                "shared": r.encoded.shared,
                "stats": r.stats,
            }
        meta = {RESULTS_KEY: json.dumps(docs)}
        _atomic_write(self.path(index), lambda p: save_file(tensors, str(p), metadata=meta))

    def load_encoded(self, index: int) -> dict[str, tuple[EncodedTensor, dict[str, float]]]:
        """Block ``index``'s records and stats, by Linear name within the block."""
        from safetensors import safe_open

        try:
            with safe_open(str(self.path(index)), "pt") as f:
                docs = json.loads((f.metadata() or {})[RESULTS_KEY])
                return {
                    name: (
                        EncodedTensor(
                            {seg: f.get_tensor(f"{name}.{seg}") for seg in doc["segments"]},
                            doc["params"],
                            doc["shared"],
                        ),
                        doc["stats"],
                    )
                    for name, doc in docs.items()
                }
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise InputError(f"{self.path(index)}: unreadable resume state ({exc}); pass --no-resume") from None

    def load(self, index: int, targets: list[_Target]) -> dict[str, LinearResult]:
        """Block ``index``'s results for ``targets``, each weight rebuilt by decoding its record (fp32)."""
        saved = self.load_encoded(index)
        results = {}
        for t in targets:
            if t.name not in saved:
                raise InputError(f"{self.path(index)}: no result for {t.name} in the resume state; pass --no-resume")
            encoded, stats = saved[t.name]
            try:
                weight = decode_encoded(t.tensor, t.codec, encoded, t.linear.weight.shape, torch.float32)
            except NwcError as exc:
                raise InputError(f"{self.path(index)}: {t.name} does not decode ({exc}); pass --no-resume") from None
            results[t.name] = LinearResult(encoded, weight, stats)
        return results

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- blocks


def check_results(results: dict[str, LinearResult], targets: list[_Target], quantizer: BlockQuantizer) -> None:
    """Every selected Linear has a result: a finite fp32 weight of the Linear's shape, and a record the codec
    accepts (its ``validate`` and ``check``) for that tensor; :class:`EncodeError` otherwise."""
    codec = quantizer.codec
    missing = sorted({t.name for t in targets} - set(results))
    if missing:
        raise EncodeError(f"{codec.codec_id} returned no result for {', '.join(missing)}")
    for t in targets:
        r, shape = results[t.name], tuple(t.linear.weight.shape)
        where = f"{t.tensor} ({codec.codec_id})"
        if not isinstance(r, LinearResult) or not isinstance(r.encoded, EncodedTensor):
            raise EncodeError(f"{where}: the result must be a LinearResult holding an EncodedTensor")
        w = r.weight
        if not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or tuple(w.shape) != shape:
            found = f"{w.dtype} {list(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
            raise EncodeError(f"{where}: weight must be float32 {list(shape)}, not {found}")
        if not bool(torch.isfinite(w).all()):
            raise EncodeError(f"{where}: weight holds inf or NaN")
        try:
            check_encoded(t.tensor, t.codec, r.encoded, shape, t.dtype)
        except NwcError as exc:
            raise EncodeError(f"{where}: the encoded record is refused: {exc}") from None


def _apply(results: dict[str, LinearResult], targets: list[_Target]) -> None:
    """Load the results' weights (rounded to the checkpoint's dtype, as a decoder returns them)."""
    for t in targets:
        weight = results[t.name].weight.reshape(t.linear.weight.shape)
        t.linear.weight.data.copy_(weight.to(t.dtype).to(t.linear.weight.dtype))


def _quantize(
    block: torch.nn.Module,
    index: int,
    inputs: list[torch.Tensor],
    kwargs: dict[str, Any],
    targets: list[_Target],
    quantizer: BlockQuantizer,
    seed: int,
    shared_claims: int = 0,
    executor: Executor = INLINE,
) -> dict[str, LinearResult]:
    linears = {t.name: t.linear for t in targets}
    with torch.no_grad(), HessianCollector(linears) as collector:
        outputs = [run_block(block, x, kwargs) for x in inputs]
    data = BlockData(
        index=index,
        inputs=inputs,
        kwargs=kwargs,
        targets=outputs if quantizer.needs_targets else None,
        hessians=collector.hessians(),
        tokens=collector.rows,
        shared_claims=shared_claims,
        executor=executor,
        dtypes={t.name: t.dtype for t in targets},
        codecs={t.name: t.codec for t in targets},
    )
    del outputs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + index)
        results = quantizer.quantize_block(block, linears, data)
    check_results(results, targets, quantizer)
    return {t.name: results[t.name] for t in targets}


# ---------------------------------------------------------------------------------------------- encode


class _SavedResults:
    """The results of every block, read back from the resume state one block at a time while writing (tensors
    come in model order), so they never all sit in memory."""

    def __init__(self, state: ResumeState, targets: list[list[_Target]]) -> None:
        self.state = state
        self.where = {t.tensor: (t.block, t.name) for block in targets for t in block}
        self._block: tuple[int, dict[str, tuple[EncodedTensor, dict[str, float]]]] = (-1, {})

    def get(self, tensor: str) -> EncodedTensor | None:
        if tensor not in self.where:
            return None
        index, name = self.where[tensor]
        if self._block[0] != index:
            self._block = (index, self.state.load_encoded(index))
        if name not in self._block[1]:
            raise InputError(f"{self.state.path(index)}: no result for {name} in the resume state; pass --no-resume")
        return self._block[1][name][0]


def data_free_codec(codec: Codec) -> Codec | None:
    """What codes a tensor that the policy gives to a calibrated codec but that no block holds (BERT's pooler,
    GPT-Neo's ``wte``): the codec's own data-free encoder (``ecsq``, ``neural``), ``rtn`` in the same
    integer layout (``gptq``, ``flexround``, ``lrq``), or None (stored raw)."""
    from nwcfmt.codecs.quant import GroupQuantCodec
    from nwcfmt.codecs.rtn import RtnCodec

    if getattr(codec, "calibration_optional", False):
        return codec
    if isinstance(codec, GroupQuantCodec):
        return RtnCodec(**GroupQuantCodec.get_config(codec), entropy=codec.entropy)
    return None


def _encoder(saved: _SavedResults, quantizer: BlockQuantizer, policy: Policy, claims: dict[str, int]):
    codec = quantizer.codec

    def encode(name: str, tensor: torch.Tensor) -> tuple[Codec, EncodedTensor]:
        encoded = saved.get(name)
        chosen = policy.choose(name, tensor)
        if encoded is None:
            if chosen.codec_id != codec.codec_id:
                return encode_tensor(name, tensor, chosen)
            fallback = data_free_codec(chosen)
            if fallback is not None and fallback.supports(tensor):  # nothing calibrates it: coded data-free
                return encode_tensor(name, tensor, fallback, EncodeContext(name=name, shared_claims=claims[name]))
            return encode_tensor(name, tensor, "raw")
        return chosen, encoded

    return encode


def _stop_after(stop_after_blocks: int | None) -> int | None:
    if stop_after_blocks is not None:
        return stop_after_blocks
    value = os.environ.get(STOP_ENV)
    return int(value) if value else None


def encode_calibrated(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    quantizer: BlockQuantizer,
    *,
    calib: CalibOptions | None = None,
    policy: Policy | None = None,
    max_shard_size: int | None = None,
    overwrite: bool = False,
    progress: BlockProgress | None = None,
    write_progress: Progress | None = None,
    resume: bool = True,
    base_model: str | None = None,
    stop_after_blocks: int | None = None,
    executor: Executor | None = None,
) -> ConversionReport | None:
    """Encode the model folder ``src`` into the NWC folder ``dst`` with a calibrated encoder (module docstring).

    ``executor``: a :class:`~nwcfmt.distributed.torch_backend.TorchDistExecutor` shares each block's Linears
    among the ranks; ranks other than rank 0 return None once the blocks are done (rank 0 writes).

    ``policy`` defaults to the encoder's codec and config (norms and biases raw, embeddings and ``lm_head``
    lossless).
    ``stop_after_blocks`` (or ``$NWC_CALIB_STOP_AFTER``) raises :class:`CalibrationStopped` once that many blocks
    are finished, leaving the resume state behind (for tests).
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    calib = calib or CalibOptions()
    codec = quantizer.codec
    policy = policy or Policy(codec=codec.codec_id, params=codec.get_config())
    if not (src.is_dir() and (src / "config.json").is_file()):
        raise InputError(f"{src}: calibrated codecs need a model folder with config.json and a tokenizer")
    if dst.exists() and not overwrite:
        raise InputError(f"{dst.absolute()}: already exists (use --overwrite to replace it)")
    executor = executor or INLINE
    model, layout, tokenizer = load_model(src)
    source = WeightSource.open(src)
    targets = _targets(model, layout, source, policy, quantizer)
    claims = shared_claims(policy, source, plan_shards(source, max_shard_size))  # records sharing a file's network
    fingerprint = {
        "src": str(src.absolute()),
        "files": source_files(src),
        "codec": codec.codec_id,
        "config": codec.get_config(),
        "quantizer": f"{type(quantizer).__module__}.{type(quantizer).__qualname__}",
        "calib": calib.fingerprint(),
        "tensors": [t.tensor for block in targets for t in block],
    }
    configs = _per_linear_configs(targets, codec)
    if configs:  # only then, so that the resume states of one-config encodes stay valid
        fingerprint["configs"] = configs
    if calib.generate:
        batches = generated_batches(src, tokenizer, calib.samples, calib.seqlen, calib.batch_size, calib.seed)
    else:
        batches = calibration_batches(tokenizer, calib.text, calib.samples, calib.seqlen, calib.batch_size, calib.seed)
    state = ResumeState(resume_dir(dst), json.loads(json.dumps(fingerprint)), resume, writer=executor.is_main)
    executor.barrier()  # the other ranks read the state rank 0 has checked (or cleared)
    base = base_prefix(model, layout)
    load_weights(layout.base, base, source, model, skip=(layout.blocks,), required=False)
    load_weights(layout.blocks[0], layout.block_name(0), source, model)
    captured = capture_inputs(layout, batches)
    release_weights(layout.base)
    try:
        _run_blocks(
            layout,
            captured,
            targets,
            quantizer,
            state,
            calib.seed,
            start,
            progress,
            _stop_after(stop_after_blocks),
            claims,
            (source, model),
            executor,
        )
    except BaseException:
        if state.finished() == 0 and executor.is_main:  # nothing worth resuming
            state.remove()
        raise
    if not executor.is_main:
        return None
    saved, total = _SavedResults(state, targets), len(layout.blocks)
    del model, layout, captured, targets  # the model is not needed for writing
    if progress:
        progress(BlockEvent("write", total, total, time.perf_counter() - start, 0.0))
    info = {
        "method": codec.codec_id,
        "text": calib.text_name,
        "samples": calib.samples,
        "seqlen": calib.seqlen,
        "seed": calib.seed,
    }
    report = encode_model(
        src,
        dst,
        policy,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress=write_progress,
        base_model=base_model,
        encoder=_encoder(saved, quantizer, policy, claims),
        calibration=info,
        resume=resume,
        fingerprint={"calibrated": fingerprint},
    )
    state.remove()
    report.seconds = time.perf_counter() - start
    return report


def _run_blocks(
    layout: BlockLayout,
    captured,
    targets: list[list[_Target]],
    quantizer: BlockQuantizer,
    state: ResumeState,
    seed: int,
    start: float,
    progress: BlockProgress | None,
    stop_after: int | None,
    claims: dict[str, int],
    weights: tuple[WeightSource, torch.nn.Module],
    executor: Executor = INLINE,
) -> None:
    """Quantize (or reload) every block in order, saving each block's results in ``state``; ``claims``: per
    tensor, the calibrated codec's records in its output file (for shared segments). Each block's weights are
    read from ``weights`` (the checkpoint and the model that names them) before it runs and released after."""
    total, saved = len(layout.blocks), state.finished()
    inputs = captured.inputs
    times: list[float] = []
    if progress:
        progress(BlockEvent("prepare", 0, total, time.perf_counter() - start, None))
    for i, block in enumerate(layout.blocks):
        t0 = time.perf_counter()
        kwargs = captured.kwargs[i]
        load_weights(block, layout.block_name(i), *weights)
        if i < saved:
            results = state.load(i, targets[i])
            check_results(results, targets[i], quantizer)
        else:
            shared = claims[targets[i][0].tensor] if targets[i] else 0
            results = (
                _quantize(block, i, inputs, kwargs, targets[i], quantizer, seed, shared, executor) if targets[i] else {}
            )
            state.save(i, results)
        _apply(results, targets[i])
        with torch.no_grad():
            inputs = [run_block(block, x, kwargs) for x in inputs]
        release_weights(block)
        stats = {t.name: results[t.name].stats for t in targets[i] if results[t.name].stats}
        del results
        trim_heap()
        seconds = time.perf_counter() - t0
        if i >= saved:
            times.append(seconds)
        if progress:
            eta = sum(times) / len(times) * (total - i - 1) if times else None
            stage = "replay" if i < saved else "block"
            progress(BlockEvent(stage, i + 1, total, time.perf_counter() - start, eta, seconds, stats))
        if stop_after is not None and i >= saved and i + 1 >= stop_after and i + 1 < total:
            raise CalibrationStopped(f"stopped after {i + 1} blocks as asked; run again to resume")


__all__ = [
    "BlockEvent",
    "BlockProgress",
    "CalibOptions",
    "CalibrationStopped",
    "ResumeState",
    "check_results",
    "encode_calibrated",
    "resume_dir",
]
