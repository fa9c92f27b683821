"""MatVec core (hw/matvec.py): cocotb simulation (sim/tb/matvec.py) against sim/numerics.matvec.

Every cocotb test of sim/tb/matvec.py runs for each parameter set below: the full cross product of
bus width and weight format on Verilator, a representative subset on Icarus. The 768 x 3072
throughput test (>= 0.98 weight beats per cycle) runs on the sets marked `throughput`, including
one on Icarus, so every test runs on both simulators.
"""

import json

import pytest

from gpt_fpga.hw.matvec import MatVec
from gpt_fpga.sim.tb.runner import BUILD, param_slug, run_cocotb, simulator_cases

CONFIGS = {  # name: (elaboration parameters, run the throughput test)
    "b64-int8": (dict(bus_bits=64, weights="int8", group=32), True),
    "b64-int4-g32": (dict(bus_bits=64, weights="int4", group=32), True),
    "b64-int4-g64": (dict(bus_bits=64, weights="int4", group=64), False),
    "b64-int4-g128": (dict(bus_bits=64, weights="int4", group=128), False),
    "b128-int8": (dict(bus_bits=128, weights="int8", group=32), False),
    "b128-int4-g32": (dict(bus_bits=128, weights="int4", group=32), True),
    "b128-int4-g64": (dict(bus_bits=128, weights="int4", group=64), False),
    "b128-int4-g128": (dict(bus_bits=128, weights="int4", group=128), False),
}
ICARUS = {"b64-int8": False, "b128-int4-g64": True, "b64-int4-g128": False}  # name: run the throughput test

MATRIX = [("verilator", name, thr) for name, (_, thr) in CONFIGS.items()] + \
         [("icarus", name, thr) for name, thr in ICARUS.items()]


@pytest.mark.sim
@pytest.mark.parametrize("sim,name,throughput", simulator_cases(MATRIX, ids=[f"{s}-{n}" for s, n, _ in MATRIX]))
def test_matvec(sim, name, throughput):
    params = CONFIGS[name][0]
    dut = MatVec(**params)
    tb = {"latency": dut.latency, "throughput": throughput}
    result = BUILD / "matvec" / f"{sim}-{param_slug(params)}" / "throughput.json"
    result.unlink(missing_ok=True)
    if throughput:
        tb["result_json"] = str(result)
    run_cocotb("matvec", dut, "gpt_fpga.sim.tb.matvec", sim, params=params, tb_params=tb)
    if throughput:
        eff = json.loads(result.read_text())[params["weights"]]
        assert eff["beats"] / eff["cycles"] >= 0.98, eff


# ---- elaboration-time checks (no simulator) ---------------------------------------------------
# (a rejected core's UnusedElaboratable warning is filtered in pyproject.toml)
@pytest.mark.parametrize("kw,match", [
    (dict(bus_bits=32), "bus_bits"),
    (dict(bus_bits=256), "bus_bits"),
    (dict(weights="int2"), "weights"),
    (dict(weights="int4", group=16), "group"),
    (dict(group=256), "group"),
    (dict(max_d_in=100), "max_d_in"),
    (dict(weights="int4", max_d_in=8), "max_d_in"),
    (dict(max_d_in=0), "max_d_in"),
    (dict(max_d_in=8192), "max_d_in"),
    (dict(max_d_in=768.0), "max_d_in"),
])
def test_matvec_rejects_bad_params(kw, match):
    with pytest.raises(ValueError, match=match):
        MatVec(**kw)


def test_matvec_params_are_keyword_only():
    with pytest.raises(TypeError, match="positional"):
        MatVec(64)  # noqa


@pytest.mark.parametrize("name", CONFIGS)
def test_matvec_elaborates(name):
    """Every configuration elaborates; the latency property matches the pipeline (checked in
    simulation by test_latency); the ports have the documented widths."""
    from amaranth.hdl import Fragment

    params = CONFIGS[name][0]
    dut = MatVec(**params, max_d_in=3072)
    Fragment.get(dut, None)
    expect = {"int8": 15, "int4": 15 if params["bus_bits"] == 64 else 16}[params["weights"]]
    assert dut.latency == expect
    assert len(dut.s_weights.tdata) == len(dut.s_act.tdata) == params["bus_bits"]
    assert len(dut.m_out.tdata) == 32
    assert dut.d_in.shape().width == 12 and len(dut.n_rows) == 16 and len(dut.out_int8) == 1
    assert MatVec.ERROR_BITS == ("config", "act_tlast", "weights_tlast", "shift")
    assert len(dut.error) == len(MatVec.ERROR_BITS)
