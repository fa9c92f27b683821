"""Sampling (host/generate.py) and sliding-window perplexity (host/perplexity.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import MODELS, tiny_gpt2_config, tiny_gpt2_tensors, write_model_dir
from gpt_fpga.host.backends import Backend, FloatBackend
from gpt_fpga.contract.errors import InputError
from gpt_fpga.host.generate import Sampling, generate, sample_next
from gpt_fpga.host.perplexity import perplexity, windows


def _logits(seed=0, v=50):
    return np.random.default_rng(seed).normal(0, 2, v).astype(np.float32)


def _softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


# ---------------------------------------------------------------------------------------------
# sampling

@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    z = _logits(seed)
    rng = np.random.default_rng(0)
    assert Sampling().greedy
    assert sample_next(z, Sampling(), rng) == int(np.argmax(z))
    z[7] = z.max() + 1.0
    assert sample_next(z, Sampling(), rng) == 7


@pytest.mark.parametrize("temperature", [None, 0.5, 1.0, 3.0])
def test_top_k_1_is_greedy(temperature):
    rng = np.random.default_rng(1)
    for seed in range(20):
        z = _logits(seed)
        assert sample_next(z, Sampling(temperature=temperature, top_k=1), rng) == int(np.argmax(z))


@pytest.mark.parametrize("temperature", [None, 0.7, 2.0])
def test_tiny_top_p_is_greedy(temperature):
    rng = np.random.default_rng(2)
    for seed in range(20):
        z = _logits(seed)
        assert sample_next(z, Sampling(temperature=temperature, top_p=1e-9), rng) == int(np.argmax(z))


def test_seed_reproducibility():
    z = _logits(3)
    s = Sampling(temperature=1.5)
    draw = lambda seed: [sample_next(z, s, r) for r in [np.random.default_rng(seed)] for _ in range(50)]  # noqa
    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


def test_top_k_restricts_support_and_keeps_proportions():
    z = _logits(4)
    rng = np.random.default_rng(5)
    k, n = 3, 6000
    draws = np.array([sample_next(z, Sampling(top_k=k), rng) for _ in range(n)])
    top = np.argsort(-z)[:k]
    assert set(draws.tolist()) == set(top.tolist())
    p = _softmax64(z[top])
    freq = np.array([(draws == t).mean() for t in top])
    assert np.abs(freq - p).max() < 4 * np.sqrt(p * (1 - p) / n).max() + 1e-3


def test_top_p_nucleus():
    z = np.log(np.array([0.05, 0.5, 0.15, 0.3]))  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    rng = np.random.default_rng(6)
    n = 6000
    draws = np.array([sample_next(z, Sampling(top_p=0.7), rng) for _ in range(n)])
    assert set(draws.tolist()) == {1, 3}  # 0.5 < 0.7 so the second one is needed; 0.8 >= 0.7 stops
    assert abs((draws == 1).mean() - 0.5 / 0.8) < 0.03
    draws = np.array([sample_next(z, Sampling(top_p=0.5), rng) for _ in range(500)])
    assert set(draws.tolist()) == {1}
    draws = np.array([sample_next(z, Sampling(top_p=1.0), rng) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1, 2, 3}


def test_temperature_distribution():
    z = np.array([0.0, 1.0, 2.0, -1.0], np.float32)
    t, n = 2.0, 20000
    rng = np.random.default_rng(7)
    draws = np.array([sample_next(z, Sampling(temperature=t), rng) for _ in range(n)])
    freq = np.bincount(draws, minlength=4) / n
    p = _softmax64(z.astype(np.float64) / t)
    assert np.abs(freq - p).max() < 0.015


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory):
    d = write_model_dir(tmp_path_factory.mktemp("tiny") / "m", tiny_gpt2_config(), tiny_gpt2_tensors(seed=3))
    return FloatBackend(d)


def test_generate_greedy_and_seeded(tiny_backend):
    be = tiny_backend
    prompt = [5, 17, 300, 42]
    out = generate(be, prompt, 10)
    # reference: full recompute, argmax, no cache
    ids, ref = list(prompt), []
    for _ in range(10):
        be.reset()
        tok = int(np.argmax(be.forward(ids)[-1]))
        ref.append(tok)
        ids.append(tok)
        if tok == be.config.eos_token_id:
            break
    assert out == ref
    s = Sampling(temperature=1.0, top_k=50, seed=123)
    a, b = generate(be, prompt, 12, s), generate(be, prompt, 12, s)
    assert a == b
    c = generate(be, prompt, 12, Sampling(temperature=1.0, top_k=50, seed=124))
    assert a != c
    seen = []
    generate(be, prompt, 5, s, on_token=seen.append)
    assert seen == a[:len(seen)]


def test_generate_rejects_bad_input(tiny_backend):
    with pytest.raises(InputError, match="empty"):
        generate(tiny_backend, [], 3)
    with pytest.raises(InputError, match="context"):
        generate(tiny_backend, [1] * 30, 3)
    with pytest.raises(InputError, match="out of range"):
        generate(tiny_backend, [1, 4096], 3)


# ---------------------------------------------------------------------------------------------
# perplexity windows

@pytest.mark.parametrize("n", [2, 3, 10, 33, 100])
@pytest.mark.parametrize("ctx,stride", [(2, 1), (4, 1), (4, 3), (8, 4), (8, 7), (16, 5), (200, 100)])
def test_windows_score_every_target_once(n, ctx, stride):
    targets = []
    prev_begin = -1
    for begin, end, first in windows(n, ctx, stride):
        assert prev_begin < begin and end - begin <= ctx and begin < first <= end <= n
        assert first > begin  # each scored target has at least one token of context in its window
        targets += range(first, end)
        prev_begin = begin
    assert targets == list(range(1, n))


class BigramBackend(Backend):
    """Logits depend only on the current token, so every window gives the same numbers."""
    name = "bigram"

    def __init__(self, vocab=40, n_ctx=64, seed=0):
        self.config = SimpleNamespace(vocab_size=vocab, n_ctx=n_ctx, eos_token_id=None)
        self.table = np.random.default_rng(seed).normal(0, 2, (vocab, vocab)).astype(np.float32)
        self.calls = []

    def reset(self):
        pass

    def forward(self, ids):
        self.calls.append(len(ids))
        return self.table[np.asarray(ids)]


@pytest.mark.parametrize("ctx,stride", [(2, 1), (8, 3), (16, 8), (64, 32), (64, 1)])
def test_perplexity_with_stride_on_bigram(ctx, stride):
    be = BigramBackend()
    ids = np.random.default_rng(1).integers(0, 40, 150).tolist()
    nll = 0.0
    for a, b in zip(ids[:-1], ids[1:]):
        nll -= math.log(_softmax64(be.table[a])[b])
    r = perplexity(be, ids, ctx=ctx, stride=stride, progress=False)
    assert r["tokens"] == len(ids) - 1
    assert r["nll"] == pytest.approx(nll / (len(ids) - 1), rel=1e-9)
    assert r["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-9)
    assert max(be.calls) <= ctx


def _ref_windowed_nll(be, ids, ctx, stride):
    """Independent sliding-window NLL: each target is scored in the first window that holds it with
    context before it, using that window's full-sequence logits, log-softmax in float64."""
    n, total, scored = len(ids), 0.0, set()
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        be.reset()
        z = be.forward(ids[begin:end]).astype(np.float64)  # [end-begin, v]
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for t in range(begin + 1, end):
            if t not in scored:
                total -= logp[t - begin - 1, ids[t]]
                scored.add(t)
        if end == n:
            break
    assert scored == set(range(1, n))
    return total / (n - 1)


@pytest.fixture(scope="module")
def heldout_ids(tiny_backend):
    return tiny_backend.codec.encode((MODELS / "kjv-heldout.txt").read_text()[:600])


@pytest.mark.parametrize("ctx,stride", [(32, 16), (32, 31), (32, 1), (9, 4), (2, 1)])
def test_perplexity_with_stride_on_model(tiny_backend, heldout_ids, ctx, stride):
    ids = heldout_ids[:90] if stride > 1 else heldout_ids[:45]
    assert len(ids) > 32
    ref = _ref_windowed_nll(tiny_backend, ids, ctx, stride)
    r = perplexity(tiny_backend, ids, ctx=ctx, stride=stride, progress=False)
    assert r["tokens"] == len(ids) - 1 and r["ctx"] == ctx and r["stride"] == stride
    assert r["nll"] == pytest.approx(ref, rel=1e-5)
    assert r["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_perplexity_single_window_is_full_sequence(tiny_backend, heldout_ids):
    ids = heldout_ids[:32]
    tiny_backend.reset()
    z = tiny_backend.forward(ids).astype(np.float64)
    nll = -np.mean([np.log(_softmax64(z[i])[ids[i + 1]]) for i in range(len(ids) - 1)])
    r = perplexity(tiny_backend, ids, progress=False)  # default ctx = n_ctx = 32: one window
    assert r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_perplexity_default_stride_is_half_context(tiny_backend, heldout_ids):
    r = perplexity(tiny_backend, heldout_ids[:50], progress=False)
    assert (r["ctx"], r["stride"]) == (32, 16)


@pytest.mark.parametrize("seed", range(3))
def test_temperature_zero_is_greedy(seed):
    z = _logits(seed)
    s = Sampling(temperature=0.0, top_k=5, seed=seed)
    assert s.greedy
    assert sample_next(z, s, np.random.default_rng(seed)) == int(np.argmax(z))


def test_stream_decoder_flushes_a_held_back_character():
    from gpt_fpga.quantize.tokenizer import StreamDecoder, TextCodec

    codec = TextCodec(MODELS / "gpt2-kjv" / "tokenizer.json")
    ids = codec.encode("é")  # byte-level BPE: one character, possibly split over two ids
    raw = codec.tok.get_vocab()
    # a lone lead byte of a 2-byte UTF-8 sequence decodes to U+FFFD until its continuation arrives
    lead = raw.get("Ã")
    stream = StreamDecoder(codec, codec.encode("A"))
    assert lead is not None
    assert stream.push(lead) == ""  # held back: incomplete character
    assert stream.flush() == "\ufffd"  # generation ended: what was held back is shown, not lost
    assert ids  # the tokenizer knows the character at all


def test_ctx_and_stride_zero_are_refused(tmp_path):
    model = write_model_dir(tmp_path / "m", tiny_gpt2_config(), tiny_gpt2_tensors())
    backend = FloatBackend(model)
    ids = list(range(1, 20))
    with pytest.raises(InputError, match="--ctx"):
        perplexity(backend, ids, ctx=0, progress=False)
    with pytest.raises(InputError, match="--stride"):
        perplexity(backend, ids, ctx=8, stride=0, progress=False)
