"""hw/register_slice.py and hw/ping_pong_slice.py: every beat through, in order, once, under random stalls on both sides; one beat
per cycle when nothing stalls; no combinational path from one side to the other (Amaranth simulator)."""

import random

import pytest
from amaranth.sim import Simulator

from gpt_fpga.hw.ping_pong_slice import PingPongSlice
from gpt_fpga.hw.register_slice import RegisterSlice

SLICES = pytest.mark.parametrize("cls", [RegisterSlice, PingPongSlice])


def _run(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


@SLICES
@pytest.mark.parametrize("p_valid,p_ready", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.3), (0.6, 0.6)])
def test_beats_pass_in_order_under_stalls(cls, p_valid, p_ready):
    rng = random.Random(f"{p_valid}-{p_ready}")
    beats = [(rng.getrandbits(40), rng.random() < 0.1) for _ in range(400)]
    dut = cls(40)
    got = []

    async def bench(ctx):
        sent = 0
        cycles = 0
        while len(got) < len(beats):
            offer = sent < len(beats) and rng.random() < p_valid
            if offer:
                ctx.set(dut.s.tdata, beats[sent][0])
                ctx.set(dut.s.tlast, beats[sent][1])
            ctx.set(dut.s.tvalid, offer)
            ctx.set(dut.m.tready, rng.random() < p_ready)
            _, _, s_ready, m_valid, m_ready, m_data, m_last = await ctx.tick().sample(
                dut.s.tready, dut.m.tvalid, dut.m.tready, dut.m.tdata, dut.m.tlast)
            if offer and s_ready:
                sent += 1
            if m_valid and m_ready:
                got.append((m_data, bool(m_last)))
            cycles += 1
            assert cycles < 20 * len(beats), "stream stuck"
        if p_valid == 1.0 and p_ready == 1.0:  # one beat per cycle, one cycle of latency
            assert cycles == len(beats) + 1

    _run(dut, bench)
    assert got == beats


@SLICES
def test_outputs_do_not_depend_combinationally_on_the_other_side(cls):
    """Changing s.tvalid / s.tdata or m.tready within a cycle moves none of the slice's outputs."""
    dut = cls(8)

    async def bench(ctx):
        ctx.set(dut.m.tready, 0)
        for k in range(3):  # fill the output register and the skid
            ctx.set(dut.s.tvalid, 1)
            ctx.set(dut.s.tdata, 10 + k)
            await ctx.tick()
        assert ctx.get(dut.m.tvalid) and ctx.get(dut.m.tdata) == 10 and not ctx.get(dut.s.tready)
        before = (ctx.get(dut.s.tready), ctx.get(dut.m.tvalid), ctx.get(dut.m.tdata))
        for ready, valid, data in ((1, 0, 0), (0, 1, 99), (1, 1, 55)):
            ctx.set(dut.m.tready, ready)
            ctx.set(dut.s.tvalid, valid)
            ctx.set(dut.s.tdata, data)
            await ctx.delay(1e-9)
            assert (ctx.get(dut.s.tready), ctx.get(dut.m.tvalid), ctx.get(dut.m.tdata)) == before

    _run(dut, bench)


@SLICES
def test_bad_width_is_refused(cls):
    with pytest.raises(ValueError, match="data_bits must be a positive int, got 0"):
        cls(0)
