"""Gelu core: cocotb simulation against numerics.gelu (tables from numerics.gelu_table)."""

import pytest

from gpt_fpga.hw.gelu import Gelu
from gpt_fpga.sim.tb.runner import SIMULATORS, run_cocotb, simulator_cases


@pytest.mark.sim
@pytest.mark.parametrize("lanes", [1, 4])
@pytest.mark.parametrize("sim", simulator_cases(SIMULATORS))
def test_gelu(sim, lanes):
    dut = Gelu(lanes=lanes)
    run_cocotb("gelu", dut, "gpt_fpga.sim.tb.gelu", sim, params={"lanes": lanes}, tb_params={"latency": dut.latency})


def test_gelu_error_port():
    """Gelu has no error cause; its error output exists (always 0) so that every core has one."""
    assert Gelu.ERROR_BITS == () and len(Gelu(lanes=1).error) == 1


@pytest.mark.parametrize("lanes", [0, 65, 1.0, True, "2"])
def test_gelu_rejects_bad_lanes(lanes):
    with pytest.raises(ValueError, match="lanes"):
        Gelu(lanes=lanes)
