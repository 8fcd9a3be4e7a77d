"""gptq: GPTQ with static groups and the two-stage grid optimization, on real SmolLM2 layers and activations."""

from __future__ import annotations

import pytest
import torch

import nwcfmt
from nwcfmt.calibration.method import BlockData
from nwcfmt.codecs.gptq import (
    GptqCodec,
    GptqSolution,
    gptq_method,
    gptq_quantize,
    group_losses,
    init_grid,
    layer_loss,
    rtn_codes,
)
from nwcfmt.codecs.quant import QuantLayout, dequantize
from nwcfmt.codecs.rtn import RtnCodec
from nwcfmt.errors import EncodeError

LAYER = 3
LINEARS = ("self_attn.q_proj", "mlp.down_proj")  # 576 -> 576 and 1536 -> 576 inputs
SEQS, SEQLEN = 4, 512  # 2048 calibration tokens
CASES = [(4, 128), (3, 128), (4, 0), (3, 0)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded torch, as gptq itself runs: the checks below are many small ops (see gptq._one_thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def layers() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weight and input Hessian ``2/N sum x x^T`` of real Linears: SmolLM2-135M (fp32) on calibration text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nwcfmt import data

    path = data.smollm2_dir("float32")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[: LAYER + 1]  # nothing after the captured layer is needed
    ids = AutoTokenizer.from_pretrained(path)(data.calib_text()[:40_000], return_tensors="pt").input_ids[0]
    assert ids.numel() >= SEQS * SEQLEN
    sums: dict[str, torch.Tensor | float] = dict.fromkeys(LINEARS, 0.0)
    block = model.model.layers[LAYER]

    def hook(name: str):
        def run(module, args, output) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            sums[name] = sums[name] + x.T @ x

        return run

    handles = [block.get_submodule(n).register_forward_hook(hook(n)) for n in LINEARS]
    with torch.no_grad():
        for i in range(SEQS):
            model.model(ids[i * SEQLEN : (i + 1) * SEQLEN].unsqueeze(0))  # no lm_head
    for handle in handles:
        handle.remove()
    n = SEQS * SEQLEN
    return {name: (block.get_submodule(name).weight.detach().clone(), (2 * sums[name] / n).float()) for name in LINEARS}


def decoded(solution: GptqSolution, layout: QuantLayout) -> torch.Tensor:
    """``(codes - zero) * scale``: what a decoder rebuilds from the solution once packed."""
    return dequantize(solution.codes, solution.scale, solution.zero, layout)


def loss_of(solution, weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, sym=False) -> float:
    layout = QuantLayout.of(tuple(weight.shape), bits, group_size, sym)
    return layer_loss(weight, decoded(solution, layout), hessian.double())


def rtn_loss(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, **config) -> float:
    """The layer-wise loss of the ``rtn`` codec's own codes and grid."""
    codec = RtnCodec(bits=bits, group_size=group_size, **config)
    codes, scale, zero = codec.quantize(weight, codec.layout(weight))
    return loss_of(GptqSolution(codes, scale, zero, {}), weight, hessian, bits, group_size)


@pytest.mark.parametrize("bits,group_size", CASES)
@pytest.mark.parametrize("name", LINEARS)
def test_gptq_beats_rtn_by_a_clear_margin(layers, name, bits, group_size):
    weight, hessian = layers[name]
    plain = gptq_quantize(weight, hessian, bits=bits, group_size=group_size, grid_init=False, grid_refine=False)
    full = gptq_quantize(weight, hessian, bits=bits, group_size=group_size)
    rtn = rtn_loss(weight, hessian, bits, group_size)
    assert plain.stats["loss_rtn"] == pytest.approx(rtn, rel=1e-9)  # same (min-max) grid, rounded to nearest
    assert plain.stats["loss"] < 0.7 * rtn
    assert full.stats["loss"] < 0.7 * rtn_loss(weight, hessian, bits, group_size, clip_search=True)
    assert full.stats["loss"] == pytest.approx(loss_of(full, weight, hessian, bits, group_size), rel=1e-12)


@pytest.mark.parametrize(
    "bits,group_size,symmetric,scale_dtype",
    [(4, 128, False, "float16"), (3, 0, False, "float16"), (3, 128, True, "bfloat16"), (4, 0, True, "float16")],
)
def test_refinement_never_increases_the_loss_and_stores_exact_scales(layers, bits, group_size, symmetric, scale_dtype):
    for weight, hessian in layers.values():
        config = dict(bits=bits, group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype)
        off = gptq_quantize(weight, hessian, grid_refine=False, **config)
        on = gptq_quantize(weight, hessian, **config)
        assert torch.equal(on.codes, off.codes)  # stage 2 only moves scales
        assert on.zero is None if symmetric else torch.equal(on.zero, off.zero)
        assert on.stats["loss"] <= off.stats["loss"] == on.stats["loss_gptq"]
        stored = on.scale.to(getattr(torch, scale_dtype)).to(torch.float32)
        assert torch.equal(stored, on.scale) and bool((on.scale > 0).all())
        assert on.stats["loss"] == pytest.approx(loss_of(on, weight, hessian, bits, group_size, symmetric), rel=1e-12)


@pytest.mark.parametrize("bits,group_size", CASES)
def test_grid_init_lowers_the_h_weighted_group_loss(layers, bits, group_size):
    for weight, hessian in layers.values():
        layout = QuantLayout.of(tuple(weight.shape), bits, group_size, False)
        h = hessian.double()
        losses = []
        for search in (False, True):
            grid = init_grid(weight, h, layout, "float16", search=search)
            w_hat = (rtn_codes(weight, grid, layout) - grid.columns(layout)[1]) * grid.columns(layout)[0]
            losses.append(group_losses(weight - w_hat, h, layout))
        assert bool((losses[1] <= losses[0]).all())  # per group: min-max is one of the candidates
        assert float(losses[1].sum()) < 0.9 * float(losses[0].sum())


@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 0)])
def test_act_order_needs_no_permutation_at_decode(layers, bits, group_size):
    weight, hessian = layers["mlp.down_proj"]
    plain = gptq_quantize(weight, hessian, bits=bits, group_size=group_size)
    ordered = gptq_quantize(weight, hessian, bits=bits, group_size=group_size, act_order=True)
    assert not torch.equal(ordered.codes, plain.codes)
    assert ordered.scale.shape == plain.scale.shape and ordered.codes.shape == weight.shape
    # the plain layout decodes it: the loss recomputed from (codes - zero) * scale is the reported one
    assert ordered.stats["loss"] == pytest.approx(loss_of(ordered, weight, hessian, bits, group_size), rel=1e-12)
    assert ordered.stats["loss"] < 0.7 * ordered.stats["loss_rtn"]


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 100, False), (4, -1, False), (3, -1, True)])
def test_partial_groups_and_per_tensor(layers, bits, group_size, symmetric):
    weight, hessian = layers["self_attn.q_proj"]  # 576 columns: groups of 100 leave a partial group of 76
    result = gptq_quantize(weight, hessian, bits=bits, group_size=group_size, symmetric=symmetric, act_order=True)
    layout = QuantLayout.of(tuple(weight.shape), bits, group_size, symmetric)
    assert tuple(result.scale.shape) == (layout.scale_rows, layout.n_groups)
    assert result.stats["loss"] == pytest.approx(
        loss_of(result, weight, hessian, bits, group_size, symmetric), rel=1e-12
    )
    assert result.stats["loss"] <= result.stats["loss_gptq"] < 0.7 * result.stats["loss_rtn"]


@pytest.mark.parametrize("entropy", ["none", "zstd"])
def test_file_round_trip_decodes_exactly_the_result(layers, tmp_path, entropy):
    weight, hessian = layers["self_attn.q_proj"]
    codec = GptqCodec(bits=3, group_size=128, act_order=True, entropy=entropy)
    result = codec.quantize_with_hessian(weight, hessian)
    solution = gptq_quantize(weight, hessian, bits=3, group_size=128, act_order=True)
    assert torch.equal(result.weight, decoded(solution, codec.layout(weight)))
    assert result.stats == solution.stats
    path = tmp_path / "q.safetensors"
    with nwcfmt.NwcWriter(path) as writer:
        writer.append("w", weight, codec, result.encoded)
    assert torch.equal(nwcfmt.load(path)["w"], result.weight)
    with nwcfmt.open(path) as reader:
        record = reader.record("w")
        assert record.codec == "gptq" and record.codec_version == 1
        assert {**record.params, "entropy": entropy} == {**codec.get_config(), "entropy": entropy}
        assert record.params["act_order"] is True and record.params["percdamp"] == 0.01


def test_dead_inputs_are_zeroed_and_ignored(layers):
    weight, hessian = layers["self_attn.q_proj"]
    dead = torch.tensor([0, 5, 200, 575])
    h = hessian.clone()
    h[dead, :] = 0
    h[:, dead] = 0
    for group_size in (128, 0):
        result = gptq_quantize(weight, h, bits=4, group_size=group_size, act_order=True)
        w_hat = decoded(result, QuantLayout.of(tuple(weight.shape), 4, group_size, False))
        assert bool(torch.isfinite(w_hat).all())
        assert bool((w_hat[:, dead] == 0).all())  # a dead input's weight is quantized as 0
        assert result.stats["loss"] < 0.7 * result.stats["loss_rtn"]


def test_codec_refuses_to_encode_without_calibration_data(tmp_path):
    with pytest.raises(EncodeError, match="gptq needs calibration data"):
        nwcfmt.save({"w": torch.randn(8, 64)}, tmp_path / "w.safetensors", codec="gptq")
    with pytest.raises(EncodeError):
        GptqCodec(bits=1, symmetric=True)
    with pytest.raises(EncodeError):
        gptq_quantize(torch.randn(4, 8), torch.eye(7))


def test_block_quantizer_runs_every_linear_from_its_hessian(layers):
    from nwcfmt.calibration import get_method

    assert get_method("gptq") is gptq_method
    method = gptq_method({"bits": 4, "group_size": 128})
    assert method.needs_targets is False and method.codec.get_config()["grid_refine"] is True
    linears = {}
    for name, (weight, _) in layers.items():
        linears[name] = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linears[name].weight.data.copy_(weight)
    data = BlockData(LAYER, [], {}, None, {n: h for n, (_, h) in layers.items()}, SEQS * SEQLEN)
    results = method.quantize_block(torch.nn.Module(), linears, data)
    for name, (weight, hessian) in layers.items():
        assert torch.equal(linears[name].weight, weight)  # left as found
        expected = gptq_quantize(weight, hessian, bits=4, group_size=128)
        packed = method.codec.pack(expected.codes, expected.scale, expected.zero, method.codec.layout(weight))
        segments = results[name].encoded.segments
        assert list(segments) == list(packed.segments)
        assert all(torch.equal(segments[k], v) for k, v in packed.segments.items())
        assert results[name].encoded.params == packed.params
        assert torch.equal(results[name].weight, decoded(expected, method.codec.layout(weight)))
        assert results[name].stats == expected.stats
