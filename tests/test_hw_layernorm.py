"""LayerNorm core: cocotb simulation against numerics.layernorm."""

import pytest

from gpt_fpga.hw.layernorm import LayerNorm
from gpt_fpga.contract.numerics import MAX_D_IN
from gpt_fpga.sim.tb.runner import SIMULATORS, row_timing, run_cocotb, simulator_cases


# The contract's bound (MAX_D_IN, 4096) on both simulators; a small buffer (other widths) on Icarus only.
@pytest.mark.sim
@pytest.mark.parametrize("sim,max_d", simulator_cases([(s, MAX_D_IN) for s in SIMULATORS] + [("icarus", 100)]))
def test_layernorm(sim, max_d):
    dut = LayerNorm(max_d=max_d)
    run_cocotb("layernorm", dut, "gpt_fpga.sim.tb.layernorm", sim, params={"max_d": max_d}, tb_params=row_timing(dut))


def test_layernorm_error_port():
    assert LayerNorm.ERROR_BITS == ("row_too_long",) and len(LayerNorm(max_d=100).error) == 1


@pytest.mark.parametrize("max_d", [0, MAX_D_IN + 1, 768.0, True, None])
def test_layernorm_rejects_bad_max_d(max_d):
    with pytest.raises(ValueError, match="max_d"):
        LayerNorm(max_d=max_d)
