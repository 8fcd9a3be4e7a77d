"""Peak anonymous memory of `nwc encode` / `nwc decode` on a synthetic Llama-shaped checkpoint (issue 15's baseline).

    python benchmarks/bench_memory.py --hidden 2048 --layers 8 --steps "encode rtn" "decode" "encode gptq"

Writes a random bf16 LlamaForCausalLM checkpoint (sharded safetensors, SmolLM2's tokenizer so calibrated codecs
run; no transformers model is built, the tensors are written one at a time), then runs each step as a user
would (a ``python -m nwcfmt.cli.main`` subprocess) while the parent samples the child's ``RssAnon`` from
``/proc/PID/status`` every 20 ms. ``RssAnon`` leaves out mapped file pages, which reading a checkpoint through a
memory map touches without allocating. Prints the peak against the checkpoint's size and its largest tensor.
Calibrated steps use ``--calib-samples`` windows (default 8 x 128 tokens, issue 15's figure).
"""

from __future__ import annotations

import argparse
import json
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


def write_checkpoint(dst: Path, hidden: int, layers: int, intermediate: int, shard_bytes: int) -> tuple[int, int]:
    """A random bf16 Llama folder; returns (total bytes, largest tensor bytes)."""
    from safetensors.torch import save_file

    from nwcfmt import data

    vocab, heads = 49152, max(1, hidden // 64)
    gen = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes, total, largest = [0], 0, 0
    for name, shape in llama_tensors(hidden, layers, intermediate, vocab):
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * (1.0 / hidden**0.5)).to(torch.bfloat16)
        nbytes = t.numel() * 2
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t
        sizes[-1] += nbytes
        total, largest = total + nbytes, max(largest, nbytes)
    index = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata={"format": "pt"})
        index.update({name: fname for name in shard})
        shard.clear()
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


def _anon_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(args: list[str]) -> tuple[float, float]:
    """Run ``nwc ARGS`` in a subprocess; (seconds, peak RssAnon MB sampled every 20 ms)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty child never blocks on it
        proc = subprocess.Popen([sys.executable, "-m", "nwcfmt.cli.main", *args], stderr=log, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _anon_kb(proc.pid))
            time.sleep(0.02)
        log.seek(0)
        err = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"nwc {' '.join(args)} failed ({proc.returncode}): {err.strip()[-500:]}")
    return time.perf_counter() - start, peak / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden, a multiple of 256")
    parser.add_argument("--shard-mb", type=int, default=500)
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=128)
    parser.add_argument("--steps", nargs="+", default=["encode rtn", "decode"], help='"encode CODEC" or "decode"')
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    inter = args.intermediate or round(2.75 * args.hidden / 256) * 256
    work = args.workdir or Path(tempfile.mkdtemp(prefix="nwc-mem-"))
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    total, largest = write_checkpoint(src, args.hidden, args.layers, inter, args.shard_mb << 20)
    print(f"checkpoint: {total / 2**20:.0f} MB bf16, largest tensor {largest / 2**20:.0f} MB "
          f"(hidden {args.hidden}, {args.layers} layers, intermediate {inter})", flush=True)  # fmt: skip
    print(f"{'step':<16} {'seconds':>8} {'peak anon MB':>13} {'x checkpoint':>13} {'x largest':>10}")
    encoded = None
    for step in args.steps:
        verb, _, codec = step.partition(" ")
        if verb == "encode":
            encoded = work / f"enc-{codec}"
            extra = ["--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen)]
            calibrated = codec in ("gptq", "flexround", "lrq")
            cmd = ["encode", str(src), "-o", str(encoded), "--codec", codec, "--bits", "4", "-q", "--overwrite"]
            seconds, peak = run_measured(cmd + (extra if calibrated else []))
        elif verb == "decode" and encoded is not None:
            seconds, peak = run_measured(["decode", str(encoded), "-o", str(work / "dec"), "-q", "--overwrite"])
        else:
            raise SystemExit(f"{step!r}: expected 'encode CODEC' or 'decode' after an encode")
        print(f"{step:<16} {seconds:8.1f} {peak:13.0f} {peak * 2**20 / total:13.2f} {peak * 2**20 / largest:10.2f}",
              flush=True)  # fmt: skip
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
