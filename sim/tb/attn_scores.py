"""cocotb testbench for hw.attn_scores.AttnScores: every score equals numerics.attention_scores.

``AttnScoresTB`` drives the query (``s_q``) and the key rows (``s_k``) from cocotbext-axi sources
and drains ``m_scores`` into a sink, each with optional random valid/ready stalls; the model
computes the expected scores only through ``numerics.attention_scores``; a monitor coroutine passes
every received row of scores (one job, tlast-delimited) to the scoreboard, which compares by
equality. Padding bytes past ``head_dim`` are random, so a core that reads them fails.

TB_PARAMS (JSON): ``bus_bits``, ``max_head_dim``, ``max_keys``, ``latency`` and ``cycles_per_job``
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
CYCLES_PER_JOB = {(hd, n): c for hd, n, c in PARAMS.get("cycles_per_job", [])}


def beats(head_dim: int) -> int:
    return -(-head_dim // LANES)


def pack_rows(rows, rng: np.random.Generator) -> bytes:
    """int8 rows [n, hd] -> the stream bytes: each row padded to whole beats with random bytes."""
    rows = np.asarray(rows, dtype=np.int64)
    n, hd = rows.shape
    buf = rng.integers(0, 256, (n, beats(hd) * LANES), dtype=np.uint8)
    buf[:, :hd] = (rows & 0xFF).astype(np.uint8)
    return buf.tobytes()


def signed32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


class ScoresModel:
    @staticmethod
    def __call__(q, k) -> list[int]:
        s = numerics.attention_scores(np.asarray(q, dtype=np.int64)[None], np.asarray(k, dtype=np.int64))[0]
        return [int(v) for v in s]


class Handshakes:
    """Cycle numbers of every transfer (and the first tvalid cycles) on the named ports."""

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


class AttnScoresTB(StreamTB):
    ERROR_BITS = tuple(ERRORS)

    def __init__(self, dut, seed: int):
        super().__init__(dut)
        self.rng, self.np_rng = random.Random(seed), np.random.default_rng(seed)
        self.q_src = self.axis_source("s_q")
        self.k_src = self.axis_source("s_k")
        self.sink = self.axis_sink("m_scores", byte_size=32)
        self.model = ScoresModel()
        self.scoreboard = Scoreboard()
        self.monitor = cocotb.start_soon(self._monitor())

    async def _monitor(self):
        while True:
            frame = await self.sink.recv()
            user = frame.tuser if isinstance(frame.tuser, list) else [frame.tuser] * len(frame.tdata)
            assert all(u == 1 for u in user), f"m_scores tuser (visible) not 1: {user}"
            self.scoreboard.compare([signed32(int(v)) for v in frame.tdata])

    async def config(self, head_dim: int, n_keys: int):
        await self.drive_config(head_dim=head_dim, n_keys=n_keys)

    def set_stalls(self, p_q: float = 0.0, p_k: float = 0.0, p_out: float = 0.0):
        for port, p in ((self.q_src, p_q), (self.k_src, p_k), (self.sink, p_out)):
            if p:
                port.set_pause_generator(stalls(self.rng, p))
            else:
                port.clear_pause_generator()
                port.pause = False

    def idle(self) -> bool:
        return all(s.empty() and s.idle() for s in (self.q_src, self.k_src))

    async def job(self, q, k, tag: str):
        """Queue one job. Returns once its query is in (the core has sampled head_dim and n_keys), so
        the next job may be queued at once: back to back."""
        q, k = np.asarray(q, dtype=np.int64), np.asarray(k, dtype=np.int64)
        assert k.ndim == 2 and q.shape == (k.shape[1],)
        self.scoreboard.expect(self.model(q, k), tag)
        await self.config(len(q), len(k))
        await self.q_src.send(AxiStreamFrame(pack_rows(q[None], self.np_rng)))
        await self.k_src.send(AxiStreamFrame(pack_rows(k, self.np_rng)))
        await self.q_src.wait()

    async def drain(self, timeout: int = 200000):
        await self.scoreboard.wait_empty(self.dut.clk, timeout, idle=self.idle)
        await ClockCycles(self.dut.clk, 4)
        assert not self.scoreboard.expected and self.sink.empty()

    async def abort(self):
        """Drop whatever is queued or in flight on the inputs and reset the core."""
        self.q_src.clear()
        self.k_src.clear()
        await self.reset()

    # ---- stimulus ----
    def rand(self, *shape):
        return self.np_rng.integers(-128, 128, shape)


async def start(dut, seed: int) -> AttnScoresTB:
    tb = AttnScoresTB(dut, seed)
    await tb.reset()
    await tb.config(1, 1)
    return tb


def shapes() -> list[int]:
    return sorted({hd for hd in (48, 64, 20, 8, 256, 1, 9) if hd <= MAX_HD})


# ---- tests ------------------------------------------------------------------------------------
@cocotb.test(timeout_time=20, timeout_unit="ms")
async def test_shapes(dut):
    """head_dim 48, 64, 20, 8, 256, 1, 9 with n_keys 1, 2, 17, back to back, under random stalls."""
    tb = await start(dut, 1)
    for i, hd in enumerate(shapes()):
        tb.set_stalls(*[(0.0, 0.0, 0.0), (0.3, 0.3, 0.3), (0.1, 0.5, 0.2), (0.5, 0.1, 0.6)][i % 4])
        for n in (1, 2, 17):
            if n <= MAX_KEYS:
                await tb.job(tb.rand(hd), tb.rand(n, hd), f"hd={hd} n_keys={n}")
    await tb.drain()
    assert tb.scoreboard.checked == 3 * len(shapes())


@cocotb.test(timeout_time=100, timeout_unit="ms", skip=not PARAMS.get("long", True))
async def test_long_context(dut):
    """n_keys 2048 (GPT-2's context), head_dim 64, with random stalls on every port."""
    tb = await start(dut, 2)
    tb.set_stalls(0.1, 0.1, 0.2)
    n, hd = min(2048, MAX_KEYS), min(64, MAX_HD)
    await tb.job(tb.rand(hd), tb.rand(n, hd), f"hd={hd} n_keys={n}")
    await tb.drain()


@cocotb.test(timeout_time=20, timeout_unit="ms")
async def test_extremes(dut):
    """q = k = -128 everywhere (the largest score, 2**22 at head_dim 256), -128 against 127 (the most
    negative), alternating signs, zeros, and single-element rows."""
    tb = await start(dut, 3)
    tb.set_stalls(0.2, 0.2, 0.2)
    hd = min(256, MAX_HD)
    n = min(17, MAX_KEYS)
    lo = np.full(hd, -128)
    await tb.job(lo, np.full((n, hd), -128), "q = k = -128")
    await tb.job(lo, np.full((n, hd), 127), "q = -128, k = 127")
    await tb.job(np.full(hd, 127), np.full((n, hd), 127), "q = k = 127")
    alt = np.where(np.arange(hd) % 2, 127, -128)
    k = np.stack([alt if j % 2 else -alt - 1 for j in range(n)])
    await tb.job(alt, k, "alternating")
    await tb.job(np.zeros(hd), tb.rand(n, hd), "q = 0")
    await tb.job(np.full(1, -128), np.full((n, 1), -128), "head_dim 1")
    await tb.drain()
    assert max(numerics.attention_scores(lo[None], np.full((1, hd), -128))[0]) == 128 * 128 * hd


@cocotb.test(timeout_time=5, timeout_unit="ms")
async def test_latency_throughput(dut):
    """No stalls, jobs back to back: one key beat per cycle across rows and jobs, the documented
    latency from a row's last key beat to its score, one score per cycle for one-beat rows."""
    tb = await start(dut, 4)
    jobs = [(hd, n) for hd, n in ((64, 17), (8, 40), (20, 9), (LANES, 1), (256, 3)) if hd <= MAX_HD and n <= MAX_KEYS]
    hs = Handshakes(dut, ["s_q", "s_k", "m_scores"])
    for hd, n in jobs:
        await tb.job(tb.rand(hd), tb.rand(n, hd), f"timing hd={hd} n={n}")
    await tb.drain()
    hs.stop()
    q, k, out = hs.cycles["s_q"], hs.cycles["s_k"], hs.cycles["m_scores"]
    assert len(q) == sum(beats(hd) for hd, _ in jobs)
    assert len(k) == sum(n * beats(hd) for hd, n in jobs)
    assert len(out) == sum(n for _, n in jobs)
    # from the first query beat to the last key beat every cycle carries a query or a key beat
    span = k[-1] - q[0] + 1
    assert span == len(q) + len(k), f"{span - len(q) - len(k)} bubbles in {span} cycles"
    # every score leaves exactly `latency` cycles after its row's last key beat (m_scores never
    # stalls, so nothing queues): one score per cycle for one-beat rows
    row_ends, ko = [], 0
    for hd, n in jobs:
        nb = beats(hd)
        row_ends += [k[ko + (j + 1) * nb - 1] for j in range(n)]
        ko += n * nb
    qo = 0
    for hd, n in jobs[:-1]:  # first query beat to the next job's first query beat
        per_job = q[qo + beats(hd)] - q[qo]
        assert per_job == CYCLES_PER_JOB[(hd, n)], \
            f"hd={hd} n={n}: {per_job} cycles per job, documented {CYCLES_PER_JOB[(hd, n)]}"
        qo += beats(hd)
    lat = [o - e for o, e in zip(out, row_ends)]
    assert set(lat) == {LATENCY}, f"latencies {sorted(set(lat))}, documented {LATENCY}"
    cocotb.log.info("%d key beats in %d cycles; latency %d", len(k), k[-1] - k[0] + 1, LATENCY)


@cocotb.test(timeout_time=5, timeout_unit="ms")
async def test_output_backpressure(dut):
    """m_scores held while one-beat rows stream: the core stops taking keys at its credit limit, loses
    nothing, and everything drains in order once m_scores is released."""
    tb = await start(dut, 5)
    hs = Handshakes(dut, ["s_k"])
    tb.sink.pause = True
    hd, n = min(LANES, MAX_HD), min(60, MAX_KEYS)
    driver = cocotb.start_soon(tb.job(tb.rand(hd), tb.rand(n, hd), "held output"))
    await ClockCycles(dut.clk, 200)
    held = len(hs.cycles["s_k"])
    assert 0 < held < n, f"s_k took {held} of {n} rows while m_scores was held"
    assert dut.m_scores__tvalid.value == 1
    tb.sink.pause = False
    await driver
    await tb.drain()
    hs.stop()
    assert len(hs.cycles["s_k"]) == n


@cocotb.test(timeout_time=10, timeout_unit="ms")
async def test_reset_mid_job(dut):
    """A synchronous reset during the query load, during the keys, and with scores held back by
    m_scores; each is followed by an exact job (the abandoned one leaves nothing behind)."""
    tb = await start(dut, 6)

    async def abort(hd, n, after, hold=False, p=0.0):
        tb.set_stalls(p, p, p)
        tb.sink.pause = hold
        await tb.config(hd, n)
        await tb.q_src.send(AxiStreamFrame(pack_rows(tb.rand(1, hd), tb.np_rng)))
        await tb.k_src.send(AxiStreamFrame(pack_rows(tb.rand(n, hd), tb.np_rng)))
        await ClockCycles(dut.clk, after)
        await tb.abort()
        tb.sink.pause = False
        assert tb.sink.empty() and not tb.scoreboard.expected
        assert int(dut.error.value) == 0
        hd2 = min(48, MAX_HD)
        n2 = min(5, MAX_KEYS)
        await tb.job(tb.rand(hd2), tb.rand(n2, hd2), f"after a reset {after} cycles in (hd={hd}, n={n})")
        await tb.drain()

    hd = min(256, MAX_HD)
    await abort(hd, 3, beats(hd) // 2, p=0.3)           # inside the query load
    await abort(min(64, MAX_HD), min(17, MAX_KEYS), 40)  # inside the keys, mid-row
    await abort(min(8, MAX_HD), min(40, MAX_KEYS), 100, hold=True)  # output queue full, m_scores held
    await abort(min(20, MAX_HD), min(17, MAX_KEYS), 25, p=0.5)


async def check_error(tb: AttnScoresTB, name: str, hd: int, n: int, q_beats: int, k_beats: int,
                      taken: tuple[int, int], out_scores: int = 0):
    """Send q_beats query beats and k_beats key beats (each one frame, tlast on its last beat) with
    head_dim hd and n_keys n. The core must raise exactly the error bit `name` (no hang), having
    taken `taken` (query, key) beats, the offending one included, and nothing after it (tready
    low); deliver `out_scores` scores and no tlast; keep the bit until a reset, after which a job
    is exact."""
    dut = tb.dut
    hs = Handshakes(dut, ["s_q", "s_k", "m_scores"])
    await tb.config(hd, n)
    await tb.q_src.send(AxiStreamFrame(tb.np_rng.integers(0, 256, q_beats * LANES, dtype=np.uint8).tobytes()))
    await tb.k_src.send(AxiStreamFrame(tb.np_rng.integers(0, 256, k_beats * LANES, dtype=np.uint8).tobytes()))
    for _ in range(4 * (q_beats + k_beats) + 100):
        if int(dut.error.value):
            break
        await RisingEdge(dut.clk)
    want = 1 << ERRORS.index(name)
    assert int(dut.error.value) == want, f"{name}: error = {int(dut.error.value):#x}, expected {want:#x}"
    for cycle in range(LATENCY + 20):  # sticky; nothing more is taken
        await RisingEdge(dut.clk)
        assert int(dut.error.value) == want, f"{name}: error changed {cycle} cycles later"
        assert not dut.s_q__tready.value and not dut.s_k__tready.value, f"{name}: input taken after the error"
    got = (len(hs.cycles["s_q"]), len(hs.cycles["s_k"]))
    assert got == taken, f"{name}: took {got} (query, key) beats, expected {taken}"
    assert len(hs.cycles["m_scores"]) == out_scores, (name, len(hs.cycles["m_scores"]), out_scores)
    assert tb.sink.empty(), f"{name}: a complete (tlast) score row came out"
    hs.stop()
    await tb.abort()
    assert int(dut.error.value) == 0
    hd2 = min(20, MAX_HD)
    await tb.job(tb.rand(hd2), tb.rand(min(3, MAX_KEYS), hd2), f"after error {name}")
    await tb.drain()


@cocotb.test(timeout_time=10, timeout_unit="ms")
async def test_errors(dut):
    """Every error bit: head_dim 0 / above the maximum / 511, n_keys 0 / above the maximum / 4095,
    tlast early or missing on s_q and on s_k (mid-row, at a row end); each refused without a hang."""
    tb = await start(dut, 7)
    hd = min(20, MAX_HD)
    nb = beats(hd)
    n = min(4, MAX_KEYS)
    for bad in (0, MAX_HD + 1, 511):
        await check_error(tb, "head_dim", bad, n, 1, 3, (1, 0))
    for bad in (0, MAX_KEYS + 1, 4095):
        await check_error(tb, "n_keys", hd, bad, nb, 3, (1, 0))
    if nb > 1:
        await check_error(tb, "q_tlast_early", hd, n, nb - 1, n * nb, (nb - 1, 0))
    await check_error(tb, "q_tlast_missing", hd, n, nb + 1, n * nb, (nb, 0))
    if n > 1:  # tlast at the end of the second-last row: that row's score is dropped
        await check_error(tb, "k_tlast_early", hd, n, nb, (n - 1) * nb, (nb, (n - 1) * nb), out_scores=n - 2)
    if nb > 1:  # tlast on the second row's first beat
        await check_error(tb, "k_tlast_early", hd, n, nb, nb + 1, (nb, nb + 1), out_scores=1)
    await check_error(tb, "k_tlast_missing", hd, n, nb, n * nb + 2, (nb, n * nb), out_scores=n - 1)
    tb.set_stalls(0.3, 0.3, 0.3)
    await check_error(tb, "k_tlast_missing", hd, n, nb, n * nb + 1, (nb, n * nb), out_scores=n - 1)
