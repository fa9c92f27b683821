"""The decoder engine (hw/engine.py through hw/top.py): whole LAYER and HEAD commands from DDR, equal
to the fixed model (sim/fixed_model.py), in cocotb (sim/tb/engine.py) on Icarus and Verilator.

Random-weight checkpoints with odd shapes (sim/random_checkpoint.py), quantized by the real
quantizer: d_model not a power of two, 3 and 5 heads (head_dim not a multiple of the beat),
a GPT-Neo local window shorter than the prompt, d_ff not 4 d, a vocabulary that does not fill whole
beats, int8 and int4 weights, 64- and 128-bit buses. Each case also runs the error, abort and reset
tests of sim/tb/engine.py.
"""

from __future__ import annotations

import pytest

from gpt_fpga.hw.engine import Engine
from gpt_fpga.hw.top import TOP_NAME, verilog
from gpt_fpga.quantize.quantizer import quantize_checkpoint
from gpt_fpga.contract.image import read_image
from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint
from gpt_fpga.sim.tb.runner import BUILD, run_cocotb, simulator_cases

# (name, family, weights, group, bus bits, config kwargs, prompt ids)
CASES = {
    "neo5h-int8": ("gpt_neo", "int8", 32, 64, dict(vocab=75, d=60, heads=5, layers=2, n_ctx=16, d_ff=100,
                                                attention_types=[[["global", "local"], 1]], window_size=3),
                   [3, 17, 42, 5, 64]),
    "gpt2-3h-int4": ("gpt2", "int4", 32, 64, dict(vocab=53, d=48, heads=3, layers=2, n_ctx=16, d_ff=80),
                     [1, 52, 7, 30]),
    "neo3h-int4-128": ("gpt_neo", "int4", 32, 128, dict(vocab=45, d=36, heads=3, layers=2, n_ctx=16, d_ff=52,
                                                        attention_types=[[["local", "global"], 1]], window_size=2),
                       [44, 0, 9]),
}
# small on-chip sizes keep the simulation model small; the real engine uses the contract's maxima
ENGINE_KW = dict(max_d=128, max_context=32, max_head_dim=64, max_heads=8)


def build_image(name: str) -> str:
    family, weights, group, bus_bits, kw, _ = CASES[name]
    out = BUILD / "engine" / "images"
    out.mkdir(parents=True, exist_ok=True)
    img = out / f"{name}.img"
    if not img.is_file():
        cfg = make_config(family, **kw)
        model_dir = write_checkpoint(out / name, cfg, random_tensors(cfg, seed=11))
        quantize_checkpoint(model_dir, img, weights=weights, group=group, bus_bits=bus_bits, calib_tokens=32,
                            progress=False)
    return str(img)


# Engine-level tests run on Icarus (no compile step: the engine's Verilator build under cocotb's VPI takes
# minutes). Whole models run on Verilator through the driver: tests/test_rtl_backend.py.
@pytest.mark.sim
@pytest.mark.parametrize("sim,case", simulator_cases([("icarus", c) for c in CASES]))
def test_engine_equals_fixed_model(sim, case):
    image = build_image(case)
    hw = read_image(image).hw
    engine = Engine(weights=hw.weights, group=hw.group, bus_bits=hw.bus_bits, **ENGINE_KW)
    run_cocotb("engine", engine, "gpt_fpga.sim.tb.engine", sim, params={"case": case},
               tb_params={"image": image, "ids": CASES[case][-1], "stall": 0.2},
               top=TOP_NAME, verilog_text=verilog(engine))
