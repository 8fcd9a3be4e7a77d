"""Shared fixtures: small real models written with transformers, and a runner for the ``nwc`` CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run_nwc(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed CLI entry point as a user would (a real subprocess)."""
    proc = subprocess.run(
        [sys.executable, "-m", "nwcfmt.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"nwc {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
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
