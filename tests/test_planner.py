"""The bit-budget planner: solver, candidates, held-out windows, per-Linear settings in the calibration pipeline,
and ``nwc plan`` / ``nwc encode --target-bpw`` end to end on a tiny Llama with SmolLM2's tokenizer."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from conftest import run_nwc
from nwcfmt.planner.solver import allocate, frontier, lower_hull, total

CALIB = ["--calib-samples", "8", "--calib-seqlen", "64"]


# ------------------------------------------------------------------------------------------------ solver


def _random_tables(rng: random.Random, tensors: int, options: int) -> list[list[tuple[int, float]]]:
    tables = []
    for _ in range(tensors):
        size = rng.randint(50, 500)
        table = []
        for _ in range(options):
            bits = rng.uniform(1.0, 16.0)
            table.append((int(bits * size), size * 2 ** (-bits) * rng.uniform(0.5, 2.0)))
        tables.append(table)
    return tables


def test_frontier_and_hull():
    points = [(10, 5.0), (20, 3.0), (15, 6.0), (30, 2.9), (40, 0.5), (20, 4.0)]
    front = frontier(points)
    assert front == [0, 1, 3, 4]  # (15, 6) and (20, 4) are dominated
    hull = lower_hull(points, front)
    assert hull == [0, 1, 4]  # (30, 2.9) lies above the chord from (20, 3) to (40, 0.5)


def test_allocate_fits_and_no_single_change_helps():
    """Within budget, and locally optimal: no tensor can move to another candidate that fits what is left and
    lowers the error (what the greedy fill guarantees)."""
    rng = random.Random(0)
    for trial in range(30):
        tables = _random_tables(rng, rng.randint(1, 12), rng.randint(1, 8))
        cheapest = sum(min(c[0] for c in t) for t in tables)
        dearest = sum(max(c[0] for c in t) for t in tables)
        budget = rng.randint(cheapest, dearest)
        chosen = allocate(tables, budget)
        used, _ = total(tables, chosen)
        assert used <= budget, trial
        for k, t in enumerate(tables):
            for i, (b, e) in enumerate(t):
                if used - t[chosen[k]][0] + b <= budget:
                    assert e >= t[chosen[k]][1] - 1e-9, (trial, k, i)


def test_allocate_is_close_to_the_exhaustive_optimum():
    """On small problems the plan's error is within a few percent of the best of every combination (the relaxation
    is exact at hull points; the fill closes most of the rest)."""
    rng = random.Random(1)
    worst = 0.0
    for _ in range(40):
        tables = _random_tables(rng, 4, 5)
        cheapest = sum(min(c[0] for c in t) for t in tables)
        budget = cheapest + rng.randint(0, sum(max(c[0] for c in t) for t in tables) - cheapest)
        best = min(
            total(tables, list(combo))[1]
            for combo in itertools.product(*(range(len(t)) for t in tables))
            if total(tables, list(combo))[0] <= budget
        )
        got = total(tables, allocate(tables, budget))[1]
        worst = max(worst, got / best - 1)
    assert worst < 0.35  # measured 0.0 to a few % on most draws; a greedy cannot promise the optimum


def test_allocate_refuses_a_budget_below_the_smallest_plan():
    from nwcfmt.errors import InputError

    with pytest.raises(InputError, match="below the smallest plan"):
        allocate([[(100, 1.0), (200, 0.5)]], 99)


# ------------------------------------------------------------------------------------------------ candidates


def test_weighted_error_is_the_layer_output_error():
    """tr(dW H dW^T) with H = 2/N sum x x^T is 2/N times the squared error of the layer's outputs."""
    from nwcfmt.planner.candidates import ErrorWeight, weighted_error

    torch.manual_seed(0)
    x = torch.randn(300, 24, dtype=torch.float64)
    delta = torch.randn(16, 24, dtype=torch.float64)
    hessian = 2 / 300 * x.T @ x
    expected = 2 / 300 * float((x @ delta.T).pow(2).sum())
    assert weighted_error(delta.float(), ErrorWeight(hessian=hessian.float())) == pytest.approx(expected, rel=1e-5)
    rows = torch.rand(16)
    assert weighted_error(delta, ErrorWeight(rows=rows)) == pytest.approx(float((delta.pow(2).sum(1) * rows).sum()))


def test_options_refuse_two_calibrated_codecs_and_unknown_ones():
    from nwcfmt.errors import InputError
    from nwcfmt.planner import options

    with pytest.raises(InputError, match="one calibrated codec"):
        options(("ecsq", "gptq"))
    with pytest.raises(InputError, match="not neural"):
        options(("neural",))
    labels = [o.label for o in options()]
    assert "ecsq 3.5" in labels and "rtn 4 g128" in labels and "lossless" in labels


def test_heldout_windows_share_no_text_with_the_calibration_windows():
    from transformers import AutoTokenizer

    from nwcfmt.calibration.data import _starts, default_text, heldout_batches
    from nwcfmt.data import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    a = heldout_batches(tokenizer, None, 6, 64, calib_samples=32, seed=3)
    b = heldout_batches(tokenizer, None, 6, 64, calib_samples=32, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.cat(a).shape == (6, 64)
    text = default_text()
    calib = torch.cat(
        [
            torch.tensor(tokenizer(text[s : s + 8 * 64], add_special_tokens=False)["input_ids"][:64])
            for s in _starts(text, 32, 3)
        ]
    )
    held = {tuple(w[i : i + 8].tolist()) for w in torch.cat(a) for i in range(0, 56, 8)}
    seen = {tuple(calib[i : i + 8].tolist()) for i in range(calib.numel() - 8)}
    assert not held & seen  # no 8-token run of a held-out window appears in the calibration windows


# ------------------------------------------------------------------------------------------------ end to end


def _planned_bits(folder) -> tuple[float, dict[str, str]]:
    doc = json.loads(run_nwc("info", folder, "--json").stdout)
    planned = [t for t in doc["tensors"] if t["numel"] > 0 and "norm" not in t["name"]]
    bits = 8 * sum(t["stored_bytes"] for t in planned) / sum(t["numel"] for t in planned)
    return bits, {t["name"]: t["codec"] for t in planned}


@pytest.fixture(scope="module")
def measured(calib_llama_dir):
    from nwcfmt.calibration.pipeline import CalibOptions
    from nwcfmt.planner import options
    from nwcfmt.planner.measure import measure_model

    return measure_model(calib_llama_dir, options(), CalibOptions(samples=8, seqlen=64))


def test_plans_meet_their_targets_within_a_hundredth(measured):
    """Every target between the smallest and largest plan is met from below within 0.01 bit (the continuous ecsq
    rate takes what the discrete choices leave), over the planned tensors or the whole file."""
    from nwcfmt.errors import InputError
    from nwcfmt.planner import make_plan

    assert measured.proxy == "fisher-scaled"
    assert {t.kind for t in measured.tensors} == {"linear", "embedding"}
    for target in (1.6, 2.0, 2.5, 3.0, 3.5, 4.5, 6.0, 8.0):
        for budget in ("planned", "whole"):
            plan = make_plan(measured, target, budget)
            assert target - 0.01 <= plan.bits_per_weight <= target, (target, budget, plan.bits_per_weight)
    errors = [make_plan(measured, t).predicted_error for t in (2.0, 3.0, 4.0, 6.0)]
    assert errors == sorted(errors, reverse=True)  # more bits, less predicted damage
    with pytest.raises(InputError, match="below the smallest plan"):
        make_plan(measured, 0.5)


def test_size_plans_fit_their_files(measured):
    """--target-size: the bound of the weight files (records, their header bounds, an allowance per file) is at
    most the size and within 0.2% of it; a size below the smallest plan is refused."""
    from nwcfmt.errors import InputError
    from nwcfmt.planner import make_plan

    for size in (1_000_000, 1_500_000, 3_000_000):
        plan = make_plan(measured, None, target_size=size, shards=2)
        assert 0.998 * size <= plan.file_bytes <= size, (size, plan.file_bytes)
        assert plan.budget == "whole" and plan.summary()["target_size"] == size
    with pytest.raises(InputError, match="below the smallest plan"):
        make_plan(measured, None, target_size=100_000)


def test_candidate_bytes_are_the_bytes_written(measured, calib_llama_dir, tmp_path):
    """A data-free plan written by nwc encode stores each tensor in exactly the candidate's measured bytes (rtn,
    lossless) or within its ecsq bound."""
    from nwcfmt.planner import make_plan

    plan = make_plan(measured, 4.5)
    doc = plan.policy_dict()
    for part in [doc, *doc["rules"]]:
        if part["codec"] == "ecsq":
            part["params"] = {**part["params"], "calibrate": False}
    policy = tmp_path / "plan.json"
    policy.write_text(json.dumps(doc))
    out = tmp_path / "out"
    run_nwc("encode", calib_llama_dir, "-o", out, "--policy", policy, "-q")
    stored = {t["name"]: t for t in json.loads(run_nwc("info", out, "--json").stdout)["tensors"]}
    for e in plan.entries:
        assert stored[e.name]["codec"] == e.choice.option.codec
        if e.choice.option.codec == "ecsq":
            assert stored[e.name]["stored_bytes"] <= e.choice.nbytes
        else:
            assert stored[e.name]["stored_bytes"] == e.choice.nbytes == e.choice.measured_bytes


def test_encode_meets_the_target(calib_llama_dir, tmp_path):
    """End to end: the file's planned tensors (embedding included) hold at most the target, within 0.01 bit, the
    ecsq tensors calibrated at their planned rates, and the folder loads with from_pretrained."""
    target = 2.5
    out = tmp_path / "out"
    plan = tmp_path / "plan.json"
    run_nwc("encode", calib_llama_dir, "-o", out, "--target-bpw", target, "--plan-out", plan, "-q", *CALIB)
    bits, codecs = _planned_bits(out)
    assert target - 0.01 <= bits <= target, bits
    assert codecs["model.embed_tokens.weight"] != "raw"
    doc = json.loads(plan.read_text())
    assert doc["plan"]["bits_per_weight"] <= target and doc["plan"]["proxy"] == "fisher-scaled"
    from transformers import AutoModelForCausalLM

    import nwcfmt  # noqa: F401  (registers the quantizer)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model.model.embed_tokens.weight).all()


def test_plan_prints_and_writes_a_policy(calib_llama_dir, tmp_path):
    """``nwc plan`` prints one line per tensor and writes the policy ``encode --policy`` reads (``encode
    --target-bpw`` runs through the same file, so test_encode_meets_the_target covers encoding it);
    ``--budget whole`` counts the norms too, ``--no-sensitivity`` plans on the Hessian-weighted error."""
    from nwcfmt.policy import Policy

    plan = tmp_path / "plan.json"
    shown = run_nwc("plan", calib_llama_dir, "--target-bpw", "3", "--budget", "whole", "--no-sensitivity", "-o", plan,
                    "--exclude", "*layers.2.mlp.*", "-q", *CALIB).stdout  # fmt: skip
    assert "bits per weight over the whole tensors" in shown and "model.embed_tokens.weight" in shown
    doc = json.loads(plan.read_text())
    summary = doc["plan"]
    assert summary["budget"] == "whole" and summary["proxy"] == "hessian"
    assert doc["exclude"] == ["*layers.2.mlp.*"]  # kept raw by the plan's policy too
    assert not any(".layers.2.mlp." in name for name in summary["tensors"])
    assert summary["fixed_weights"] == 7 * 64 + 3 * 64 * 160  # the norms and the excluded Linears
    total = 8 * (summary["planned_bytes"] + summary["fixed_bytes"])
    assert 2.99 <= total / (summary["planned_weights"] + summary["fixed_weights"]) <= 3.0
    policy = Policy.from_file(plan)
    assert {r.match for r in policy.rules} == set(summary["tensors"])


def test_measurements_file_is_measured_once_and_checked(calib_llama_dir, tmp_path):
    """--measurements: the first plan measures and writes the file; a plan for another target (and encode
    --target-bpw) reads it without measuring and solves the same plan as from fresh measurements; a file measured
    with other options, of a changed source, or not a measurements file, is refused in one line."""
    import shutil

    src = tmp_path / "model"
    shutil.copytree(calib_llama_dir, src)
    saved = tmp_path / "m.json"
    first, again = tmp_path / "p3.json", tmp_path / "p3-again.json"
    proc = run_nwc("plan", src, "--target-bpw", "3", "--measurements", saved, "-o", first, *CALIB)
    assert "measuring the Fisher sensitivity" in proc.stderr and saved.exists()
    assert json.loads(saved.read_text())["format"] == "nwc-plan-measurements"
    proc = run_nwc("plan", src, "--target-bpw", "3", "--measurements", saved, "-o", again, *CALIB)
    assert "measurements from" in proc.stderr and "measuring" not in proc.stderr
    plans = [json.loads(f.read_text()) for f in (first, again)]
    assert plans[0]["rules"] == plans[1]["rules"] and plans[0]["plan"]["tensors"] == plans[1]["plan"]["tensors"]
    out = tmp_path / "out"
    proc = run_nwc("encode", src, "-o", out, "--target-bpw", "4", "--measurements", saved, "--calib-samples", "8",
                   "--calib-seqlen", "64")  # fmt: skip
    assert "measurements from" in proc.stderr
    assert 3.99 <= _planned_bits(out)[0] <= 4.0

    def refused(*args: str, file=saved) -> str:
        proc = run_nwc("plan", src, "--target-bpw", "3", "--measurements", file, *args, check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        return proc.stderr

    assert "measured with another exclude" in refused("--exclude", "*q_proj*", *CALIB)
    assert "measured with another calib" in refused("--calib-samples", "4", "--calib-seqlen", "64")
    assert "measured with another choices" in refused("--plan-codecs", "ecsq", *CALIB)
    assert "measured with another sensitivity" in refused("--no-sensitivity", *CALIB)
    config = src / "config.json"
    config.write_text(config.read_text() + "\n")  # the source changed: the measurements may be stale
    assert "measured with another files" in refused(*CALIB)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    assert "not a measurements file" in refused(*CALIB, file=bad)
    bad.write_text("{not json")
    assert "not a measurements file" in refused(*CALIB, file=bad)
    assert "its folder does not exist" in refused(*CALIB, file=tmp_path / "no" / "m.json")


def test_gptq_plan_mixes_bits_in_one_calibrated_run(calib_llama_dir, tmp_path):
    """A gptq plan gives Linears different bits; the pipeline calibrates each at its own (per_linear_keys)."""
    plan = tmp_path / "plan.json"
    run_nwc("plan", calib_llama_dir, "--target-bpw", "4.6", "--plan-codecs", "gptq", "--exclude", "*embed*", "-o", plan,
            "-q", *CALIB)  # fmt: skip
    rules = json.loads(plan.read_text())["rules"]
    bits = {r["params"]["bits"] for r in rules if ".layers." in r["match"]}
    assert len(bits) > 1, bits
    out = tmp_path / "out"
    run_nwc("encode", calib_llama_dir, "-o", out, "--policy", plan, "--exclude", "*embed*", "-q", *CALIB)
    doc = json.loads(run_nwc("info", out, "--json").stdout)
    stored = {t["name"]: t for t in doc["tensors"]}
    for r in rules:
        if ".layers." in r["match"]:
            assert stored[r["match"]]["codec"] == "gptq"
            assert stored[r["match"]]["details"]["bits"] == r["params"]["bits"]


def test_calibrated_codecs_still_refuse_other_per_tensor_params(calib_llama_dir, tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"codec": "gptq", "rules": [{"match": "*q_proj*", "codec": "gptq",
                                                              "params": {"act_order": True}}]}))  # fmt: skip
    proc = run_nwc("encode", calib_llama_dir, "-o", tmp_path / "o", "--codec", "gptq", "--policy", policy, *CALIB,
                   check=False)  # fmt: skip
    assert proc.returncode != 0 and "act_order" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target-bpw", "3", "--codec", "ecsq"], "chooses the codecs itself"),
        (["--budget", "whole"], "need --target-bpw"),
        (["--target-bpw", "3", "--plan-codecs", "ecsq,gptq"], "one calibrated codec"),
        (["--target-bpw", "3", "--calib", "self"], "not supported"),
        (["--target-bpw", "3", "--target-size", "1MB"], "not both"),
        (["--target-size", "1MB", "--budget", "whole"], "drop --budget"),
        (["--target-size", "lots"], "--target-size: 'lots' is not a size"),
        (["--plan-out", "p.json"], "need --target-bpw or --target-size"),
        (["--measurements", "m.json"], "need --target-bpw or --target-size"),
    ],
)
def test_bad_plans_get_one_line_errors(calib_llama_dir, tmp_path, args, message):
    proc = run_nwc("encode", calib_llama_dir, "-o", tmp_path / "o", *args, *CALIB, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_plan_refuses_a_folder_it_cannot_run(tiny_llama_dir, tmp_path):
    """No tokenizer: the planner cannot run the model on calibration text."""
    proc = run_nwc("plan", tiny_llama_dir, "--target-bpw", "3", check=False)
    assert proc.returncode != 0 and "tokenizer" in proc.stderr and "Traceback" not in proc.stderr


def test_rerank_keeps_the_plan_with_the_lowest_heldout_kl(calib_llama_dir, tmp_path):
    """--rerank plans under three proxies, measures each one's KL on held-out calibration windows and keeps the
    lowest; the KLs are positive and the chosen one is their minimum."""
    doc = json.loads(run_nwc("plan", calib_llama_dir, "--target-bpw", "2.5", "--rerank", "--json", "-q", *CALIB).stdout)
    kls = doc["plan"]["rerank_heldout_kl"]
    assert set(kls) == {"fisher-scaled", "fisher-half", "hessian"}
    assert all(v > 0 for v in kls.values())
    assert doc["plan"]["heldout_kl"] == min(kls.values()) and doc["plan"]["proxy"] == min(kls, key=kls.get)
    proc = run_nwc("plan", calib_llama_dir, "--target-bpw", "2.5", "--rerank", "--no-sensitivity", *CALIB, check=False)
    assert proc.returncode != 0 and "drop --no-sensitivity" in proc.stderr


def test_target_size_and_a_stored_tied_head(calib_llama_dir, tmp_path):
    """encode --target-size: the weight files, headers included, hold at most the size and nearly all of it. The
    checkpoint stores its tied lm_head as a tensor of its own: the plan gives it the embedding's setting (counting
    its bytes), so the two decode alike and transformers keeps them tied; the referee substitutes it too."""
    import shutil

    from safetensors.torch import load_file, save_file

    from nwcfmt.planner.candidates import Candidate, Option
    from nwcfmt.planner.check import plan_loss
    from nwcfmt.planner.plan import Plan, PlanEntry

    src = tmp_path / "src"
    shutil.copytree(calib_llama_dir, src)
    tensors = load_file(src / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out, plan = tmp_path / "out", tmp_path / "plan.json"
    run_nwc("encode", src, "-o", out, "--target-size", "2MB", "--plan-out", plan, "-q", *CALIB)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0.99 * 2_000_000 <= size <= 2_000_000, size
    summary = json.loads(plan.read_text())["plan"]["tensors"]
    assert summary["lm_head.weight"]["choice"] == summary["model.embed_tokens.weight"]["choice"]
    assert summary["lm_head.weight"]["predicted"] == 0.0  # its damage is in the embedding's (shared) Fisher
    from transformers import AutoModelForCausalLM

    import nwcfmt  # noqa: F401  (registers the quantizer)

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    numel = tensors["lm_head.weight"].numel()
    exact = PlanEntry("lm_head.weight", numel, Candidate(Option.of("lossless"), 0, 0.0), 1.0, "tied")
    metric, [loss] = plan_loss(src, [Plan([exact], 16.0, "planned", "hessian")], samples=2)
    assert metric == "kl" and abs(loss) < 1e-6


def test_an_encoders_sensitivity_predicts_its_embedding_change(tmp_path):
    """For an encoder the Fisher is the Gauss-Newton diagonal of its unit sentence embedding: for a random change
    dW of a Linear, sum F dW^2 predicts the mean |du|^2 it causes (equal in expectation over dW) within 1/3; the
    measured planner scales every tensor, the pooler (unused by the embedding) by the median; --rerank scores an
    encoder's plans by 1 - cosine on held-out windows."""
    from transformers import AutoModel, BertConfig, BertModel

    from conftest import tokenizer_files
    from nwcfmt.calibration.data import calibration_batches
    from nwcfmt.calibration.pipeline import CalibOptions
    from nwcfmt.planner import options
    from nwcfmt.planner.measure import fisher_diagonal, measure_model

    torch.manual_seed(0)
    config = BertConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    src = tmp_path / "bert"
    BertModel(config).save_pretrained(src)
    tokenizer_files(src)
    from transformers import AutoTokenizer

    batches = calibration_batches(AutoTokenizer.from_pretrained(src), samples=16, seqlen=32, batch_size=16)
    fisher = fisher_diagonal(src, batches)
    model = AutoModel.from_pretrained(src).eval()

    def units() -> torch.Tensor:
        with torch.no_grad():
            pooled = model(input_ids=batches[0]).last_hidden_state.mean(dim=1)
        return pooled / pooled.norm(dim=-1, keepdim=True)

    name = "encoder.layer.1.attention.output.dense.weight"
    weight = dict(model.named_parameters())[name]
    before, original = units(), weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    measured = predicted = 0.0
    for _ in range(8):  # the off-diagonal terms average out over random changes
        delta = 0.02 * torch.randn(weight.shape, generator=gen)
        with torch.no_grad():
            weight.copy_(original + delta)
        measured += float((units() - before).pow(2).sum(dim=-1).mean())
        predicted += float((fisher[name] * delta.pow(2)).sum())
    assert 0.75 < predicted / measured < 1.33, (predicted, measured)

    result = measure_model(src, options(("ecsq", "lossless")), CalibOptions(samples=8, seqlen=32))
    assert result.proxy == "fisher-scaled"
    scales = {t.name: t.scale for t in result.tensors}
    assert all(s > 0 for s in scales.values())
    others = sorted(s for n, s in scales.items() if not n.startswith("pooler."))
    assert min(others) <= scales["pooler.dense.weight"] <= max(others)
    from nwcfmt.planner.plan import rerank  # the end-to-end referee of an encoder: 1 - cosine on held-out windows

    chosen = rerank(src, result, 3.0, calib=CalibOptions(samples=8, seqlen=32))
    losses = chosen.notes["rerank_heldout_1_minus_cosine"]
    assert set(losses) == {"fisher-scaled", "fisher-half", "hessian"} and all(0 < v < 1 for v in losses.values())
    assert chosen.notes["heldout_1_minus_cosine"] == min(losses.values())
