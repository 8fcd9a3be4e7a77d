"""NwcReader: open an NWC file lazily, validate header and manifest up front, decode tensors on demand."""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from nwcfmt.codecs.registry import get_codec
from nwcfmt.constants import (
    DTYPE_NAMES,
    LOADER_NOTICE,
    MANIFEST_KEY,
    PAD_PREFIX,
    SHARED_PREFIX,
    SHARED_SEGMENTS,
    ST_TO_TORCH,
    dtype_name,
)
from nwcfmt.container.checksum import crc32_parallel
from nwcfmt.container.manifest import Manifest, SegmentRef, TensorRecord
from nwcfmt.container.safetensors_io import Header, TensorInfo, read_header
from nwcfmt.errors import ChecksumError, FormatError, InputError, LimitError, NwcError, UnsupportedVersionError


def _open_regular_file(path: Path) -> BinaryIO:
    """Open ``path`` for reading; InputError if it is missing or not a regular file (a FIFO would block, a device
    has no size)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot open ({exc.strerror or exc.__class__.__name__})") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InputError(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _plain_manifest(header: Header) -> Manifest:
    """A plain safetensors file read as if every tensor were stored with the raw codec."""
    records = [
        TensorRecord(t.name, "raw", 1, dtype_name(ST_TO_TORCH[t.dtype]), t.shape, {}, {"data": SegmentRef(t.name, -1)})
        for t in header.tensors.values()
    ]
    return Manifest(records, alignment=1)


class NwcReader:
    """Reads an NWC file (or, with ``allow_plain=True``, a plain safetensors file).

    The constructor reads only the header: it validates the safetensors header, the manifest, every
    record against the tensors that hold its segments, segment alignment, and codec ids and versions.
    Payloads are memory-mapped and checked against their CRC-32 when a tensor is decoded.
    """

    def __init__(
        self, path: str | os.PathLike, *, allow_plain: bool = False, max_tensor_bytes: int | None = None
    ) -> None:
        self.path = Path(path)
        self.max_tensor_bytes = max_tensor_bytes  # opt-in cap on one decoded tensor (untrusted files)
        self._file = _open_regular_file(self.path)
        self._map: mmap.mmap | None = None
        self._map_lock = threading.Lock()
        try:
            self.header = read_header(self._file, self.path)
            self.metadata = {k: v for k, v in self.header.metadata.items() if k != MANIFEST_KEY}
            text = self.header.metadata.get(MANIFEST_KEY)
            self.is_plain = text is None
            if self.is_plain and not allow_plain:
                raise FormatError(f"{self.path}: not an NWC file (no {MANIFEST_KEY!r} manifest in __metadata__)")
            self.manifest = _plain_manifest(self.header) if self.is_plain else Manifest.from_json(text, str(self.path))
            self._records = {r.name: r for r in self.manifest.tensors}
            self._validate()
        except BaseException:
            self._file.close()
            raise

    # ----------------------------------------------------------------------------------- validation
    def _segment_infos(self, record: TensorRecord) -> dict[str, TensorInfo]:
        infos = {}
        for seg_name, ref in record.segments.items():
            info = self.header.tensors.get(ref.tensor)
            if info is None:
                raise FormatError(f"{self.path}: tensor {record.name!r}: segment tensor {ref.tensor!r} is missing")
            infos[seg_name] = info
        return infos

    def _locate(self, exc: NwcError, record: TensorRecord) -> None:
        """Put the file (and the tensor, if missing) in front of an error raised by a codec or the registry."""
        msg = str(exc)
        if not msg.startswith(str(self.path)):
            if f"{record.name!r}" not in msg:
                msg = f"tensor {record.name!r}: {msg}"
            exc.args = (f"{self.path}: {msg}",)

    def _validate(self) -> None:
        used: dict[str, str] = {}
        self._claims: dict[str, int] = {}  # safetensors tensor -> number of records whose segments it holds
        sharing = SHARED_SEGMENTS in self.manifest.required_features
        for record in self.manifest.tensors:
            try:
                codec = get_codec(record.codec)
            except NwcError as exc:
                self._locate(exc, record)
                raise
            if record.codec_version < 1:
                raise FormatError(f"{self.path}: tensor {record.name!r}: codec_version must be at least 1")
            if record.codec_version > codec.version:
                raise UnsupportedVersionError(
                    f"{self.path}: tensor {record.name!r} uses {record.codec} v{record.codec_version}; "
                    f"this nwcfmt reads up to v{codec.version}"
                )
            infos = self._segment_infos(record)
            for info in infos.values():
                self._claims[info.name] = self._claims.get(info.name, 0) + 1
                if info.name in used and not (sharing and info.name.startswith(SHARED_PREFIX)):
                    raise FormatError(
                        f"{self.path}: safetensors tensor {info.name!r} is claimed twice "
                        f"(by {used[info.name]!r} and {record.name!r})"
                    )
                used[info.name] = record.name
                if (info.start % self.manifest.alignment) and info.nbytes:
                    raise FormatError(
                        f"{self.path}: tensor {record.name!r}: segment {info.name!r} is not "
                        f"{self.manifest.alignment}-byte aligned"
                    )
            try:
                codec.validate(record, infos)
            except NwcError as exc:
                self._locate(exc, record)
                raise
        for info in self.header.tensors.values():
            if info.name in used:
                continue
            ignorable = info.name.startswith(PAD_PREFIX) or (info.name == LOADER_NOTICE and not info.nbytes)
            if not (ignorable and info.dtype == "U8"):
                raise FormatError(f"{self.path}: tensor {info.name!r} is not described by the manifest")

    # ------------------------------------------------------------------------------------- access
    @property
    def names(self) -> list[str]:
        return [r.name for r in self.manifest.tensors]

    def record(self, name: str) -> TensorRecord:
        try:
            return self._records[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def segment_infos(self, name: str) -> dict[str, TensorInfo]:
        """The safetensors header entries of a tensor's segments, by segment name."""
        return self._segment_infos(self.record(name))

    def segment_bytes(self, name: str) -> dict[str, float]:
        """Bytes of each of a tensor's segments; a shared segment counts its share (its bytes over the records
        that use it, format-v1.md 6.2)."""
        infos = self._segment_infos(self.record(name))
        return {seg: info.nbytes / self._claims.get(info.name, 1) for seg, info in infos.items()}

    def stored_bytes(self, name: str) -> int:
        """Bytes of a tensor's segments, shared segments by their share (:meth:`segment_bytes`)."""
        return round(sum(self.segment_bytes(name).values()))

    def _buffer(self) -> mmap.mmap:
        with self._map_lock:  # decode() may run in several threads
            if self._map is None:
                changed = FormatError(f"{self.path}: the file changed size since it was opened")
                try:
                    mapped = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
                except ValueError:  # "cannot mmap an empty file": truncated since the header was read
                    raise changed from None
                if len(mapped) != self.header.file_size:  # touching pages past a shrunk file's end is SIGBUS
                    mapped.close()
                    raise changed
                self._map = mapped
            return self._map

    def segments(self, name: str, *, verify: bool = True) -> dict[str, torch.Tensor]:
        """The segments of one tensor as CPU tensors viewing the file (checked against their CRC-32)."""
        record = self.record(name)
        out = {}
        for seg_name, info in self._segment_infos(record).items():
            view = memoryview(self._buffer())[info.start : info.end]
            if verify:
                self._verify(record, seg_name, view)
            dtype = ST_TO_TORCH[info.dtype]
            flat = torch.frombuffer(view, dtype=torch.uint8) if info.nbytes else torch.empty(0, dtype=torch.uint8)
            out[seg_name] = flat.view(dtype).reshape(info.shape)
        return out

    def _verify(self, record: TensorRecord, segment: str, data: memoryview) -> None:
        expected = record.segments[segment].crc32
        if expected >= 0 and crc32_parallel(data) != expected:
            raise ChecksumError(f"{self.path}: tensor {record.name!r}: checksum mismatch in segment {segment!r}")

    def verify_segments(self, name: str, segments: Mapping[str, torch.Tensor]) -> None:
        """Check CPU copies of a tensor's segments (all of them, as stored) against their CRC-32."""
        record = self.record(name)
        if set(segments) != set(record.segments):
            expected = sorted(record.segments)
            raise FormatError(f"{self.path}: tensor {name!r} has segments {expected}, got {sorted(segments)}")
        for seg_name, tensor in segments.items():
            data = tensor.contiguous().view(torch.uint8).reshape(-1).numpy() if tensor.numel() else b""
            self._verify(record, seg_name, memoryview(data))

    def decode(
        self,
        name: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        verify: bool = True,
    ) -> torch.Tensor:
        """Decode one tensor onto ``device``, optionally cast to ``dtype``."""
        record = self.record(name)
        if self.max_tensor_bytes is not None and record.nbytes > self.max_tensor_bytes:
            raise LimitError(
                f"{self.path}: tensor {name!r} decodes to {record.nbytes} bytes, over the {self.max_tensor_bytes} cap"
            )
        segments = self.segments(name, verify=verify)
        tensor = self.decode_segments(name, segments, device)
        return tensor if dtype is None else tensor.to(dtype)

    def decode_segments(
        self, name: str, segments: Mapping[str, torch.Tensor], device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Decode one tensor from its segments: CPU ones from :meth:`segments`, or device copies of them that
        passed the codec's ``check`` where the codec ``decodes_on_device``."""
        record = self.record(name)
        try:
            tensor = get_codec(record.codec).decode(record, segments, torch.device(device))
        except NwcError as exc:
            self._locate(exc, record)
            raise
        if tensor.dtype != DTYPE_NAMES[record.dtype] or tuple(tensor.shape) != record.shape:
            raise FormatError(f"{self.path}: tensor {name!r} decoded to the wrong dtype or shape")
        return tensor

    def check_segments(self, name: str, segments: Mapping[str, torch.Tensor]) -> None:
        """The codec's content checks on CPU segments (before copies of them are decoded on a device)."""
        record = self.record(name)
        try:
            get_codec(record.codec).check(record, segments)
        except NwcError as exc:
            self._locate(exc, record)
            raise

    def items(self, *, readahead: int = 0, **kwargs) -> Iterator[tuple[str, torch.Tensor]]:
        """Decode every tensor in file order; with ``readahead`` > 0, that many tensors ahead in worker threads.

        Memory stays bounded by about ``readahead + 1`` decoded tensors. The default decodes inline: codecs
        already spread one tensor over threads, and on 2 cores tensor-level read-ahead measured slower.
        On a CUDA ``device`` the stored bytes are staged through pinned memory and decoded on the GPU
        (:mod:`nwcfmt.container.streaming`), with at least one tensor of read-ahead.
        """
        if torch.device(kwargs.get("device", "cpu")).type == "cuda":
            from nwcfmt.container.streaming import stream_decode

            yield from stream_decode(self, readahead=max(readahead, 2), **kwargs)
            return
        if readahead <= 0:
            for name in self.names:
                yield name, self.decode(name, **kwargs)
            return
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=readahead, thread_name_prefix="nwc-read") as pool:
            pending: deque = deque()
            names = iter(self.names)
            try:
                for name in names:
                    pending.append((name, pool.submit(self.decode, name, **kwargs)))
                    if len(pending) > readahead:
                        done, future = pending.popleft()
                        yield done, future.result()
                while pending:
                    done, future = pending.popleft()
                    yield done, future.result()
            finally:
                for _, future in pending:
                    future.cancel()

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view; the map goes with it
                self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> NwcReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
