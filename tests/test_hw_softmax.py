"""Softmax core: cocotb simulation against numerics.softmax."""

import pytest

from gpt_fpga.hw.softmax import Softmax
from gpt_fpga.sim.tb.runner import SIMULATORS, row_timing, run_cocotb, simulator_cases


# GPT-2's context on both simulators; a small odd buffer (other widths, fewer normalisation steps)
# on Icarus only, to keep the suite short.
@pytest.mark.sim
@pytest.mark.parametrize("sim,max_len", simulator_cases([(s, 2048) for s in SIMULATORS] + [("icarus", 17)]))
def test_softmax(sim, max_len):
    dut = Softmax(max_len=max_len)
    run_cocotb("softmax", dut, "gpt_fpga.sim.tb.softmax", sim, params={"max_len": max_len}, tb_params=row_timing(dut))


def test_softmax_error_port():
    assert Softmax.ERROR_BITS == ("row_too_long",) and len(Softmax(max_len=17).error) == 1


@pytest.mark.parametrize("max_len", [0, (1 << 16) + 1, 2048.0, True, None])
def test_softmax_rejects_bad_max_len(max_len):
    with pytest.raises(ValueError, match="max_len"):
        Softmax(max_len=max_len)
