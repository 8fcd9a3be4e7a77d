"""Shared fixtures: small real models written with transformers, and a runner for the ``nwc`` CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run_nwc(*args: str, check: bool = True, timeout: float = 600, real: bool = False) -> subprocess.CompletedProcess:
    """Run ``nwc ARGS`` and return its exit code, stdout and stderr.

    In-process by default (click's runner on the same ``cli`` object the entry point calls: same parsing, error
    handling and exit codes, without paying 3 s of interpreter and torch start-up per call); an exception that
    escaped the CLI's own handling is appended to stderr as the traceback a user would see, with exit code 1.
    ``real=True`` runs the installed entry point as a user would (a subprocess), as the tests of the entry point
    itself, signals and interpreter-level output do."""
    argv = [str(a) for a in args]
    if real:
        proc = subprocess.run(
            [sys.executable, "-m", "nwcfmt.cli.main", *argv], capture_output=True, text=True, timeout=timeout
        )
    else:
        import traceback

        from click.testing import CliRunner

        from nwcfmt.cli.main import cli

        result = CliRunner().invoke(cli, argv, prog_name="nwc")
        code, stderr = result.exit_code, result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            stderr += "Traceback (most recent call last):\n" + "".join(traceback.format_exception(*result.exc_info))
            code = 1
        proc = subprocess.CompletedProcess(["nwc", *argv], code, result.stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"nwc {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A small randomly initialised LlamaForCausalLM saved by transformers (bf16, real HF folder layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    return path


def rewrite_nwc(src: Path, dst: Path, edit) -> Path:
    """Copy an NWC file with ``edit(manifest, tensors)`` applied (both mutable), CRC-32s recomputed and the
    64-byte alignment kept, so that only the edit, not the surgery, can make a reader refuse the copy."""
    import json

    from safetensors import safe_open

    from nwcfmt.constants import MANIFEST_KEY, PAD_PREFIX
    from nwcfmt.container.checksum import crc32
    from nwcfmt.container.safetensors_io import StreamingWriter, tensor_bytes

    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(PAD_PREFIX)}  # noqa: SIM118
    manifest = json.loads(metadata[MANIFEST_KEY])
    edit(manifest, tensors)
    for rec in manifest["tensors"]:
        for ref in rec["segments"].values():
            ref["crc32"] = f"{crc32(tensor_bytes(tensors[ref['tensor']].contiguous())):08x}"
    metadata[MANIFEST_KEY] = json.dumps(manifest)
    writer = StreamingWriter(dst, alignment=manifest.get("alignment", 64))
    for name, tensor in tensors.items():
        writer.add(name, tensor.contiguous())
    writer.finish(metadata)
    return dst


def tokenizer_files(dst: Path) -> None:
    from nwcfmt.data import smollm2_dir

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir() / name, dst / name)


@pytest.fixture(scope="session")
def calib_llama_dir(tmp_path_factory) -> Path:
    """A tiny bf16 Llama with SmolLM2's real tokenizer (49152 ids), so real text tokenizes into it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("calib-llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer_files(path)
    return path
