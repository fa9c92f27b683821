"""The model and the matvec core refuse the same weight streams: a row shift above
numerics.MAX_SHIFT (47) is an ImageError in ``fixed_model.Matrix.from_stream`` and the ``shift``
bit of ``MatVec.error`` in hardware (the full cocotb proof is sim/tb/matvec.py::test_errors).
"""

import numpy as np
import pytest

from gpt_fpga.contract import numerics as nx
from gpt_fpga.contract.errors import ImageError
from gpt_fpga.contract.layout import HwLayout, ceil_div, pack_matrix, unpack_matrix
from gpt_fpga.sim.fixed_model import Matrix

LAYOUTS = [HwLayout(64, "int8"), HwLayout(128, "int8"), HwLayout(64, "int4", 32), HwLayout(128, "int4", 128)]


def _stream(hw: HwLayout, shift, d_in=40, seed=0):
    rng = np.random.default_rng(seed)
    shift = np.asarray(shift)
    d_out = len(shift)
    lo, hi = (-8, 7) if hw.weights == "int4" else (-128, 127)
    w = rng.integers(lo, hi + 1, (d_out, d_in))
    gs = rng.integers(1, 256, (d_out, ceil_div(d_in, hw.group))) if hw.weights == "int4" else None
    bias = rng.integers(-nx.MAX_BIAS, nx.MAX_BIAS + 1, d_out)
    mult = rng.integers(1 << 14, 1 << 15, d_out)
    return pack_matrix(w, gs, bias, mult, shift, hw), w, gs, bias, mult


@pytest.mark.parametrize("hw", LAYOUTS, ids=lambda h: f"{h.bus_bits}-{h.weights}")
def test_shifts_up_to_max_are_read(hw):
    """Shifts 0..47 load, and the matrix computes numerics.matvec with them."""
    shift = np.arange(nx.MAX_SHIFT + 1)
    blob, w, gs, bias, mult = _stream(hw, shift)
    m = Matrix.from_stream(blob, len(shift), w.shape[1], hw)
    a = np.random.default_rng(1).integers(-128, 128, (2, w.shape[1]))
    w_eff = nx.expand_int4(w, gs, hw.group) if gs is not None else w
    assert np.array_equal(m(a, 32), nx.matvec(w_eff, a, bias, mult, shift, 32))


@pytest.mark.parametrize("hw", LAYOUTS, ids=lambda h: f"{h.bus_bits}-{h.weights}")
@pytest.mark.parametrize("bad", [nx.MAX_SHIFT + 1, 63, 64, 255])
def test_shift_above_max_is_an_image_error(hw, bad):
    shift = [0, 5, nx.MAX_SHIFT, bad, 7]
    blob, w, *_ = _stream(hw, shift)
    with pytest.raises(ImageError, match=f"row 3 has shift {bad}, above the contract's maximum {nx.MAX_SHIFT}"):
        Matrix.from_stream(blob, len(shift), w.shape[1], hw)
    # the layout itself is only the byte format: it still round-trips any shift byte
    assert unpack_matrix(blob, len(shift), w.shape[1], hw)["shift"].tolist() == shift


def test_model_and_core_refuse_the_same_shift_bytes():
    """Every shift byte 0..255 through the matvec core (Amaranth simulator, a 1 x 8 matrix, an
    engine-style soft reset through ResetInserter after each): ``error`` is exactly the ``shift``
    bit for the bytes Matrix.from_stream refuses, and 0 for the others."""
    from amaranth import Module, ResetInserter, Signal
    from amaranth.sim import Simulator

    from gpt_fpga.hw.matvec import MatVec

    hw = HwLayout(64, "int8")
    d_in = hw.weights_per_beat
    dut = MatVec(bus_bits=hw.bus_bits, weights=hw.weights, max_d_in=d_in)
    soft_reset = Signal()
    top = Module()
    top.submodules.dut = ResetInserter(soft_reset)(dut)
    shift_bit = 1 << MatVec.ERROR_BITS.index("shift")
    streams = [_stream(hw, [s], d_in=d_in, seed=s)[0] for s in range(256)]
    refused_by_model, refused_by_core = [], []
    for s, blob in enumerate(streams):
        try:
            Matrix.from_stream(blob, 1, d_in, hw)
        except ImageError:
            refused_by_model.append(s)

    async def bench(ctx):
        async def beat(port, data: int, last: bool):
            ctx.set(port.tdata, data)
            ctx.set(port.tlast, last)
            ctx.set(port.tvalid, 1)
            for _ in range(16):  # a beat the core never takes is a failure, not a hang
                ready = ctx.get(port.tready)
                await ctx.tick()
                if ready:
                    break
            else:
                raise AssertionError(f"{port} never ready (shift byte {s})")
            ctx.set(port.tvalid, 0)

        ctx.set(dut.d_in, d_in)
        ctx.set(dut.n_rows, 1)
        ctx.set(dut.m_out.tready, 1)
        await ctx.tick()  # the config is stable from the cycle before the first beat
        for s, blob in enumerate(streams):
            header, weights = (int.from_bytes(blob[k:k + hw.bus_bytes], "little") for k in (0, hw.bus_bytes))
            await beat(dut.s_act, 0, True)
            await beat(dut.s_weights, header, False)
            if not ctx.get(dut.error):
                await beat(dut.s_weights, weights, True)
            await ctx.tick().repeat(2)
            err = ctx.get(dut.error)
            assert err in (0, shift_bit), (s, err)
            if err:
                refused_by_core.append(s)
                assert not ctx.get(dut.s_act.tready) and not ctx.get(dut.s_weights.tready), s  # stopped
            ctx.set(soft_reset, 1)
            await ctx.tick()
            ctx.set(soft_reset, 0)
            assert ctx.get(dut.error) == 0, s

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert refused_by_model == list(range(nx.MAX_SHIFT + 1, 256))
    assert refused_by_core == refused_by_model
