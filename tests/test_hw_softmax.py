"""Softmax core: cocotb simulation against sim.numerics.softmax."""

import pytest

from hw.softmax import Softmax
from sim.runner import SIMULATORS, have_simulator, run_cocotb


def _linear(f):
    """(constant, per-element) of a cycle-count formula that is linear in the row length."""
    return [f(0), f(1) - f(0)]


# GPT-2's context on both simulators; a small odd buffer (other widths, fewer normalisation steps)
# on Icarus only, to keep the suite short.
@pytest.mark.sim
@pytest.mark.parametrize("sim,max_len", [(s, 2048) for s in SIMULATORS] + [("icarus", 17)])
def test_softmax(sim, max_len):
    if not have_simulator(sim):
        pytest.skip(f"{sim} not installed")
    dut = Softmax(max_len=max_len)
    tb = {"latency": _linear(dut.latency), "cycles_per_row": _linear(dut.cycles_per_row)}
    run_cocotb("softmax", dut, "sim.tb_softmax", sim, params={"max_len": max_len}, tb_params=tb)


@pytest.mark.parametrize("max_len", [0, (1 << 16) + 1, 2048.0, True, None])
def test_softmax_rejects_bad_max_len(max_len):
    with pytest.raises(ValueError, match="max_len"):
        Softmax(max_len=max_len)
