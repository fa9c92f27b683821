"""The decoder engine (hw/engine.py through hw/top.py): whole LAYER and HEAD commands from DDR, equal
to the fixed model (sim/fixed_model.py), in cocotb (sim/tb/engine.py) on Icarus and Verilator.

Random-weight checkpoints with odd shapes (sim/random_checkpoint.py), quantized by the real
quantizer: d_model not a power of two, 3 and 5 heads (head_dim not a multiple of the beat),
a GPT-Neo local window shorter than the prompt, d_ff not 4 d, a vocabulary that does not fill whole
beats, int8 and int4 weights, 64- and 128-bit buses, and one head (the attention step's reads with
no next head's keys in between). Each case also runs the error, abort and reset tests of
sim/tb/engine.py. The 128-bit image also runs on the two-port engine (two 64-bit read
managers over the same DDR, with different latencies and stalls, and an error on either port alone).
"""

from __future__ import annotations

import pytest

from gpt_fpga.hw.engine import Engine
from gpt_fpga.hw.top import TOP_NAME, verilog
from gpt_fpga.quantize.quantizer import quantize_checkpoint
from gpt_fpga.contract.image import read_image
from gpt_fpga.contract.layout import DEFAULT_GROUP
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
    # one head: the attention step reads K0, V0 only (no next head's K in between)
    "gpt2-1h-int8-128": ("gpt2", "int8", 32, 128, dict(vocab=37, d=40, heads=1, layers=1, n_ctx=16, d_ff=64),
                         [5, 30, 2]),
}
# small on-chip sizes keep the simulation model small; the real engine uses the contract's maxima
ENGINE_KW = dict(max_d=128, max_context=32, max_head_dim=64, max_heads=8)
# (simulator, case, ports): every case on the one-port engine, the 128-bit one also on two ports
RUNS = [("icarus", c, 1) for c in CASES] + [("icarus", "neo3h-int4-128", 2)]
# two-port engine: port 1 stalls more, and each port answers a burst this many cycles after its AR
TWO_PORT_TB = {"stall1": 0.4, "latency": [6, 23]}


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
@pytest.mark.parametrize("sim,case,ports", simulator_cases(RUNS, ids=[f"{s}-{c}-{p}port" for s, c, p in RUNS]))
def test_engine_equals_fixed_model(sim, case, ports):
    image = build_image(case)
    hw = read_image(image).hw
    engine = Engine(weights=hw.weights, group=hw.group, bus_bits=hw.bus_bits, ports=ports, **ENGINE_KW)
    params = {"case": case} | ({"ports": ports} if ports != 1 else {})
    run_cocotb("engine", engine, "gpt_fpga.sim.tb.engine", sim, params=params,
               tb_params={"image": image, "ids": CASES[case][-1], "stall": 0.2, "ports": ports}
               | (TWO_PORT_TB if ports == 2 else {}),
               top=TOP_NAME, verilog_text=verilog(engine))


@pytest.mark.parametrize("kw", [dict(ports=2), dict(ports=2, bus_bits=64), dict(ports=3, bus_bits=128),
                                dict(ports=0), dict(ports=True, bus_bits=128)])
def test_engine_rejects_bad_ports(kw):
    with pytest.raises(ValueError, match="ports must be 1, or 2 with bus_bits=128"):
        Engine(**kw)


def test_two_port_engine_signature_and_identity():
    """ports=2: m_axi (read and write) and m_axi1 (read only) at 64 bits each under the Vivado wrapper,
    the clock associated with all three AXI interfaces, and HW_CONFIG saying 128 bits over 2 ports."""
    from gpt_fpga.contract import registers as rm
    from gpt_fpga.hw.top import wrapper_ports, wrapper_verilog

    one, two = (Engine(weights="int4", bus_bits=128, ports=p, **ENGINE_KW) for p in (1, 2))
    assert set(two.signature.members) == set(one.signature.members) | {"m_axi1_r"}
    assert len(two.m_axi_r.rdata) == len(two.m_axi_w.wdata) == len(two.m_axi1_r.rdata) == 64
    assert len(one.m_axi_r.rdata) == len(one.m_axi_w.wdata) == 128
    tops = {top: (d, w) for top, _, d, w in wrapper_ports(two)}
    port1 = {t for t in tops if t.startswith("m_axi1_")}
    assert port1 == {f"m_axi1_{n}" for n in ("araddr", "arlen", "arsize", "arburst", "arid", "arcache", "arprot",
                                             "arvalid", "arready", "rdata", "rresp", "rlast", "rid", "rvalid",
                                             "rready")}
    assert tops["m_axi1_rdata"] == ("input", 64) and tops["m_axi_wdata"] == ("output", 64)
    assert "ASSOCIATED_BUSIF s_axi:m_axi:m_axi1," in wrapper_verilog(two)
    assert "ASSOCIATED_BUSIF s_axi:m_axi," in wrapper_verilog(one)
    hw = rm.register("HW_CONFIG")
    # int4 (code 1) at the default group, which the identity reports
    assert hw.unpack(two.identity()["HW_CONFIG"]) == {"bus_bits": 128, "weights": 1, "group": DEFAULT_GROUP,
                                                      "ports": 2}
    assert hw.unpack(one.identity()["HW_CONFIG"])["ports"] == 1
