"""Peers for the benchmarks: HQQ, llm-compressor's GPTQ and its SparseGPT / Wanda pruning, as plain fp32 folders.

Each adapter quantizes (or prunes) the same tensors as ``nwc encode`` does on a decoder-only model (every Linear
inside the decoder blocks: :func:`nwcfmt.eval.fakequant.quantizable_linears`; embeddings, norms and a tied
``lm_head`` stay as they are), then rebuilds each weight in fp32 from what the peer stores and writes a plain
Hugging Face folder (config, tokenizer, one ``model.safetensors``) that ``nwc eval`` scores on the same protocol as
an NWC folder. A quantizer's effective bits per weight count every byte the peer stores for those Linears (codes
and their grid), from the peer's own quantized representation, not from the dense copy. It writes a JSON result::

    python benchmarks/peers.py hqq --src DIR --out DIR --bits 4 --group-size 128 --result hqq.json
    python benchmarks/peers.py llmcompressor --src DIR --out DIR --bits 4 --group-size 0 \\
        --tokens calib.pt --result llmc.json
    python benchmarks/peers.py llmc-prune --src DIR --out DIR --method sparsegpt --sparsity 0.5 \\
        --pattern unstructured --tokens calib.pt --result llmc-sparsegpt-50.json

``--group-size 0`` means one group per output channel (a whole input row). ``bench_calibrated.py`` runs each
adapter in a process of its own to time it and read its peak RSS; llm-compressor pins an older transformers than
the project's, so it runs from a separate virtual environment (see ``benchmarks/README.md``).

* **HQQ** (``hqq`` on PyPI): ``BaseQuantizeConfig(nbits, group_size, axis=1)`` (HQQ's defaults: asymmetric,
  half-quadratic optimisation of the zero point, integer-rounded zero at 4 bits, float zero at 3 bits) through
  ``HQQLinear`` on the CPU with ``compute_dtype=float16``, so scale and zero are stored in fp16 as in HQQ's own
  checkpoints. ``axis=1`` groups consecutive values along the input dimension, like nwcfmt; HQQ groups the
  *flattened* weight, so with 576 input columns a group of 128 straddles two rows (576 = 4.5 x 128) and there
  are fewer groups than nwcfmt's per-row groups. Per channel is ``group_size=None`` (one group per row). HQQ
  stores 3-bit codes ten to an int32 (3.2 bits per code); the bit count includes that.
* **llm-compressor** ``GPTQModifier`` through ``oneshot`` with an asymmetric int scheme (``strategy="group"``
  or ``"channel"``), its defaults otherwise (``actorder="static"``, ``dampening_frac=0.01``, ``block_size=128``),
  ``ignore=["lm_head"]``, on the calibration token windows given (``--tokens``: an int64 ``[samples, seqlen]``
  tensor). The model is saved compressed (``pack-quantized``) and the bits are read from that file; the dense
  weights are the ones llm-compressor leaves in the model (its fake-quantized values), checked against the
  saved codes, scales and zero points.
* **llm-compressor pruning** (``llmc-prune``): ``SparseGPTModifier`` or ``WandaPruningModifier`` through
  ``oneshot`` (``--method sparsegpt|wanda``), ``sparsity=--sparsity`` and ``mask_structure="0:0"``
  (unstructured) or ``"2:4"`` (two zeros in every four consecutive input columns; the sparsity is then 0.5),
  ``targets=["Linear"]``, ``ignore=["re:.*lm_head"]`` (a plain ``"lm_head"`` does not match in these modifiers
  and would prune the tied embedding), its defaults otherwise (SparseGPT: ``block_size=128``,
  ``dampening_frac=0.01``; the sequential pipeline, each decoder block calibrated on the outputs of the
  blocks already pruned). The dense weights are the pruned ones it leaves in the model; the result records
  the fraction of exact zeros in the protocol Linears (and checks every other tensor is the source's, and
  that a 2:4 mask holds in every group of four).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

WEIGHTS_FILE = "model.safetensors"
# weight indexes and nwcfmt.data's record of how it built the source folder do not describe the copy
SKIPPED_FILES = {"model.safetensors.index.json", "nwcfmt_build.json"}


def protocol_linears(src: Path) -> list[str]:
    """Names of the Linear modules nwcfmt's protocol quantizes (the model is built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from nwcfmt.eval.fakequant import quantizable_linears

    config = AutoConfig.from_pretrained(src, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return quantizable_linears(model)


def load_tensors(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``src/model.safetensors`` (the SmolLM2 folder is a single file)."""
    from safetensors.torch import load_file

    path = src / WEIGHTS_FILE
    if not path.is_file():
        raise SystemExit(f"peers: {path}: expected a single-file model folder")
    return load_file(path)


def write_dense_folder(src: Path, out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``out``: the non-weight files of ``src`` (config, tokenizer...) and ``tensors`` as one safetensors file."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and item.suffix not in (".safetensors", ".bin") and item.name not in SKIPPED_FILES:
            shutil.copy2(item, out / item.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / WEIGHTS_FILE, metadata={"format": "pt"})


def quantize_hqq(src: Path, out: Path, bits: int, group_size: int, axis: int = 1) -> dict:
    """HQQ every protocol Linear of ``src``; write the fp32 dequantized folder ``out``; return the statistics."""
    import hqq
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear, Quantizer

    tensors = load_tensors(src)
    names = protocol_linears(src)
    config = BaseQuantizeConfig(nbits=bits, group_size=group_size or None, axis=axis)
    quantize_s = dequant_s = 0.0
    numel = codes_bytes = scale_bytes = zero_bytes = 0
    for name in names:
        key = f"{name}.weight"
        weight = tensors[key].to(torch.float32).clone()
        start = time.perf_counter()
        layer = HQQLinear.from_weights(weight, None, config, compute_dtype=torch.float16, device="cpu")
        quantize_s += time.perf_counter() - start
        meta = layer.meta
        numel += tensors[key].numel()
        codes_bytes += layer.W_q.numel() * layer.W_q.element_size()
        scale_bytes += meta["scale"].numel() * meta["scale"].element_size()
        zero_bytes += meta["zero"].numel() * meta["zero"].element_size()
        start = time.perf_counter()
        # HQQ's own dequantizer, run in fp32 from the stored fp16 scale/zero (the protocol evaluates in fp32).
        fp32_meta = {**meta, "compute_dtype": torch.float32}
        fp32_meta["scale"], fp32_meta["zero"] = meta["scale"].float(), meta["zero"].float()
        dense = Quantizer.dequantize(layer.W_q, fp32_meta).reshape(tensors[key].shape)
        tensors[key] = dense.to(torch.float32)
        dequant_s += time.perf_counter() - start
        del layer
    start = time.perf_counter()
    write_dense_folder(src, out, tensors)
    stored = codes_bytes + scale_bytes + zero_bytes
    return {
        "peer": "hqq",
        "version": getattr(hqq, "__version__", _dist_version("hqq")),
        "config": {
            "nbits": bits,
            "group_size": group_size or None,
            "axis": axis,
            "optimize": True,
            "round_zero": config["weight_quant_params"]["round_zero"],
            "compute_dtype": "float16",
        },
        "linears": len(names),
        "linear_numel": numel,
        "linear_stored_bytes": stored,
        "bits_per_weight": 8 * stored / numel,
        "bits_breakdown": {
            k: 8 * v / numel for k, v in (("codes", codes_bytes), ("scale", scale_bytes), ("zero", zero_bytes))
        },
        "quantize_s": quantize_s,
        "eval_copy_s": dequant_s + time.perf_counter() - start,
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _safetensors_sizes(folder: Path) -> dict[str, int]:
    """Tensor name -> stored bytes, from the headers of every ``*.safetensors`` file of ``folder``."""
    sizes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                sizes[name] = end - begin
    return sizes


def load_tokens(tokens: Path) -> torch.Tensor:
    """The calibration windows of ``tokens``: an int64 ``[samples, seqlen]`` tensor saved by ``torch.save``."""
    ids = torch.load(tokens, weights_only=True)
    if ids.dim() != 2 or ids.dtype != torch.long:
        raise SystemExit(f"peers: {tokens}: expected an int64 [samples, seqlen] tensor")
    return ids


def calibration_dataset(ids: torch.Tensor):
    """A ``datasets.Dataset`` of the windows ``ids`` (no padding) for llm-compressor's ``oneshot``."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def quantize_llmcompressor(src: Path, out: Path, bits: int, group_size: int, tokens: Path) -> dict:
    """llm-compressor GPTQ on ``src`` with the calibration windows in ``tokens``; write the fp32 folder ``out``."""
    import tempfile

    import compressed_tensors
    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = load_tokens(tokens)
    samples, seqlen = ids.shape
    names = protocol_linears(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    dataset = calibration_dataset(ids)
    weights = QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=False,
        strategy="group" if group_size else "channel",
        group_size=group_size or None,
    )
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]
    )
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=samples)
    quantize_s = time.perf_counter() - start
    modules = dict(model.named_modules())
    quantized = sorted(n for n, m in modules.items() if hasattr(m, "weight_scale"))
    if quantized != sorted(names):
        raise SystemExit(f"peers: llm-compressor quantized {len(quantized)} modules, the protocol {len(names)}")
    # the weights llm-compressor leaves in the model, before saving compressed replaces them with packed codes
    start = time.perf_counter()
    dense = {}
    for name in names:
        module = modules[name]
        dense[name] = module.weight.detach().to(torch.float32).clone()
        _check_fake_quant(name, dense[name], module, bits, group_size)
    actorder = str(modules[names[0]].quantization_scheme.weights.actorder)
    with tempfile.TemporaryDirectory(prefix="llmc-packed-") as packed:
        model.save_pretrained(packed, save_compressed=True)
        sizes = _safetensors_sizes(Path(packed))
        fmt = json.loads((Path(packed) / "config.json").read_text())["quantization_config"].get("format")
    save_s = time.perf_counter() - start
    numel = stored = 0
    parts: dict[str, int] = {}
    for name in names:
        numel += dense[name].numel()
        for key, size in sizes.items():
            if key.startswith(f"{name}.weight"):
                part = key[len(name) + 1 :]
                parts[part] = parts.get(part, 0) + size
                stored += size
    start = time.perf_counter()
    tensors = load_tensors(src)
    for name in names:
        tensors[f"{name}.weight"] = dense[name]
    write_dense_folder(src, out, tensors)
    return {
        "peer": "llmcompressor",
        "version": llmcompressor.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "config": {
            "num_bits": bits,
            "strategy": weights.strategy.value if hasattr(weights.strategy, "value") else str(weights.strategy),
            "group_size": group_size or None,
            "symmetric": False,
            "actorder": actorder,
            "calib_samples": samples,
            "calib_seqlen": seqlen,
            "format": fmt,
        },
        "linears": len(names),
        "linear_numel": numel,
        "linear_stored_bytes": stored,
        "bits_per_weight": 8 * stored / numel,
        "bits_breakdown": {k: 8 * v / numel for k, v in sorted(parts.items())},
        "quantize_s": quantize_s,
        "eval_copy_s": save_s + time.perf_counter() - start,
    }


def prune_llmcompressor(src: Path, out: Path, method: str, sparsity: float, pattern: str, tokens: Path) -> dict:
    """llm-compressor SparseGPT or Wanda on ``src`` with the windows in ``tokens``; write the fp32 folder ``out``."""
    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    try:
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    except ImportError:  # releases before SparseGPT moved to modifiers.pruning
        from llmcompressor.modifiers.obcq import SparseGPTModifier
        from llmcompressor.modifiers.pruning import WandaPruningModifier

    if pattern == "2:4" and sparsity != 0.5:
        raise SystemExit("peers: --pattern 2:4 prunes half of every four weights: give --sparsity 0.5")
    ids = load_tokens(tokens)
    samples, seqlen = ids.shape
    names = protocol_linears(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    dataset = calibration_dataset(ids)
    modifier = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    mask_structure = "0:0" if pattern == "unstructured" else pattern
    # a regex: with targets=["Linear"] the modifiers name each module "<name>." (trailing dot), so an exact
    # "lm_head" never matches and the tied head (the embedding) would be pruned
    recipe = modifier(sparsity=sparsity, mask_structure=mask_structure, targets=["Linear"], ignore=["re:.*lm_head"])
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=samples)
    prune_s = time.perf_counter() - start
    start = time.perf_counter()
    tensors = load_tensors(src)
    state = model.state_dict()
    protocol = {f"{name}.weight" for name in names}
    changed = sorted(k for k, v in tensors.items() if k not in protocol and not torch.equal(state[k], v))
    if changed:
        raise SystemExit(f"peers: llm-compressor changed tensors outside the protocol Linears: {changed[:4]}")
    numel = zeros = source_zeros = 0
    per_linear = {}
    for name in names:
        key = f"{name}.weight"
        weight = state[key].detach().to(torch.float32).clone()
        nz = int((weight == 0).sum())
        per_linear[name] = nz / weight.numel()
        if per_linear[name] < 0.9 * sparsity:
            raise SystemExit(f"peers: {name}: {per_linear[name]:.3f} of zeros, llm-compressor did not prune it")
        if pattern == "2:4" and (weight.reshape(weight.shape[0], -1, 4) == 0).sum(-1).lt(2).any():
            raise SystemExit(f"peers: {name}: a group of four consecutive weights has fewer than two zeros")
        numel += weight.numel()
        zeros += nz
        source_zeros += int((tensors[key] == 0).sum())
        tensors[key] = weight
    write_dense_folder(src, out, tensors)
    config = {
        "method": method,
        "modifier": type(recipe).__name__,
        "sparsity": sparsity,
        "pattern": pattern,
        "mask_structure": mask_structure,
        "targets": list(recipe.targets),
        "ignore": list(recipe.ignore),
        "calib_samples": samples,
        "calib_seqlen": seqlen,
    }
    if method == "sparsegpt":
        config |= {"block_size": recipe.block_size, "dampening_frac": recipe.dampening_frac}
    return {
        "peer": "llmc-prune",
        "version": llmcompressor.__version__,
        "compressed_tensors": compressed_tensors.__version__,
        "transformers": transformers.__version__,
        "config": config,
        "linears": len(names),
        "linear_numel": numel,
        "linear_zeros": zeros,
        "sparsity": zeros / numel,
        "source_sparsity": source_zeros / numel,
        "sparsity_min": min(per_linear.values()),
        "sparsity_max": max(per_linear.values()),
        "prune_s": prune_s,
        "eval_copy_s": time.perf_counter() - start,
    }


def _check_fake_quant(name: str, dense: torch.Tensor, module: torch.nn.Module, bits: int, group_size: int) -> None:
    """``dense`` must lie on the grid of the module's scale and zero point: compressed-tensors' int codes are
    signed, ``[-2**(bits-1), 2**(bits-1) - 1]``, and decode as ``(code - zero) * scale``."""
    scale = module.weight_scale.detach().to(torch.float32)
    zero = module.weight_zero_point.detach().to(torch.float32)
    cols = dense.shape[1]
    size = group_size or cols
    s = scale.repeat_interleave(size, dim=1)[:, :cols]
    z = zero.repeat_interleave(size, dim=1)[:, :cols]
    codes = torch.round(dense / s + z)
    in_range = codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    if not in_range or ((codes - z) * s - dense).abs().gt(1e-4 * s).any():  # off-grid: a step's 1e-4 or more
        raise SystemExit(f"peers: {name}: llm-compressor's weights are not on its stored {bits}-bit grid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("peer", choices=["hqq", "llmcompressor", "llmc-prune"])
    parser.add_argument("--src", type=Path, required=True, help="plain HF model folder (fp32)")
    parser.add_argument("--out", type=Path, required=True, help="output: plain fp32 folder of the peer's weights")
    parser.add_argument("--bits", type=int, help="hqq, llmcompressor: bits per code")
    parser.add_argument("--group-size", type=int, help="hqq, llmcompressor: 0 means per output channel")
    parser.add_argument("--axis", type=int, default=1, choices=[0, 1], help="HQQ: grouping axis (default 1)")
    parser.add_argument("--tokens", type=Path, help="llm-compressor: int64 [samples, seqlen] calibration windows")
    parser.add_argument("--method", choices=["sparsegpt", "wanda"], help="llmc-prune: the pruning modifier")
    parser.add_argument("--sparsity", type=float, default=0.5, help="llmc-prune: fraction of zeros (default 0.5)")
    parser.add_argument(
        "--pattern", choices=["unstructured", "2:4"], default="unstructured", help="llmc-prune: mask structure"
    )
    parser.add_argument("--result", type=Path, required=True, help="JSON statistics")
    args = parser.parse_args(argv)
    if args.peer in ("hqq", "llmcompressor") and (args.bits is None or args.group_size is None):
        parser.error(f"{args.peer} needs --bits and --group-size")
    if args.peer != "hqq" and args.tokens is None:
        parser.error(f"{args.peer} needs --tokens")
    if args.peer == "llmc-prune" and args.method is None:
        parser.error("llmc-prune needs --method")
    torch.manual_seed(0)
    if args.peer == "hqq":
        result = quantize_hqq(args.src, args.out, args.bits, args.group_size, args.axis)
    elif args.peer == "llmcompressor":
        result = quantize_llmcompressor(args.src, args.out, args.bits, args.group_size, args.tokens)
    else:
        result = prune_llmcompressor(args.src, args.out, args.method, args.sparsity, args.pattern, args.tokens)
    result["python"] = sys.executable
    result["torch"] = torch.__version__
    args.result.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
