"""Sparse records: the layout (mask + values of any codec), the pruners against straightforward references, the
global magnitude threshold, self-generated calibration text, and the CLI end to end on a real model folder."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import nwcfmt
from nwcfmt.codecs.mask import Pattern, encode_mask, nm_sets, symbols_of
from nwcfmt.codecs.sparse import SparseCodec, compact, expand, values_shape
from nwcfmt.container.writer import decode_encoded, encode_tensor
from nwcfmt.encoders import prune
from nwcfmt.errors import EncodeError, FormatError, InputError, UnknownCodecError, UnsupportedVersionError
from tests.conftest import rewrite_nwc, run_nwc

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def weight(rows: int, cols: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=gen) * 0.02).to(dtype)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "config",
    [
        {"values_codec": "raw"},
        {"values_codec": "raw", "pattern": "2:4"},
        {"values_codec": "lossless", "sparsity": 0.3},
        {"values_codec": "rtn", "values": {"bits": 4, "group_size": 32}},
        {"values_codec": "rtn", "values": {"bits": 3}, "pattern": "4:8"},
        {"values_codec": "ecsq", "values": {"bits": 3}, "prune": "random", "sparsity": 0.7},
        {"values_codec": "neural", "values": {"bits": 4}, "pattern": "1:4"},
    ],
    ids=lambda c: "-".join(str(v) for v in c.values()),
)
def test_file_round_trip(tmp_path, dtype, config):
    """Through a real file: pruned elements decode to +0, kept ones to the values codec's decode of the values
    matrix, and the pattern and count hold."""
    w = weight(48, 96, dtype)
    path = tmp_path / "s.safetensors"
    nwcfmt.save({"layer.weight": w}, path, codec="sparse", **config)
    with nwcfmt.open(path) as reader:
        record = reader.record("layer.weight")
        out = reader.decode("layer.weight")
        assert reader.verify() if hasattr(reader, "verify") else True
    assert record.codec == "sparse" and out.dtype == dtype and out.shape == w.shape
    codec = SparseCodec(**config)
    keep = codec.mask_for("layer.weight", w.float())
    assert int(keep.sum()) == record.params["nnz"]
    pruned = ~keep
    assert bool((bits_of(out)[pruned] == 0).all()), "pruned elements must be +0"
    if codec.pattern.structured:
        groups = keep.view(48, -1, codec.pattern.m).sum(-1)
        assert bool((groups == codec.pattern.n).all())
    if config["values_codec"] in ("raw", "lossless"):
        assert torch.equal(bits_of(out)[keep], bits_of(w)[keep])
    else:  # kept values are exactly what the values codec decodes from the values matrix
        values = compact(w.float(), keep).to(dtype)
        inner, enc = encode_tensor("v", values, config["values_codec"], **config.get("values", {}))
        want = decode_encoded("v", inner, enc, values.shape, dtype)
        assert torch.equal(bits_of(out)[keep], bits_of(want).reshape(-1)[: keep.sum()])


def test_values_matrix_shape():
    assert values_shape(4, 8) == (4, 2)  # per-row counts: [rows, kept per row]
    assert values_shape(4, 9) == (3, 3)  # ragged: rows straddle
    assert values_shape(4, 0) == (0, 1)
    keep = torch.tensor([[1, 0, 1], [0, 0, 1]]).bool()
    w = torch.arange(6.0).view(2, 3)
    v = compact(w, keep)
    assert v.tolist() == [[0.0, 2.0], [5.0, 0.0]]
    assert torch.equal(expand(v, keep), w * keep)


def test_bits_per_weight_count_the_mask(tmp_path):
    """50% unstructured pays about 1 bit of mask; 2:4 about log2(6)/4 = 0.646 (rANS over the 6 group sets)."""
    w = weight(256, 512)
    for pattern, lo, hi in (("unstructured", 0.98, 1.01), ("2:4", 0.645, 0.67)):
        _, enc = encode_tensor("w", w, "sparse", values_codec="raw", pattern=pattern)
        mask_bytes = sum(v.numel() * v.element_size() for k, v in enc.segments.items() if not k.startswith("values."))
        assert lo <= 8 * mask_bytes / w.numel() <= hi, pattern
    path = tmp_path / "s.safetensors"
    nwcfmt.save({"w": w}, path, codec="sparse", values_codec="rtn", values={"bits": 4})
    info = run_nwc("info", str(path), "--json")
    doc = json.loads(info.stdout)
    tensor = doc["tensors"][0]
    assert tensor["details"]["mask_bits_per_weight"] == pytest.approx(1.0, abs=0.01)
    # 4-bit values of half the weights, scales of 128 kept values, and the mask: about 3.1 bits a weight
    assert 3.0 < tensor["bits_per_weight"] < 3.2
    assert (
        "unstructured magnitude 50.0% sparse, mask bits 1.000 b/w; values rtn 4b g128 asym"
        in run_nwc("info", str(path)).stdout
    )


def test_mask_levels_pay_for_column_skew():
    """Columns kept in most rows and columns pruned in most rows get tables of their own (Wanda's input norms
    make such masks): the rANS mask costs well under 1 bit a weight where one table would cost 1."""
    gen = torch.Generator().manual_seed(1)
    rates = torch.linspace(0.05, 0.95, 512)
    keep = torch.rand(256, 512, generator=gen) < rates
    params, segments = encode_mask(keep, Pattern())
    nbytes = sum(v.numel() * v.element_size() for v in segments.values())
    assert params["mask_coding"] == "rans" and params["mask_levels"] > 1
    p = keep.double().mean(0).clamp(1e-9, 1 - 1e-9)
    ideal = float((-(p * p.log2() + (1 - p) * (1 - p).log2())).mean())  # per-column entropy, about 0.77 bit
    assert 8 * nbytes / keep.numel() < min(0.9, 1.08 * ideal)


def test_nm_symbols_follow_the_spec_order():
    assert nm_sets(2, 4).tolist() == [
        [1, 1, 0, 0],
        [1, 0, 1, 0],
        [0, 1, 1, 0],
        [1, 0, 0, 1],
        [0, 1, 0, 1],
        [0, 0, 1, 1],
    ]
    keep = np.array([[0, 0, 1, 1, 1, 1, 0, 0]], bool)
    assert symbols_of(keep, Pattern(2, 4)).tolist() == [5, 0]  # kept {2, 3}: 0b1100; kept {0, 1}: 0b0011
    with pytest.raises(EncodeError, match="exactly 2 of every 4"):
        symbols_of(np.array([[1, 1, 1, 0]], bool), Pattern(2, 4))


def test_codec_config_errors():
    for bad in (
        {"prune": "nope"},
        {"sparsity": 1.0},
        {"pattern": "4:2"},
        {"pattern": "2:16"},
        {"values_codec": "sparse"},
        {"scope": "global", "prune": "random"},
    ):
        with pytest.raises(EncodeError):
            SparseCodec(**bad)
    with pytest.raises(EncodeError, match="needs calibration data"):
        encode_tensor("w", weight(8, 8), "sparse", prune="wanda")
    with pytest.raises(EncodeError, match="multiple of 4"):
        SparseCodec(pattern="2:4").encode(weight(4, 6))


# ------------------------------------------------------------------------------------------- bad files
def _sparse_file(tmp_path, **config):
    path = tmp_path / "good.safetensors"
    nwcfmt.save({"w": weight(16, 64, torch.bfloat16)}, path, codec="sparse", **config)
    return path


def _edit_params(**changes):
    def edit(manifest, tensors):
        manifest["tensors"][0]["params"].update(changes)

    return edit


@pytest.mark.parametrize(
    "config, edit, error",
    [
        ({}, _edit_params(nnz=511), FormatError),
        ({}, _edit_params(pattern="3:4"), FormatError),
        ({}, _edit_params(mask_coding="zip"), FormatError),
        ({}, _edit_params(values_codec="sparse"), FormatError),
        ({}, _edit_params(values_codec="nope"), UnknownCodecError),
        ({}, _edit_params(values_codec_version=9), UnsupportedVersionError),
        ({"pattern": "2:4"}, _edit_params(mask_levels=3), FormatError),
        ({"pattern": "2:4"}, _edit_params(mask_lane_symbols=7), FormatError),
    ],
)
def test_reader_refuses_bad_params(tmp_path, config, edit, error):
    good = _sparse_file(tmp_path, **config)
    bad = rewrite_nwc(good, tmp_path / "bad.safetensors", edit)
    with pytest.raises(error), nwcfmt.open(bad) as reader:
        reader.decode("w")
    proc = run_nwc("verify", str(bad), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_reader_refuses_masks_that_break_their_promises(tmp_path):
    good = _sparse_file(tmp_path)  # a plain bitmask of 1024 bits, half kept

    def flip_first_bit(manifest, tensors):
        tensors["w"] = tensors["w"].clone()
        tensors["w"][0] ^= 1

    bad = rewrite_nwc(good, tmp_path / "a.safetensors", flip_first_bit)
    with nwcfmt.open(bad) as reader, pytest.raises(FormatError, match="keeps"):
        reader.decode("w")
    good24 = tmp_path / "g24.safetensors"
    nwcfmt.save({"w": weight(16, 64, torch.bfloat16)}, good24, codec="sparse", pattern="2:4")

    def as_bits_breaking_groups(manifest, tensors):  # a bitmask with the right count but a 3-1 group
        rec = manifest["tensors"][0]
        keep = torch.zeros(16 * 64, dtype=torch.uint8)
        keep[0::2] = 1
        keep[0:4] = torch.tensor([1, 1, 1, 0])
        keep[4:8] = torch.tensor([1, 0, 0, 0])
        tensors["w"] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
        for seg in ("mask_lanes", "mask_tables"):
            tensors.pop(rec["segments"].pop(seg)["tensor"])
        rec["params"]["mask_coding"] = "bits"

    bad = rewrite_nwc(good24, tmp_path / "b.safetensors", as_bits_breaking_groups)
    with nwcfmt.open(bad) as reader, pytest.raises(FormatError, match="2 of every 4"):
        reader.decode("w")


# ------------------------------------------------------------------------------------------ the pruners
def test_magnitude_and_random_masks_match_a_plain_reference():
    w = weight(32, 80)
    for s in (0.0, 0.5, 0.73):
        keep = prune.magnitude_mask(w, s, Pattern())
        order = np.argsort(np.abs(w.numpy()).reshape(-1), kind="stable")
        want = np.ones(w.numel(), bool)
        want[order[: int(s * w.numel())]] = False
        assert np.array_equal(keep.numpy().reshape(-1), want)
    keep = prune.magnitude_mask(w, 0.5, Pattern(2, 4))
    mags = np.abs(w.numpy()).reshape(32, 20, 4)
    want = np.zeros_like(mags, bool)
    top = np.argsort(-mags, axis=-1, kind="stable")[..., :2]
    np.put_along_axis(want, top, True, axis=-1)
    assert np.array_equal(keep.numpy(), want.reshape(32, 80))
    r1 = prune.random_mask((32, 80), 0.6, Pattern(), prune.tensor_seed("a", 0))
    r2 = prune.random_mask((32, 80), 0.6, Pattern(), prune.tensor_seed("a", 0))
    r3 = prune.random_mask((32, 80), 0.6, Pattern(), prune.tensor_seed("b", 0))
    assert torch.equal(r1, r2) and not torch.equal(r1, r3) and int((~r1).sum()) == int(0.6 * 32 * 80)


def test_wanda_matches_its_definition_on_real_activations():
    """Wanda's score |W_ij| * ||X_j||_2, computed from the activations themselves, ranked per output row: the
    same mask as ours from the Hessian the pipeline collects (H = 2/N X^T X)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 64, generator=gen) * torch.linspace(0.1, 3, 64)
    w = weight(24, 64, seed=4)
    h = 2 / x.shape[0] * x.T @ x
    norms = x.norm(dim=0)
    metric = (w.abs() * norms).numpy()
    for pattern, sparsity in ((Pattern(), 0.5), (Pattern(), 0.7), (Pattern(2, 4), 0.5), (Pattern(4, 8), 0.5)):
        keep = prune.wanda_mask(w, h, sparsity, pattern)
        if pattern.structured:
            groups = metric.reshape(24, -1, pattern.m)
            want = np.zeros_like(groups, bool)
            np.put_along_axis(want, np.argsort(-groups, axis=-1, kind="stable")[..., : pattern.n], True, axis=-1)
            want = want.reshape(24, 64)
        else:
            want = np.ones_like(metric, bool)
            np.put_along_axis(want, np.argsort(metric, axis=1, kind="stable")[:, : int(sparsity * 64)], False, axis=1)
        assert np.array_equal(keep.numpy(), want), pattern


def reference_sparsegpt(w: np.ndarray, h: np.ndarray, sparsity: float, n: int, m: int, block: int = 128):
    """SparseGPT written from the paper's algorithm (Frantar and Alistarh 2023, Algorithm 1), in float64, with
    eager (not lazy) updates of every later column after each column: the OBS update the lazy batches reorder."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64).copy()
    cols = w.shape[1]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += 0.01 * np.mean(np.diag(h)) * np.eye(cols)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    keep = np.ones_like(w, bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        if not m:
            score = w[:, i1:i2] ** 2 / np.diag(hinv)[i1:i2] ** 2
            k = int(score.size * sparsity)
            thresh = np.sort(score.reshape(-1))[k]
            keep[:, i1:i2] = score > thresh
        for j in range(i1, i2):
            if m and j % m == 0:
                score = w[:, j : j + m] ** 2 / np.diag(hinv)[j : j + m] ** 2
                sel = np.zeros_like(score, bool)
                np.put_along_axis(sel, np.argsort(-score, axis=1, kind="stable")[:, :n], True, axis=1)
                keep[:, j : j + m] = sel
            q = np.where(keep[:, j], w[:, j], 0.0)
            err = (w[:, j] - q) / hinv[j, j]
            w[:, j:] -= np.outer(err, hinv[j, j:])
            w[:, j] = q
    return keep, w


@pytest.mark.parametrize("n, m, sparsity", [(0, 0, 0.5), (0, 0, 0.7), (2, 4, 0.5)])
def test_sparsegpt_matches_the_reference_arithmetic(n, m, sparsity):
    gen = torch.Generator().manual_seed(5)
    mix = torch.randn(256, 256, generator=gen) / 16 + torch.eye(256)  # correlated inputs, as real ones are
    x = (torch.randn(400, 256, generator=gen) @ mix) * torch.linspace(0.2, 2, 256)
    x[:, 7] = 0  # a dead input column
    h = (2 / 400 * x.T @ x).double()
    w = weight(48, 256, seed=6) * torch.linspace(0.5, 1.5, 256)
    result = prune.sparsegpt(w, h, sparsity=sparsity, pattern=Pattern(n, m))
    keep, w_ref = reference_sparsegpt(w.numpy(), h.numpy(), sparsity, n, m)
    agree = (result.keep.numpy() == keep).mean()
    assert agree > 0.999, agree  # near-ties can flip between float32 lazy and float64 eager arithmetic
    same = result.keep.numpy() == keep
    err = np.abs(result.weight.numpy()[same] - w_ref[same]).max() / np.abs(w_ref).max()
    assert err < 1e-3
    assert bool((result.weight[~result.keep] == 0).all())
    # the point of the update: a lower layer-wise loss than pruning the same mask without it
    from nwcfmt.codecs.gptq import layer_loss

    assert layer_loss(w, result.weight, h.float()) < 0.9 * layer_loss(w, w * result.keep, h.float())


def test_joint_gptq_values_beat_pruning_then_rounding():
    """sparsegpt + gptq values: each kept weight on its group's grid, pruned ones zero, errors spread; its layer
    loss is below rtn's on the same pruned values and its record decodes to exactly the weight it reports."""
    from nwcfmt.calibration.method import BlockData
    from nwcfmt.codecs.gptq import layer_loss
    from nwcfmt.encoders.sparse import SparseMethod

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(600, 128, generator=gen) * torch.linspace(0.2, 2, 128)
    h = 2 / 600 * x.T @ x
    w = weight(64, 128, seed=8)
    losses = {}
    for values in ("gptq", "rtn"):
        codec = SparseCodec(values_codec=values, values={"bits": 3, "group_size": 32}, prune="sparsegpt")
        method = SparseMethod(codec)
        linear = torch.nn.Linear(128, 64, bias=False)
        linear.weight.data.copy_(w)
        data = BlockData(0, [], {}, None, {"l": h}, tokens=600, dtypes={"l": torch.float32})
        result = method.quantize_block(torch.nn.Module(), {"l": linear}, data)["l"]
        decoded = decode_encoded("l", codec, result.encoded, w.shape, torch.float32)
        assert torch.equal(decoded, result.weight)
        losses[values] = layer_loss(w, result.weight, h)
    assert losses["gptq"] < losses["rtn"]


def test_global_threshold_is_exact_with_ties():
    gen = torch.Generator().manual_seed(9)
    tensors = [(torch.randn(50, 40, generator=gen) * 0.02).to(torch.bfloat16) for _ in range(3)]  # many ties
    for sparsity in (0.3, 0.5, 0.8):
        found = prune.global_threshold(lambda: iter(tensors), sparsity)
        everything = torch.cat([t.float().abs().reshape(-1) for t in tensors])
        k = int(sparsity * everything.numel())
        assert found.threshold == float(torch.sort(everything).values[k - 1])
        pruned = sum(
            int((~prune.threshold_mask(t.float(), found.threshold, found.tie_fraction)).sum()) for t in tensors
        )
        assert abs(pruned - k) <= len(tensors)  # ties are shared out per tensor, rounded


# ------------------------------------------------------------------------------------ self-generated text
def test_generated_calibration_windows(calib_llama_dir):
    from transformers import AutoTokenizer

    from nwcfmt.calibration.data import generated_batches

    tok = AutoTokenizer.from_pretrained(calib_llama_dir)
    a = generated_batches(calib_llama_dir, tok, samples=6, seqlen=12, batch_size=4, seed=1)
    b = generated_batches(calib_llama_dir, tok, samples=6, seqlen=12, batch_size=4, seed=1)
    c = generated_batches(calib_llama_dir, tok, samples=6, seqlen=12, batch_size=4, seed=2)
    assert [t.shape for t in a] == [torch.Size([3, 12])] * 2
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    first = torch.cat(a)[:, 0]
    assert not set(first.tolist()) & set(tok.all_special_ids)


# ----------------------------------------------------------------------------------------------- the CLI
def _assert_pattern(folder, pattern: str, sparsity: float):
    model = nwcfmt.from_pretrained(folder)
    proj = model.model.layers[1].mlp.down_proj.weight.detach()
    if pattern == "2:4":
        assert bool(((proj != 0).view(proj.shape[0], -1, 4).sum(-1) <= 2).all())
    else:
        assert abs(float((proj == 0).float().mean()) - sparsity) < 0.05
    return model


@pytest.mark.parametrize(
    "args, pattern, sparsity",
    [
        (["--prune", "magnitude", "--codec", "rtn", "--bits", "4"], "unstructured", 0.5),
        (
            ["--prune", "magnitude", "--prune-scope", "global", "--sparsity", "0.6", "--codec", "raw"],
            "unstructured",
            0.6,
        ),
        (["--prune", "wanda", "--sparsity-pattern", "2:4", "--codec", "gptq", "--bits", "4"], "2:4", 0.5),
        (["--prune", "sparsegpt", "--codec", "ecsq", "--bits", "3", "--calib", "self"], "unstructured", 0.5),
        (["--prune", "sparsegpt", "--sparsity-pattern", "2:4", "--reconstruct", "--codec", "raw"], "2:4", 0.5),
    ],
    ids=["magnitude-rtn", "global-raw", "wanda-24-gptq", "sparsegpt-ecsq-self", "sparsegpt-24-recon"],
)
def test_cli_end_to_end(tmp_path, calib_llama_dir, args, pattern, sparsity):
    out = tmp_path / "out"
    calib = ["--calib-samples", "8", "--calib-seqlen", "32"] if args[1] in ("wanda", "sparsegpt") else []
    run_nwc("encode", str(calib_llama_dir), "-o", str(out), *args, *calib, "-q")
    run_nwc("verify", str(out), "-q")
    info = json.loads(run_nwc("info", str(out), "--json").stdout)
    sparse = [t for t in info["tensors"] if t["codec"] == "sparse"]
    assert len(sparse) == 3 * 7  # every Linear of the 3 blocks
    assert all(t["details"]["pattern"] == pattern for t in sparse)
    if pattern == "2:4":
        assert all(t["details"]["mask_bits_per_weight"] < 0.75 for t in sparse)  # log2(6)/4 + lane and table bytes
    _assert_pattern(out, pattern, sparsity)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "nwc"


def test_cli_refuses_bad_combinations(tmp_path, calib_llama_dir):
    for args, message in (
        (["--sparsity", "0.5"], "need --prune"),
        (["--prune", "wanda", "--codec", "flexround"], "flexround cannot code sparse values"),
        (["--prune", "magnitude", "--codec", "sparse"], "give --codec the codec of the kept values"),
        (["--prune", "magnitude", "--sparsity-pattern", "5:4"], "N:M"),
        (["--prune", "wanda", "--prune-scope", "global"], "global"),
    ):
        proc = run_nwc("encode", str(calib_llama_dir), "-o", str(tmp_path / "x"), *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "x").exists()


def test_info_and_sizes_are_file_bytes(tmp_path):
    """The record's bytes are all that the sparse tensor costs (mask and values both counted)."""
    w = weight(64, 256)
    path = tmp_path / "s.safetensors"
    nwcfmt.save({"w": w}, path, codec="sparse", values_codec="raw", pattern="2:4")
    with nwcfmt.open(path) as reader:
        stored = reader.stored_bytes("w")
    assert stored == pytest.approx(64 * 128 * 4 + 64 * 256 * math.log2(6) / 4 / 8, rel=0.03)


def test_input_errors_are_typed(calib_llama_dir):
    from nwcfmt.calibration.data import generated_batches

    with pytest.raises(InputError):
        generated_batches(calib_llama_dir, None, samples=0)
