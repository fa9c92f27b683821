"""AttnScores core (hw/attn_scores.py): cocotb simulation (sim/tb/attn_scores.py) against
numerics.attention_scores, on Icarus and Verilator."""

import gc

import pytest

from gpt_fpga.hw.attn_scores import ERROR_BITS, AttnScores
from gpt_fpga.contract import numerics
from gpt_fpga.sim.tb.runner import SIMULATORS, run_cocotb, simulator_cases

# The 64-bit core on both simulators (every test, including n_keys 2048); the 128-bit core on
# Verilator without the long job, to keep the suite short.
CASES = [(s, 64, True) for s in SIMULATORS] + [("verilator", 128, False)]
TIMED_JOBS = [(64, 17), (8, 40), (20, 9), (8, 1), (16, 1), (256, 3)]  # (head_dim, n_keys) of test_latency_throughput


@pytest.mark.sim
@pytest.mark.parametrize("sim,bus_bits,long", simulator_cases(CASES, ids=[f"{s}-b{b}" for s, b, _ in CASES]))
def test_attn_scores(sim, bus_bits, long):
    dut = AttnScores(bus_bits=bus_bits)
    params = {"bus_bits": bus_bits}
    tb = {"max_head_dim": dut.max_head_dim, "max_keys": dut.max_keys, "latency": dut.latency,
          "cycles_per_job": [[hd, n, dut.cycles_per_job(n, hd)] for hd, n in TIMED_JOBS],
          "errors": list(ERROR_BITS), "long": long}
    run_cocotb("attn_scores", dut, "gpt_fpga.sim.tb.attn_scores", sim, params=params, tb_params=tb)


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
])
def test_attn_scores_rejects_bad_params(kw, match):
    with pytest.raises(ValueError, match=match) as excinfo:
        AttnScores(**kw)
    del excinfo
    gc.collect()


@pytest.mark.parametrize("bus_bits", [64, 128])
def test_attn_scores_ports_and_softmax_connection(bus_bits):
    """The documented port widths; m_scores has Softmax.s_scores' signature, so they connect."""
    from amaranth import Module
    from amaranth.hdl import Fragment
    from amaranth.lib import wiring

    from gpt_fpga.hw.softmax import Softmax

    dut = AttnScores(bus_bits=bus_bits)
    assert len(dut.s_q.tdata) == len(dut.s_k.tdata) == bus_bits
    assert len(dut.m_scores.tdata) == 32 and len(dut.m_scores.tuser) == 1
    assert len(dut.head_dim) == 9 and len(dut.n_keys) == 12 and len(dut.error) == len(ERROR_BITS) == 6
    assert dut.latency == 9 and dut.throughput == 1
    assert dut.cycles_per_job(17, 64) == 18 * (64 // (bus_bits // 8))
    m = Module()
    sm = Softmax()
    m.submodules.scores, m.submodules.softmax = dut, sm
    wiring.connect(m, dut.m_scores, sm.s_scores)
    Fragment.get(m, None)
