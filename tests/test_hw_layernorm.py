"""LayerNorm core: cocotb simulation against sim.numerics.layernorm."""

import pytest

from hw.layernorm import LayerNorm
from sim.runner import SIMULATORS, have_simulator, run_cocotb


def _linear(f):
    """(constant, per-element) of a cycle-count formula that is linear in the row length."""
    return [f(0), f(1) - f(0)]


# The contract's bound (4096) on both simulators; a small buffer (other widths) on Icarus only.
@pytest.mark.sim
@pytest.mark.parametrize("sim,max_d", [(s, 4096) for s in SIMULATORS] + [("icarus", 100)])
def test_layernorm(sim, max_d):
    if not have_simulator(sim):
        pytest.skip(f"{sim} not installed")
    dut = LayerNorm(max_d=max_d)
    tb = {"latency": _linear(dut.latency), "cycles_per_row": _linear(dut.cycles_per_row)}
    run_cocotb("layernorm", dut, "sim.tb_layernorm", sim, params={"max_d": max_d}, tb_params=tb)


@pytest.mark.parametrize("max_d", [0, 4097, 768.0, True, None])
def test_layernorm_rejects_bad_max_d(max_d):
    with pytest.raises(ValueError, match="max_d"):
        LayerNorm(max_d=max_d)
