"""AxiReadDma: cocotb simulation against a latency RAM (sim/tb/axi_read.py), on Icarus and Verilator."""

import pytest

from gpt_fpga.hw.axi_read import AxiReadDma
from gpt_fpga.sim.tb.runner import BUILD, SIMULATORS, run_cocotb, simulator_cases, write_verilog


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(SIMULATORS))
def test_axi_read(sim):
    dut = AxiReadDma()
    run_cocotb("axi_read", dut, "gpt_fpga.sim.tb.axi_read", sim,
               params={"max_outstanding": dut.max_outstanding, "fifo_depth": dut.fifo_depth},
               tb_params={"ar_latency": dut.ar_latency, "r_latency": dut.r_latency})


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(["icarus"]))
def test_axi_read_small(sim):
    """The smallest FIFO (one burst of credits) and 2 bursts in flight: exact data, limits held."""
    dut = AxiReadDma(max_outstanding=2, fifo_depth=16)
    run_cocotb("axi_read", dut, "gpt_fpga.sim.tb.axi_read", sim,
               params={"max_outstanding": dut.max_outstanding, "fifo_depth": dut.fifo_depth},
               tb_params={"ar_latency": dut.ar_latency, "r_latency": dut.r_latency},
               testcase=["test_lengths_and_page_splits", "test_heavy_backpressure", "test_flush"])


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(["verilator"]))
@pytest.mark.parametrize("kw", [dict(), dict(data_bits=128, max_outstanding=4), dict(data_bits=32, max_outstanding=1,
                                                                                  fifo_depth=16)])
def test_axi_read_verilog_lint(sim, kw):
    """The Verilog passes `verilator --lint-only -Wno-WIDTH -Wno-CASEINCOMPLETE` (as make verilog's)."""
    import subprocess

    from gpt_fpga.hw.toolchain import verilator_env

    path = write_verilog(AxiReadDma(**kw), "axi_read", BUILD / "lint" / f"axi_read-{len(kw)}.v")
    with verilator_env():
        r = subprocess.run(["verilator", "--lint-only", "-Wno-WIDTH", "-Wno-CASEINCOMPLETE", "--top-module",
                            "axi_read", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.parametrize("kw", [dict(data_bits=48), dict(data_bits=2048), dict(data_bits=True), dict(addr_bits=8),
                                dict(max_outstanding=0), dict(max_outstanding=1.5), dict(fifo_depth=8),
                                dict(fifo_depth=8192)])
def test_axi_read_rejects_bad_params(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        AxiReadDma(**kw)


def test_axi_read_ports():
    dut = AxiReadDma()
    assert dut.fifo_depth == 128 and dut.latency == dut.ar_latency + dut.r_latency
    assert len(dut.error) == len(dut.ERROR_BITS) == 1 and len(dut.beats) == 32
    assert (len(dut.cmd.addr), len(dut.cmd.beats), len(dut.m_data.tdata)) == (32, 24, 64)
    names = {path[0] for path, _, _ in dut.signature.flatten(dut)}
    assert names == {"cmd", "m_data", "axi", "error", "beats", "idle", "flush"}
