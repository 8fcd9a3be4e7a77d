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
