"""TwoPortReadDma: cocotb simulation against two latency RAMs over one memory (sim/tb/axi_read_2port.py),
on Icarus and Verilator."""

import pytest

from gpt_fpga.hw.axi_read_2port import TwoPortReadDma
from gpt_fpga.sim.tb.runner import BUILD, SIMULATORS, run_cocotb, simulator_cases, write_verilog


def _run(dut, sim, testcase=None):
    run_cocotb("axi_read_2port", dut, "gpt_fpga.sim.tb.axi_read_2port", sim,
               params={"max_outstanding": dut.max_outstanding, "fifo_depth": dut.fifo_depth},
               tb_params={"ar_latency": dut.ar_latency, "r_latency": dut.r_latency, "latency": dut.latency},
               testcase=testcase)


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(SIMULATORS))
def test_axi_read_2port(sim):
    _run(TwoPortReadDma(), sim)


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(["icarus"]))
def test_axi_read_2port_small(sim):
    """Small FIFOs (two longest bursts of credits per port) and 2 bursts in flight per port."""
    _run(TwoPortReadDma(max_outstanding=2, fifo_depth=32), sim,
         ["test_random_commands", "test_one_port_late_or_slow", "test_flush"])


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(["verilator"]))
@pytest.mark.parametrize("kw", [dict(), dict(data_bits=256, max_outstanding=4), dict(data_bits=64, max_outstanding=1)])
def test_axi_read_2port_verilog_lint(sim, kw):
    """The Verilog passes `verilator --lint-only -Wno-WIDTH -Wno-CASEINCOMPLETE` (as make verilog's)."""
    import subprocess

    from gpt_fpga.hw.toolchain import verilator_env

    path = write_verilog(TwoPortReadDma(**kw), "axi_read_2port", BUILD / "lint" / f"axi_read_2port-{len(kw)}.v")
    with verilator_env():
        r = subprocess.run(["verilator", "--lint-only", "-Wno-WIDTH", "-Wno-CASEINCOMPLETE", "--top-module",
                            "axi_read_2port", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.parametrize("kw", [dict(data_bits=48), dict(data_bits=8), dict(data_bits=4096), dict(data_bits=True),
                                dict(addr_bits=8), dict(max_outstanding=0), dict(fifo_depth=8),
                                dict(fifo_depth=17), dict(fifo_depth=8192)])
def test_axi_read_2port_rejects_bad_params(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        TwoPortReadDma(**kw)


def test_axi_read_2port_ports():
    dut = TwoPortReadDma()
    assert dut.fifo_depth == 128 and dut.latency == dut.ar_latency + 1 + dut.r_latency
    assert len(dut.error) == len(dut.ERROR_BITS) == 1 and len(dut.beats) == 32
    assert (len(dut.cmd.addr), len(dut.cmd.beats), len(dut.m_data.tdata)) == (32, 24, 128)
    assert len(dut.axi0.rdata) == len(dut.axi1.rdata) == 64 and len(dut.axi0.araddr) == 32
    names = {path[0] for path, _, _ in dut.signature.flatten(dut)}
    assert names == {"cmd", "m_data", "axi0", "axi1", "error", "beats", "idle", "flush", "only"}
