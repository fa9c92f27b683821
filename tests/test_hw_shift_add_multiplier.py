"""hw/shift_add_multiplier.py: exact unsigned products (random, zero and all-ones factors), ``done`` exactly
``latency`` cycles after ``start``, ``p`` held until the next start, a restart while busy (Amaranth simulator)."""

import random

import pytest
from amaranth.sim import Simulator

from gpt_fpga.hw.shift_add_multiplier import ShiftAddMultiplier


def _run(dut, bench):
    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


async def _multiply(ctx, dut, a, b):
    """Start one product; return (cycles until done, p)."""
    ctx.set(dut.a, a)
    ctx.set(dut.b, b)
    ctx.set(dut.start, 1)
    await ctx.tick()
    ctx.set(dut.start, 0)
    ctx.set(dut.a, 0)  # sampled with start: later changes must not matter
    ctx.set(dut.b, 0)
    cycles = 1
    while not ctx.get(dut.done):
        await ctx.tick()
        cycles += 1
        assert cycles < 100, "done never came"
    return cycles, ctx.get(dut.p)


@pytest.mark.parametrize("a_bits,b_bits", [(16, 5), (16, 16), (1, 1), (32, 3)])
def test_products_are_exact_and_take_latency_cycles(a_bits, b_bits):
    rng = random.Random(f"{a_bits}x{b_bits}")
    dut = ShiftAddMultiplier(a_bits, b_bits)
    assert dut.latency == b_bits and len(dut.p) == a_bits + b_bits
    top_a, top_b = (1 << a_bits) - 1, (1 << b_bits) - 1
    cases = [(0, 0), (top_a, top_b), (top_a, 0), (0, top_b), (1, top_b), (top_a, 1)]
    cases += [(rng.getrandbits(a_bits), rng.getrandbits(b_bits)) for _ in range(60)]

    async def bench(ctx):
        assert ctx.get(dut.done) and ctx.get(dut.p) == 0  # idle before the first start
        for a, b in cases:
            cycles, p = await _multiply(ctx, dut, a, b)
            assert (cycles, p) == (b_bits, a * b), (a, b)
            for _ in range(3):  # held until the next start
                await ctx.tick()
                assert ctx.get(dut.done) and ctx.get(dut.p) == a * b

    _run(dut, bench)


def test_a_start_while_busy_begins_anew():
    dut = ShiftAddMultiplier(16, 8)

    async def bench(ctx):
        ctx.set(dut.a, 40000)
        ctx.set(dut.b, 200)
        ctx.set(dut.start, 1)
        await ctx.tick()
        ctx.set(dut.start, 0)
        await ctx.tick().repeat(3)
        assert not ctx.get(dut.done)
        cycles, p = await _multiply(ctx, dut, 1234, 255)
        assert (cycles, p) == (8, 1234 * 255)

    _run(dut, bench)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_bad_widths_are_refused(bad):
    with pytest.raises(ValueError, match="must be a positive int"):
        ShiftAddMultiplier(bad, 4)
    with pytest.raises(ValueError, match="must be a positive int"):
        ShiftAddMultiplier(4, bad)
