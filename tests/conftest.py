"""Shared helpers: the missing-tool rule, the in-process CLI, random-init reference models and small
checkpoint directories.

Nothing here reads /work/shared: reference models are built live with transformers from a config,
and the tiny checkpoints for the error tests are written with NumPy.

Missing tools (one rule, :func:`tool_missing`): a test that needs something not installed (a
simulator, torch, transformers) carries a ``missing_tool(what, install)`` mark, added at collection
by :func:`requires_modules` or by ``sim/tb/runner.py::simulator_cases``. At setup the mark skips the
test, or, when the environment says ``CI=true`` (``.ci/run``), fails it naming what to install: on CI a
green run must mean every test ran.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import socket
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
KJV_TOKENIZER = MODELS / "gpt2-kjv" / "tokenizer.json"  # BPE, 4096 ids, <|endoftext|> = 0


# ---------------------------------------------------------------------------------------------
# missing tools: skipped locally, a failure under CI=true

MISSING_TOOL_MARK = "missing_tool"  # also spelled in sim/tb/runner.py::simulator_cases
PIP_TEST = "pip install -e '.[test]' / make install-dev"
INSTALL = {"torch": PIP_TEST, "transformers": PIP_TEST}


def skipping_forbidden() -> bool:
    """True on CI: the environment variable CI is 'true' (or '1' / 'yes', any case)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def tool_missing(what: str, install: str):
    """The one rule for a test whose tool is not installed: skip it, or fail it under CI=true."""
    if skipping_forbidden():
        pytest.fail(f"{what} is not installed (CI=true forbids skipping): {install}", pytrace=False)
    pytest.skip(f"{what} is not installed: {install}")


def module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def requires_modules(*names: str) -> list:
    """``pytestmark`` for tests that import `names`: a missing_tool mark for each one not installed."""
    return [getattr(pytest.mark, MISSING_TOOL_MARK)(f"{n} (Python package)", INSTALL.get(n, PIP_TEST))
            for n in names if not module_available(n)]


def optional_import(name: str) -> ModuleType | None:
    """The module, or None when it is not installed (tests using it carry requires_modules(name))."""
    return importlib.import_module(name) if module_available(name) else None


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MISSING_TOOL_MARK}(what, install): a tool the test needs is not installed "
                                       "(skip; fail under CI=true)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for mark in item.iter_markers(MISSING_TOOL_MARK):
        tool_missing(*mark.args)


# ---------------------------------------------------------------------------------------------
# the command line, in process

def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`gpt-fpga argv...` through host.cli.main: (exit code, stdout, stderr)."""
    from gpt_fpga.host.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def expect_error(capsys, argv, *needles):
    """Run the CLI in-process; it must exit 2 with one 'gpt-fpga: error:' line naming every needle."""
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt-fpga: error: "), err
    for n in needles:
        assert n.lower() in err.lower(), f"{n!r} not in {err!r}"
    return err


# ---------------------------------------------------------------------------------------------
# transformers reference models (torch is imported lazily: only the HF tests pay for it)

def _torch():
    import torch

    torch.set_num_threads(2)
    return torch


def hf_config(family: str, **kw):
    """A transformers config with dropout off; `kw` uses the transformers names of the family."""
    from transformers import GPT2Config, GPTNeoConfig

    if family == "gpt2":
        base = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        base.update(kw)
        return GPT2Config(**base)
    base = dict(vocab_size=97, max_position_embeddings=32, hidden_size=32, num_layers=2, num_heads=4,
                attention_types=[[["global", "local"], 1]], window_size=8, initializer_range=0.2,
                embed_dropout=0.0, attention_dropout=0.0, resid_dropout=0.0, bos_token_id=0, eos_token_id=0)
    base.update(kw)
    return GPTNeoConfig(**base)


def hf_random_model(family: str, seed: int = 0, **kw):
    """A random-init GPT2LMHeadModel / GPTNeoForCausalLM in float32, eval mode.

    transformers initialises biases to 0 and LayerNorm to (1, 0); those are randomised too so that
    a bias or LayerNorm parameter that is dropped or misplaced changes the logits.
    """
    torch = _torch()
    from transformers import GPT2LMHeadModel, GPTNeoForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, **kw)
    cls = GPT2LMHeadModel if family == "gpt2" else GPTNeoForCausalLM
    model = cls(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif ".ln_" in name and name.endswith(".weight"):
                p.normal_(1.0, 0.1)
    return model


def save_hf(model, out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "config.json").is_file()
    return out_dir


def hf_logits(model, ids) -> np.ndarray:  # [n] -> [n, v] float32
    torch = _torch()
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False).logits[0]
    assert out.dtype == torch.float32
    return out.numpy()


def float_model(model_dir: Path):
    from gpt_fpga.quantize.checkpoint import load_checkpoint
    from gpt_fpga.sim.float_model import FloatModel

    ck = load_checkpoint(model_dir)
    return FloatModel(ck.config, ck.params)


# ---------------------------------------------------------------------------------------------
# tiny NumPy-written GPT-2 checkpoint for CLI / error tests (no torch needed; see sim/random_checkpoint.py)

TINY_GPT2 = dict(vocab=4096, d=16, heads=2, layers=2, n_ctx=32, d_ff=48)


def tiny_gpt2_config(**kw) -> dict:
    """The config.json dict of the tiny GPT-2 (TINY_GPT2, overridden by `kw`: vocab, d, heads, ...)."""
    return make_config("gpt2", **{**TINY_GPT2, **kw})


def tiny_gpt2_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """HF GPT-2 tensor names and [in, out] Conv1D layouts of the tiny GPT-2, random float32."""
    return random_tensors(tiny_gpt2_config(), seed)


def write_model_dir(out: Path, config: dict, tensors: dict[str, np.ndarray], tokenizer: bool = True) -> Path:
    """config.json + model.safetensors, plus the KJV tokenizer.json when `tokenizer`."""
    return write_checkpoint(out, config, tensors, KJV_TOKENIZER if tokenizer else None)


# a smaller one, without tokenizer.json, for the fixed model and image tests
TINY_MODEL = dict(vocab=64, d=32, heads=2, layers=2, n_ctx=32)


def write_tiny_model(out: Path, family: str, seed: int = 0, window: int = 3) -> Path:
    """TINY_MODEL of `family` (gpt2 | gpt_neo), random weights, no tokenizer.json. Neo: layer 0 local
    (`window`, shorter than the tests' sequences), layer 1 global."""
    cfg = make_config(family, **TINY_MODEL, attention_types=[[["local", "global"], 1]], window_size=window)
    return write_checkpoint(out, cfg, random_tensors(cfg, seed))


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A fresh, writable tiny GPT-2 directory with the KJV tokenizer (vocab 4096, n_ctx 32)."""
    return write_model_dir(tmp_path / "tiny", tiny_gpt2_config(), tiny_gpt2_tensors())


# ---------------------------------------------------------------------------------------------
# gpt-fpga serve on loopback (tests/test_serve*.py)

@contextlib.contextmanager
def running_server(app, timeout_s: float = 30.0):
    """Serve the ASGI `app` with uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"
