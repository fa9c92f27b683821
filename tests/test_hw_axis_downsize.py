"""StreamDownsizer (hw/axis_downsize.py) in the Amaranth simulator: random frames with random stalls
on both sides come out as half-width beats, low half first, tlast on the high half of each frame's
last beat; without stalls one half-width beat leaves every cycle."""

import random

import pytest
from amaranth.sim import Simulator

from gpt_fpga.hw.axis_downsize import StreamDownsizer


def _run(frames, p_in: float, p_out: float, seed: int):
    """Send `frames` (lists of ints) with stall probabilities; returns the (data, last, cycle) beats out."""
    dut = StreamDownsizer(data_bits=128)
    rng = random.Random(seed)
    n_out = 2 * sum(len(f) for f in frames)
    got = []

    async def source(ctx):
        for frame in frames:
            for k, beat in enumerate(frame):
                while rng.random() < p_in:
                    ctx.set(dut.s_data.tvalid, 0)
                    await ctx.tick()
                ctx.set(dut.s_data.tdata, beat)
                ctx.set(dut.s_data.tlast, k == len(frame) - 1)
                ctx.set(dut.s_data.tvalid, 1)
                await ctx.tick().until(dut.s_data.tready)
        ctx.set(dut.s_data.tvalid, 0)

    async def sink(ctx):
        cycle = 0
        while len(got) < n_out:
            ready = rng.random() >= p_out
            ctx.set(dut.m_data.tready, ready)
            _, _, valid, data, last = await ctx.tick().sample(dut.m_data.tvalid, dut.m_data.tdata, dut.m_data.tlast)
            if valid and ready:
                got.append((data, last, cycle))
            cycle += 1
            assert cycle < 20 * n_out + 100, "the downsizer stalled"

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(source)
    sim.add_testbench(sink)
    sim.run()
    return got


def _expected(frames):
    out = []
    for frame in frames:
        for k, beat in enumerate(frame):
            out += [(beat & (2**64 - 1), 0), (beat >> 64, int(k == len(frame) - 1))]
    return out


@pytest.mark.parametrize("p_in,p_out", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.4, 0.6)])
def test_downsizer_halves_in_order(p_in, p_out):
    rng = random.Random(1)
    frames = [[rng.getrandbits(128) for _ in range(rng.choice([1, 2, 3, 17]))] for _ in range(12)]
    got = _run(frames, p_in, p_out, seed=2)
    assert [(d, last) for d, last, _ in got] == _expected(frames)
    if p_in == p_out == 0:
        cycles = [c for _, _, c in got]
        assert cycles[-1] - cycles[0] == len(cycles) - 1, "bubble between half-width beats"


@pytest.mark.parametrize("bad", [0, 7, True, 64.0])
def test_downsizer_rejects_bad_width(bad):
    with pytest.raises(ValueError, match="data_bits"):
        StreamDownsizer(data_bits=bad)


def test_downsizer_ports():
    dut = StreamDownsizer(data_bits=128)
    assert (len(dut.s_data.tdata), len(dut.m_data.tdata), dut.latency) == (128, 64, 1)
