"""`gpt-fpga serve --backend rtl`: the engine's RTL (Verilator) through the board's driver, behind the server.

Kept small (a few tokens on the bundled gpt2-kjv, the one-port 64-bit engine): greedy completion and
stream equal `gpt-fpga generate --backend rtl`; each streamed token carries the engine's cycle counters;
/health names the engine; a real driver timeout answers 500 and the next request is served.
"""

from __future__ import annotations

import json

import openai
import pytest

from conftest import MODELS, run_cli, running_server
from gpt_fpga.contract import registers as rm
from gpt_fpga.host.backends import RtlBackend
from gpt_fpga.host.serve import create_app
from gpt_fpga.quantize.quantizer import quantize_checkpoint
from gpt_fpga.sim.tb.runner import simulator_cases
from test_serve import MODEL_ID, PROMPT, client, get

pytestmark = pytest.mark.sim
VERILATOR = simulator_cases(["verilator"])  # the suite's missing-tool rule (fails under CI)
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def rtl_image(tmp_path_factory):
    img = tmp_path_factory.mktemp("serve-rtl") / f"{MODEL_ID}.img"
    quantize_checkpoint(MODELS / "gpt2-kjv", img, weights="int8", bus_bits=64, progress=False)
    return img


@pytest.mark.parametrize("sim", VERILATOR)
def test_rtl_backend_behind_the_server(sim, rtl_image, capsys):
    rc, out, err = run_cli(capsys, "generate", rtl_image, "--backend", "rtl", "--prompt", PROMPT,
                           "--max-new-tokens", str(NEW_TOKENS))
    assert rc == 0, err
    want = out[len(PROMPT):-1]  # generate prints the prompt, the new text and a newline
    backend = RtlBackend(rtl_image)
    with running_server(create_app(backend, MODEL_ID)) as url:
        got = client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
        assert out == PROMPT + got.choices[0].text + "\n" and len(want.split()) >= 2
        assert got.usage.completion_tokens == NEW_TOKENS

        chunks = list(client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=NEW_TOKENS,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == want
        tokens = [c for c in chunks if c.choices[0].finish_reason is None]
        assert len(tokens) == NEW_TOKENS
        n_layer, clock = backend.config.n_layer, backend.device.clock_hz
        for c in tokens:
            engine = c.model_extra["engine"]
            assert [e["command"] for e in engine] == [f"LAYER {i}" for i in range(n_layer)] + ["HEAD"]
            assert all(e["cycles"] > 0 and e["us"] == pytest.approx(e["cycles"] / clock * 1e6, abs=1e-3)
                       for e in engine)

        health = json.loads(get(url, "/health")[1])
        assert health["backend"] == "rtl" and health["engine"]["ID"] == rm.ENGINE_MAGIC
        assert health["engine"]["clock_hz"] == clock and health["engine"]["HW_CONFIG"]["bus_bits"] == 64

        # a real device error: the driver's timeout, shorter than any command
        timeouts = dict(backend.model.timeouts)
        backend.model.timeouts = {name: 1e-6 for name in timeouts}
        with pytest.raises(openai.InternalServerError) as info:
            client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
        assert "LAYER 0 at position 0 did not finish within" in info.value.body["message"]
        backend.model.timeouts = timeouts
        again = client(url).completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0)
        assert again.choices[0].text == want
