"""The float32 golden model against Hugging Face transformers, built live from random configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, float_model, hf_logits, hf_random_model, optional_import, requires_modules, save_hf

pytestmark = requires_modules("torch", "transformers")  # missing: skipped, or failed under CI=true
torch = optional_import("torch")

TOL = 1e-4

# (family, transformers config overrides, sequence length)
SHAPES = [
    pytest.param("gpt2", {}, 20, id="gpt2-default"),
    pytest.param("gpt2", dict(n_layer=3, n_head=2, n_embd=24, n_inner=40), 31, id="gpt2-n_inner40-3L"),
    pytest.param("gpt2", dict(scale_attn_weights=False, n_inner=72, layer_norm_epsilon=1e-2), 16,
                 id="gpt2-noscale-eps1e-2"),
    pytest.param("gpt2", dict(n_head=8, activation_function="gelu_pytorch_tanh"), 32, id="gpt2-8heads-fullctx"),
    pytest.param("gpt_neo", dict(window_size=8, attention_types=[[["global", "local"], 1]]), 24,
                 id="neo-window8-seq24"),
    pytest.param("gpt_neo", dict(num_layers=3, attention_types=[[["local"], 3]], window_size=5,
                                 intermediate_size=40, layer_norm_epsilon=1e-2), 30, id="neo-all-local-w5-ff40-eps"),
    pytest.param("gpt_neo", dict(hidden_size=24, num_heads=2, attention_types=[[["global"], 2]],
                                 intermediate_size=56), 32, id="neo-all-global-fullctx"),
    pytest.param("gpt_neo", dict(num_layers=4, attention_types=[[["global", "local"], 2]], window_size=1), 12,
                 id="neo-window1"),
]


def _ids(n: int, vocab: int = 97, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _assert_close(ours: np.ndarray, ref: np.ndarray, tol: float = TOL):
    assert ours.dtype == np.float32
    assert ours.shape == ref.shape
    assert ref.std() > 0.1, f"reference logits are nearly constant (std {ref.std():.3g}): the test is too weak"
    err = float(np.abs(ours.astype(np.float64) - ref).max())
    assert err <= tol, f"max |dlogit| = {err:.3g} > {tol}"


@pytest.mark.parametrize("family,kw,seq", SHAPES)
def test_logits_match_transformers(tmp_path, family, kw, seq):
    model = hf_random_model(family, **kw)
    d = save_hf(model, tmp_path / "m")
    ids = _ids(seq)
    ours = float_model(d).forward(ids)
    _assert_close(ours, hf_logits(model, ids))


def test_neo_window_actually_matters(tmp_path):
    """Guard for the window test above: with seq > window, local and global layers must differ."""
    kw = dict(window_size=4, attention_types=[[["global", "local"], 1]])
    local = hf_random_model("gpt_neo", seed=3, **kw)
    glob = hf_random_model("gpt_neo", seed=3, **dict(kw, attention_types=[[["global"], 2]]))
    ids = _ids(20)
    a, b = hf_logits(local, ids), hf_logits(glob, ids)
    assert np.abs(a[:4] - b[:4]).max() < 1e-5  # within the window: identical
    assert np.abs(a[4:] - b[4:]).max() > 1e-2
    ours = float_model(save_hf(local, tmp_path / "m")).forward(ids)
    _assert_close(ours, a)


# ---------------------------------------------------------------------------------------------
# checkpoint variants

def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy a saved model directory, passing its tensors (torch, any dtype) through `edit`."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = edit(load_file(str(src / "model.safetensors")))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module", params=["gpt2", "gpt_neo"])
def saved(request, tmp_path_factory):
    family = request.param
    model = hf_random_model(family, seed=5, **({"n_inner": 40} if family == "gpt2" else {"intermediate_size": 40}))
    d = save_hf(model, tmp_path_factory.mktemp(family) / "orig")
    return family, model, d


def test_saved_file_has_prefix_and_no_lm_head(saved):
    """The premise of the variants below: transformers writes 'transformer.' names and no lm_head."""
    from safetensors import safe_open

    _, _, d = saved
    with safe_open(str(d / "model.safetensors"), "np") as f:
        keys = list(f.keys())
    assert all(k.startswith("transformer.") for k in keys), keys
    assert "lm_head.weight" not in keys


def test_names_without_transformer_prefix(saved, tmp_path):
    family, model, d = saved
    v = _rewrite(d, tmp_path / "v", lambda t: {k.removeprefix("transformer."): x for k, x in t.items()})
    ids = _ids(24)
    _assert_close(float_model(v).forward(ids), hf_logits(model, ids))


def test_extra_attention_buffers_are_ignored(saved, tmp_path):
    family, model, d = saved
    n = model.config.max_position_embeddings
    attn = "attn" if family == "gpt2" else "attn.attention"

    def edit(t):
        t = dict(t)
        for i in range(model.config.num_hidden_layers):
            # as older transformers saved them: a float or bool causal mask and a scalar
            t[f"transformer.h.{i}.{attn}.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
            t[f"transformer.h.{i}.{attn}.masked_bias"] = torch.tensor(-1e4)
        t["transformer.h.0." + attn + ".bias"] = t["transformer.h.0." + attn + ".bias"].float()
        return t

    v = _rewrite(d, tmp_path / "v", edit)
    ids = _ids(24)
    _assert_close(float_model(v).forward(ids), hf_logits(model, ids))


def test_tied_lm_head_present(saved, tmp_path):
    family, model, d = saved
    v = _rewrite(d, tmp_path / "v", lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"].clone()})
    ids = _ids(24)
    _assert_close(float_model(v).forward(ids), hf_logits(model, ids))


def test_untied_lm_head_is_refused(saved, tmp_path):
    from gpt_fpga.contract.errors import CheckpointError
    from gpt_fpga.quantize.checkpoint import load_checkpoint

    family, model, d = saved
    v = _rewrite(d, tmp_path / "v", lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"] * 1.5})
    with pytest.raises(CheckpointError, match="lm_head"):
        load_checkpoint(v)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_files(saved, tmp_path, dtype):
    """fp16/bf16 files are widened exactly; compare with HF holding the same rounded weights in float32."""
    family, model, d = saved
    tdtype = getattr(torch, dtype)
    v = _rewrite(d, tmp_path / "v", lambda t: {k: x.to(tdtype) for k, x in t.items()})
    from safetensors import safe_open

    with safe_open(str(v / "model.safetensors"), "pt") as f:  # the file really is half precision
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16" if dtype == "float16" else "BF16"}
    ref = hf_random_model(family, seed=5, **({"n_inner": 40} if family == "gpt2" else {"intermediate_size": 40}))
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.to(tdtype).to(torch.float32))
    assert not torch.equal(ref.transformer.wte.weight, model.transformer.wte.weight)  # rounding happened
    ids = _ids(24)
    _assert_close(float_model(v).forward(ids), hf_logits(ref, ids))


def test_params_are_float32_canonical(saved):
    from gpt_fpga.quantize.checkpoint import load_checkpoint

    family, model, d = saved
    ck = load_checkpoint(d)
    dm, f = ck.config.d_model, ck.config.d_ff
    assert all(a.dtype == np.float32 for a in ck.params.values())
    assert ck.params["h0.w_qkv"].shape == (dm, 3 * dm) and ck.params["h0.w_fc"].shape == (dm, f)
    assert ck.params["h0.w_proj"].shape == (f, dm)
    # q projection of a unit vector equals the HF weight row/column for that input
    w = ck.params["h1.w_qkv"]
    if family == "gpt2":
        hf = model.transformer.h[1].attn.c_attn.weight.detach().numpy()  # [in, out]
        np.testing.assert_array_equal(w, hf)
    else:
        att = model.transformer.h[1].attn.attention
        for i, name in enumerate("qkv"):
            hf = getattr(att, f"{name}_proj").weight.detach().numpy()  # [out, in]
            np.testing.assert_array_equal(w[:, i * dm:(i + 1) * dm], hf.T)


# ---------------------------------------------------------------------------------------------
# KV cache

@pytest.mark.parametrize("family,kw", [
    ("gpt2", dict(n_positions=40)),
    ("gpt_neo", dict(max_position_embeddings=40, window_size=8, attention_types=[[["global", "local"], 1]])),
])
@pytest.mark.parametrize("chunks", [(5,), (1,), (7, 3, 2)], ids=lambda c: "prefill" + "+".join(map(str, c)))
def test_cached_decode_equals_full_recompute(tmp_path, family, kw, chunks):
    model = hf_random_model(family, seed=11, **kw)
    fm = float_model(save_hf(model, tmp_path / "m"))
    ids = _ids(40, seed=4)
    full = fm.forward(ids)
    _assert_close(full, hf_logits(model, ids))

    for _ in range(2):  # the second round checks that reset() really forgets the cache
        fm.reset()
        parts, pos = [], 0
        for c in chunks:  # prefill, possibly in several chunks
            parts.append(fm.forward(ids[pos:pos + c]))
            pos += c
        while pos < len(ids):  # then one token at a time, well past the window
            parts.append(fm.forward([ids[pos]]))
            pos += 1
        assert fm.position == len(ids)
        np.testing.assert_allclose(np.concatenate(parts), full, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="context"):
        fm.forward([1])


# ---------------------------------------------------------------------------------------------
# the bundled trained models

@pytest.mark.parametrize("name", ["neo-kjv", "gpt2-kjv"])
def test_bundled_logits_match_transformers(name):
    """Whole context (256 > the Neo window of 128) of held-out text, HF loading the same fp16 file."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    d = MODELS / name
    ids = Tokenizer.from_file(str(d / "tokenizer.json")).encode(
        (MODELS / "kjv-heldout.txt").read_text()[:4000], add_special_tokens=False).ids
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    ids = ids[:hf.config.max_position_embeddings]
    assert len(ids) == 256
    _assert_close(float_model(d).forward(ids), hf_logits(hf, ids))


@pytest.mark.parametrize("name", ["neo-kjv", "gpt2-kjv"])
def test_greedy_matches_transformers_generate(name):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    from gpt_fpga.host.backends import FloatBackend
    from gpt_fpga.host.generate import generate

    d = MODELS / name
    prompt = Tokenizer.from_file(str(d / "tokenizer.json")).encode(
        "And God said unto Moses,", add_special_tokens=False).ids
    assert len(prompt) >= 3
    steps = 64

    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    assert hf.transformer.wte.weight.dtype == torch.float32
    hf.generation_config.eos_token_id = None  # never stop early on the HF side
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    ref = out[0, len(prompt):].tolist()
    assert len(ref) == steps

    be = FloatBackend(d)
    # plain greedy loop with the cache, no EOS stop: all 64 tokens
    be.reset()
    logits = be.forward(prompt)[-1]
    mine = []
    for _ in range(steps):
        mine.append(int(np.argmax(logits)))
        logits = be.forward([mine[-1]])[-1]
    assert mine == ref

    # the library's generate() stops at EOS: a prefix of the same sequence
    gen = generate(be, prompt, steps)
    eos = be.config.eos_token_id
    assert gen == ref[:len(gen)]
    assert len(gen) == steps or gen[-1] == eos
    assert len(set(ref)) > 5, "degenerate generation makes this test weak"
