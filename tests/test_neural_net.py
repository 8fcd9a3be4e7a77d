"""The ``nwc-mlp-1`` networks: the decoder's exact math and checks, the shipped weights, deterministic training."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nwcfmt.errors import ChecksumError, FormatError
from nwcfmt.neural import arch
from nwcfmt.neural.arch import (
    ARCH_ID,
    CHUNK,
    DECODER_TENSORS,
    ENCODER_TENSORS,
    decode_chunks,
    decoder_hash,
    encode_chunks,
    validate_decoder,
)
from nwcfmt.neural.data import to_chunks
from nwcfmt.neural.rate import hard_rate, soft_rate
from nwcfmt.neural.weights import WEIGHTS_FILE, WEIGHTS_SHA256, load_codec, read_weights


def _random_decoder(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(shape, generator=g) for k, shape in DECODER_TENSORS.items()}


def _random_q(n: int = 300, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-20, 21, (n, CHUNK), generator=g), torch.randint(0, 4, (n,), generator=g)


def test_tensor_specs() -> None:
    assert ARCH_ID == "nwc-mlp-1" and CHUNK == 16 and arch.N_LEVELS == 4
    assert DECODER_TENSORS["dec.emb"] == (4, 8)
    assert DECODER_TENSORS["dec.l0.weight"] == (arch.HIDDEN, 25)
    assert set(ENCODER_TENSORS) == {k.replace("dec.", "enc.") for k in DECODER_TENSORS}
    assert sum(torch.Size(s).numel() for s in DECODER_TENSORS.values()) < 10_000


def test_decode_deterministic_and_batched(monkeypatch) -> None:
    w = _random_decoder()
    q, levels = _random_q()
    a = decode_chunks(q, levels, 0.25, w)
    assert a.dtype == torch.float32 and a.shape == q.shape and torch.isfinite(a).all()
    assert torch.equal(a, decode_chunks(q.clone(), levels.clone(), 0.25, w))
    assert torch.equal(a, decode_chunks(q.to(torch.int32), levels, 0.25, w))
    monkeypatch.setattr(arch, "BATCH_CHUNKS", 7)  # batches change the matmul blocking, not the values beyond fp32
    torch.testing.assert_close(a, decode_chunks(q, levels, 0.25, w), rtol=1e-5, atol=1e-5)
    # the specified math, written out
    st = torch.tensor(0.25)
    inp = torch.cat([q.float() * st, torch.log2(st).expand(len(q), 1), w["dec.emb"][levels]], dim=1)
    h = torch.relu(inp @ w["dec.l0.weight"].T + w["dec.l0.bias"])
    h = torch.relu(h @ w["dec.l1.weight"].T + w["dec.l1.bias"])
    ref = st * (q.float() + h @ w["dec.l2.weight"].T + w["dec.l2.bias"])
    torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6)


def test_decode_rejects_bad_input() -> None:
    w = _random_decoder()
    q, levels = _random_q(10)
    with pytest.raises(ValueError):
        decode_chunks(q.float(), levels, 0.1, w)
    with pytest.raises(ValueError):
        decode_chunks(q, levels + 4, 0.1, w)
    with pytest.raises(ValueError):
        decode_chunks(q[:, :8], levels, 0.1, w)
    with pytest.raises(ValueError):
        decode_chunks(q, levels, 0.0, w)


def test_zero_last_layers_is_plain_ecsq() -> None:
    """With zero output layers the encoder rounds to nearest and the decoder rebuilds ``q * step``."""
    from nwcfmt.neural.train import init_params

    params = {k: v.detach() for k, v in init_params(torch.Generator().manual_seed(0)).items()}
    x = torch.randn(500, CHUNK)
    levels = torch.zeros(500, dtype=torch.long)
    enc = {k: v for k, v in params.items() if k in ENCODER_TENSORS}
    dec = {k: v for k, v in params.items() if k in DECODER_TENSORS}
    q = encode_chunks(x, levels, 0.3, enc)
    assert q.dtype == torch.int64
    assert torch.equal(q, torch.round(x / torch.tensor(0.3)).long())
    torch.testing.assert_close(decode_chunks(q, levels, 0.3, dec), q.float() * 0.3)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w.pop("dec.l1.bias"), "missing"),
        (lambda w: w.__setitem__("dec.extra", torch.zeros(1)), "unexpected"),
        (lambda w: w.__setitem__("dec.l0.weight", torch.zeros(3, 25)), "shape"),
        (lambda w: w.__setitem__("dec.emb", torch.zeros(4, 8, dtype=torch.float64)), "dtype"),
        (lambda w: w["dec.l2.bias"].__setitem__(3, float("nan")), "non-finite"),
        (lambda w: w["dec.l1.weight"].__setitem__((0, 0), float("inf")), "non-finite"),
    ],
)
def test_validate_decoder_errors(mutate, message: str) -> None:
    w = _random_decoder()
    validate_decoder(w)
    mutate(w)
    with pytest.raises(FormatError, match=message):
        validate_decoder(w)


def test_decoder_hash() -> None:
    w = _random_decoder()
    h = decoder_hash(w)
    assert len(h) == 64 and h == decoder_hash(dict(reversed(list(w.items()))))
    w2 = {k: v.clone() for k, v in w.items()}
    w2["dec.l1.weight"][5, 7] = torch.nextafter(w2["dec.l1.weight"][5, 7], torch.tensor(1.0))
    assert decoder_hash(w2) != h


def test_chunk_layout() -> None:
    w = torch.arange(20 * 3, dtype=torch.float32).reshape(20, 3)
    c = to_chunks(w)
    assert c.shape == (6, CHUNK)
    assert torch.equal(c[1], w[:16, 1]) and torch.equal(c[4, :4], w[16:, 1]) and not c[4, 4:].any()


def test_rate_estimates() -> None:
    y = torch.randn(2, 256, CHUNK) / 0.05
    levels = torch.zeros(2, 256, dtype=torch.long)
    hard = hard_rate(y, levels, 4)
    counts = torch.unique(torch.round(y[0]), return_counts=True)[1].double()
    p = counts / counts.sum()
    assert abs(float(hard[0]) - float(-(p * p.log2()).sum())) < 1e-5
    assert torch.allclose(soft_rate(y, levels, 4), hard, atol=0.1)


def test_shipped_weights() -> None:
    assert WEIGHTS_FILE.stat().st_size < 100_000
    assert hashlib.sha256(WEIGHTS_FILE.read_bytes()).hexdigest() == WEIGHTS_SHA256
    codec = load_codec()
    assert codec is load_codec() and codec.arch == ARCH_ID
    assert set(codec.decoder) == set(DECODER_TENSORS) and set(codec.encoder) == set(ENCODER_TENSORS)
    assert codec.decoder_hash == decoder_hash(codec.decoder)
    info = json.loads(WEIGHTS_FILE.with_suffix(".json").read_text())
    assert info["sha256"] == WEIGHTS_SHA256 and info["decoder_sha256"] == codec.decoder_hash
    with pytest.raises(ChecksumError):
        read_weights(WEIGHTS_FILE, "0" * 64)


TRAIN_ARGS = ["--steps", "30", "--groups", "2", "--chunks", "64", "--synthetic-only", "--eval-chunks", "0"]


def test_training_is_deterministic(tmp_path: Path) -> None:
    """The command (a real subprocess) and a second run in this process write byte-identical files."""
    from nwcfmt.neural import train

    a, b = tmp_path / "a" / "w.safetensors", tmp_path / "b" / "w.safetensors"
    cmd = [sys.executable, "-m", "nwcfmt.neural.train", "--out", str(a), *TRAIN_ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        assert train.main(["--out", str(b), *TRAIN_ARGS]) == 0
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    assert a.read_bytes() == b.read_bytes()
    codec = read_weights(a, hashlib.sha256(a.read_bytes()).hexdigest())
    info = json.loads(a.with_suffix(".json").read_text())
    assert info["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert info["decoder_sha256"] == codec.decoder_hash and info["steps_done"] == 30
    assert info["config"]["steps"] == 30 and not info["cut_by_minutes"]
    with pytest.raises(FormatError):
        read_weights(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(a.read_bytes()[:-10])
    with pytest.raises(FormatError):
        read_weights(bad)
