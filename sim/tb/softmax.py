"""cocotb testbench for hw.softmax.Softmax: every probability equals numerics.softmax.

``SoftmaxTB`` drives ``s_scores`` (score, visibility in tuser) from a cocotbext-axi source and
drains ``m_probs`` into a sink, both with random valid/ready stalls; the model computes expected
rows only by calling numerics.softmax; a monitor coroutine passes every received row to the
scoreboard, which checks it by equality; ``drain`` also checks that the sticky ``error`` output
stayed 0, and test_row_too_long provokes its one cause. The core holds two rows (ping-pong banks):
test_back_to_back has the next row arrive while the one before it is still being sent, and the
reset and row_too_long tests also run with a row ahead in the core. TB_PARAMS (JSON): max_len, and the
latency / cycles-per-row formulas of the component as (constant, per-element) pairs.
"""

from __future__ import annotations

import random

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiStreamFrame

from gpt_fpga.hw.softmax import Softmax
from gpt_fpga.contract import numerics
from gpt_fpga.sim.tb.common import PARAMS, CycleMonitor, Scoreboard, StreamTB, linear, set_stalls, watch_rows

MAX_LEN = int(PARAMS.get("max_len", 2048))
M32 = (1 << 32) - 1


class SoftmaxModel:
    @staticmethod
    def __call__(scores, mask, mult: int, shift: int) -> list[int]:
        p = numerics.softmax(np.asarray(scores, dtype=np.int64)[None], np.asarray(mask, dtype=bool)[None],
                             mult, shift)[0]
        return [int(v) for v in p]


class SoftmaxTB(StreamTB):
    ERROR_BITS = Softmax.ERROR_BITS

    def __init__(self, dut, seed: int):
        super().__init__(dut)
        self.rng, self.np_rng = random.Random(seed), np.random.default_rng(seed)
        self.source = self.axis_source("s_scores", byte_size=32)
        self.sink = self.axis_sink("m_probs", byte_size=16)
        self.model = SoftmaxModel()
        self.scoreboard = Scoreboard()
        self.monitor = cocotb.start_soon(self._monitor())
        self.config(1 << 14, 14)

    async def _monitor(self):
        while True:
            frame = await self.sink.recv()
            self.scoreboard.compare([int(v) for v in frame.tdata])

    def config(self, mult: int, shift: int):
        assert 0 <= mult < 1 << 15 and 0 <= shift < 64
        self.mult, self.shift = mult, shift
        self.dut.mult.value = mult
        self.dut.shift.value = shift

    def set_stalls(self, p_in: float, p_out: float):
        set_stalls(self.source, self.rng, p_in)
        set_stalls(self.sink, self.rng, p_out)

    async def send(self, scores, mask, tag: str):
        scores, mask = [int(s) for s in scores], [int(bool(v)) for v in mask]
        assert 1 <= len(scores) == len(mask) <= MAX_LEN
        self.scoreboard.expect(self.model(scores, mask, self.mult, self.shift), tag)
        await self.source.send(AxiStreamFrame([s & M32 for s in scores], tuser=mask))

    async def drain(self, timeout: int = 100000):
        """Wait until every expected row has been received and checked; no error may have risen."""
        await self.scoreboard.wait_empty(self.dut.clk, timeout)
        self.assert_no_error()

    async def row(self, scores, mask, tag: str, mult: int | None = None, shift: int | None = None):
        """One row with its own (mult, shift): the configuration changes only between rows."""
        await self.drain()
        if mult is not None:
            self.config(mult, shift)
        await self.send(scores, mask, tag)
        await self.drain()

    # ---- stimulus ----
    def scores(self, n: int, spread: int = 1 << 21):
        return self.np_rng.integers(-spread, spread, n)

    def causal_mask(self, n: int):
        """Visible prefix (a query attends to keys 0..i) with an optional local window."""
        i = self.rng.randrange(n)
        window = self.rng.choice([0, 0, max(1, n // 4)])
        return numerics.visible_keys([i], n, window)[0]


def realistic_config():
    """GPT-2 head: s_q = s_k ~ 0.05, hd = 64: ratio s_q s_k log2(e) 2**8 / sqrt(64)."""
    return numerics.multiplier_for(0.05 * 0.05 * 1.4426950408889634 * 256 / 8)


@cocotb.test()
async def test_random_rows(dut):
    """Rows of lengths 1, 2, 17, 100, 1024 and max_len with causal / local / random masks, stalls."""
    tb = SoftmaxTB(dut, seed=11)
    await tb.reset()
    tb.config(*realistic_config())
    lengths = sorted({n for n in (1, 2, 17, 100, 1024, MAX_LEN) if n <= MAX_LEN})
    for k, n in enumerate(lengths):
        tb.set_stalls(*[(0.3, 0.3), (0.5, 0.1), (0.1, 0.5)][k % 3])
        await tb.send(tb.scores(n), tb.causal_mask(n), f"causal n={n}")
        m = tb.np_rng.random(n) < 0.7
        m[tb.rng.randrange(n)] = True
        await tb.send(tb.scores(n, 1 << 14), m, f"random-mask n={n}")
    await tb.drain()
    assert tb.scoreboard.checked == 2 * len(lengths)


@cocotb.test()
async def test_edge_rows(dut):
    """All equal, single visible, fully masked, masked positions with wild scores, huge differences."""
    tb = SoftmaxTB(dut, seed=12)
    await tb.reset()
    tb.set_stalls(0.3, 0.3)
    tb.config(*realistic_config())
    n = min(33, MAX_LEN)
    ones = np.ones(n, dtype=bool)
    await tb.send([12345] * n, ones, "all-equal")
    await tb.send([-(1 << 31)] * n, ones, "all-equal int32 min")
    await tb.send([7], [1], "single element")
    single = np.zeros(n, dtype=bool)
    single[n // 2] = True
    await tb.send(tb.scores(n), single, "single visible")
    await tb.send(tb.scores(n), np.zeros(n, dtype=bool), "fully masked")
    await tb.send([0], [0], "fully masked n=1")
    wild = tb.np_rng.integers(-(1 << 31), 1 << 31, n)
    half = np.arange(n) % 2 == 0
    wild[half] = tb.np_rng.integers(-1000, 1000, half.sum())
    await tb.send(wild, half, "masked positions hold extreme scores")
    # identity requantization (z = score) from here: differences are exact
    await tb.drain()
    tb.config(1 << 14, 14)
    # differences (zmax - z) >> 8 at and around 15 and 16, and far beyond (e underflows to 0)
    base = np.array([0, -15 * 256, -15 * 256 - 1, -16 * 256 + 1, -16 * 256, -16 * 256 - 1, -17 * 256,
                     -(1 << 20), -(1 << 30), -(1 << 31) + 1, 100 - (1 << 31)])
    await tb.send(base, np.ones(len(base), dtype=bool), "large negative differences")
    await tb.send(np.maximum(base - (1 << 30), -(1 << 31)), np.ones(len(base), dtype=bool), "clipped at int32 min")
    # long row where almost every difference is large: S just above 2**15
    n = min(MAX_LEN, 300)
    s = np.full(n, -(1 << 20))
    s[0] = 1 << 20
    await tb.send(s, np.ones(n, dtype=bool), "one dominant score")
    # every position with the same diff: S = 1 + (n-1) * EXP2_TABLE[f] sweeps the reciprocal index
    for f in (1, 128, 255, 256, 3000, 3839, 3840):
        s = np.full(n, -f)
        s[0] = 0
        await tb.send(s, np.ones(n, dtype=bool), f"uniform diff {f}")
    for m in (2, 3, 1000, 2047):  # S = m * 2**15: exact powers and just above
        m = min(m, MAX_LEN)
        await tb.send(np.zeros(m, dtype=np.int64), np.ones(m, dtype=bool), f"{m} equal scores")
    await tb.drain()


@cocotb.test()
async def test_config_extremes(dut):
    """mult 0 / max, shift 0 (z saturates at int32) / 47 / 63, with extreme scores."""
    tb = SoftmaxTB(dut, seed=13)
    await tb.reset()
    tb.set_stalls(0.2, 0.2)
    n = min(24, MAX_LEN)
    extreme = np.concatenate([[-(1 << 31), (1 << 31) - 1, 0, 1, -1], tb.np_rng.integers(-(1 << 31), 1 << 31, 19)])[:n]
    mask = tb.np_rng.random(n) < 0.8
    mask[1] = True
    for mult, shift in [(0, 0), (0, 63), ((1 << 15) - 1, 0), ((1 << 15) - 1, 63), ((1 << 15) - 1, 47),
                        ((1 << 15) - 1, 46), (1, 0), (1 << 14, 31), (12345, 24), ((1 << 15) - 1, 38)]:
        await tb.row(extreme, mask, f"extreme scores mult={mult} shift={shift}", mult, shift)
        await tb.row(tb.scores(n, 1 << 22), mask, f"attention scores mult={mult} shift={shift}", mult, shift)
    # z exactly at the int32 saturation boundaries: 196611 * 21845 == 2**32 - 1
    edge = [196611, -196611, 196610, -196612, 196612, 98305, -98306, 0]
    await tb.row(edge, [1] * len(edge), "z at 2**31 after rounding", 21845, 1)
    edge = [(1 << 31) - 1, 1 << 30, (1 << 30) - 1, -(1 << 30), -(1 << 30) - 1, -(1 << 31)]
    for mult in (1, 2):
        await tb.row(edge, [1] * len(edge), f"z at the int32 limits, mult={mult}", mult, 0)


async def wait_last_in(dut, rows: int = 1):
    """Wait until `rows` more rows' last scores have been taken."""
    while rows:
        await RisingEdge(dut.clk)
        if dut.s_scores__tvalid.value and dut.s_scores__tready.value and dut.s_scores__tlast.value:
            rows -= 1


@cocotb.test()
async def test_reset_mid_stream(dut):
    """Reset while receiving, summing, and sending, with one row or two in the core (the second in
    the other bank, or still arriving): every abandoned row is dropped, the next row is exact."""
    tb = SoftmaxTB(dut, seed=14)
    await tb.reset()
    tb.config(*realistic_config())
    n = min(MAX_LEN, 200)
    for rows, when in ((1, "receive"), (1, "exp"), (1, "send"), (2, "receive"), (2, "exp"), (2, "send")):
        tb.set_stalls(0.2, 0.2)
        # the abandoned rows' scores are far above the next row's: a stale zmax would show
        for _ in range(rows):
            await tb.source.send(AxiStreamFrame([int(s) & M32 for s in tb.scores(n) + (1 << 28)], tuser=[1] * n))
        if when == "exp":  # every row in; the first one's exp pass is running
            await wait_last_in(dut, rows)
        if when == "send":
            while not dut.m_probs__tvalid.value:
                await RisingEdge(dut.clk)
        await ClockCycles(dut.clk, n // 3)
        tb.source.clear()
        await tb.reset()
        assert tb.sink.empty() and not tb.scoreboard.expected
        await tb.send(tb.scores(n), tb.causal_mask(n), f"after a reset mid-{when} ({rows} rows in the core)")
        await tb.drain()


@cocotb.test()
async def test_row_too_long(dut):
    """A row of max_len + 1 (or + 5) scores: ``row_too_long`` rises and stays, the core takes
    exactly max_len scores and no more (the bank does not wrap) and sends nothing of that row; a row
    taken before it (in the other bank, its output stalled) is still sent, exact; after a reset the
    next row is exact. (A row of exactly max_len is a normal row: test_random_rows.)"""
    tb = SoftmaxTB(dut, seed=16)
    await tb.reset()
    tb.config(*realistic_config())
    for extra, stall, ahead in ((1, 0.0, 0), (5, 0.3, 0), (1, 0.0, min(MAX_LEN, 40)), (3, 0.3, MAX_LEN)):
        tb.set_stalls(stall, 0.9 if ahead else stall)
        n = MAX_LEN + extra
        mon = CycleMonitor(dut, "s_scores").start()
        if ahead:
            await tb.send(tb.scores(ahead), tb.causal_mask(ahead), f"row ahead of a too long row ({ahead})")
        await tb.source.send(AxiStreamFrame([int(s) & M32 for s in tb.scores(n)], tuser=[1] * n))
        await tb.expect_error("row_too_long", timeout=4 * (n + ahead) + 100, stopped=("s_scores",))
        await tb.scoreboard.wait_empty(dut.clk, 50 * (ahead + 100))
        mon.stop()
        taken = mon.count("s_scores") - ahead
        assert taken == MAX_LEN, f"took {taken} scores of a row longer than {MAX_LEN}"
        await ClockCycles(dut.clk, 4 * MAX_LEN + 100)  # the too long row is never processed
        assert tb.sink.empty() and not dut.m_probs__tvalid.value
        tb.source.clear()
        await tb.reset()
        tb.assert_no_error("right after the reset")
        n = min(MAX_LEN, 100)
        await tb.send(tb.scores(n), tb.causal_mask(n), f"after row_too_long (+{extra})")
        await tb.drain()


@cocotb.test()
async def test_back_to_back(dut):
    """Rows of random lengths sent back to back with random valid / ready stalls: the next row is
    taken into the other bank while the row before it is still being sent (checked: it happens),
    and every row is exact."""
    tb = SoftmaxTB(dut, seed=17)
    await tb.reset()
    tb.config(*realistic_config())
    edges, w = watch_rows(dut, "s_scores", "m_probs")
    lengths = [1, 1, 2, 3, 17, 1, 64, 5, 200, 2, 100, 33, 7, min(MAX_LEN, 400), 1, min(MAX_LEN, 300), 9]
    lengths = [min(n, MAX_LEN) for n in lengths]
    rows = 0
    for stalls in ((0.0, 0.0), (0.0, 0.5), (0.3, 0.3), (0.6, 0.1), (0.1, 0.8)):
        tb.set_stalls(*stalls)
        for k, n in enumerate(lengths):
            if k % 3 == 2:
                m = tb.np_rng.random(n) < 0.7
                await tb.send(tb.scores(n, 1 << 14), m, f"stalls {stalls} row {k} n={n} random mask")
            else:
                await tb.send(tb.scores(n), tb.causal_mask(n), f"stalls {stalls} row {k} n={n}")
        rows += len(lengths)
        await tb.drain(timeout=400000)
    w.cancel()
    assert tb.scoreboard.checked == rows
    first_in, last_out = edges["first_in"], edges["last_out"]
    assert len(first_in) == len(last_out) == rows
    overlapped = sum(first_in[i + 1] < last_out[i] for i in range(rows - 1))
    assert overlapped >= rows // 2, f"only {overlapped} of {rows - 1} rows were taken while the row before was being sent"


@cocotb.test()
async def test_latency_throughput(dut):
    """No stalls, three rows back to back per length: the documented latency of a row into an idle
    core, the second row taken right after the first (no gap), and the documented steady-state
    cycles per row between first probabilities."""
    tb = SoftmaxTB(dut, seed=15)
    await tb.reset()
    tb.config(*realistic_config())
    edges, w = watch_rows(dut, "s_scores", "m_probs")
    lengths = [1, 5, min(64, MAX_LEN), MAX_LEN]
    per_group = 3
    for n in lengths:
        for k in range(per_group):
            await tb.send(tb.scores(n), np.ones(n, dtype=bool), f"timing n={n} row {k}")
        await tb.drain()  # the core is idle before the next group
    w.cancel()
    for g, n in enumerate(lengths):
        rows = range(g * per_group, (g + 1) * per_group)
        for i in rows:
            assert edges["last_in"][i] - edges["first_in"][i] == n - 1, "scores not accepted one per cycle"
            assert edges["last_out"][i] - edges["first_out"][i] == n - 1, "probabilities not sent one per cycle"
        i = rows[0]
        lat = edges["first_out"][i] - edges["last_in"][i]
        assert lat == linear("latency", n), f"latency n={n}: {lat} cycles, documented {linear('latency', n)}"
        assert edges["first_in"][i + 1] == edges["last_in"][i] + 1, f"n={n}: the second row was not taken at once"
        for i in rows[:-1]:
            cyc = edges["first_out"][i + 1] - edges["first_out"][i]
            assert cyc == linear("cycles_per_row", n), \
                f"n={n}: {cyc} cycles per row, documented {linear('cycles_per_row', n)}"
