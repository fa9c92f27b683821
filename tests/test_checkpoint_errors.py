"""Every bad input gets a one-line error naming the problem, exit code 2 and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import (MODELS, REPO, TINY_GPT2, expect_error, run_cli, tiny_gpt2_config, tiny_gpt2_tensors,
                      write_model_dir)

N_CTX = TINY_GPT2["n_ctx"]
VOCAB = TINY_GPT2["vocab"]


def gen(model_dir, *extra):
    return ["generate", model_dir, "--ids", "1,2,3", "--max-new-tokens", "2", *extra]


# ---------------------------------------------------------------------------------------------
# the directory and its files

def test_missing_directory(capsys, tmp_path):
    d = tmp_path / "nope"
    expect_error(capsys, gen(d), str(d), "no such model directory")
    expect_error(capsys, ["info", d], str(d), "no such model directory")
    expect_error(capsys, ["logits", d, "--ids", "1", "--out", tmp_path / "x.npy"], "no such model directory")


def test_missing_config(capsys, tiny_dir):
    (tiny_dir / "config.json").unlink()
    expect_error(capsys, gen(tiny_dir), "config.json", "missing")
    expect_error(capsys, ["info", tiny_dir], "config.json", "missing")


def test_missing_safetensors(capsys, tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    expect_error(capsys, gen(tiny_dir), "model.safetensors", "missing")


@pytest.mark.parametrize("keep", [0, 5, 100, 0.5, -1], ids=["empty", "5B", "in-header", "half", "last-byte"])
def test_truncated_safetensors(capsys, tmp_path, keep):
    """A real trained checkpoint, cut short at various points."""
    d = tmp_path / "cut"
    shutil.copytree(MODELS / "gpt2-kjv", d)
    st = d / "model.safetensors"
    data = st.read_bytes()
    n = {0.5: len(data) // 2, -1: len(data) - 1}.get(keep, keep)
    st.write_bytes(data[:n])
    expect_error(capsys, gen(d), "model.safetensors", "truncated")


def test_garbage_file(capsys, tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    expect_error(capsys, gen(tiny_dir), "model.safetensors", "corrupt")


def test_corrupt_header_json(capsys, tiny_dir):
    st = tiny_dir / "model.safetensors"
    body = st.read_bytes()
    (n,) = struct.unpack("<Q", body[:8])
    garbage = b"{not json" + b"\x00\xff" * ((n - 9) // 2) + b" " * ((n - 9) % 2)
    assert len(garbage) == n
    st.write_bytes(body[:8] + garbage + body[8 + n:])  # same length: only the header is garbage
    expect_error(capsys, gen(tiny_dir), "model.safetensors", "corrupt", "header")


def test_corrupt_header_entry(capsys, tiny_dir):
    st = tiny_dir / "model.safetensors"
    body = st.read_bytes()
    (n,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8:8 + n])
    header["transformer.wpe.weight"]["data_offsets"] = "somewhere"
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(raw) == n
    st.write_bytes(body[:8] + raw + body[8 + n:])
    expect_error(capsys, gen(tiny_dir), "corrupt", "transformer.wpe.weight")


def test_config_not_json(capsys, tiny_dir):
    (tiny_dir / "config.json").write_text("{'model_type': gpt2")
    expect_error(capsys, gen(tiny_dir), "config.json", "JSON")
    (tiny_dir / "config.json").write_text("[1, 2, 3]")
    expect_error(capsys, gen(tiny_dir), "config.json", "JSON object")


# ---------------------------------------------------------------------------------------------
# tensors

def _write(tmp_path, tensors=None, config=None, tokenizer=True):
    return write_model_dir(tmp_path / "m", config or tiny_gpt2_config(), tensors or tiny_gpt2_tensors(), tokenizer)


def test_missing_tensor_is_named(capsys, tmp_path):
    t = tiny_gpt2_tensors()
    del t["transformer.h.1.mlp.c_fc.weight"]
    expect_error(capsys, gen(_write(tmp_path, t)), "missing tensor", "h.1.mlp.c_fc.weight")


def test_missing_tensor_neo_is_named(capsys, tmp_path):
    """GPT-Neo names: a missing k_proj is reported with its own name."""
    d, f, v, n = 16, 32, 64, 16
    cfg = {"model_type": "gpt_neo", "vocab_size": v, "hidden_size": d, "num_heads": 2, "num_layers": 1,
           "max_position_embeddings": n, "attention_types": [[["local"], 1]], "window_size": 4,
           "intermediate_size": f}
    r = np.random.default_rng(0)
    w = lambda *s: r.normal(size=s).astype(np.float32)  # noqa: E731
    a = "transformer.h.0.attn.attention."
    t = {"transformer.wte.weight": w(v, d), "transformer.wpe.weight": w(n, d), "transformer.ln_f.weight": w(d),
         "transformer.ln_f.bias": w(d), "transformer.h.0.ln_1.weight": w(d), "transformer.h.0.ln_1.bias": w(d),
         "transformer.h.0.ln_2.weight": w(d), "transformer.h.0.ln_2.bias": w(d), a + "q_proj.weight": w(d, d),
         a + "v_proj.weight": w(d, d), a + "out_proj.weight": w(d, d), a + "out_proj.bias": w(d),
         "transformer.h.0.mlp.c_fc.weight": w(f, d), "transformer.h.0.mlp.c_fc.bias": w(f),
         "transformer.h.0.mlp.c_proj.weight": w(d, f), "transformer.h.0.mlp.c_proj.bias": w(d)}
    m = write_model_dir(tmp_path / "neo", cfg, t, tokenizer=False)
    expect_error(capsys, gen(m), "missing tensor", "h.0.attn.attention.k_proj.weight")
    t[a + "k_proj.weight"] = w(d, d)
    write_model_dir(tmp_path / "neo", cfg, t, tokenizer=False)
    rc, out, err = run_cli(capsys, *gen(m))
    assert rc == 0, err


def test_unexpected_shape_is_named(capsys, tmp_path):
    t = tiny_gpt2_tensors()
    name = "transformer.h.0.attn.c_attn.weight"
    t[name] = np.ascontiguousarray(t[name].T)  # [3d, d] instead of Conv1D [d, 3d]
    err = expect_error(capsys, gen(_write(tmp_path, t)), name, "shape", "[48, 16]", "[16, 48]")
    assert "config.json" in err


def test_vocab_mismatch_between_config_and_file(capsys, tmp_path):
    cfg = dict(tiny_gpt2_config(), vocab_size=5000)
    expect_error(capsys, gen(_write(tmp_path, config=cfg)), "transformer.wte.weight", "shape", "5000")


@pytest.mark.parametrize("dtype,name", [(np.float64, "transformer.wpe.weight"), (np.int32, "transformer.ln_f.bias"),
                                        (np.int8, "transformer.h.1.mlp.c_proj.weight")])
def test_unsupported_dtype_is_named(capsys, tmp_path, dtype, name):
    t = tiny_gpt2_tensors()
    t[name] = t[name].astype(dtype)
    code = {np.float64: "F64", np.int32: "I32", np.int8: "I8"}[dtype]
    expect_error(capsys, gen(_write(tmp_path, t)), name, "unsupported dtype", code)


def test_non_finite_weights_are_named(capsys, tmp_path):
    t = tiny_gpt2_tensors()
    t["transformer.h.1.ln_2.bias"][3] = np.inf
    expect_error(capsys, gen(_write(tmp_path, t)), "NaN or Inf", "'transformer.h.1.ln_2.bias'")


def test_ignored_buffers_of_any_dtype(capsys, tmp_path):
    """attn.bias / masked_bias buffers are dropped before any dtype or shape check."""
    t = tiny_gpt2_tensors()
    t["transformer.h.0.attn.bias"] = np.tril(np.ones((N_CTX, N_CTX), bool))[None, None]
    t["transformer.h.1.attn.masked_bias"] = np.array(-1e4, np.float64)
    rc, out, err = run_cli(capsys, *gen(_write(tmp_path, t)))
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------
# config.json

@pytest.mark.parametrize("model_type", ["llama", "gptj", None])
def test_unsupported_model_type(capsys, tmp_path, model_type):
    cfg = dict(tiny_gpt2_config(), model_type=model_type)
    d = _write(tmp_path, config=cfg)
    expect_error(capsys, gen(d), "unsupported model_type", str(model_type))
    expect_error(capsys, ["info", d], "unsupported model_type")


@pytest.mark.parametrize("act", ["relu", "gelu", "silu"])
def test_unsupported_activation(capsys, tmp_path, act):
    cfg = dict(tiny_gpt2_config(), activation_function=act)
    expect_error(capsys, gen(_write(tmp_path, config=cfg)), "unsupported activation_function", f"'{act}'")


@pytest.mark.parametrize("key,value,needles", [
    ("n_embd", "abc", ["n_embd", "integer"]),
    ("n_layer", -1, ["n_layer", ">= 1"]),
    ("n_head", 0, ["n_head", ">= 1"]),
    ("n_head", 3, ["not divisible", "3 heads"]),
    ("n_positions", None, ["n_positions"]),
    ("layer_norm_epsilon", "x", ["layer_norm_epsilon"]),
    ("scale_attn_by_inverse_layer_idx", True, ["scale_attn_by_inverse_layer_idx"]),
])
def test_bad_config_values(capsys, tmp_path, key, value, needles):
    cfg = dict(tiny_gpt2_config(), **{key: value})
    expect_error(capsys, gen(_write(tmp_path, config=cfg)), "config.json", *needles)


@pytest.mark.parametrize("types", ["global", [["global", 2]], [[["global", "sparse"], 1]], [[["local"], 3]]])
def test_bad_neo_attention_types(capsys, tmp_path, types):
    cfg = {"model_type": "gpt_neo", "vocab_size": 64, "hidden_size": 16, "num_heads": 2, "num_layers": 2,
           "max_position_embeddings": 16, "attention_types": types, "window_size": 4}
    expect_error(capsys, ["info", write_model_dir(tmp_path / "neo", cfg, {"x": np.zeros(1, np.float32)})],
                 "attention_types", "2 layers")


def test_neo_local_without_window(capsys, tmp_path):
    cfg = {"model_type": "gpt_neo", "vocab_size": 64, "hidden_size": 16, "num_heads": 2, "num_layers": 2,
           "max_position_embeddings": 16, "attention_types": [[["global", "local"], 1]], "window_size": 0}
    expect_error(capsys, ["info", write_model_dir(tmp_path / "neo", cfg, {"x": np.zeros(1, np.float32)})],
                 "window_size")


# ---------------------------------------------------------------------------------------------
# prompt, ids and options

def test_context_overflow(capsys, tiny_dir):
    ids = ",".join(["5"] * (N_CTX - 4))
    expect_error(capsys, ["generate", tiny_dir, "--ids", ids, "--max-new-tokens", 5],
                 f"{N_CTX - 4} tokens", "--max-new-tokens", "context", str(N_CTX))
    rc, out, err = run_cli(capsys, "generate", tiny_dir, "--ids", ids, "--max-new-tokens", 4)  # exactly fits
    assert rc == 0, err
    expect_error(capsys, ["logits", tiny_dir, "--ids", ",".join(["5"] * (N_CTX + 1)), "--out", tiny_dir / "x.npy"],
                 "context", str(N_CTX))
    text = "And God said unto Moses, " * 40
    expect_error(capsys, ["generate", tiny_dir, "--prompt", text, "--max-new-tokens", 1], "context")


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 100, -1])
def test_ids_out_of_range(capsys, tiny_dir, bad):
    expect_error(capsys, ["generate", tiny_dir, f"--ids=3,{bad},4"], f"token id {bad}", "out of range", str(VOCAB))
    expect_error(capsys, ["logits", tiny_dir, f"--ids={bad}", "--out", tiny_dir / "x.npy"], "out of range")


def test_empty_prompt(capsys, tiny_dir):
    expect_error(capsys, ["generate", tiny_dir, "--prompt", ""], "prompt is empty")
    expect_error(capsys, ["generate", tiny_dir, "--ids", ""], "prompt is empty")
    expect_error(capsys, ["logits", tiny_dir, "--ids", " , ", "--out", tiny_dir / "x.npy"], "--ids is empty")


@pytest.mark.parametrize("ids", ["1,x,3", "1;2", "0x10", "1.5", "one"])
def test_garbage_ids(capsys, tiny_dir, ids):
    expect_error(capsys, ["generate", tiny_dir, "--ids", ids], "--ids", "integers", ids)


@pytest.mark.parametrize("opt,val,needle", [("--temperature", "-1", "--temperature"), ("--top-k", "0", "--top-k"),
                                            ("--seed", "-1", "--seed"),
                                            ("--top-p", "1.5", "--top-p"), ("--top-p", "0", "--top-p"),
                                            ("--max-new-tokens", "0", "--max-new-tokens")])
def test_bad_sampling_options(capsys, tiny_dir, opt, val, needle):
    expect_error(capsys, ["generate", tiny_dir, "--ids", "1", opt, val], needle)


@pytest.mark.parametrize("text", ["", "a", "\n"], ids=["empty", "one-token", "newline"])
def test_perplexity_text_too_short(capsys, tiny_dir, tmp_path, text):
    from tokenizers import Tokenizer

    n = len(Tokenizer.from_file(str(tiny_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids)
    assert n < 2
    f = tmp_path / "short.txt"
    f.write_text(text)
    expect_error(capsys, ["perplexity", tiny_dir, "--text", f], f"{n} token", "at least 2")


def test_perplexity_bad_inputs(capsys, tiny_dir, tmp_path):
    expect_error(capsys, ["perplexity", tiny_dir, "--text", tmp_path / "none.txt"], "none.txt", "no such text file")
    heldout = MODELS / "kjv-heldout.txt"
    expect_error(capsys, ["perplexity", tiny_dir, "--text", heldout, "--ctx", N_CTX + 1], "--ctx")
    expect_error(capsys, ["perplexity", tiny_dir, "--text", heldout, "--ctx", 16, "--stride", 16], "--stride")


def test_no_tokenizer(capsys, tmp_path):
    d = _write(tmp_path, tokenizer=False)
    expect_error(capsys, ["generate", d, "--prompt", "And God said"], "tokenizer.json", "--ids")
    f = tmp_path / "t.txt"
    f.write_text("In the beginning God created the heaven and the earth.")
    expect_error(capsys, ["perplexity", d, "--text", f], "tokenizer.json")
    rc, out, err = run_cli(capsys, "generate", d, "--ids", "5,6,7", "--max-new-tokens", 3)
    assert rc == 0, err
    toks = [int(t) for t in out.split()]
    assert 1 <= len(toks) <= 3 and all(0 <= t < VOCAB for t in toks)
    assert len(toks) == 3 or toks[-1] == 0  # generation stops early only at EOS (id 0)


def test_bad_tokenizer_file(capsys, tiny_dir):
    (tiny_dir / "tokenizer.json").write_text("not a tokenizer")
    expect_error(capsys, ["generate", tiny_dir, "--prompt", "hi"], "tokenizer.json", "cannot load tokenizer")


def test_good_inputs_still_work(capsys, tiny_dir):
    """The fixtures themselves are valid: the errors above come from the one thing each test breaks."""
    rc, out, err = run_cli(capsys, "generate", tiny_dir, "--prompt", "And God said", "--max-new-tokens", 4)
    assert rc == 0 and out.startswith("And God said"), (out, err)
    rc, out, err = run_cli(capsys, "logits", tiny_dir, "--ids", "1,2,3", "--out", tiny_dir / "l.npy")
    assert rc == 0 and np.load(tiny_dir / "l.npy").shape == (3, VOCAB)
    rc, out, err = run_cli(capsys, "info", tiny_dir, "--json")
    assert rc == 0 and json.loads(out)["n_ctx"] == N_CTX


# ---------------------------------------------------------------------------------------------
# real processes: the console entry point prints no traceback either

def _run(*argv):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "gpt_fpga.host.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)


def test_subprocess_errors_exit_2_without_traceback(tmp_path):
    t = tiny_gpt2_tensors()
    del t["transformer.ln_f.bias"]
    d = _write(tmp_path, t)
    r = _run("generate", d, "--ids", "1")
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt-fpga: error: "), r.stderr
    assert str(d / "model.safetensors") in lines[0] and "missing tensor 'ln_f.bias'" in lines[0]

    r = _run("generate", tmp_path / "nope", "--ids", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such model directory" in r.stderr


def test_subprocess_success(tmp_path):
    d = _write(tmp_path)
    r = _run("generate", d, "--ids", "1,2", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) >= 1


def test_logits_writes_exactly_the_given_path(capsys, tiny_dir, tmp_path):
    out = tmp_path / "noext"
    rc, _, err = run_cli(capsys, "logits", tiny_dir, "--ids", "1,2,3", "--out", out)
    assert rc == 0 and str(out) in err, err
    arr = np.load(out)  # no '.npy' appended behind the user's back
    assert arr.shape == (3, 4096) and arr.dtype == np.float32
    expect_error(capsys, ["logits", tiny_dir, "--ids", "1", "--out", tmp_path], "is a directory")


def test_unwritable_outputs_fail_before_work(capsys, tiny_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expect_error(capsys, ["quantize", tiny_dir, "-o", blocker / "x.img"], str(blocker))
    expect_error(capsys, ["logits", tiny_dir, "--ids", "1", "--out", blocker / "x.npy"], str(blocker))


def test_group_is_only_for_int4(capsys, tiny_dir, tmp_path):
    expect_error(capsys, ["quantize", tiny_dir, "-o", tmp_path / "a.img", "--group", "64"], "--group", "int4")


def test_image_where_a_model_directory_is_expected(capsys, tiny_dir, tmp_path):
    img = tmp_path / "a.img"
    assert run_cli(capsys, "quantize", tiny_dir, "-o", img, "--calib-tokens", "16")[0] == 0
    expect_error(capsys, ["quantize", img, "-o", tmp_path / "b.img"], "is a file", "model directory")
    expect_error(capsys, ["generate", img, "--ids", "1"], "is a file", "--backend fixed")


def test_info_on_an_image(capsys, tiny_dir, tmp_path):
    import json

    img = tmp_path / "a.img"
    assert run_cli(capsys, "quantize", tiny_dir, "-o", img, "--weights", "int4", "--calib-tokens", "16")[0] == 0
    rc, out, err = run_cli(capsys, "info", img, "--json")
    info = json.loads(out)
    assert rc == 0 and info["image"]["hardware"]["weights"] == "int4" and list(info["bytes_per_token"]) == ["int4"]
    assert info["image"]["calibration"]["tokens"] == 16 and info["vocab"] == 4096
