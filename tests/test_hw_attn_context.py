"""AttnContext core (hw/attn_context.py): cocotb simulation (sim/tb/attn_context.py) against
numerics.attention_context and numerics.requantize, on Icarus and Verilator."""

import gc

import pytest

from gpt_fpga.hw.attn_context import ERROR_BITS, AttnContext
from gpt_fpga.contract import numerics
from gpt_fpga.sim.tb.runner import SIMULATORS, run_cocotb, simulator_cases

# The 64-bit core on both simulators (every test, including n_keys 2048); the 128-bit core on
# Verilator without the long job, to keep the suite short; and a read-out requantizing every lane
# of a word at once (one output beat per cycle).
CASES = [(s, 64, True, 1) for s in SIMULATORS] + [("verilator", 128, False, 1), ("verilator", 64, False, 8)]
TIMED_JOBS = [(64, 17), (8, 40), (20, 9), (8, 1), (16, 1), (256, 3)]  # (head_dim, n_keys) of test_latency_throughput


@pytest.mark.sim
@pytest.mark.parametrize("sim,bus_bits,long,requant_lanes",
                         simulator_cases(CASES, ids=[f"{s}-b{b}-r{r}" for s, b, _, r in CASES]))
def test_attn_context(sim, bus_bits, long, requant_lanes):
    dut = AttnContext(bus_bits=bus_bits, requant_lanes=requant_lanes)
    params = {"bus_bits": bus_bits, "requant_lanes": requant_lanes}
    tb = {"max_head_dim": dut.max_head_dim, "max_keys": dut.max_keys, "latency": dut.latency,
          "out_interval": dut.out_interval,
          "cycles_per_job": [[hd, n, dut.cycles_per_job(n, hd)] for hd, n in TIMED_JOBS],
          "errors": list(ERROR_BITS), "long": long}
    run_cocotb("attn_context", dut, "gpt_fpga.sim.tb.attn_context", sim, params=params, tb_params=tb)


# ---- elaboration-time checks (no simulator) ---------------------------------------------------
@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
@pytest.mark.parametrize("kw,match", [
    (dict(bus_bits=32), "bus_bits"),
    (dict(bus_bits=True), "bus_bits"),
    (dict(max_head_dim=0), "max_head_dim"),
    (dict(max_head_dim=numerics.MAX_HEAD_DIM + 1), "max_head_dim"),
    (dict(max_head_dim=64.0), "max_head_dim"),
    (dict(max_keys=0), "max_keys"),
    (dict(max_keys=numerics.MAX_CONTEXT + 1), "max_keys"),
    (dict(requant_lanes=0), "requant_lanes"),
    (dict(requant_lanes=3), "requant_lanes"),
    (dict(bus_bits=64, requant_lanes=16), "requant_lanes"),
    (dict(requant_lanes=True), "requant_lanes"),
])
def test_attn_context_rejects_bad_params(kw, match):
    with pytest.raises(ValueError, match=match) as excinfo:
        AttnContext(**kw)
    del excinfo
    gc.collect()


@pytest.mark.parametrize("bus_bits", [64, 128])
def test_attn_context_ports_and_softmax_connection(bus_bits):
    """The documented port widths and timing; s_p has Softmax.m_probs' signature, so they connect."""
    from amaranth import Module
    from amaranth.hdl import Fragment
    from amaranth.lib import wiring

    from gpt_fpga.hw.softmax import Softmax

    dut = AttnContext(bus_bits=bus_bits)
    assert len(dut.s_v.tdata) == len(dut.m_ctx.tdata) == bus_bits and len(dut.s_p.tdata) == 16
    assert len(dut.head_dim) == 9 and len(dut.n_keys) == 12
    assert len(dut.ctx_mult) == numerics.MULT_BITS and len(dut.ctx_shift) == 6
    assert len(dut.error) == len(ERROR_BITS) == 7
    # one requantization lane: a word's bus_bits / 8 values take as many cycles
    lanes = bus_bits // 8
    latency = {64: 21, 128: 29}[bus_bits]
    assert dut.latency == latency and dut.throughput == 1 and dut.out_interval == lanes
    nb = 64 // lanes  # head_dim 64: the last output beat comes (nb - 1) * lanes cycles after the first
    assert dut.cycles_per_job(17, 64) == 17 * nb + latency - 1 + (nb - 1) * lanes
    wide = AttnContext(bus_bits=bus_bits, requant_lanes=lanes)  # every lane at once: the output at one beat per cycle
    assert wide.out_interval == 1 and wide.latency == 14 + max(0, lanes - 7)
    assert wide.cycles_per_job(17, 64) == 17 * nb + wide.latency - 1 + nb - 1
    sm = Softmax()
    m = Module()
    m.submodules.softmax, m.submodules.context = sm, dut
    wiring.connect(m, sm.m_probs, dut.s_p)
    Fragment.get(m, None)
