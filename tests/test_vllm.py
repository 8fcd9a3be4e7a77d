"""The vLLM plugin: its entry point and weight iterator here; greedy generation in vLLM's CPU build (opt-in).

vLLM pins its own torch and transformers, so it lives in its own environment (``benchmarks/vllm_env.sh``); the
opt-in test runs ``tests/vllm_generate.py`` with that environment's Python::

    NWC_VLLM_PYTHON=/path/to/vllm-env/bin/python pytest tests/test_vllm.py
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from conftest import run_nwc
from nwcfmt import NwcReader
from nwcfmt.integrations.vllm import nwc_weights

VLLM_PYTHON = os.environ.get("NWC_VLLM_PYTHON")
PROMPTS = [[1, 2, 3, 4], [504, 30, 1180], [1, 9038, 2115, 2767, 28, 260]]
TOKENS = 16


def test_entry_point_is_declared():
    plugins = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    assert plugins["nwc"].value == "nwcfmt.integrations.vllm:register"
    assert callable(plugins["nwc"].load())


def test_weights_are_decoded_under_checkpoint_names(tmp_path, tiny_llama_dir):
    out = tmp_path / "enc"
    run_nwc("encode", tiny_llama_dir, "-o", out, "--codec", "rtn", "--bits", "4", "--max-shard-size", "1", "-q")
    assert len(list(out.glob("*.safetensors"))) > 1  # shards are read in turn
    got = dict(nwc_weights(out))
    assert "model.layers.0.self_attn.q_proj.weight" in got
    count = 0
    for f in out.glob("*.safetensors"):
        with NwcReader(f) as reader:
            for name in reader.names:
                assert torch.equal(got[name], reader.decode(name))
                count += 1
    assert count == len(got)


@pytest.mark.skipif(not VLLM_PYTHON, reason="opt-in: set NWC_VLLM_PYTHON to a vLLM environment's python")
def test_vllm_greedy_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from nwcfmt import data

    out = tmp_path / "rtn4"
    run_nwc("encode", data.smollm2_dir("float32"), "-o", out, "--codec", "rtn", "--bits", "4", "-q")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    script = Path(__file__).with_name("vllm_generate.py")
    proc = subprocess.run(
        [VLLM_PYTHON, str(script), str(out), str(TOKENS), json.dumps(PROMPTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("NWC-RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:] + proc.stdout[-3000:]
    vllm_tokens = json.loads(lines[-1].removeprefix("NWC-RESULT "))["tokens"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for prompt, got in zip(PROMPTS, vllm_tokens, strict=True):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)
        assert got == ref[0, len(prompt) :].tolist()
