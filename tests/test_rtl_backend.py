"""`--backend rtl`: the engine's RTL (Verilator, host/rtl_device.py) through the board's driver
(host/driver.py) equals `--backend fixed`, token for token and logit for logit.

* both bundled models, int8 and int4 (the default group, 128; the odd shapes below use group 32):
  64 greedy tokens; every step's int32 logits identical; then reset() and a second prompt, identical again;
* random-weight checkpoints with odd shapes (rows that are not a multiple of 16 bytes);
* each on the one-port 64-bit engine and on the board's default two-port engine (a 128-bit image:
  two 64-bit ports with different latencies, sharing the DDR model's bandwidth);
* the command line: `generate`, `logits --int32` and `compare --backend rtl`.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import MODELS, run_cli
from gpt_fpga.host.backends import FixedBackend, RtlBackend
from gpt_fpga.quantize.quantizer import quantize_checkpoint
from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint
from gpt_fpga.sim.tb.runner import simulator_cases

pytestmark = pytest.mark.sim
VERILATOR = simulator_cases(["verilator"])  # the missing-tool policy of the suite (fails under CI)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("rtl-images")
    made = {}
    for model in ("gpt2-kjv", "neo-kjv"):
        for weights in ("int8", "int4"):
            for bus in (64, 128):
                img = out / f"{model}-{weights}-{bus}.img"
                quantize_checkpoint(MODELS / model, img, weights=weights, bus_bits=bus, progress=False)  # default group
                made[(model, weights, bus)] = img
    odd = [("neo-odd", "gpt_neo", "int4", dict(vocab=301, d=60, heads=5, layers=3, n_ctx=40, d_ff=100,
                                                attention_types=[[["local", "global", "local"], 1]], window_size=7)),
           ("gpt2-odd", "gpt2", "int8", dict(vocab=77, d=36, heads=3, layers=2, n_ctx=24, d_ff=40))]
    for name, family, weights, kw in odd:
        cfg = make_config(family, **kw)
        model_dir = write_checkpoint(out / name, cfg, random_tensors(cfg, seed=3))
        for bus in (64, 128):
            img = out / f"{name}-{bus}.img"
            quantize_checkpoint(model_dir, img, weights=weights, group=32, bus_bits=bus, calib_tokens=32,
                                progress=False)
            made[(name, weights, bus)] = img
    return made


def rtl_backend(img) -> RtlBackend:
    """The RTL backend; on the two-port engine, port 1 answers later than port 0 (its own latency)."""
    rtl = RtlBackend(img)
    if rtl.device.ports == 2:
        rtl.device.configure_port(1, read_latency=113)
    return rtl


def greedy_equal(fixed, rtl, prompt: list[int], new_tokens: int) -> list[int]:
    """Feed the prompt and `new_tokens` greedy tokens to both; every step's int32 logits must be equal."""
    fixed.reset(), rtl.reset()
    ids, nxt = list(prompt), None
    for step in range(len(prompt) + new_tokens):
        tok = ids[step] if step < len(prompt) else nxt
        if step >= len(prompt):
            ids.append(tok)
        want = fixed.forward_int([tok])[0]
        got = rtl.forward_int([tok])[0]
        bad = np.nonzero(got != want)[0]
        assert not len(bad), (f"step {step} (position {step}, token {tok}): {len(bad)} logits differ, first "
                              f"[{bad[0]}] rtl {got[bad[0]]} fixed {want[bad[0]]}")
        nxt = int(np.argmax(want))
    assert rtl.position == fixed.position == len(ids)
    return ids


@pytest.mark.parametrize("sim", VERILATOR)
@pytest.mark.parametrize("bus", [64, 128])
@pytest.mark.parametrize("model,weights", [("gpt2-kjv", "int8"), ("gpt2-kjv", "int4"), ("neo-kjv", "int8"),
                                           ("neo-kjv", "int4")])
def test_bundled_models_64_greedy_tokens(images, sim, model, weights, bus):
    img = images[(model, weights, bus)]
    fixed, rtl = FixedBackend(img), rtl_backend(img)
    assert rtl.device.ports == (2 if bus == 128 else 1)
    first = greedy_equal(fixed, rtl, fixed.codec.encode("And God said"), 64)
    assert len(first) == len(fixed.codec.encode("And God said")) + 64
    # reset, then a second, different prompt: no state leaks from the first sequence
    greedy_equal(fixed, rtl, fixed.codec.encode("In the beginning"), 8)


@pytest.mark.parametrize("sim", VERILATOR)
@pytest.mark.parametrize("bus", [64, 128])
@pytest.mark.parametrize("name,weights", [("neo-odd", "int4"), ("gpt2-odd", "int8")])
def test_odd_shapes(images, sim, name, weights, bus):
    img = images[(name, weights, bus)]
    fixed, rtl = FixedBackend(img), rtl_backend(img)
    n_ctx = fixed.config.n_ctx
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, fixed.config.vocab_size, 5)]
    greedy_equal(fixed, rtl, prompt, n_ctx - len(prompt))  # up to the last position of the context


@pytest.mark.parametrize("sim", VERILATOR)
def test_cli_rtl_backend(images, sim, tmp_path, capsys):
    img = images[("gpt2-kjv", "int4", 64)]
    args = ["--prompt", "And God said", "--max-new-tokens", "12"]
    rc_f, fixed, _ = run_cli(capsys, "generate", img, "--backend", "fixed", *args)
    rc_r, rtl, err = run_cli(capsys, "generate", img, "--backend", "rtl", *args)
    assert rc_f == 0 and rc_r == 0, err
    assert rtl == fixed and len(rtl.split()) > 3
    for backend in ("fixed", "rtl"):
        rc, _, err = run_cli(capsys, "logits", img, "--backend", backend, "--ids", "5,17,300", "--int32", "--out",
                             tmp_path / f"{backend}.npy")
        assert rc == 0, err
    a, b = np.load(tmp_path / "fixed.npy"), np.load(tmp_path / "rtl.npy")
    assert a.dtype == np.int32 and a.shape == (3, 4096) and np.array_equal(a, b)
    rc, _, err = run_cli(capsys, "logits", MODELS / "gpt2-kjv", "--ids", "5", "--int32", "--out", tmp_path / "f.npy")
    assert rc == 2 and "--int32 needs an image backend" in err
    rc, out, err = run_cli(capsys, "compare", img, "--backend", "rtl", "--text", MODELS / "kjv-heldout.txt",
                           "--tokens", "6", "--out", tmp_path / "cmp")
    assert rc == 0, err
    assert "rtl == fixed" in out and (tmp_path / "cmp" / "compare.json").is_file()
