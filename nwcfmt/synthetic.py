"""Synthetic checkpoints for scale tests: a random Llama-shaped bf16 folder written a tensor at a time, and the peak
anonymous memory of a command run on it.

Used by the memory test and ``benchmarks/bench_memory.py``. ``RssAnon`` (from ``/proc/PID/status``) leaves out
mapped file pages, which reading a checkpoint through a memory map touches without allocating.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def llama_tensors(hidden: int, layers: int, intermediate: int, vocab: int, kv_heads_ratio: int = 4):
    """(name, shape) of a Llama checkpoint, in file order."""
    kv = hidden // kv_heads_ratio
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        for name, shape in [
            ("self_attn.q_proj", (hidden, hidden)),
            ("self_attn.k_proj", (kv, hidden)),
            ("self_attn.v_proj", (kv, hidden)),
            ("self_attn.o_proj", (hidden, hidden)),
            ("mlp.gate_proj", (intermediate, hidden)),
            ("mlp.up_proj", (intermediate, hidden)),
            ("mlp.down_proj", (hidden, intermediate)),
        ]:
            yield p + name + ".weight", shape
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_checkpoint(
    dst: Path, hidden: int, layers: int, intermediate: int, shard_bytes: int, vocab: int = 49152
) -> tuple[int, int]:
    """A random bf16 Llama folder with SmolLM2's tokenizer (so calibrated codecs run); returns (total bytes,
    largest tensor bytes). Memory: one shard of ``shard_bytes``."""
    from safetensors.torch import save_file

    from nwcfmt import data

    heads = max(1, hidden // 64)
    gen = torch.Generator().manual_seed(0)
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]  # shards planned from the shapes, then written one by one
    size = 0
    for name, shape in llama_tensors(hidden, layers, intermediate, vocab):
        nbytes = math.prod(shape) * 2
        if size and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, shape))
        size += nbytes
    index, total, largest = {}, 0, 0
    for k, entries in enumerate(plan):
        shard = {}
        for name, shape in entries:
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                shard[name] = (torch.randn(shape, generator=gen) * (1.0 / hidden**0.5)).to(torch.bfloat16)
            total, largest = total + shard[name].numel() * 2, max(largest, shard[name].numel() * 2)
        fname = f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, fname))
        del shard
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 4),
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    tok = data.smollm2_dir("bfloat16")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        if (tok / name).is_file():
            shutil.copy(tok / name, dst / name)
    return total, largest


def anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``nwc ARGS`` in a subprocess; (seconds, peak RssAnon MB sampled every 20 ms)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty child never blocks on it
        proc = subprocess.Popen([sys.executable, "-m", "nwcfmt.cli.main", *args], stderr=log, text=True, env=env)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, anon_kb(proc.pid))
            time.sleep(0.02)
        log.seek(0)
        err = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"nwc {' '.join(args)} failed ({proc.returncode}): {err.strip()[-500:]}")
    return time.perf_counter() - start, peak / 1024


def baseline_mb() -> float:
    """Peak RssAnon MB of a process that imports what ``nwc encode`` imports and does nothing (the floor)."""
    code = "import torch, transformers, nwcfmt.cli.main, nwcfmt.calibration.pipeline"
    proc = subprocess.Popen([sys.executable, "-c", code + "; import time; time.sleep(0.5)"])
    peak = 0
    while proc.poll() is None:
        peak = max(peak, anon_kb(proc.pid))
        time.sleep(0.02)
    return peak / 1024


__all__ = ["anon_kb", "baseline_mb", "llama_tensors", "run_measured", "write_checkpoint"]
