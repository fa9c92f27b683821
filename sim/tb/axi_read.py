"""cocotb testbench for hw.axi_read.AxiReadDma: every frame equals the RAM bytes it was read from.

Structure (as the other testbenches): ``AxiReadTB`` owns the command source (a cocotbext-axi
stream source on ``cmd__*``), ``ReadRam`` (an AXI read subordinate on a bytearray built from
cocotbext-axi's AR sink and R source, with a fixed AR-to-R latency, per-address RRESP errors and
reset handling), the ``m_data`` sink, all with random pauses; the model is the RAM's bytes at
each command's range plus the exact burst split a command must produce; ``BusMonitor`` checks
the AXI rules cycle by cycle (arlen <= 15, no 4 KiB crossing, AR fields and stability, rready
always high, bursts in flight <= max_outstanding, idle only when nothing is in flight, no
``m_data`` beat after a flush) and records timing; the ``Scoreboard`` compares every frame.
TB_PARAMS (JSON) carries ``max_outstanding``, ``fifo_depth``, ``ar_latency``, ``r_latency``.
"""

from __future__ import annotations

import random
from collections import deque

import cocotb
from cocotb.triggers import ClockCycles, Event, RisingEdge
from cocotbext.axi import AxiReadBus
from cocotbext.axi.axi_channels import AxiARSink, AxiRSource, AxiRTransaction
from cocotbext.axi.reset import Reset
from cocotbext.axi.stream import define_stream

from gpt_fpga.sim.tb import common
from gpt_fpga.sim.tb.common import PARAMS, Scoreboard, StreamTB

DATA_BYTES = 8
MEM_SIZE = 1 << 20  # the RAM aliases every address modulo 1 MiB
PAGE = 4096
MAX_BURST = 16
MAX_OUTSTANDING = int(PARAMS.get("max_outstanding", 8))
FIFO_DEPTH = int(PARAMS.get("fifo_depth", 16 * MAX_OUTSTANDING))
RESP_OKAY, RESP_SLVERR, RESP_DECERR = 0, 2, 3

DmaCmdBus, DmaCmdTransaction, DmaCmdSource, _, _ = define_stream(
    "DmaCmd", signals=["addr", "beats", "valid", "ready"])


def split_bursts(addr: int, beats: int, nbytes: int = DATA_BYTES) -> list[tuple[int, int]]:
    """The (address, beats) bursts a command must become: <= 16 beats, none across 4 KiB."""
    out = []
    while beats:
        n = min(MAX_BURST, beats, (PAGE - addr % PAGE) // nbytes)
        out.append((addr, n))
        addr, beats = (addr + n * nbytes) % 2**32, beats - n
    return out


class ReadRam(Reset):
    """AXI read subordinate: R beats of a burst start `latency` cycles after its AR is accepted
    (bursts pipelined, unlimited ARs accepted), data from `mem` (address modulo its size), RRESP
    from `errors` ((start, end, resp) byte ranges; the data are returned anyway)."""

    def __init__(self, dut, prefix: str, latency: int, rng: random.Random):
        bus = AxiReadBus.from_prefix(dut, prefix, bus_separator="__")
        self.clk = dut.clk
        self.ar = AxiARSink(bus.ar, dut.clk, dut.rst)
        self.r = AxiRSource(bus.r, dut.clk, dut.rst)
        for ch in (self.ar, self.r):
            ch.log.setLevel("WARNING")
        self.latency, self.rng = latency, rng
        self.mem = bytearray(MEM_SIZE)
        self.errors: list[tuple[int, int, int]] = []
        self.pending: deque = deque()
        self.wake = Event()
        self.cycle = 0
        self._tasks = []
        cocotb.start_soon(self._count())
        self._init_reset(dut.rst, True)

    def fill(self):
        """Fresh random contents (a new RAM)."""
        self.mem[:] = self.rng.randbytes(MEM_SIZE)

    def read(self, addr: int, n: int) -> bytes:
        a = addr % MEM_SIZE
        assert a + n <= MEM_SIZE, "test command wraps around the RAM"
        return bytes(self.mem[a:a + n])

    def set_stalls(self, p_ar: float, p_r: float):
        common.set_stalls(self.ar, self.rng, p_ar)
        common.set_stalls(self.r, self.rng, p_r)

    def _handle_reset(self, state):
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        self.pending.clear()
        self.ar.clear()
        self.r.clear()  # a reset drops the bursts in flight (the stream source alone keeps its queue)
        if not state:
            self._tasks = [cocotb.start_soon(self._accept()), cocotb.start_soon(self._respond())]

    async def _count(self):
        while True:
            await RisingEdge(self.clk)
            self.cycle += 1

    async def _accept(self):
        while True:
            ar = await self.ar.recv()
            self.pending.append((self.cycle + self.latency, int(ar.araddr), int(ar.arlen)))
            self.wake.set()

    def resp(self, addr: int) -> int:
        return next((r for s, e, r in self.errors if s <= addr < e), RESP_OKAY)

    async def _respond(self):
        while True:
            while not self.pending:
                self.wake.clear()
                await self.wake.wait()
            due, addr, arlen = self.pending[0]
            while self.cycle < due:
                await RisingEdge(self.clk)
            self.pending.popleft()
            for n in range(arlen + 1):
                a = addr + n * DATA_BYTES
                self.r.send_nowait(AxiRTransaction(rid=0, rdata=int.from_bytes(self.read(a, DATA_BYTES), "little"),
                                                   rlast=int(n == arlen), rresp=self.resp(a)))


class BusMonitor:
    """Cycle-by-cycle protocol checks and timing on the DMA's ports (started after the first reset)."""

    def __init__(self, dut):
        self.dut = dut
        self.expected_ars: deque = deque()  # (addr, beats) bursts still to be issued, in order
        self.clear_counts()
        self.task = None

    def clear_counts(self):
        self.cycle = 0
        self.ars, self.rlasts, self.r_beats, self.max_in_flight = 0, 0, 0, 0
        self.ar_cycles, self.r_cycles, self.out_cycles, self.out_valid_cycles, self.cmd_cycles = [], [], [], [], []
        self.flush_cycles = []
        self.flushed = False  # since the last flush, no command taken yet
        self.draining = False  # a flush was seen, idle not yet
        self.stalled_ar = None

    def start(self):
        if self.task is None:
            self.task = cocotb.start_soon(self._run())

    async def _run(self):
        d = self.dut
        arvalid, arready = d.axi__arvalid, d.axi__arready
        rvalid, rready, rlast = d.axi__rvalid, d.axi__rready, d.axi__rlast
        tvalid, tready = d.m_data__tvalid, d.m_data__tready
        while True:
            await RisingEdge(d.clk)
            if d.rst.value:
                self.expected_ars.clear()
                self.clear_counts()
                continue
            self.cycle += 1
            c = self.cycle
            if self.draining:
                assert not d.cmd__ready.value, "cmd.ready before a flush has drained"
                self.draining = not d.idle.value
            if d.cmd__valid.value and d.cmd__ready.value:
                self.cmd_cycles.append(c)
                self.flushed = False
            # AR: fields, stability while stalled, the expected split, 4 KiB rule
            av, ar = bool(arvalid.value), bool(arready.value)
            if av:
                pay = (int(d.axi__araddr.value), int(d.axi__arlen.value), int(d.axi__arsize.value),
                       int(d.axi__arburst.value), int(d.axi__arcache.value), int(d.axi__arprot.value),
                       int(d.axi__arid.value))
                if self.stalled_ar is not None:
                    assert pay == self.stalled_ar, f"AR changed while stalled: {self.stalled_ar} -> {pay}"
                addr, arlen, size, burst, cache, prot, arid = pay
                assert arlen <= MAX_BURST - 1, f"arlen {arlen} > 15"
                assert addr % PAGE + (arlen + 1) * DATA_BYTES <= PAGE, f"burst 0x{addr:x}+{arlen + 1} crosses 4 KiB"
                assert addr % DATA_BYTES == 0 and size == 3 and burst == 1 and cache == 0b0011 and prot == 0 \
                    and arid == 0, f"bad AR fields {pay}"
                if ar:
                    assert self.expected_ars, f"unexpected AR 0x{addr:x} len {arlen + 1}"
                    exp = self.expected_ars.popleft()
                    assert (addr, arlen + 1) == exp, f"AR (0x{addr:x}, {arlen + 1}), expected (0x{exp[0]:x}, {exp[1]})"
                    self.ars += 1
                    self.ar_cycles.append(c)
            self.stalled_ar = pay if av and not ar else None
            # R: never back-pressured
            if rvalid.value:
                assert rready.value, "rready low while rvalid: R back-pressured"
                self.r_beats += 1
                self.r_cycles.append(c)
                if rlast.value:
                    self.rlasts += 1
            in_flight = self.ars - self.rlasts
            assert 0 <= in_flight <= MAX_OUTSTANDING, f"{in_flight} bursts in flight > {MAX_OUTSTANDING}"
            self.max_in_flight = max(self.max_in_flight, in_flight)
            # m_data: nothing after a flush until the next command
            if tvalid.value:
                assert not self.flushed, "m_data.tvalid after a flush"
                self.out_valid_cycles.append(c)
                if tready.value:
                    self.out_cycles.append(c)
            if d.idle.value:
                assert in_flight == 0 and not av, f"idle with {in_flight} bursts in flight (arvalid {av})"
            if d.flush.value:
                self.draining = True
                self.flush_cycles.append(c)
                self.flushed = True
                # bursts not yet presented are never issued; a presented AR stays until accepted
                stuck = [self.expected_ars[0]] if av and not ar and self.expected_ars else []
                self.expected_ars = deque(stuck)


class ReadDmaTB(StreamTB):
    """What the read DMAs' testbenches share: the command source, the ``m_data`` sink and scoreboard,
    drain, and flush. A subclass sets ``self.bus`` (a monitor with ``start()`` and
    ``expected_ars``, empty or 0 when no burst is still expected) and queues commands with
    :meth:`send` after telling the monitor and the scoreboard what to expect."""

    ERROR_BITS = ("rresp",)  # as hw.axi_read.AxiReadDma.ERROR_BITS

    def __init__(self, dut, seed: int):
        super().__init__(dut)
        self.rng = random.Random(seed)
        self.cmd = DmaCmdSource(DmaCmdBus.from_prefix(dut, "cmd", bus_separator="__"), dut.clk, dut.rst)
        self.cmd.log.setLevel("WARNING")
        self.sink = self.axis_sink("m_data")
        self.scoreboard = Scoreboard()
        self.frames = cocotb.start_soon(self._frames())
        dut.flush.value = 0

    async def _frames(self):
        while True:
            frame = await self.sink.recv()
            self.scoreboard.compare(list(frame.tdata))

    async def reset(self, cycles: int = 3):
        await super().reset(cycles)
        self.bus.start()

    async def send(self, addr: int, beats: int):
        await self.cmd.send(DmaCmdTransaction(addr=addr, beats=beats))

    async def drain(self, timeout: int = 50000):
        await self.scoreboard.wait_empty(self.dut.clk, timeout, idle=lambda: self.cmd.empty() and self.cmd.idle()
                                         and bool(self.dut.idle.value))
        await ClockCycles(self.dut.clk, 4)
        assert not self.scoreboard.expected and not self.bus.expected_ars
        assert self.dut.idle.value

    async def wait_idle(self, timeout: int = 5000):
        for _ in range(timeout):
            await RisingEdge(self.dut.clk)
            if self.dut.idle.value:
                return
        raise AssertionError("timeout waiting for idle")

    async def flush(self, cycles: int = 1):
        """Abort like the engine does: drop our own unsent command, pulse flush, wait for idle; the
        frames cut by the flush are dropped from the scoreboard and the sink."""
        self.cmd.clear()
        self.cmd.assert_reset()  # the command being presented is withdrawn too
        self.dut.flush.value = 1
        await ClockCycles(self.dut.clk, cycles)
        self.dut.flush.value = 0
        await self.wait_idle()
        await ClockCycles(self.dut.clk, 2)
        dropped = len(self.scoreboard.expected)
        self.scoreboard.clear()
        self.sink.assert_reset()  # forget the partial frame
        return dropped


class AxiReadTB(ReadDmaTB):
    def __init__(self, dut, seed: int, latency: int = 8):
        super().__init__(dut, seed)
        self.ram = ReadRam(dut, "axi", latency, self.rng)
        self.ram.fill()
        self.bus = BusMonitor(dut)

    def set_stalls(self, p_cmd=0.0, p_ar=0.0, p_r=0.0, p_out=0.0):
        common.set_stalls(self.cmd, self.rng, p_cmd)
        self.ram.set_stalls(p_ar, p_r)
        common.set_stalls(self.sink, self.rng, p_out)

    async def read(self, addr: int, beats: int, tag: str):
        """Queue a command; the model: its bursts and the RAM bytes it covers."""
        self.bus.expected_ars.extend(split_bursts(addr, beats))
        self.scoreboard.expect(list(self.ram.read(addr, beats * DATA_BYTES)), tag)
        await self.send(addr, beats)


LENGTHS = [1, 15, 16, 17, 1000]


def starts(rng: random.Random) -> list[int]:
    """Start addresses: 4 KiB aligned, a few beats before a page end, mid-page, and near 2**32."""
    page = 0x1000 * rng.randrange(1, 200)
    return [page, page - 8 * 3, page - 8 * 16, page - 8 * 17, page + 8 * rng.randrange(1, 500),
            0xFFF0_1000 - 8 * 5]


@cocotb.test()
async def test_lengths_and_page_splits(dut):
    """Lengths 1, 15, 16, 17, 1000 from aligned and unaligned starts, back to back, random stalls
    on every channel: exact data, exact burst split (split at the 4 KiB boundary)."""
    tb = AxiReadTB(dut, seed=1, latency=12)
    await tb.reset()
    tb.set_stalls(p_cmd=0.3, p_ar=0.3, p_r=0.3, p_out=0.3)
    n = 0
    for beats in LENGTHS:
        for addr in starts(tb.rng):
            await tb.read(addr, beats, f"len{beats}@0x{addr:x}")
            n += 1
    await tb.drain()
    assert tb.scoreboard.checked == n
    assert tb.bus.max_in_flight >= 2, "never more than one burst in flight"
    assert int(dut.beats.value) == tb.bus.r_beats == sum(LENGTHS) * len(starts(tb.rng))
    assert not dut.error.value


@cocotb.test()
async def test_heavy_backpressure(dut):
    """A slow consumer (80 % stalls) and a slow memory: credits hold R, data stay exact."""
    tb = AxiReadTB(dut, seed=2, latency=30)
    await tb.reset()
    tb.set_stalls(p_cmd=0.5, p_ar=0.5, p_r=0.6, p_out=0.8)
    for k in range(6):
        await tb.read(0x2_0000 + 0x1000 * k - 8 * tb.rng.randrange(0, 40), tb.rng.randrange(1, 300), f"slow{k}")
    await tb.drain()
    assert tb.scoreboard.checked == 6


@cocotb.test()
async def test_back_to_back_no_bubble(dut):
    """Without stalls, commands queued back to back leave no gap between their frames on m_data."""
    tb = AxiReadTB(dut, seed=3, latency=20)
    await tb.reset()
    sizes = [40, 17, 33, 64, 16, 100, 31, 200]
    for k, beats in enumerate(sizes):
        await tb.read(0x4_0000 + 0x1000 * k + 8 * tb.rng.randrange(0, 512 - 17), beats, f"b2b{k}")
    await tb.drain()
    out = tb.bus.out_cycles
    assert len(out) == sum(sizes)
    assert out[-1] - out[0] == len(out) - 1, f"bubble on m_data: {len(out)} beats in {out[-1] - out[0] + 1} cycles"


@cocotb.test()
async def test_throughput_latency(dut):
    """No stalls: a 4096-beat read sustains >= 0.95 beats/cycle at RAM latencies 24 and 85 (the
    HP port's worst measured), counting from the command; the DMA adds ar_latency + r_latency."""
    results = {}
    tb = AxiReadTB(dut, seed=4)
    for latency in (24, 85):
        tb.ram.latency = latency
        await tb.reset()
        addr = 0x8_0000 + 8 * 5  # unaligned: the bursts are split at every 4 KiB boundary
        await tb.read(addr, 4096, f"tput-lat{latency}")
        await tb.drain()
        b = tb.bus
        cmd, first_ar, first_r, first_out, last_out = b.cmd_cycles[0], b.ar_cycles[0], b.r_cycles[0], \
            b.out_valid_cycles[0], b.out_cycles[-1]
        total = 4096 / (last_out - cmd + 1)
        steady = 4096 / (last_out - first_out + 1)
        results[latency] = total
        dut._log.warning(f"axi_read: RAM latency {latency}: {total:.4f} beats/cycle from the command "
                         f"({steady:.4f} from the first beat); {b.max_in_flight} bursts in flight at most; "
                         f"cmd->AR {first_ar - cmd}, R->m_data {first_out - first_r} cycles")
        assert first_ar - cmd == PARAMS["ar_latency"]
        assert first_out - first_r == PARAMS["r_latency"]
        assert total >= 0.95, f"throughput {total:.4f} < 0.95 beats/cycle at latency {latency}"
    assert results[24] >= 0.99


@cocotb.test()
async def test_rresp_errors(dut):
    """SLVERR and DECERR beats set the sticky error bit; their data are delivered, later commands
    are exact, and only a reset clears it."""
    tb = AxiReadTB(dut, seed=5, latency=10)
    await tb.reset()
    tb.set_stalls(p_ar=0.2, p_r=0.2, p_out=0.2)
    await tb.read(0x1_0000, 100, "clean")
    await tb.drain()
    assert not dut.error.value
    tb.ram.errors = [(0x2_0000 + 8 * 37, 0x2_0000 + 8 * 38, RESP_SLVERR)]
    await tb.read(0x2_0000, 64, "slverr")
    await tb.drain()
    assert dut.error.value, "SLVERR did not set error"
    tb.ram.errors = [(0x3_0008, 0x3_0010, RESP_DECERR)]
    await tb.read(0x3_0000, 20, "decerr")
    await tb.read(0x4_0000, 20, "after")
    await tb.drain()
    assert dut.error.value
    await tb.reset()
    assert not dut.error.value, "error survived reset"
    tb.ram.errors = [(0x3_0008, 0x3_0010, RESP_DECERR)]
    await tb.read(0x3_0000, 2, "decerr2")
    await tb.drain()
    assert dut.error.value, "DECERR did not set error"


@cocotb.test()
async def test_flush(dut):
    """Flush with bursts in flight (consumer fast or stalled, a command queued behind, flush held
    for several cycles, flush while idle): idle once every owed beat has arrived, nothing on m_data
    after the flush, and the next commands' data are exact (no stale beat)."""
    tb = AxiReadTB(dut, seed=6, latency=30)
    await tb.reset()
    # (consumer stall probability, flush cycles, bursts in flight, m_data beats of the cut command)
    cases = [(0.0, 1, 3, 0), (0.0, 1, 3, 40), (0.7, 1, 1, 30), (0.3, 4, 2, 10), (0.0, 1, 8, 100)]
    for k, (p_out, hold, min_in_flight, min_out) in enumerate(cases):
        min_in_flight = min(min_in_flight, MAX_OUTSTANDING, FIFO_DEPTH // MAX_BURST)  # what credits allow
        tb.set_stalls(p_ar=0.2, p_r=0.2, p_out=p_out)
        out0 = len(tb.bus.out_cycles)
        await tb.read(0x5_0000 + 0x1000 * k + 8 * 3, 1000, f"cut{k}")
        await tb.read(0x6_0000 + 0x1000 * k, 50, f"queued{k}")
        for _ in range(3000):
            await RisingEdge(dut.clk)
            if tb.bus.ars - tb.bus.rlasts >= min_in_flight and len(tb.bus.out_cycles) - out0 >= min_out \
                    and (not min_out or dut.m_data__tvalid.value):
                break
        in_flight = tb.bus.ars - tb.bus.rlasts
        assert in_flight >= min_in_flight
        if min_out:
            assert dut.m_data__tvalid.value, "flush test: no data waiting on m_data"
        dropped = await tb.flush(hold)
        assert dropped >= 1
        dut._log.info(f"flush {k}: {in_flight} bursts in flight, {dropped} frames cut")
        assert tb.bus.ars == tb.bus.rlasts
        tb.set_stalls(p_ar=0.2, p_r=0.2, p_out=0.2)
        await tb.read(0x7_0000 + 0x1000 * k - 8 * 9, 77, f"next{k}")
        await tb.read(0x7_8000 + 8 * k, 5, f"next{k}b")
        await tb.drain()
    await tb.flush(2)  # while idle: nothing happens
    await tb.read(0x9_0000, 33, "final")
    await tb.drain()
    assert tb.scoreboard.checked == 2 * len(cases) + 1


@cocotb.test()
async def test_reset_mid_command(dut):
    """A synchronous reset in the middle of a long read returns to idle (counters and error cleared);
    with a fresh RAM behind it, the next command's data are exact."""
    tb = AxiReadTB(dut, seed=7, latency=16)
    await tb.reset()
    tb.set_stalls(p_ar=0.2, p_r=0.2, p_out=0.3)
    tb.ram.errors = [(0xA_0000, 0xA_0008, RESP_SLVERR)]
    await tb.read(0xA_0000, 1000, "cut")
    await tb.read(0xB_0000, 10, "queued")
    for _ in range(3000):
        await RisingEdge(dut.clk)
        if tb.bus.ars - tb.bus.rlasts >= 3 and tb.bus.out_cycles:
            break
    assert dut.error.value and not dut.idle.value
    tb.cmd.clear()
    await tb.reset()
    tb.scoreboard.clear()
    assert dut.idle.value and not dut.error.value and int(dut.beats.value) == 0
    assert not dut.m_data__tvalid.value and not dut.axi__arvalid.value
    tb.ram.errors = []
    tb.ram.fill()  # a fresh RAM: any stale beat would not match
    await tb.read(0xA_0000 + 8 * 500, 300, "after-reset")
    await tb.drain()
    assert tb.scoreboard.checked == 1 and not dut.error.value
