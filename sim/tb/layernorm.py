"""cocotb testbench for hw.layernorm.LayerNorm: every output equals numerics.layernorm.

``LayerNormTB`` drives ``s_x`` (int32 residual row) and ``s_params`` (gamma_mult, beta per element)
from cocotbext-axi sources and drains ``m_y`` into a sink, all three with random valid/ready
stalls; the eps table is written through the core's write port. The model computes expected rows
only by calling sim.numerics; a monitor coroutine passes each received row to the scoreboard,
which checks it by equality; ``drain`` also checks that the sticky ``error`` output stayed 0, and
test_row_too_long provokes its one cause. TB_PARAMS (JSON): max_d, and the latency /
cycles-per-row formulas of the component as (constant, per-element) pairs.
"""

from __future__ import annotations

import random

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiStreamFrame

from gpt_fpga.hw.layernorm import LayerNorm
from gpt_fpga.contract.layout import pack_ln_params
from gpt_fpga.contract import numerics
from gpt_fpga.sim.tb.common import (PARAMS, CycleMonitor, Scoreboard, StreamTB, int8_values, linear, set_stalls,
                                    watch_rows)

MAX_D = int(PARAMS.get("max_d", numerics.MAX_D_IN))
M32 = (1 << 32) - 1
EPS = 1e-5


def eps_table(d: int, eps: float = EPS) -> np.ndarray:
    """E[sh] for sh = 0..LN_MAX_SHIFT (17: a row holding -2**31)."""
    return numerics.layernorm_eps_table(eps, d)


class LayerNormModel:
    @staticmethod
    def __call__(x, gamma, beta, out_shift: int, table) -> list[int]:
        y = numerics.layernorm(np.asarray(x, dtype=np.int64)[None], np.asarray(gamma, dtype=np.int64),
                               np.asarray(beta, dtype=np.int64), out_shift, table)[0]
        return [int(v) for v in y]


class LayerNormTB(StreamTB):
    ERROR_BITS = LayerNorm.ERROR_BITS

    def __init__(self, dut, seed: int):
        super().__init__(dut)
        self.rng, self.np_rng = random.Random(seed), np.random.default_rng(seed)
        self.x_source = self.axis_source("s_x", byte_size=32)
        self.p_source = self.axis_source("s_params", byte_size=64)
        self.sink = self.axis_sink("m_y", byte_size=8)
        self.model = LayerNormModel()
        self.scoreboard = Scoreboard()
        self.monitor = cocotb.start_soon(self._monitor())
        self.table, self.out_shift = None, 0
        dut.eps_we.value = 0
        dut.eps_addr.value = 0
        dut.eps_data.value = 0
        dut.out_shift.value = 0

    async def _monitor(self):
        while True:
            frame = await self.sink.recv()
            self.scoreboard.compare(int8_values(frame.tdata))

    def set_stalls(self, p_x: float, p_params: float, p_out: float):
        for end, p in ((self.x_source, p_x), (self.p_source, p_params), (self.sink, p_out)):
            set_stalls(end, self.rng, p)

    async def config(self, table, out_shift: int):
        """Load the eps table and out_shift (between rows only)."""
        table = np.asarray(table, dtype=np.int64)
        assert len(table) == numerics.LN_MAX_SHIFT + 1 and table.min() >= 1 and table.max() < 1 << 48
        for i, v in enumerate(table):
            self.dut.eps_addr.value = i
            self.dut.eps_data.value = int(v)
            self.dut.eps_we.value = 1
            await RisingEdge(self.dut.clk)
        self.dut.eps_we.value = 0
        self.dut.out_shift.value = out_shift
        self.table, self.out_shift = table, out_shift

    async def send(self, x, gamma, beta, tag: str):
        x, gamma, beta = (np.asarray(v, dtype=np.int64) for v in (x, gamma, beta))
        assert 1 <= len(x) == len(gamma) == len(beta) <= MAX_D
        self.scoreboard.expect(self.model(x, gamma, beta, self.out_shift, self.table), tag)
        await self.x_source.send(AxiStreamFrame([int(v) & M32 for v in x]))
        words = np.frombuffer(pack_ln_params(gamma, beta), dtype="<u8")  # the image's own word format
        await self.p_source.send(AxiStreamFrame([int(w) for w in words]))

    async def drain(self, timeout: int = 200000):
        """Wait until every expected row has been received and checked; no error may have risen."""
        await self.scoreboard.wait_empty(self.dut.clk, timeout)
        self.assert_no_error()

    async def row(self, x, gamma, beta, tag: str, out_shift: int, eps: float = EPS):
        """One row with its own configuration (table for its d, out_shift), after the previous."""
        await self.drain()
        await self.config(eps_table(len(x), eps), out_shift)
        await self.send(x, gamma, beta, tag)

    # ---- stimulus ----
    def residual(self, d: int, sigma: float = 1.0, outliers: int = 0, scale: float = 300.0):
        """int32 residual, RESID_FRAC fraction bits: N(0, sigma) plus a few large outlier dims."""
        r = self.np_rng.normal(0.0, sigma, d)
        idx = self.np_rng.choice(d, size=min(outliers, d), replace=False)
        r[idx] = self.np_rng.choice([-1, 1], len(idx)) * scale * self.np_rng.uniform(0.5, 1.0, len(idx))
        return np.clip(np.round(r * 2.0 ** numerics.RESID_FRAC), -(1 << 31), (1 << 31) - 1).astype(np.int64)

    def ln_params(self, d: int, out_shift: int = 18, s_out: float = 4.0 / 127):
        """gamma_mult and beta as the contract's docstring defines them, from float gamma and beta."""
        gamma = self.np_rng.normal(1.0, 0.2, d)
        beta = self.np_rng.normal(0.0, 0.1, d)
        gm = np.round(gamma / s_out * 2.0 ** (out_shift - numerics.LN_NORM_FRAC)).astype(np.int64)
        bt = np.round(beta / s_out * 2.0 ** out_shift).astype(np.int64)
        assert np.abs(gm).max() < 1 << 15
        return gm, bt

    def wild_params(self, d: int):
        return (self.np_rng.integers(-(1 << 15), 1 << 15, d), self.np_rng.integers(-(1 << 31), 1 << 31, d))


@cocotb.test()
async def test_random_rows(dut):
    """Real sizes: d = 768 and 3072 (and max_d) with GPT-2-like residuals and outliers, stalls."""
    tb = LayerNormTB(dut, seed=21)
    await tb.reset()
    cases = [(768, 1.0, 0, (0.3, 0.3, 0.3)), (768, 3.0, 4, (0.5, 0.1, 0.2)), (3072, 2.0, 6, (0.2, 0.4, 0.3)),
             (MAX_D, 0.5, 2, (0.1, 0.1, 0.1))]
    for d, sigma, outliers, st in cases:
        if d > MAX_D:
            continue
        tb.set_stalls(*st)
        x = tb.residual(d, sigma, outliers)
        await tb.row(x, *tb.ln_params(d), f"d={d} sigma={sigma} outliers={outliers}", out_shift=18)
    await tb.drain()


@cocotb.test()
async def test_edge_rows(dut):
    """Zero variance, |x| near 2**31 (sh 16), small values (sh 0), -2**31 (sh 17), d = 1, 2."""
    tb = LayerNormTB(dut, seed=22)
    await tb.reset()
    tb.set_stalls(0.3, 0.3, 0.3)
    d = min(96, MAX_D)
    gm, bt = tb.ln_params(d)
    big = (1 << 31) - 1
    # (row, the contract's input shift for it: checked so that the stimulus is what it says)
    rows = {
        "all equal": (np.full(d, 12345), 0),
        "all zero": (np.zeros(d, dtype=np.int64), 0),
        "all equal negative large": (np.full(d, -(1 << 30) - 7), 16),
        "outliers near 2**31": (np.concatenate([[big, -big, big - 5], tb.residual(d - 3)]), 16),
        "all near +-2**31": (tb.np_rng.choice([-1, 1], d) * tb.np_rng.integers(big - 1000, big, d, endpoint=True), 16),
        "small values": (tb.np_rng.integers(-(1 << 15) + 1, 1 << 15, d), 0),
        "tiny values": (tb.np_rng.integers(-3, 4, d), 0),
        "one nonzero": (np.eye(1, d, 17, dtype=np.int64)[0] * 5, 0),
        "-2**31": (np.concatenate([[-(1 << 31)], tb.residual(d - 1, 100.0)]), 17),
        "-32768": (np.concatenate([[-(1 << 15)], tb.np_rng.integers(-100, 100, d - 1)]), 1),
        "every power of two": (np.array([1 << k for k in range(31)] + [-(1 << k) for k in range(31)] + [0] * (d - 62)), 16),
    }
    for tag, (x, sh) in rows.items():
        assert int(numerics.layernorm_input_shift(x)) == sh, tag
        await tb.row(x, gm, bt, f"{tag} (sh {sh})", out_shift=18)
    # every input shift 0..17, so every eps table entry is used
    for sh in range(numerics.LN_MAX_SHIFT + 1):
        peak = -(1 << 31) if sh == 17 else 1 << (14 + sh)
        x = np.concatenate([[peak], tb.np_rng.integers(-abs(peak) + 1, abs(peak), 31)])
        assert int(numerics.layernorm_input_shift(x)) == sh
        await tb.row(x, *tb.ln_params(32), f"input shift {sh}", out_shift=18, eps=1e-3)
    for d in (1, 2, 3):
        x = tb.residual(d, 2.0)
        await tb.row(x, *tb.ln_params(d), f"d={d}", out_shift=18)
    # widest sums: |S| = max_d * 2**15 and Q = max_d * 2**30 (xs = -32768 everywhere), then V > 0
    tb.set_stalls(0.1, 0.1, 0.1)
    x = np.full(MAX_D, -(1 << 31) + 1)
    await tb.row(x, *tb.ln_params(MAX_D), "d=max_d all -(2**31-1)", out_shift=18)
    x[::2] = (1 << 31) - 1
    await tb.row(x, *tb.ln_params(MAX_D), "d=max_d alternating +-(2**31-1)", out_shift=18)
    await tb.drain()


@cocotb.test()
async def test_param_extremes(dut):
    """Full-range gamma_mult / beta, out_shift 0..63 (saturation both ways), eps extremes."""
    tb = LayerNormTB(dut, seed=23)
    await tb.reset()
    tb.set_stalls(0.2, 0.3, 0.2)
    d = 64
    for out_shift in (0, 1, 10, 18, 31, 40, 63):
        x = tb.residual(d, 1.0, 2)
        await tb.row(x, *tb.wild_params(d), f"wild params out_shift={out_shift}", out_shift=out_shift)
    gm = np.array([(1 << 15) - 1, -(1 << 15)] * (d // 2))
    bt = np.array([(1 << 31) - 1, -(1 << 31)] * (d // 2))
    await tb.row(tb.residual(d, 1.0), gm, bt, "gamma/beta extremes", out_shift=30)
    await tb.row(tb.residual(d, 1.0), gm, bt[::-1], "gamma/beta extremes swapped", out_shift=33)
    # gamma_mult = 0 makes n*gamma + beta == beta: walk the rounding and saturation boundaries
    bt = np.concatenate([np.arange(-262, -250), np.arange(250, 262), np.arange(-131, -125), np.arange(125, 131),
                         [-1, 0, 1, 2, 3]])
    for out_shift in (0, 1, 2):
        await tb.row(tb.residual(len(bt)), np.zeros(len(bt), dtype=np.int64), bt,
                     f"beta at the int8 boundaries, out_shift={out_shift}", out_shift=out_shift)
    for eps in (1e-12, 1e-2):
        await tb.row(tb.residual(d, 0.01), *tb.ln_params(d), f"eps={eps}", out_shift=18, eps=eps)
    await tb.drain()


@cocotb.test()
async def test_reset_mid_stream(dut):
    """Reset while receiving, while summing, and while sending; the next row is exact."""
    tb = LayerNormTB(dut, seed=24)
    await tb.reset()
    d = min(200, MAX_D)
    await tb.config(eps_table(d), 18)
    for when in ("receive", "sums", "send"):
        tb.set_stalls(0.2, 0.2, 0.2)
        # the abandoned row is much larger than the next one: stale row state would show
        await tb.x_source.send(AxiStreamFrame([int(v) & M32 for v in tb.residual(d, 5000.0)]))
        await tb.p_source.send(AxiStreamFrame([1 << 12] * d))
        if when == "receive":
            await ClockCycles(dut.clk, d // 2)
        elif when == "sums":
            while dut.s_x__tready.value:  # low once the row's last value is in
                await RisingEdge(dut.clk)
            await ClockCycles(dut.clk, d // 2)
        else:
            while not dut.m_y__tvalid.value:
                await RisingEdge(dut.clk)
            await ClockCycles(dut.clk, d // 3)
        tb.x_source.clear()
        tb.p_source.clear()
        await tb.reset()
        assert tb.sink.empty() and not tb.scoreboard.expected
        await tb.send(tb.residual(d, 2.0), *tb.ln_params(d), f"after a reset mid-{when}")
        await tb.drain()


@cocotb.test()
async def test_row_too_long(dut):
    """A row of max_d + 1 (or + 5) values: ``row_too_long`` rises and stays, the core takes exactly
    max_d values and no more (the buffer does not wrap) and sends nothing; after a reset the next
    row is exact. (Rows of exactly max_d are normal rows: test_edge_rows.)"""
    tb = LayerNormTB(dut, seed=26)
    await tb.reset()
    for extra, stall in ((1, 0.0), (5, 0.3)):
        tb.set_stalls(stall, stall, stall)
        d = MAX_D + extra
        mon = CycleMonitor(dut, "s_x").start()
        await tb.x_source.send(AxiStreamFrame([int(v) & M32 for v in tb.residual(d, 2.0)]))
        await tb.expect_error("row_too_long", timeout=4 * d + 100, stopped=("s_x", "s_params"))
        mon.stop()
        assert mon.count("s_x") == MAX_D, f"took {mon.count('s_x')} values of a row longer than {MAX_D}"
        assert tb.sink.empty() and not dut.m_y__tvalid.value
        tb.x_source.clear()
        await tb.reset()
        tb.assert_no_error("right after the reset")
        d = min(MAX_D, 100)
        await tb.row(tb.residual(d, 2.0), *tb.ln_params(d), f"after row_too_long (+{extra})", out_shift=18)
        await tb.drain()


@cocotb.test()
async def test_latency_throughput(dut):
    """No stalls: rows back to back; check the documented latency and cycles per row."""
    tb = LayerNormTB(dut, seed=25)
    await tb.reset()
    edges, w = watch_rows(dut, "s_x", "m_y")
    lengths = [1, min(48, MAX_D), 7]
    await tb.config(eps_table(48), 18)  # any valid table: the model uses the one loaded
    for d in lengths:
        await tb.send(tb.residual(d, 1.0), *tb.ln_params(d), f"timing d={d}")
    await tb.drain()
    w.cancel()
    for i, d in enumerate(lengths):
        assert edges["last_in"][i] - edges["first_in"][i] == d - 1, "values not accepted one per cycle"
        lat = edges["first_out"][i] - edges["last_in"][i]
        assert lat == linear("latency", d), f"latency d={d}: {lat} cycles, documented {linear('latency', d)}"
        assert edges["last_out"][i] - edges["first_out"][i] == d - 1, "outputs not sent one per cycle"
        if i + 1 < len(lengths):
            cyc = edges["first_in"][i + 1] - edges["first_in"][i]
            assert cyc == linear("cycles_per_row", d), \
                f"d={d}: {cyc} cycles per row, documented {linear('cycles_per_row', d)}"
