"""AxiWriteDma: cocotb simulation against cocotbext-axi's RAM (sim/tb/axi_write.py), on Icarus and Verilator."""

import pytest

from gpt_fpga.hw.axi_write import AxiWriteDma
from gpt_fpga.sim.tb.runner import BUILD, SIMULATORS, run_cocotb, simulator_cases, write_verilog


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(SIMULATORS))
def test_axi_write(sim):
    dut = AxiWriteDma()
    run_cocotb("axi_write", dut, "gpt_fpga.sim.tb.axi_write", sim,
               params={"max_outstanding": dut.max_outstanding, "fifo_depth": dut.fifo_depth},
               tb_params={"latency": dut.latency, "w_latency": dut.w_latency})


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(["icarus"]))
def test_axi_write_small(sim):
    """The smallest FIFO (exactly one burst) and 2 bursts awaiting B: exact memory, limits held."""
    dut = AxiWriteDma(max_outstanding=2, fifo_depth=16)
    run_cocotb("axi_write", dut, "gpt_fpga.sim.tb.axi_write", sim,
               params={"max_outstanding": dut.max_outstanding, "fifo_depth": dut.fifo_depth},
               tb_params={"latency": dut.latency, "w_latency": dut.w_latency},
               testcase=["test_lengths_and_page_splits", "test_heavy_backpressure", "test_flush"])


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(["verilator"]))
@pytest.mark.parametrize("kw", [dict(), dict(data_bits=128, max_outstanding=4), dict(data_bits=32, max_outstanding=1,
                                                                                  fifo_depth=16)])
def test_axi_write_verilog_lint(sim, kw):
    """The Verilog passes `verilator --lint-only -Wno-WIDTH -Wno-CASEINCOMPLETE` (as make verilog's)."""
    import subprocess

    from gpt_fpga.hw.toolchain import verilator_env

    path = write_verilog(AxiWriteDma(**kw), "axi_write", BUILD / "lint" / f"axi_write-{len(kw)}.v")
    with verilator_env():
        r = subprocess.run(["verilator", "--lint-only", "-Wno-WIDTH", "-Wno-CASEINCOMPLETE", "--top-module",
                            "axi_write", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.parametrize("kw", [dict(data_bits=48), dict(data_bits=2048), dict(data_bits=True), dict(addr_bits=8),
                                dict(max_outstanding=0), dict(max_outstanding=1.5), dict(fifo_depth=8),
                                dict(fifo_depth=8192)])
def test_axi_write_rejects_bad_params(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        AxiWriteDma(**kw)


def test_axi_write_ports():
    dut = AxiWriteDma()
    assert dut.fifo_depth == 128
    names = {path[0] for path, _, _ in dut.signature.flatten(dut)}
    assert names == {"cmd", "s_data", "axi", "error", "beats", "idle", "flush"}
    assert len(dut.error) == len(dut.ERROR_BITS) == 2 and len(dut.beats) == 32
    assert (len(dut.cmd.addr), len(dut.cmd.beats), len(dut.s_data.tdata), len(dut.axi.wstrb)) == (32, 24, 64, 8)
