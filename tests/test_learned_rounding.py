"""flexround / lrq: learned rounding trained on a real SmolLM2 block, decoded exactly by the shared layout."""

from __future__ import annotations

import pytest
import torch

import nwcfmt
from nwcfmt import data as nwc_data
from nwcfmt.calibration.method import BlockData, LinearResult
from nwcfmt.calibration.reconstruction import block_output
from nwcfmt.codecs.flexround import FlexRoundCodec, FlexRoundRounding, flexround_method
from nwcfmt.codecs.learned_rounding import trainable_params
from nwcfmt.codecs.lrq import LrqCodec, lrq_method
from nwcfmt.codecs.rtn import RtnCodec
from nwcfmt.container.writer import decode_encoded
from nwcfmt.errors import EncodeError

BLOCK, N_SEQ, SEQ_LEN, ITERS = 3, 2, 128, 12
CONFIGS = [(4, 0), (3, 0)]  # (bits, group_size): per channel


class _Stop(Exception):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, small ops with two threads wait on each other (8x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def block_data() -> tuple[torch.nn.Module, dict[str, torch.nn.Linear], BlockData]:
    """SmolLM2 block 3 (fp32) with its inputs, forward kwargs and fp outputs for 256 calibration tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = nwc_data.smollm2_dir("float32")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(nwc_data.calib_text()[:20000], return_tensors="pt").input_ids
    ids = ids[0, : N_SEQ * SEQ_LEN].reshape(N_SEQ, SEQ_LEN)
    block = model.model.layers[BLOCK]
    seen: dict = {}

    def hook(module, args, kwargs):
        seen.update(x=args[0], kwargs=kwargs)
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad(), pytest.raises(_Stop):
        model(ids, use_cache=False)
    handle.remove()
    with torch.no_grad():
        target = block(seen["x"], **seen["kwargs"])
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    return block, linears, BlockData(BLOCK, [seen["x"]], seen["kwargs"], [target], {}, N_SEQ * SEQ_LEN)


def _config(bits: int, group_size: int, **extra) -> dict:
    return {"bits": bits, "group_size": group_size, "iters": ITERS, "batch_size": 1, **extra}


@pytest.fixture(scope="module")
def trained(block_data) -> dict:
    """Results of both methods at each config, the block's state checked before and after."""
    block, linears, data = block_data
    before = {k: v.clone() for k, v in block.state_dict().items()}
    out = {}
    for name, factory in (("flexround", flexround_method), ("lrq", lrq_method)):
        for bits, group_size in CONFIGS:
            method = factory(_config(bits, group_size))
            out[name, bits, group_size] = method, method.quantize_block(block, linears, data)
    after = block.state_dict()
    out["untouched"] = all(torch.equal(before[k], after[k]) for k in before)
    return out


def _same_segments(a, b) -> bool:
    return list(a.segments) == list(b.segments) and all(torch.equal(a.segments[k], b.segments[k]) for k in a.segments)


def _block_loss(block_data, results: dict[str, LinearResult]) -> float:
    """Block output MSE with the decoded weights (what the pipeline loads)."""
    block, _, data = block_data
    params = {n: p.detach() for n, p in block.named_parameters()}
    for name, res in results.items():
        params[f"{name}.weight"] = res.weight
    kwargs = {**data.kwargs, "use_cache": False}
    with torch.no_grad():
        out = block_output(block, params, data.inputs[0], kwargs)
    return torch.nn.functional.mse_loss(out, data.targets[0]).item()


@pytest.mark.parametrize("method", ["flexround", "lrq"])
@pytest.mark.parametrize(("bits", "group_size"), CONFIGS)
def test_training_beats_rtn_init_and_decodes_to_the_trained_loss(block_data, trained, method, bits, group_size):
    _, results = trained[method, bits, group_size]
    stats = next(iter(results.values())).stats
    assert stats["fallback"] == 0.0
    assert stats["block_loss"] < 0.9 * stats["block_loss_rtn"], stats
    assert _block_loss(block_data, results) == pytest.approx(stats["block_loss"], rel=1e-5)


def test_iteration_zero_is_rtn(block_data):
    block, linears, data = block_data
    results = flexround_method(_config(3, 0, iters=0)).quantize_block(block, linears, data)
    rtn = RtnCodec(bits=3, group_size=0, clip_search=True)
    for name, lin in linears.items():
        assert _same_segments(results[name].encoded, rtn.encode(lin.weight.detach()))


@pytest.mark.parametrize(
    ("bits", "group_size", "symmetric"), [(3, 100, False), (4, 0, True), (4, -1, False), (2, 64, False)]
)
def test_result_decodes_exactly_to_the_trained_weight(block_data, bits, group_size, symmetric):
    _, linears, _ = block_data
    codec = FlexRoundCodec(bits=bits, group_size=group_size, symmetric=symmetric)  # 1536 % 100: partial groups
    rounding = FlexRoundRounding(linears["mlp.down_proj"].weight, codec)
    with torch.no_grad():  # a trained-looking state
        rounding.s2.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        rounding.log_s1.add_(0.05)
    w_hat = rounding()[0].detach()
    result = rounding.result()
    assert ("zero" not in result.encoded.segments) == symmetric
    assert torch.equal(result.weight, w_hat)
    shape = tuple(rounding.weight.shape)
    assert torch.equal(decode_encoded("w", codec, result.encoded, shape, torch.float32), w_hat)
    rtn = RtnCodec(bits=bits, group_size=group_size, symmetric=symmetric, clip_search=True)
    assert not torch.equal(result.encoded.segments["data"], rtn.encode(rounding.weight).segments["data"])


def test_pack_file_load_roundtrip(tmp_path, block_data, trained):
    _, linears, _ = block_data
    path = tmp_path / "block.safetensors"
    expected = {}
    with nwcfmt.NwcWriter(path) as writer:
        for method in ("flexround", "lrq"):
            meth, results = trained[method, 3, 0]
            for name, res in results.items():
                tensor_name = f"{method}.{name}.weight"
                writer.append(tensor_name, linears[name].weight.detach(), meth.codec, res.encoded)
                expected[tensor_name] = res.weight
    loaded = nwcfmt.load(path)
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert torch.equal(loaded[name], value), name
    with nwcfmt.open(path) as reader:
        record = reader.manifest.tensors[-1]
        assert record.codec == "lrq" and record.params["rank"] == trained["lrq", 3, 0][0].codec.rank
        assert record.params["iters"] == ITERS and record.params["bits"] == 3


def test_block_parameters_untouched(trained):
    assert trained["untouched"]


def test_lrq_learns_fewer_values_than_flexround(block_data):
    _, linears, _ = block_data
    flex = trainable_params(flexround_method(_config(4, 0, clip_search=False)), linears)
    lrq = trainable_params(lrq_method(_config(4, 0, clip_search=False)), linears)
    weights = sum(lin.weight.numel() for lin in linears.values())
    assert flex > weights and lrq < weights / 4


@pytest.mark.parametrize("codec", ["flexround", "lrq"])
def test_encoding_without_calibration_raises(tmp_path, codec):
    with pytest.raises(EncodeError, match="calibration"):
        nwcfmt.save({"w": torch.randn(8, 16)}, tmp_path / "w.safetensors", codec=codec)


def test_bad_config_raises():
    with pytest.raises(EncodeError):
        LrqCodec(rank=0)
    with pytest.raises(EncodeError):
        FlexRoundCodec(lr=-1.0)
    with pytest.raises(EncodeError):
        LrqCodec(scale_lr=0.0)
    with pytest.raises(EncodeError):
        FlexRoundCodec(scale_lr=float("nan"))


def test_scale_lr_drives_only_the_grid_scale(block_data, trained):
    """``scale_lr`` is the grid scale's own rate: near zero, the stored scales stay rtn's while the rounding
    still learns; the default setting moves them. lrq's defaults give the scale the larger rate."""
    block, linears, data = block_data
    assert LrqCodec().scale_lr > LrqCodec().lr and FlexRoundCodec().scale_lr == FlexRoundCodec().lr
    method = flexround_method(_config(4, 0, scale_lr=1e-12))
    frozen_scale = method.quantize_block(block, linears, data)
    moved = trained["flexround", 4, 0][1]
    rtn = RtnCodec(bits=4, group_size=0, clip_search=True)
    codes_changed = scales_changed = 0
    for name, lin in linears.items():
        start = rtn.encode(lin.weight.detach()).segments
        frozen, trained_segments = frozen_scale[name].encoded.segments, moved[name].encoded.segments
        assert frozen_scale[name].stats["fallback"] == 0.0
        assert torch.equal(frozen["scale"], start["scale"])
        codes_changed += int(not torch.equal(frozen["data"], start["data"]))
        scales_changed += int(not torch.equal(trained_segments["scale"], start["scale"]))
    assert codes_changed == len(linears) and scales_changed == len(linears)


def test_needs_targets(block_data):
    block, linears, data = block_data
    method = flexround_method(_config(4, 0))
    assert method.needs_targets
    no_targets = BlockData(data.index, data.inputs, data.kwargs, None, {})
    with pytest.raises(EncodeError, match="targets"):
        method.quantize_block(block, linears, no_targets)
