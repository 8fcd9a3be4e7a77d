"""Mutation fuzzer for the NWC reader: a malformed file must raise an ``NwcError``, never anything else.

Every case mutates one of a few small valid seed files (raw and lossless tensors, several dtypes, lossless tensors
of several chunks, empty and scalar tensors, a plain safetensors file), writes it to disk, opens it with
:class:`NwcReader` and decodes every tensor twice: with CRC checking (``verify=True``) and without
(``verify=False``, so that corrupted payloads reach the codec decoders). Success and ``NwcError`` subclasses are
accepted. A failure is any other exception (``MemoryError`` included: the loop runs under an address-space cap, so
an allocation sized by a corrupt file shows up as one), a case slower than ``CASE_SECONDS``, or, for mutations that
leave the header intact, a ``verify=True`` decode that returns anything but the original tensor.

Mutation families (one test each):

* ``bytes``: bit flips, random byte overwrites, truncation, insertion, deletion, block copies, anywhere;
* ``header``: JSON-aware edits of the safetensors header and of the manifest in ``__metadata__["nwc"]`` (numbers,
  types, dropped, added, renamed and duplicated keys, swapped strings, list edits, over-long integer literals),
  re-written with a correct length prefix and the original alignment;
* ``payload``: edits inside one segment (bytes, lossless index fields, plane lengths moved between planes, planes
  replaced by other zstd frames), with the CRC-32 fixed up in the manifest, so that the codec, not the checksum,
  must catch them.

Deterministic: case ``i`` of family ``f`` draws from ``random.Random(f"{NWC_FUZZ_SEED}:{f}:{i}")``; a failure
report names the family and case and keeps the failing file. ``NWC_FUZZ_CASES`` is the number of cases per family
(default 6,000: 18,000 cases plus the hypothesis examples, kept small for the suite's 15 minutes). A case that hangs for
``HANG_SECONDS`` makes faulthandler dump every thread's stack and end the run. Longer runs::

    NWC_FUZZ_CASES=200000 pytest tests/test_fuzz.py
    NWC_FUZZ_SEED=7 NWC_FUZZ_CASES=50000 pytest tests/test_fuzz.py -k payload
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import random
import struct
import sys
import time
import traceback
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import nwcfmt
from nwcfmt import NwcError, NwcReader, NwcWriter
from nwcfmt.constants import PAD_PREFIX

CASES = int(os.environ.get("NWC_FUZZ_CASES", "6000"))  # the suite's share of its 15 minutes; raise it to dig
FUZZ_SEED = os.environ.get("NWC_FUZZ_SEED", "0")
CASE_SECONDS = 5.0
HANG_SECONDS = 120
ADDRESS_SPACE_HEADROOM = 2 << 30  # bytes of address space a case may add on top of what the process already has
ALIGN = 64


# ---------------------------------------------------------------------------------------------------- seed files
def _build_seeds(folder: Path) -> dict[str, tuple[bytes, bool]]:
    """name -> (file bytes, allow_plain)."""
    g = torch.Generator().manual_seed(1234)
    paths = {}

    paths["mixed"] = folder / "mixed.safetensors"
    with NwcWriter(paths["mixed"]) as w:
        w.write("bf", (torch.randn(700, generator=g) * 0.02).bfloat16(), "lossless", chunk_elems=256)
        w.write("h", torch.randn(20, 30, generator=g).half(), "lossless", chunk_elems=256, raw_if_larger=False)
        w.write("f", torch.randn(2, 300, generator=g), "lossless", chunk_elems=512, raw_if_larger=False)
        w.write("i", torch.arange(-5, 5, dtype=torch.int32))
        w.write("b", torch.tensor([True, False, True]))
        w.write("r", torch.randn(3, 4, generator=g).bfloat16())

    paths["edge"] = folder / "edge.safetensors"
    with NwcWriter(paths["edge"]) as w:
        w.write("zeros", torch.zeros(1000, dtype=torch.bfloat16), "lossless", chunk_elems=256, raw_if_larger=False)
        w.write("empty", torch.zeros(0, dtype=torch.float32), "lossless", raw_if_larger=False)
        w.write("scalar", torch.tensor(3.5, dtype=torch.float64))
        w.write("u8", torch.arange(7, dtype=torch.uint8))
        w.write("none", torch.zeros(0, 3, dtype=torch.int64))

    # uniformly random bits: incompressible planes, stored raw inside the lossless layout
    noise = torch.randint(-(2**15), 2**15, (600,), generator=g, dtype=torch.int16).view(torch.bfloat16)
    paths["saved"] = folder / "saved.safetensors"
    nwcfmt.save({"noise": noise, "w": (torch.randn(64, 40, generator=g) * 0.05).bfloat16()}, paths["saved"])
    with NwcWriter(folder / "noise.safetensors") as w:  # force the lossless layout for the noise too
        w.write("noise", noise, "lossless", chunk_elems=256, raw_if_larger=False)
        w.write("f32", torch.randn(300, generator=g), "lossless", chunk_elems=256, raw_if_larger=False)
    paths["noise"] = folder / "noise.safetensors"

    # entropy-coded latents: rANS lanes, tables, side information. Kept to the two cheapest ecsq records (a
    # several-lane stream and a one-symbol alphabet): a latent case decodes in about 6 ms, the others in 2-13 ms.
    # neural records (a network per decode, ~10 ms each) are fuzzed by targeted edits in test_neural_codec.py.
    paths["latent"] = folder / "latent.safetensors"
    with NwcWriter(paths["latent"]) as w:
        w.write("e", torch.randn(40, 64, generator=g) * 0.02, "ecsq", bits=3, lane_symbols=1024)
        w.write("c", torch.full((5, 70), 0.25), "ecsq", bits=4, lane_symbols=1024)

    # sparse: a plain bitmask with raw values and a rANS 2:4 mask with rtn values (entropy-coded values are the
    # latent seed's; kept small, as every case decodes the whole seed)
    paths["sparse"] = folder / "sparse.safetensors"
    with NwcWriter(paths["sparse"]) as w:
        w.write("m", (torch.randn(8, 48, generator=g) * 0.02).bfloat16(), "sparse", values_codec="raw")
        w.write("n", torch.randn(8, 32, generator=g) * 0.02, "sparse", pattern="2:4", values_codec="rtn")

    paths["plain"] = folder / "plain.safetensors"
    save_file({"a": torch.randn(4, 4, generator=g).half(), "b": torch.arange(3)}, str(paths["plain"]))
    return {name: (p.read_bytes(), name == "plain") for name, p in paths.items()}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, tuple[bytes, bool]]:
    return _build_seeds(tmp_path_factory.mktemp("fuzz-seeds"))


@pytest.fixture(scope="module")
def originals(seeds, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """What every seed decodes to (the oracle for mutations that leave the header intact)."""
    folder = tmp_path_factory.mktemp("fuzz-originals")
    out = {}
    for name, (data, plain) in seeds.items():
        path = folder / f"{name}.safetensors"
        path.write_bytes(data)
        with NwcReader(path, allow_plain=plain) as r:
            out[name] = {n: r.decode(n) for n in r.names}
    return out


# ------------------------------------------------------------------------------------------- file surgery helpers
def split_file(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


class Raw(str):
    """A JSON token written verbatim (an integer literal too long for Python, deep nesting, ...)."""


def dump(value, extra: dict[int, list] | None = None) -> str:
    """Compact JSON like the writer's; ``extra[id(obj)]`` lists additional (duplicate) pairs of an object."""
    extra = extra or {}
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        pairs = [*value.items(), *extra.get(id(value), [])]
        return "{" + ",".join(json.dumps(k) + ":" + dump(v, extra) for k, v in pairs) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, extra) for v in value) + "]"
    return json.dumps(value)  # NaN / Infinity are emitted on purpose


def join_file(header_text: str, body: bytes, align: int = ALIGN) -> bytes:
    raw = header_text.encode("utf-8", "surrogatepass")
    raw += b" " * ((-(8 + len(raw))) % align)
    return struct.pack("<Q", len(raw)) + raw + body


def crc_hex(data: bytes) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def relayout(header: dict, body: bytes, blobs: dict[str, bytes], manifest: dict | None = None) -> bytes:
    """Rebuild a file with some tensors' bytes replaced (1-D U8 if the size changes), re-aligned like the writer."""
    header = dict(header)
    if manifest is not None:
        header["__metadata__"] = {**header["__metadata__"], "nwc": json.dumps(manifest, separators=(",", ":"))}
    align = ALIGN if "nwc" in (header.get("__metadata__") or {}) else 1  # plain files: no padding tensors
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__" and not k.startswith(PAD_PREFIX)),
        key=lambda kv: tuple(kv[1]["data_offsets"]),
    )
    out_header: dict = {"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}
    out = bytearray()
    n_pad = 0
    for name, info in entries:
        start, end = info["data_offsets"]
        blob = blobs.get(name, body[start:end])
        if len(out) % align and len(blob):
            pad = align - len(out) % align
            out_header[f"{PAD_PREFIX}{n_pad}"] = {
                "dtype": "U8",
                "shape": [pad],
                "data_offsets": [len(out), len(out) + pad],
            }
            out += bytes(pad)
            n_pad += 1
        same = len(blob) == end - start
        out_header[name] = {
            "dtype": info["dtype"] if same else "U8",
            "shape": info["shape"] if same else [len(blob)],
            "data_offsets": [len(out), len(out) + len(blob)],
        }
        out += blob
    return join_file(dump(out_header), bytes(out))


# ----------------------------------------------------------------------------------------------- the oracle
class Failure(Exception):
    pass


def check_file(path: Path, data: bytes, allow_plain: bool, expected: dict[str, torch.Tensor] | None) -> str:
    """Open and decode everything; returns an outcome label, raises on a disallowed outcome.

    ``expected``: the seed's tensors when the header is untouched: ``verify=True`` must then give them back
    exactly or raise ChecksumError.
    """
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    try:
        reader = NwcReader(path, allow_plain=allow_plain)
    except NwcError as exc:
        return f"open:{type(exc).__name__}"
    labels = []
    with reader:
        for name in reader.names:
            for verify in (True, False):
                try:
                    tensor = reader.decode(name, verify=verify)
                except NwcError as exc:
                    labels.append(type(exc).__name__)
                    if verify and expected is not None and not isinstance(exc, nwcfmt.ChecksumError):
                        raise Failure(f"intact header, but decode({name!r}) raised {exc!r}") from exc
                    continue
                labels.append("ok")
                if verify and expected is not None:
                    want = expected[name]
                    if tensor.dtype != want.dtype or tensor.shape != want.shape or not _same_bits(tensor, want):
                        raise Failure(f"intact header and verify=True, but {name!r} decoded to different values")
    if any(label != "ok" for label in labels):
        return "decode:" + next(label for label in labels if label != "ok")
    return "ok"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0:
        return True
    return a.reshape(-1).contiguous().view(torch.uint8).equal(b.reshape(-1).contiguous().view(torch.uint8))


@contextlib.contextmanager
def address_space_cap(headroom: int):
    """Lower RLIMIT_AS to the current address-space size + ``headroom`` (Linux; a no-op elsewhere)."""
    try:
        import resource

        status = Path("/proc/self/status").read_text()
        vm_size = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize:"))) * 1024
    except (ImportError, OSError, StopIteration, ValueError):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_size + headroom
    if hard != resource.RLIM_INFINITY and cap > hard:
        cap = hard
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_family(family: str, mutate, seeds, originals, tmp_path: Path, cases: int = CASES) -> Counter:
    """Run ``cases`` cases of one family; fail with a reproducer per distinct crash site."""
    path = tmp_path / "case.safetensors"
    names = sorted(seeds)
    outcomes: Counter = Counter()
    failures: dict[tuple, str] = {}
    slowest = (0.0, -1)
    with address_space_cap(ADDRESS_SPACE_HEADROOM):
        for i in range(cases):
            rng = random.Random(f"{FUZZ_SEED}:{family}:{i}")
            seed_name = rng.choice(names)
            seed, allow_plain = seeds[seed_name]
            data = mutate(rng, seed)
            header_len = 8 + struct.unpack("<Q", seed[:8])[0]
            intact = len(data) == len(seed) and data[:header_len] == seed[:header_len]
            t0 = time.perf_counter()
            faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
            try:
                expected = originals[seed_name] if intact and not allow_plain else None  # plain: no CRC
                outcomes[check_file(path, data, allow_plain, expected)] += 1
            except Exception as exc:  # the point of the fuzzer: anything but NwcError is a bug
                tb = traceback.extract_tb(exc.__traceback__)
                site = (type(exc).__name__, tb[-1].filename, tb[-1].lineno) if tb else (type(exc).__name__,)
                outcomes["FAIL"] += 1
                if site not in failures:
                    keep = tmp_path / f"fail-{family}-{i}.safetensors"
                    keep.write_bytes(data)
                    failures[site] = (
                        f"family={family} case={i} seed_file={seed_name} NWC_FUZZ_SEED={FUZZ_SEED} "
                        f"(input kept at {keep})\n{''.join(traceback.format_exception(exc))}"
                    )
            finally:
                faulthandler.cancel_dump_traceback_later()
            elapsed = time.perf_counter() - t0
            if elapsed > slowest[0]:
                slowest = (elapsed, i)
    print(f"\n{family}: {cases} cases, slowest {slowest[0] * 1000:.1f} ms (case {slowest[1]}), {dict(outcomes)}")
    if failures:
        report = "\n\n".join(failures.values())
        pytest.fail(f"{len(failures)} distinct non-NwcError failure site(s) in family {family!r}:\n{report}")
    assert slowest[0] < CASE_SECONDS, f"case {slowest[1]} of {family} took {slowest[0]:.1f} s"
    return outcomes


# ------------------------------------------------------------------------------------------------- mutators
def _position(rng: random.Random, size: int, header_end: int) -> int:
    r = rng.random()
    if r < 0.1:
        return rng.randrange(min(8, size))
    if r < 0.4 and header_end < size:
        return rng.randrange(header_end, size)
    if r < 0.7:
        return rng.randrange(min(header_end, size))
    return rng.randrange(size)


def mutate_bytes(rng: random.Random, seed: bytes) -> bytes:
    b = bytearray(seed)
    header_end = 8 + struct.unpack("<Q", seed[:8])[0]
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not b:
            break
        pos = _position(rng, len(b), header_end)
        op = rng.randrange(7)
        if op <= 1:
            b[pos] ^= 1 << rng.randrange(8)
        elif op == 2:
            n = rng.randint(1, 8)
            b[pos : pos + n] = rng.randbytes(n)
        elif op == 3:
            del b[pos:]
        elif op == 4:
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 5:
            del b[pos : pos + rng.randint(1, 16)]
        else:
            src, n = rng.randrange(len(b)), rng.randint(1, 64)
            b[pos : pos + n] = b[src : src + n]
    return bytes(b)


GENERIC_VALUES = [
    0, -1, 1, 1.5, -0.0, 1e300, True, False, None, "", "raw", "lossless", "bfloat16", "BF16", "U8", "data", "index",
    [], {}, [1], [-1], [0, 0], [2**34], [0.5], ["1"], [True], [None], {"a": 1}, {"tensor": "x", "crc32": "00000000"},
    Raw("1" + "0" * 5000), Raw("-" + "9" * 4400), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999"),
    Raw("[" * 3000 + "]" * 3000), Raw('{"a":' * 3000 + "1" + "}" * 3000), Raw('"\\ud800"'), Raw('"\\u0000"'),
]  # fmt: skip
EDGE_INTS = [
    0, 1, -1, 255, 256, 2**16, 2**24, 2**24 + 1, 2**31, 2**32 - 1, 2**32, 2**34, 2**36 + 1, 2**53 + 1, 2**63, 2**64,
    10**30,
]  # fmt: skip
ODD_STRINGS = [
    "", "\u00b2.0", "1.0", "1.9", "2.0", "0.0", "1", "1.0.0", "\u0661.0", " 1.0", "x" * 300, "\x00", "00000000",
    "FFFFFFFF",
]  # fmt: skip


def _interesting(rng: random.Random, old, pool: list[str]):
    r = rng.random()
    if isinstance(old, int) and not isinstance(old, bool) and r < 0.7:
        small = [old + 1, old - 1, old * 2, old // 2, -old, old + ALIGN, old - ALIGN, old + rng.randint(-999, 999)]
        return rng.choice(small if rng.random() < 0.6 else EDGE_INTS)
    if isinstance(old, str) and r < 0.7:
        return rng.choice(pool) if rng.random() < 0.6 else rng.choice([old + "x", old[:-1], old.upper(), *ODD_STRINGS])
    if isinstance(old, list) and old and r < 0.5:
        return [_interesting(rng, v, pool) for v in old]
    return rng.choice(GENERIC_VALUES)


def _slots(node, out: list) -> list:
    if isinstance(node, dict):
        for key in node:
            out.append((node, key))
            _slots(node[key], out)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append((node, i))
            _slots(value, out)
    return out


def _strings(node, out: set) -> set:
    if isinstance(node, dict):
        out.update(node)
        for v in node.values():
            _strings(v, out)
    elif isinstance(node, list):
        for v in node:
            _strings(v, out)
    elif isinstance(node, str) and len(node) < 200:
        out.add(node)
    return out


def mutate_json(rng: random.Random, root: dict, extra: dict[int, list], pool: list[str]) -> None:
    """One structural edit of a JSON tree, in place (duplicate keys go to ``extra``, see :func:`dump`)."""
    slots = _slots(root, [])
    dicts = [root] + [c[k] for c, k in slots if isinstance(c[k], dict) and c[k]]
    lists = [c[k] for c, k in slots if isinstance(c[k], list) and c[k]]
    op = rng.choices(["replace", "drop", "add", "dup", "rename", "list"], weights=[10, 3, 2, 2, 2, 2])[0]
    if op == "list" and lists:
        lst = rng.choice(lists)
        i, j = rng.randrange(len(lst)), rng.randrange(len(lst))
        kind = rng.randrange(4)
        if kind == 0:
            lst.insert(j, lst[i])
        elif kind == 1:
            lst[i], lst[j] = lst[j], lst[i]
        elif kind == 2:
            del lst[i]
        else:
            lst.append(_interesting(rng, lst[i], pool))
    elif op == "add":
        rng.choice(dicts)[rng.choice([*pool, "zz_unknown"])] = rng.choice(GENERIC_VALUES)
    elif op == "dup":
        d = rng.choice(dicts)
        if d:
            key = rng.choice(list(d))
            extra.setdefault(id(d), []).append((key, d[key] if rng.random() < 0.5 else _interesting(rng, d[key], pool)))
    elif op == "rename":
        container, key = rng.choice([s for s in slots if isinstance(s[0], dict)] or [(root, next(iter(root), "x"))])
        if key in container:
            container[rng.choice([*pool, key + "_"])] = container.pop(key)
    elif slots:
        container, key = rng.choice(slots)
        if op == "drop":
            del container[key]
        else:
            container[key] = _interesting(rng, container[key], pool)


def mutate_header(rng: random.Random, seed: bytes) -> bytes:
    header, body = split_file(seed)
    meta = header.get("__metadata__") or {}
    manifest = json.loads(meta["nwc"]) if "nwc" in meta else None
    pool = sorted(_strings(header, set()) | (_strings(manifest, set()) if manifest else set()))
    extra: dict[int, list] = {}
    target = manifest if manifest is not None and rng.random() < 0.65 else header
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        mutate_json(rng, target, extra, pool)
    if target is manifest:
        header["__metadata__"]["nwc"] = Raw(json.dumps(dump(manifest, extra)))
        extra = {}
    return join_file(dump(header, extra), body)


def _lossless_parts(rec: dict, header: dict, body: bytes):
    data_info = header[rec["segments"]["data"]["tensor"]]
    index_info = header[rec["segments"]["index"]["tensor"]]
    data = bytearray(body[slice(*data_info["data_offsets"])])
    raw_index = body[slice(*index_info["data_offsets"])]
    ncol = 5 if rec["dtype"] == "float32" else 3
    words = list(struct.unpack(f"<{len(raw_index) // 4}I", raw_index))
    rows = [words[i : i + ncol] for i in range(0, len(words), ncol)]
    return data, rows


def _chunk_layout(rows: list[list[int]]) -> list[tuple[int, int, list[int]]]:
    """(chunk start, table bytes, plane starts) per index row."""
    out, pos = [], 0
    for row in rows:
        table = 2 * (((row[0] >> 8) & 0xFF) + 1)
        starts, p = [], pos + table
        for length in row[1:]:
            starts.append(p)
            p += length
        out.append((pos, table, starts))
        pos = p
    return out


def _new_plane(rng: random.Random, old: bytes, n: int) -> tuple[bytes, bool | None]:
    """A replacement plane for one of ``n`` bytes; returns (bytes, raw flag to set or None to keep)."""
    comp = zstandard.ZstdCompressor(write_content_size=True)
    kind = rng.randrange(9)
    if kind == 0:
        return comp.compress(bytes(max(0, n + rng.choice((-1, 1, n, 2**20))))), False  # wrong declared size
    if kind == 1:
        return zstandard.ZstdCompressor(write_content_size=False).compress(bytes(n)), False  # no declared size
    if kind == 2:
        return old[: rng.randrange(len(old) + 1)], None  # truncated
    if kind == 3:
        return old + rng.randbytes(rng.randint(1, 8)), None  # trailing junk
    if kind == 4:
        half = comp.compress(bytes(n // 2))
        return half + half, False  # two frames
    if kind == 5:
        return rng.randbytes(n + rng.choice((-1, 1))), True  # raw plane of the wrong length
    if kind == 6:
        return b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"abcd", False  # skippable frame
    if kind == 7:
        frame = bytearray(comp.compress(rng.randbytes(n)))  # right size, corrupted inside
        if len(frame) > 8:
            frame[rng.randrange(6, len(frame))] ^= 1 << rng.randrange(8)
        return bytes(frame), False
    return comp.compress(rng.randbytes(n)), False  # a valid frame of random bytes: decodes to garbage, no error


def mutate_lossless(rng: random.Random, rec: dict, header: dict, body: bytes) -> dict[str, bytes]:
    data, rows = _lossless_parts(rec, header, body)
    if not rows:
        return {rec["segments"]["data"]["tensor"]: bytes(data) + rng.randbytes(rng.randint(0, 4))}
    chunk = rec["params"]["chunk_elems"]
    numel = 1
    for d in rec["shape"]:
        numel *= d
    r = rng.randrange(len(rows))
    row = rows[r]
    n = min(chunk, numel - r * chunk)
    layout = _chunk_layout(rows)
    op = rng.randrange(6)
    if op == 0:  # one index field
        col = rng.randrange(len(row))
        row[col] = rng.choice([row[col] + 1, row[col] - 1, 0, n, 2**32 - 1, row[col] ^ (1 << rng.randrange(32))])
        row[col] %= 2**32
    elif op == 1:  # move bytes between two planes of a chunk (sizes still add up)
        i, j = rng.sample(range(1, len(row)), 2)
        d = rng.randint(1, max(1, row[i]))
        if row[i] >= d:
            row[i] -= d
            row[j] += d
    elif op == 2:  # replace one plane
        p = rng.randrange(len(row) - 1)
        start = layout[r][2][p]
        old = bytes(data[start : start + row[1 + p]])
        new, raw = _new_plane(rng, old, n)
        data[start : start + row[1 + p]] = new
        row[1 + p] = len(new)
        if raw is not None:
            row[0] = (row[0] & ~(1 << (16 + p))) | (int(raw) << (16 + p))
    elif op == 3:  # chunk header bits: k, n_symbols, raw mask
        row[0] ^= 1 << rng.choice([0, 1, 2, 8, 9, 15, 16, 17, 18, 19, 20, 24, 31])
    elif op == 4:  # symbol table entries
        start, table, _ = layout[r]
        for _ in range(rng.randint(1, 3)):
            pos = start + rng.randrange(table)
            data[pos] = rng.randrange(256)
    else:  # bytes anywhere in the data segment
        for _ in range(rng.randint(1, 4)):
            if data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    index = b"".join(struct.pack(f"<{len(rw)}I", *rw) for rw in rows)
    return {rec["segments"]["data"]["tensor"]: bytes(data), rec["segments"]["index"]["tensor"]: index}


def mutate_payload(rng: random.Random, seed: bytes) -> bytes:
    """Edit the bytes of one tensor's segments and fix their CRC-32 in the manifest."""
    header, body = split_file(seed)
    meta = header.get("__metadata__") or {}
    if "nwc" not in meta:  # a plain file has no checksums: just edit a tensor
        name = rng.choice([k for k in header if k != "__metadata__"])
        blob = bytearray(body[slice(*header[name]["data_offsets"])])
        if blob:
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        return relayout(header, body, {name: bytes(blob)})
    manifest = json.loads(meta["nwc"])
    rec = rng.choice(manifest["tensors"])
    if rec["codec"] == "lossless" and rng.random() < 0.8:
        blobs = mutate_lossless(rng, rec, header, body)
    else:
        seg = rng.choice(list(rec["segments"].values()))
        blob = bytearray(body[slice(*header[seg["tensor"]]["data_offsets"])])
        for _ in range(rng.randint(1, 3)):
            if blob:
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        blobs = {seg["tensor"]: bytes(blob)}
    for seg in rec["segments"].values():
        if seg["tensor"] in blobs:
            seg["crc32"] = crc_hex(blobs[seg["tensor"]])
    return relayout(header, body, blobs, manifest)


# ---------------------------------------------------------------------------------------------------- tests
def test_seeds_and_surgery_helpers_round_trip(seeds, originals, tmp_path):
    """The seeds cover what they should, and the helpers rebuild valid files: an unmutated relayout / re-dump
    decodes to the seed's tensors."""
    dtypes, chunk_counts, raw_masks = set(), set(), set()
    for data, plain in seeds.values():
        header, body = split_file(data)
        for rec in [] if plain else json.loads(header["__metadata__"]["nwc"])["tensors"]:
            dtypes.add((rec["codec"], rec["dtype"]))
            if rec["codec"] == "lossless":
                rows = _lossless_parts(rec, header, body)[1]
                chunk_counts.add(len(rows))
                raw_masks.update(row[0] >> 16 for row in rows)
    assert {("lossless", d) for d in ("bfloat16", "float16", "float32")} <= dtypes
    assert len({d for c, d in dtypes if c == "raw"}) >= 5
    assert 0 in chunk_counts and max(chunk_counts) >= 3  # empty and multi-chunk tensors
    assert 0 in raw_masks and len(raw_masks) >= 4  # zstd planes, raw planes, and mixes
    for name, (data, plain) in seeds.items():
        header, body = split_file(data)
        for rebuilt in (relayout(header, body, {}), join_file(dump(header), body)):
            assert check_file(tmp_path / "x.safetensors", rebuilt, plain, originals[name]) == "ok"
            with NwcReader(tmp_path / "x.safetensors", allow_plain=plain) as r:
                assert r.names == list(originals[name])


@pytest.mark.parametrize("leak", ["index-error", "huge-allocation"])
def test_the_fuzzer_catches_what_it_claims_to(seeds, originals, tmp_path, monkeypatch, leak):
    """Meta-test: a decoder that leaks a low-level exception, or allocates what a corrupt file says, must fail."""
    import numpy as np

    from nwcfmt.codecs.lossless import LosslessCodec

    def broken_decode(cls, record, segments, device):
        if leak == "index-error":
            raise IndexError("index 300 is out of bounds")
        np.ones(2**40, dtype=np.uint8)  # 1 TiB: beyond the address-space cap

    monkeypatch.setattr(LosslessCodec, "decode", classmethod(broken_decode))
    with pytest.raises(pytest.fail.Exception, match="IndexError" if leak == "index-error" else "MemoryError"):
        run_family("meta", mutate_payload, seeds, originals, tmp_path, cases=20)


def test_fuzz_bytes(seeds, originals, tmp_path):
    outcomes = run_family("bytes", lambda rng, seed: mutate_bytes(rng, seed), seeds, originals, tmp_path)
    assert outcomes["ok"] > 0 and sum(v for k, v in outcomes.items() if k.startswith("decode:ChecksumError")) > 0


def test_fuzz_header(seeds, originals, tmp_path):
    outcomes = run_family("header", mutate_header, seeds, originals, tmp_path)
    assert outcomes["ok"] > 0 and len(outcomes) > 5  # many different rejections, and harmless edits still read


def test_fuzz_payload_with_fixed_crc(seeds, originals, tmp_path):
    outcomes = run_family("payload", mutate_payload, seeds, originals, tmp_path)
    decode_errors = sum(v for k, v in outcomes.items() if k.startswith("decode:"))
    assert outcomes["ok"] > 0 and decode_errors > CASES // 10  # the codec, not the CRC, rejected these


# ------------------------------------------------------------------------------------------------ hypothesis
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
HYPOTHESIS = settings(
    max_examples=max(50, CASES // 20),
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@HYPOTHESIS
@given(data=st.data())
def test_hypothesis_manifest_field(seeds, tmp_path, data):
    """Any JSON value in any manifest slot (hypothesis explores integer boundaries and shrinks failures)."""
    name = data.draw(st.sampled_from(sorted(n for n, (_, plain) in seeds.items() if not plain)))
    header, body = split_file(seeds[name][0])
    manifest = json.loads(header["__metadata__"]["nwc"])
    slots = _slots(manifest, [])
    container, key = slots[data.draw(st.integers(0, len(slots) - 1))]
    container[key] = data.draw(JSON_VALUES)
    header["__metadata__"]["nwc"] = json.dumps(manifest)
    _check_or_fail(tmp_path, join_file(dump(header), body))


@HYPOTHESIS
@given(data=st.data())
def test_hypothesis_header_entry(seeds, tmp_path, data):
    """Any JSON value as a safetensors entry's dtype, shape or data_offsets (or one element of them)."""
    name = data.draw(st.sampled_from(sorted(seeds)))
    header, body = split_file(seeds[name][0])
    tensor = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    value = header[tensor][field]
    if isinstance(value, list) and value and data.draw(st.booleans()):
        value[data.draw(st.integers(0, len(value) - 1))] = data.draw(st.integers() | JSON_VALUES)
    else:
        header[tensor][field] = data.draw(JSON_VALUES)
    _check_or_fail(tmp_path, join_file(dump(header), body), allow_plain=seeds[name][1])


@HYPOTHESIS
@given(data=st.data())
def test_hypothesis_lossless_index(seeds, tmp_path, data):
    """Arbitrary uint32 values in a lossless index (CRC fixed up): the codec must reject or decode them."""
    header, body = split_file(seeds["mixed"][0])
    manifest = json.loads(header["__metadata__"]["nwc"])
    rec = data.draw(st.sampled_from([r for r in manifest["tensors"] if r["codec"] == "lossless"]))
    _, rows = _lossless_parts(rec, header, body)
    for _ in range(data.draw(st.integers(1, 4))):
        row = rows[data.draw(st.integers(0, len(rows) - 1))]
        row[data.draw(st.integers(0, len(row) - 1))] = data.draw(st.integers(0, 2**32 - 1))
    index = b"".join(struct.pack(f"<{len(rw)}I", *rw) for rw in rows)
    seg = rec["segments"]["index"]
    seg["crc32"] = crc_hex(index)
    _check_or_fail(tmp_path, relayout(header, body, {seg["tensor"]: index}, manifest))


def _check_or_fail(tmp_path: Path, data: bytes, allow_plain: bool = False) -> None:
    with address_space_cap(ADDRESS_SPACE_HEADROOM):
        check_file(tmp_path / "h.safetensors", data, allow_plain, None)


if __name__ == "__main__":  # pragma: no cover - `python tests/test_fuzz.py` runs the fuzzer without pytest
    sys.exit(pytest.main([__file__, "-q", "-s"]))
