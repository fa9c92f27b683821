"""cocotb testbench for hw.attn_context.AttnContext: every output equals
``numerics.requantize(numerics.attention_context(p, v), ctx_mult, ctx_shift, 8)``.

``AttnContextTB`` drives the probabilities (``s_p``) and the value rows (``s_v``) from cocotbext-axi
sources and drains ``m_ctx`` into a sink, each with optional random valid/ready stalls; the model
computes the expected context only through contract/numerics.py (probabilities for realistic
jobs come from ``numerics.softmax`` too); a monitor coroutine passes every received context (one
job, tlast-delimited) to the scoreboard, which compares by equality, padding bytes (0) included.
Value padding bytes past ``head_dim`` are random, so a core that reads them fails.

TB_PARAMS (JSON): ``bus_bits``, ``max_head_dim``, ``max_keys``, ``latency``, ``out_interval`` (cycles
per output beat) and ``cycles_per_job``
(the component's, the latter as ``[head_dim, n_keys, cycles]`` triples), ``errors`` (the names of
the ``error`` bits, bit 0 first) and ``long`` (run the n_keys = 2048 job).
"""

from __future__ import annotations

import random

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiStreamFrame

from gpt_fpga.contract import numerics
from gpt_fpga.sim.tb.common import PARAMS, Scoreboard, StreamTB, stalls

LANES = int(PARAMS.get("bus_bits", 64)) // 8
MAX_HD = int(PARAMS.get("max_head_dim", numerics.MAX_HEAD_DIM))
MAX_KEYS = int(PARAMS.get("max_keys", numerics.MAX_CONTEXT))
ERRORS = list(PARAMS.get("errors", []))
LATENCY = int(PARAMS.get("latency", 0))
OUT_INTERVAL = int(PARAMS.get("out_interval", 1))
CYCLES_PER_JOB = {(hd, n): c for hd, n, c in PARAMS.get("cycles_per_job", [])}
P_MAX = (1 << numerics.PROB_FRAC) + 16  # the largest probability the contract allows


def beats(head_dim: int) -> int:
    return -(-head_dim // LANES)


def pack_rows(rows, rng: np.random.Generator) -> bytes:
    """int8 rows [n, hd] -> the stream bytes: each row padded to whole beats with random bytes."""
    rows = np.asarray(rows, dtype=np.int64)
    n, hd = rows.shape
    buf = rng.integers(0, 256, (n, beats(hd) * LANES), dtype=np.uint8)
    buf[:, :hd] = (rows & 0xFF).astype(np.uint8)
    return buf.tobytes()


class ContextModel:
    @staticmethod
    def __call__(p, v, mult: int, shift: int) -> list[int]:
        """The int8 context of one head, padded with zero bytes to whole beats."""
        p, v = np.asarray(p, dtype=np.int64), np.asarray(v, dtype=np.int64)
        acc = numerics.attention_context(p[None], v)[0]
        # the core accumulates in int32: every case here stays inside it (the contract: < 2**24)
        assert -(1 << 31) <= acc.min() and acc.max() < 1 << 31, "test case overflows int32"
        ctx = numerics.requantize(acc, mult, shift, numerics.ACT_BITS)
        out = [int(x) for x in ctx]
        return out + [0] * (beats(len(out)) * LANES - len(out))


class Handshakes:
    """Cycle numbers of every transfer (and of every tvalid cycle) on the named ports."""

    def __init__(self, dut, ports):
        self.dut, self.ports = dut, ports
        self.cycles = {p: [] for p in ports}
        self.valid = {p: [] for p in ports}
        self.task = cocotb.start_soon(self._run())

    async def _run(self):
        sig = {p: (getattr(self.dut, f"{p}__tvalid"), getattr(self.dut, f"{p}__tready")) for p in self.ports}
        cycle = 0
        while True:
            await RisingEdge(self.dut.clk)
            cycle += 1
            for p, (v, r) in sig.items():
                if v.value:
                    self.valid[p].append(cycle)
                    if r.value:
                        self.cycles[p].append(cycle)

    def stop(self):
        self.task.cancel()


class AttnContextTB(StreamTB):
    ERROR_BITS = tuple(ERRORS)

    def __init__(self, dut, seed: int):
        super().__init__(dut)
        self.rng, self.np_rng = random.Random(seed), np.random.default_rng(seed)
        self.p_src = self.axis_source("s_p", byte_size=16)
        self.v_src = self.axis_source("s_v")
        self.sink = self.axis_sink("m_ctx")
        self.model = ContextModel()
        self.scoreboard = Scoreboard()
        self.monitor = cocotb.start_soon(self._monitor())

    async def _monitor(self):
        while True:
            frame = await self.sink.recv()
            self.scoreboard.compare([int(b) - 256 if b >= 128 else int(b) for b in frame.tdata])

    async def config(self, head_dim: int, n_keys: int, mult: int, shift: int):
        await self.drive_config(head_dim=head_dim, n_keys=n_keys, ctx_mult=mult, ctx_shift=shift)

    def set_stalls(self, p_p: float = 0.0, p_v: float = 0.0, p_out: float = 0.0):
        for port, p in ((self.p_src, p_p), (self.v_src, p_v), (self.sink, p_out)):
            if p:
                port.set_pause_generator(stalls(self.rng, p))
            else:
                port.clear_pause_generator()
                port.pause = False

    def idle(self) -> bool:
        return all(s.empty() and s.idle() for s in (self.p_src, self.v_src))

    async def send_raw(self, p, v_bytes: bytes):
        await self.p_src.send(AxiStreamFrame([int(x) for x in p]))
        await self.v_src.send(AxiStreamFrame(v_bytes))

    async def job(self, p, v, mult: int, shift: int, tag: str):
        """Queue one job. Returns once all its probabilities are in (so the core has sampled its
        configuration): the next job may be queued at once, back to back."""
        p, v = np.asarray(p, dtype=np.int64), np.asarray(v, dtype=np.int64)
        assert v.ndim == 2 and p.shape == (v.shape[0],) and p.min() >= 0 and p.max() < 1 << 16
        self.scoreboard.expect(self.model(p, v, mult, shift), tag)
        await self.config(v.shape[1], v.shape[0], mult, shift)
        await self.send_raw(p, pack_rows(v, self.np_rng))
        await self.p_src.wait()

    async def drain(self, timeout: int = 200000):
        await self.scoreboard.wait_empty(self.dut.clk, timeout, idle=self.idle)
        await ClockCycles(self.dut.clk, 4)
        assert not self.scoreboard.expected and self.sink.empty()

    async def abort(self):
        """Drop whatever is queued or in flight on the inputs and reset the core."""
        self.p_src.clear()
        self.v_src.clear()
        await self.reset()

    # ---- stimulus ----
    def values(self, n: int, hd: int):
        return self.np_rng.integers(-128, 128, (n, hd))

    def probs(self, n: int):
        """Softmax probabilities of realistic scores (GPT-2-like head), from numerics.softmax."""
        mult, shift = numerics.multiplier_for(0.05 * 0.05 * 1.4426950408889634 * 256 / 8)
        scores = self.np_rng.integers(-(1 << 21), 1 << 21, n) // self.rng.choice([1, 16, 256])
        return numerics.softmax(scores[None], np.ones((1, n), dtype=bool), mult, shift)[0]

    def scale(self):
        """A realistic ctx requantization: 2**-15 * s_v / s_ctx."""
        return numerics.multiplier_for(2.0 ** -15 * self.rng.uniform(0.02, 0.1) / self.rng.uniform(0.02, 0.1))


async def start(dut, seed: int) -> AttnContextTB:
    tb = AttnContextTB(dut, seed)
    await tb.reset()
    await tb.config(1, 1, 1 << 14, 14)
    return tb


def shapes() -> list[int]:
    return sorted({hd for hd in (48, 64, 20, 8, 256, 1, 9, 16) if hd <= MAX_HD})


# ---- tests ------------------------------------------------------------------------------------
@cocotb.test(timeout_time=20, timeout_unit="ms")
async def test_shapes(dut):
    """head_dim 48, 64, 20, 8, 256, 1, 9, 16 with n_keys 1, 2, 17, softmax probabilities and
    realistic scales, back to back, under random stalls."""
    tb = await start(dut, 1)
    count = 0
    for i, hd in enumerate(shapes()):
        tb.set_stalls(*[(0.0, 0.0, 0.0), (0.3, 0.3, 0.3), (0.1, 0.5, 0.2), (0.5, 0.1, 0.6)][i % 4])
        for n in (1, 2, 17):
            if n <= MAX_KEYS:
                await tb.job(tb.probs(n), tb.values(n, hd), *tb.scale(), f"hd={hd} n_keys={n}")
                count += 1
    await tb.drain()
    assert tb.scoreboard.checked == count


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def test_single_beat_rows(dut):
    """head_dim <= one beat (every row hits the same accumulator word in consecutive cycles) and two
    beats, with random probabilities, no stalls then stalls: the read-modify-write has no hazard."""
    tb = await start(dut, 2)
    for stall in (0.0, 0.3):
        tb.set_stalls(stall, stall, stall)
        for hd in (LANES, 3, LANES + 1, 2 * LANES):
            if hd <= MAX_HD:
                n = min(64, MAX_KEYS)
                p = tb.np_rng.integers(0, P_MAX + 1, n)
                await tb.job(p, tb.values(n, hd), 1 << 14, 24, f"hd={hd} stall={stall}")
    await tb.drain()


@cocotb.test(timeout_time=100, timeout_unit="ms", skip=not PARAMS.get("long", True))
async def test_long_context(dut):
    """n_keys 2048 (GPT-2's context), head_dim 64, with random stalls on every port."""
    tb = await start(dut, 3)
    tb.set_stalls(0.1, 0.1, 0.2)
    n, hd = min(2048, MAX_KEYS), min(64, MAX_HD)
    await tb.job(tb.probs(n), tb.values(n, hd), *tb.scale(), f"hd={hd} n_keys={n}")
    # every key at the largest probability and value: the contract's |acc| bound does not hold,
    # but int32 does up to 511 keys
    n = min(511, MAX_KEYS)
    await tb.job(np.full(n, P_MAX), np.full((n, hd), -128), 1 << 14, 38, f"p max, v -128, n_keys={n}")
    await tb.drain()


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def test_extremes(dut):
    """p = 2**15 + 16 (the contract's maximum) on every key with v = -128 / 127 / alternating, at
    scales that saturate and that do not; a single key with p = 2**15; zeros; acc = -2**31."""
    tb = await start(dut, 4)
    tb.set_stalls(0.2, 0.2, 0.2)
    hd = min(256, MAX_HD)
    n = min(17, MAX_KEYS)
    for v_fill in (-128, 127):
        for mult, shift in ((1 << 14, 29), ((1 << 15) - 1, 33), (1 << 14, 47), (1, 0), (0, 0), (12345, 40)):
            await tb.job(np.full(n, P_MAX), np.full((n, hd), v_fill), mult, shift,
                         f"p max v={v_fill} mult={mult} shift={shift}")
    alt = np.where(np.arange(hd) % 2, 127, -128)
    await tb.job(np.full(n, P_MAX), np.stack([alt if j % 2 else -alt - 1 for j in range(n)]), (1 << 15) - 1, 30,
                 "alternating")
    await tb.job(np.array([1 << 15]), tb.values(1, hd), (1 << 15) - 1, 30, "one key, p = 1.0")
    await tb.job(np.zeros(n, dtype=np.int64), tb.values(n, hd), (1 << 15) - 1, 0, "p = 0")
    await tb.job(tb.probs(n), np.zeros((n, hd), dtype=np.int64), (1 << 15) - 1, 0, "v = 0")
    # acc = -2**31 exactly (512 keys of p = 2**15, v = -128): a round-half tie at shift 46
    n, hd8 = min(512, MAX_KEYS), min(LANES, MAX_HD)
    for shift in (46, 45, 47, 0):
        await tb.job(np.full(n, 1 << 15), np.full((n, hd8), -128), 1 << 14, shift, f"acc = -2**31 shift={shift}")
    await tb.drain()


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def test_rounding(dut):
    """Every shift 0..47 with exact round-half ties of both signs (acc * mult = odd * 2**(shift-1))
    next to random lanes, and random multipliers."""
    tb = await start(dut, 5)
    tb.set_stalls(0.1, 0.1, 0.1)
    hd = min(2 * LANES, MAX_HD)
    for s in range(numerics.MAX_SHIFT + 1):
        # ties: one key with p = 2**k, mult = 2**j, k + j = s - 1, odd values
        if 1 <= s <= 30:
            j = min(s - 1, 14)
            k = s - 1 - j
            v = tb.np_rng.integers(-64, 64, (1, hd)) * 2 + 1
            await tb.job(np.array([1 << k]), v, 1 << j, s, f"ties shift={s}")
        n = min(3, MAX_KEYS)
        mult = int(tb.np_rng.integers(1 << 14, 1 << 15))
        await tb.job(tb.np_rng.integers(0, P_MAX + 1, n), tb.values(n, hd), mult, s, f"random shift={s}")
    await tb.drain()


@cocotb.test(timeout_time=5, timeout_unit="ms")
async def test_latency_throughput(dut):
    """No stalls, jobs back to back: one value beat per cycle across rows, the documented latency
    to the first output beat, the output at one beat every out_interval cycles, and cycles_per_job
    per job."""
    tb = await start(dut, 6)
    jobs = [(hd, n) for hd, n in ((64, 17), (8, 40), (20, 9), (LANES, 1), (256, 3)) if hd <= MAX_HD and n <= MAX_KEYS]
    hs = Handshakes(dut, ["s_p", "s_v", "m_ctx"])
    for hd, n in jobs:
        await tb.job(tb.probs(n), tb.values(n, hd), *tb.scale(), f"timing hd={hd} n={n}")
    await tb.drain()
    hs.stop()
    v, out, p = hs.cycles["s_v"], hs.cycles["m_ctx"], hs.cycles["s_p"]
    assert len(p) == sum(n for _, n in jobs) and len(v) == sum(n * beats(hd) for hd, n in jobs)
    assert len(out) == sum(beats(hd) for hd, _ in jobs)
    vo = oo = 0
    for i, (hd, n) in enumerate(jobs):
        nb = beats(hd)
        jv, jo = v[vo:vo + n * nb], out[oo:oo + nb]
        assert jv[-1] - jv[0] + 1 == n * nb, f"hd={hd} n={n}: {jv[-1] - jv[0] + 1 - n * nb} bubbles in the values"
        first_valid = next(c for c in hs.valid["m_ctx"] if c > jv[-1])
        assert first_valid - jv[-1] == LATENCY, f"hd={hd} n={n}: latency {first_valid - jv[-1]}, documented {LATENCY}"
        gaps = [b - a for a, b in zip(jo, jo[1:])]
        assert gaps == [OUT_INTERVAL] * (nb - 1), f"hd={hd}: output beats {gaps} cycles apart, documented {OUT_INTERVAL}"
        if i + 1 < len(jobs):
            per_job = v[vo + n * nb] - jv[0]
            assert per_job == CYCLES_PER_JOB[(hd, n)], \
                f"hd={hd} n={n}: {per_job} cycles per job, documented {CYCLES_PER_JOB[(hd, n)]}"
        vo, oo = vo + n * nb, oo + nb
    cocotb.log.info("%d value beats; latency %d", len(v), LATENCY)


@cocotb.test(timeout_time=5, timeout_unit="ms")
async def test_output_backpressure(dut):
    """m_ctx held during the read-out: the output waits (nothing lost or repeated), the next job's
    inputs wait, and everything is exact once m_ctx is released."""
    tb = await start(dut, 7)
    hs = Handshakes(dut, ["s_v", "m_ctx"])
    tb.sink.pause = True
    hd, n = min(256, MAX_HD), min(5, MAX_KEYS)
    await tb.job(tb.probs(n), tb.values(n, hd), *tb.scale(), "held output")
    driver = cocotb.start_soon(tb.job(tb.probs(n), tb.values(n, hd), *tb.scale(), "next job"))
    await ClockCycles(dut.clk, n * beats(hd) + 4 * LATENCY)
    assert len(hs.cycles["s_v"]) == n * beats(hd), "the next job started before the output was sent"
    assert len(hs.cycles["m_ctx"]) == 0 and dut.m_ctx__tvalid.value == 1
    tb.set_stalls(0.0, 0.0, 0.7)
    await driver
    await tb.drain()
    hs.stop()
    assert len(hs.cycles["m_ctx"]) == 2 * beats(hd)


@cocotb.test(timeout_time=10, timeout_unit="ms")
async def test_reset_mid_job(dut):
    """A synchronous reset during the values, during the read-out with m_ctx held, and under
    stalls; each is followed by an exact job (which overwrites the stale accumulators)."""
    tb = await start(dut, 8)

    async def abort(hd, n, after, hold=False, stall=0.0):
        tb.set_stalls(stall, stall, stall)
        tb.sink.pause = hold
        await tb.config(hd, n, 1 << 14, 20)
        await tb.send_raw(np.full(n, P_MAX), pack_rows(np.full((n, hd), 127), tb.np_rng))
        await ClockCycles(dut.clk, after)
        await tb.abort()
        tb.sink.pause = False
        assert tb.sink.empty() and not tb.scoreboard.expected
        assert int(dut.error.value) == 0
        hd2, n2 = min(hd, 48), min(5, MAX_KEYS)
        await tb.job(tb.probs(n2), tb.values(n2, hd2), *tb.scale(), f"after a reset {after} cycles in (hd={hd}, n={n})")
        await tb.drain()

    await abort(min(64, MAX_HD), min(17, MAX_KEYS), 50)  # inside the values, mid-row
    await abort(min(256, MAX_HD), min(2, MAX_KEYS), 100, hold=True)  # read-out held by m_ctx
    await abort(min(8, MAX_HD), min(40, MAX_KEYS), 30, stall=0.5)  # single-beat rows
    await abort(min(20, MAX_HD), min(17, MAX_KEYS), 35, stall=0.3)


async def check_error(tb: AttnContextTB, name: str, hd: int, n: int, shift: int, n_p: int, v_beats: int,
                      taken: tuple[int, int]):
    """Send n_p probabilities and v_beats value beats (each one frame, tlast on its last) with
    head_dim hd, n_keys n and ctx_shift shift. The core must raise exactly the error bit `name`
    (no hang), having taken `taken` (probability, value) beats, the offending one included, and
    nothing after it (tready low); send nothing; keep the bit until a reset, after which a job is
    exact."""
    dut = tb.dut
    hs = Handshakes(dut, ["s_p", "s_v", "m_ctx"])
    await tb.config(hd, n, 1 << 14, shift)
    await tb.send_raw(tb.np_rng.integers(0, P_MAX + 1, n_p),
                      tb.np_rng.integers(0, 256, v_beats * LANES, dtype=np.uint8).tobytes())
    for _ in range(4 * (n_p + v_beats) + 100):
        if int(dut.error.value):
            break
        await RisingEdge(dut.clk)
    want = 1 << ERRORS.index(name)
    assert int(dut.error.value) == want, f"{name}: error = {int(dut.error.value):#x}, expected {want:#x}"
    for cycle in range(LATENCY + 20):  # sticky; nothing more is taken, nothing sent
        await RisingEdge(dut.clk)
        assert int(dut.error.value) == want, f"{name}: error changed {cycle} cycles later"
        assert not dut.s_p__tready.value and not dut.s_v__tready.value, f"{name}: input taken after the error"
    got = (len(hs.cycles["s_p"]), len(hs.cycles["s_v"]))
    assert got == taken, f"{name}: took {got} (probability, value) beats, expected {taken}"
    assert not hs.valid["m_ctx"] and tb.sink.empty(), f"{name}: output after an error"
    hs.stop()
    await tb.abort()
    assert int(dut.error.value) == 0
    hd2 = min(20, MAX_HD)
    await tb.job(tb.probs(3), tb.values(3, hd2), *tb.scale(), f"after error {name}")
    await tb.drain()


@cocotb.test(timeout_time=10, timeout_unit="ms")
async def test_errors(dut):
    """Every error bit: head_dim 0 / above the maximum / 511, n_keys 0 / above the maximum / 4095,
    ctx_shift 48 / 63, tlast early or missing on s_p and on s_v (mid-row, at a row end); each
    refused without a hang."""
    tb = await start(dut, 9)
    hd = min(20, MAX_HD)
    nb = beats(hd)
    n = min(4, MAX_KEYS)
    # a bad configuration: the first beat (probability and value together) is taken and dropped
    for bad in (0, MAX_HD + 1, 511):
        await check_error(tb, "head_dim", bad, n, 20, n, 3, (1, 1))
    for bad in (0, MAX_KEYS + 1, 4095):
        await check_error(tb, "n_keys", hd, bad, 20, 2, 3, (1, 1))
    for bad in (numerics.MAX_SHIFT + 1, 63):
        await check_error(tb, "ctx_shift", hd, n, bad, n, n * nb, (1, 1))
    if n > 1:
        # tlast on the second-last probability: raised at that row's first beat
        await check_error(tb, "p_tlast_early", hd, n, 20, n - 1, n * nb, (n - 1, (n - 2) * nb + 1))
        # tlast at the end of the second-last value row
        await check_error(tb, "v_tlast_early", hd, n, 20, n, (n - 1) * nb, (n - 1, (n - 1) * nb))
    await check_error(tb, "p_tlast_missing", hd, n, 20, n + 1, n * nb, (n, (n - 1) * nb + 1))
    if nb > 1:  # tlast on the second row's first beat
        await check_error(tb, "v_tlast_early", hd, n, 20, n, nb + 1, (2, nb + 1))
    await check_error(tb, "v_tlast_missing", hd, n, 20, n, n * nb + 2, (n, n * nb))
    tb.set_stalls(0.3, 0.3, 0.3)
    await check_error(tb, "v_tlast_missing", hd, n, 20, n, n * nb + 1, (n, n * nb))
    await check_error(tb, "p_tlast_missing", hd, n, 20, n + 2, n * nb, (n, (n - 1) * nb + 1))
