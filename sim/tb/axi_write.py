"""cocotb testbench for hw.axi_write.AxiWriteDma: the RAM ends up holding exactly the data sent.

Structure (as the other testbenches): ``AxiWriteTB`` owns the command source (a cocotbext-axi
stream source on ``cmd__*``), the ``s_data`` source, and ``WriteRam`` (cocotbext-axi's AXI RAM
write side on a bytearray, SLVERR on chosen addresses), all with random pauses on every channel;
the model is a copy of the RAM updated with every command's data (only the written prefix of a
command cut by a flush) plus the exact burst split each command must produce; ``BusMonitor``
checks the AXI rules cycle by cycle (awlen <= 15, no 4 KiB crossing, AW fields and stability, W
never before its AW, wlast in place, W payload stable while stalled, wvalid held from
``w_latency`` cycles after AW to wlast, all strobes on except after a flush, bready always high,
bursts awaiting B <= max_outstanding, idle only when every B is back), reassembles each command's
bytes from W and hands them to the ``Scoreboard``; at the end of each test the whole RAM is
compared with the model. TB_PARAMS (JSON) carries ``max_outstanding``, ``latency``, ``w_latency``.
"""

from __future__ import annotations

import random
from collections import deque

import cocotb
from cocotb.triggers import ClockCycles, Event, RisingEdge
from cocotbext.axi import AxiStreamFrame, AxiWriteBus
from cocotbext.axi.axi_ram import AxiRamWrite
from cocotbext.axi.stream import define_stream

from gpt_fpga.sim.tb import common
from gpt_fpga.sim.tb.common import PARAMS, Scoreboard, StreamTB

DATA_BYTES = 8
FULL_STRB = (1 << DATA_BYTES) - 1
MEM_SIZE = 1 << 20  # the RAM aliases every address modulo 1 MiB
PAGE = 4096
MAX_BURST = 16
MAX_OUTSTANDING = int(PARAMS.get("max_outstanding", 8))
W_LATENCY = int(PARAMS.get("w_latency", 2))
ERROR_BRESP, ERROR_STREAM = 0b01, 0b10

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


class DelayedB:
    """Stands in for AxiSlaveWrite's B channel: each response goes out `latency` cycles after the RAM
    produced it (after the burst's last W beat), as a DDR controller's write response does."""

    def __init__(self, channel, clk, latency: int):
        self.channel, self.clk, self.latency = channel, clk, latency
        self.queue: deque = deque()
        self.wake = Event()
        self.cycle = 0
        cocotb.start_soon(self._count())
        self.task = cocotb.start_soon(self._run())

    def _transaction_obj(self):
        return self.channel._transaction_obj()

    async def send(self, b):
        self.queue.append((self.cycle + self.latency, b))
        self.wake.set()

    def clear(self):  # called on reset: responses in flight are lost
        self.task.cancel()
        self.queue.clear()
        self.channel.clear()
        self.task = cocotb.start_soon(self._run())

    async def _count(self):
        while True:
            await RisingEdge(self.clk)
            self.cycle += 1

    async def _run(self):
        while True:
            while not self.queue:
                self.wake.clear()
                await self.wake.wait()
            due, b = self.queue[0]
            while self.cycle < due:
                await RisingEdge(self.clk)
            self.queue.popleft()
            await self.channel.send(b)


class WriteRam(AxiRamWrite):
    """cocotbext-axi's RAM write side with a B latency; beats at addresses in `errors` ((start, end)
    byte ranges) are written and answered with SLVERR (AxiSlaveWrite turns a failing write into
    SLVERR). ``b_channel_raw`` is the real B source (for pauses)."""

    def __init__(self, dut, prefix: str, b_latency: int = 10):
        bus = AxiWriteBus.from_prefix(dut, prefix, bus_separator="__")
        super().__init__(bus, dut.clk, dut.rst, mem=bytearray(MEM_SIZE))
        self.log.setLevel("WARNING")
        for ch in (self.aw_channel, self.w_channel, self.b_channel):
            ch.log.setLevel("WARNING")
        self.b_channel_raw = self.b_channel
        self.b_channel = self.delayed_b = DelayedB(self.b_channel_raw, dut.clk, b_latency)
        self.errors: list[tuple[int, int]] = []

    async def _write(self, address, data):
        await super()._write(address, data)
        if any(s <= address < e for s, e in self.errors):
            raise OSError(f"injected write error at 0x{address:x}")


class Burst:
    """One expected burst: address, beats, whether it ends its command, and whether a flush cut it."""

    __slots__ = ("addr", "beats", "last", "cut", "aw_cycle")

    def __init__(self, addr, beats, last):
        self.addr, self.beats, self.last, self.cut, self.aw_cycle = addr, beats, last, False, None


class BusMonitor:
    """Cycle-by-cycle protocol checks and timing on the DMA's ports (started after the first reset)."""

    def __init__(self, dut, scoreboard: Scoreboard):
        self.dut, self.scoreboard = dut, scoreboard
        self.expected_aws: deque[Burst] = deque()  # bursts still to be issued, in order
        self.task = None
        self.clear()

    def clear(self):
        self.cycle = 0
        self.w_bursts: deque[Burst] = deque()  # AW accepted, W not complete
        self.w_index = 0  # beats of w_bursts[0] already sent
        self.cmd_bytes = bytearray()
        self.aws, self.bs, self.w_beats, self.strobed, self.zero_strobed = 0, 0, 0, 0, 0
        self.max_b_owed = 0
        self.strobed_at_flush = 0  # strobed W beats up to the cycle a flush was first seen
        self.cmd_cycles, self.s_cycles, self.aw_valid_cycles, self.aw_cycles, self.w_cycles = [], [], [], [], []
        self.w_valid_first = []
        self.flushed = False  # since the last flush, no command taken yet
        self.draining = False  # a flush was seen, idle not yet
        self.stuck_w_allowed = False
        self.stalled_aw = self.stalled_w = None
        self.aw_was_valid = False

    def start(self):
        if self.task is None:
            self.task = cocotb.start_soon(self._run())

    def expect_command(self, addr: int, beats: int):
        bursts = split_bursts(addr, beats)
        self.expected_aws.extend(Burst(a, n, k == len(bursts) - 1) for k, (a, n) in enumerate(bursts))

    async def _run(self):
        d = self.dut
        awvalid, awready, wvalid, wready, bvalid = d.axi__awvalid, d.axi__awready, d.axi__wvalid, d.axi__wready, \
            d.axi__bvalid
        while True:
            await RisingEdge(d.clk)
            if d.rst.value:
                self.expected_aws.clear()
                self.clear()
                continue
            self.cycle += 1
            c = self.cycle
            if self.draining:
                assert not d.cmd__ready.value, "cmd.ready before a flush has drained"
                self.draining = not d.idle.value
            if d.cmd__valid.value and d.cmd__ready.value:
                self.cmd_cycles.append(c)
                self.flushed = False
            if d.s_data__tvalid.value and d.s_data__tready.value:
                self.s_cycles.append(c)
            # AW: fields, stability while stalled, the expected split, 4 KiB rule
            av, ar = bool(awvalid.value), bool(awready.value)
            if av:
                pay = (int(d.axi__awaddr.value), int(d.axi__awlen.value), int(d.axi__awsize.value),
                       int(d.axi__awburst.value), int(d.axi__awcache.value), int(d.axi__awprot.value),
                       int(d.axi__awid.value))
                if self.stalled_aw is not None:
                    assert pay == self.stalled_aw, f"AW changed while stalled: {self.stalled_aw} -> {pay}"
                if not self.aw_was_valid:
                    self.aw_valid_cycles.append(c)
                addr, awlen, size, burst, cache, prot, awid = pay
                assert awlen <= MAX_BURST - 1, f"awlen {awlen} > 15"
                assert addr % PAGE + (awlen + 1) * DATA_BYTES <= PAGE, f"burst 0x{addr:x}+{awlen + 1} crosses 4 KiB"
                assert addr % DATA_BYTES == 0 and size == 3 and burst == 1 and cache == 0b0011 and prot == 0 \
                    and awid == 0, f"bad AW fields {pay}"
                if ar:
                    assert self.expected_aws, f"unexpected AW 0x{addr:x} len {awlen + 1}"
                    exp = self.expected_aws.popleft()
                    assert (addr, awlen + 1) == (exp.addr, exp.beats), \
                        f"AW (0x{addr:x}, {awlen + 1}), expected (0x{exp.addr:x}, {exp.beats})"
                    exp.aw_cycle = c
                    self.w_bursts.append(exp)
                    self.aws += 1
                    self.aw_cycles.append(c)
            self.stalled_aw = pay if av and not ar else None
            self.aw_was_valid = av and not ar
            # W: after its AW, held valid to wlast, stable while stalled, strobes
            wv, wr = bool(wvalid.value), bool(wready.value)
            head = self.w_bursts[0] if self.w_bursts else None
            if head is not None and c >= head.aw_cycle + W_LATENCY:
                assert wv, f"wvalid low {c - head.aw_cycle} cycles after the AW of burst 0x{head.addr:x}"
            if wv:
                wpay = (int(d.axi__wdata.value), int(d.axi__wstrb.value), int(d.axi__wlast.value))
                if self.stalled_w is not None:
                    assert wpay == self.stalled_w, f"W changed while stalled: {self.stalled_w} -> {wpay}"
                if wr:
                    self._w_beat(c, *wpay)
            self.stalled_w = wpay if wv and not wr else None
            # B
            if bvalid.value:
                assert d.axi__bready.value, "bready low while bvalid"
                self.bs += 1
                assert self.bs <= self.aws, "B before its AW"
            b_owed = self.aws - self.bs
            assert b_owed <= MAX_OUTSTANDING, f"{b_owed} bursts await B > {MAX_OUTSTANDING}"
            self.max_b_owed = max(self.max_b_owed, b_owed)
            if d.idle.value:
                assert b_owed == 0 and not self.w_bursts and not av, \
                    f"idle with {b_owed} B owed, {len(self.w_bursts)} W bursts owed, awvalid {av}"
            if d.flush.value:
                self.draining = True
                if not self.flushed:
                    self.strobed_at_flush = self.strobed
                    # the beat presented in the flush's first cycle keeps its strobes (a flush held
                    # longer: beats presented in its later cycles already have them off)
                    self.stuck_w_allowed = wv and not wr
                self.flushed = True
                # bursts not yet presented are never issued; a presented AW stays until accepted
                stuck = [self.expected_aws[0]] if av and not ar and self.expected_aws else []
                self.expected_aws = deque(stuck)
                for b in (*self.w_bursts, *stuck):
                    b.cut = True
                self.cmd_bytes = bytearray()

    def _w_beat(self, c, data, strb, last):
        assert self.w_bursts, "W beat before its AW"
        head = self.w_bursts[0]
        if self.w_index == 0:
            self.w_valid_first.append(c)
        assert last == (self.w_index == head.beats - 1), f"wlast {last} on beat {self.w_index} of {head.beats}"
        self.w_beats += 1
        self.w_cycles.append(c)
        if self.flushed and not self.stuck_w_allowed:
            assert strb == 0, f"W beat after a flush with wstrb 0x{strb:x}"
        else:
            assert strb == FULL_STRB, f"wstrb 0x{strb:x}"
        self.stuck_w_allowed = False
        if strb:
            self.strobed += 1
        else:
            self.zero_strobed += 1
        if not head.cut:
            self.cmd_bytes += data.to_bytes(DATA_BYTES, "little")
        self.w_index += 1
        if self.w_index == head.beats:
            self.w_bursts.popleft()
            self.w_index = 0
            if head.last and not head.cut:
                self.scoreboard.compare(list(self.cmd_bytes))
                self.cmd_bytes = bytearray()


class AxiWriteTB(StreamTB):
    ERROR_BITS = ("bresp", "stream")  # as hw.axi_write.AxiWriteDma.ERROR_BITS

    def __init__(self, dut, seed: int):
        super().__init__(dut)
        self.rng = random.Random(seed)
        self.ram = WriteRam(dut, "axi")
        self.cmd = DmaCmdSource(DmaCmdBus.from_prefix(dut, "cmd", bus_separator="__"), dut.clk, dut.rst)
        self.cmd.log.setLevel("WARNING")
        self.source = self.axis_source("s_data")
        self.scoreboard = Scoreboard()
        self.bus = BusMonitor(dut, self.scoreboard)
        self.fresh_ram()
        dut.flush.value = 0

    def fresh_ram(self):
        self.ram.mem[:] = self.rng.randbytes(MEM_SIZE)
        self.model = bytearray(self.ram.mem)

    async def reset(self, cycles: int = 3):
        await super().reset(cycles)
        self.bus.start()

    def set_stalls(self, p_cmd=0.0, p_in=0.0, p_aw=0.0, p_w=0.0, p_b=0.0):
        common.set_stalls(self.cmd, self.rng, p_cmd)
        common.set_stalls(self.source, self.rng, p_in)
        for ch, p in ((self.ram.aw_channel, p_aw), (self.ram.w_channel, p_w), (self.ram.b_channel_raw, p_b)):
            common.set_stalls(ch, self.rng, p)

    async def start_write(self, addr: int, beats: int, tag: str, frames: list[int] | None = None) -> bytes:
        """Queue a command and its data (split into frames of the given beats, tlast on each frame's
        end; default one frame); the scoreboard expects the data, the monitor the bursts. The model
        is not updated (see write)."""
        data = self.rng.randbytes(beats * DATA_BYTES)
        self.bus.expect_command(addr, beats)
        self.scoreboard.expect(list(data), tag)
        await self.cmd.send(DmaCmdTransaction(addr=addr, beats=beats))
        pos = 0
        for n in frames or [beats]:
            await self.source.send(AxiStreamFrame(data[pos:pos + n * DATA_BYTES]))
            pos += n * DATA_BYTES
        assert pos == len(data)
        return data

    def model_write(self, addr: int, data: bytes):
        a = addr % MEM_SIZE
        assert a + len(data) <= MEM_SIZE, "test command wraps around the RAM"
        self.model[a:a + len(data)] = data

    async def write(self, addr: int, beats: int, tag: str, frames: list[int] | None = None):
        self.model_write(addr, await self.start_write(addr, beats, tag, frames))

    async def drain(self, timeout: int = 50000):
        await self.scoreboard.wait_empty(self.dut.clk, timeout, idle=lambda: self.cmd.empty() and self.cmd.idle()
                                         and self.source.empty() and self.source.idle() and bool(self.dut.idle.value))
        await ClockCycles(self.dut.clk, 4)
        assert not self.scoreboard.expected and not self.bus.expected_aws
        assert self.dut.idle.value
        self.check_memory()

    def check_memory(self):
        if self.ram.mem != self.model:
            bad = next(i for i in range(MEM_SIZE) if self.ram.mem[i] != self.model[i])
            raise AssertionError(f"RAM differs from the model at 0x{bad:x}: {self.ram.mem[bad]} != {self.model[bad]}")

    async def wait_idle(self, timeout: int = 5000):
        for _ in range(timeout):
            await RisingEdge(self.dut.clk)
            if self.dut.idle.value:
                return
        raise AssertionError("timeout waiting for idle")

    async def flush(self, cycles: int = 1):
        """Abort like the engine does: drop our unsent command and data, pulse flush, wait for idle;
        the scoreboard forgets the cut commands."""
        for src in (self.cmd, self.source):
            src.clear()
            src.assert_reset()  # what is being presented is withdrawn too
        self.dut.flush.value = 1
        await ClockCycles(self.dut.clk, cycles)
        self.dut.flush.value = 0
        await self.wait_idle()
        await ClockCycles(self.dut.clk, 2)
        dropped = len(self.scoreboard.expected)
        self.scoreboard.clear()
        return dropped


LENGTHS = [1, 15, 16, 17, 1000]


def starts(rng: random.Random) -> list[int]:
    """Start addresses: 4 KiB aligned, a few beats before a page end, mid-page, and near 2**32."""
    page = 0x1000 * rng.randrange(1, 200)
    return [page, page - 8 * 3, page - 8 * 16, page - 8 * 17, page + 8 * rng.randrange(1, 500),
            0xFFF0_1000 - 8 * 5]


@cocotb.test()
async def test_lengths_and_page_splits(dut):
    """Lengths 1, 15, 16, 17, 1000 from aligned and unaligned starts, back to back, random stalls
    on every channel: exact memory, exact burst split (split at the 4 KiB boundary)."""
    tb = AxiWriteTB(dut, seed=1)
    await tb.reset()
    tb.set_stalls(p_cmd=0.3, p_in=0.3, p_aw=0.3, p_w=0.3, p_b=0.3)
    n = 0
    for beats in LENGTHS:
        for addr in starts(tb.rng):  # ranges may overlap: the writes land in command order
            await tb.write(addr, beats, f"len{beats}@0x{addr:x}")
            n += 1
    await tb.drain()
    assert tb.scoreboard.checked == n
    assert tb.bus.max_b_owed >= 2, "never more than one burst awaiting B"
    assert int(dut.beats.value) == tb.bus.w_beats == sum(LENGTHS) * len(starts(tb.rng))
    assert int(dut.error.value) == 0


@cocotb.test()
async def test_heavy_backpressure(dut):
    """A slow memory (W, B and AW mostly stalled, B 400 cycles late) and a bursty producer: data stay
    exact and max_outstanding bursts await B, no more."""
    tb = AxiWriteTB(dut, seed=2)
    tb.ram.delayed_b.latency = 400
    await tb.reset()
    tb.set_stalls(p_cmd=0.5, p_in=0.5, p_aw=0.6, p_w=0.7, p_b=0.8)
    for k in range(6):
        await tb.write(0x2_0000 + 0x2000 * k - 8 * tb.rng.randrange(0, 40), tb.rng.randrange(1, 300), f"slow{k}")
    await tb.drain()
    assert tb.scoreboard.checked == 6
    assert tb.bus.max_b_owed == MAX_OUTSTANDING


@cocotb.test()
async def test_throughput_latency(dut):
    """No stalls: a 4096-beat write and back-to-back commands take one s_data beat per cycle with no
    bubble between commands; W sustains >= 0.95 beats/cycle from the command; AW comes `latency`
    cycles after a burst's data are in, W `w_latency` cycles after AW."""
    tb = AxiWriteTB(dut, seed=3)
    tb.ram.delayed_b.latency = 40  # write response latency: several bursts await B
    await tb.reset()
    await tb.write(0x8_0000 + 8 * 5, 4096, "tput")
    await tb.drain()
    b = tb.bus
    total = 4096 / (b.w_cycles[-1] - b.cmd_cycles[0] + 1)
    steady = 4096 / (b.w_cycles[-1] - b.w_cycles[0] + 1)
    first = split_bursts(0x8_0000 + 8 * 5, 4096)[0][1]
    dut._log.warning(f"axi_write: {total:.4f} W beats/cycle from the command ({steady:.4f} from the first W beat); "
                     f"{b.max_b_owed} bursts awaiting B at most; "
                     f"data->AW {b.aw_valid_cycles[0] - b.s_cycles[first - 1]}, "
                     f"AW->W {b.w_valid_first[0] - b.aw_cycles[0]} cycles")
    assert b.s_cycles[-1] - b.s_cycles[0] == 4095, "s_data did not stream at one beat per cycle"
    assert b.aw_valid_cycles[0] - b.s_cycles[first - 1] == PARAMS["latency"]
    assert b.w_valid_first[0] - b.aw_cycles[0] == PARAMS["w_latency"]
    assert total >= 0.95, f"write throughput {total:.4f} < 0.95 beats/cycle"
    assert b.max_b_owed >= 3

    tb.bus.clear()
    sizes = [40, 17, 1, 33, 64, 16, 100, 31, 200, 5]
    for k, beats in enumerate(sizes):
        await tb.write(0x4_0000 + 0x1000 * k + 8 * tb.rng.randrange(0, 512 - 17), beats, f"b2b{k}")
    await tb.drain()
    s = tb.bus.s_cycles
    assert len(s) == sum(sizes) and s[-1] - s[0] == len(s) - 1, \
        f"bubble on s_data: {len(s)} beats in {s[-1] - s[0] + 1} cycles"


@cocotb.test()
async def test_bresp_error(dut):
    """A SLVERR response sets error bit 0 (sticky, the data are still written by this RAM), later
    commands are exact, and only a reset clears it."""
    tb = AxiWriteTB(dut, seed=4)
    await tb.reset()
    tb.set_stalls(p_aw=0.2, p_w=0.2, p_b=0.2, p_in=0.2)
    await tb.write(0x1_0000, 100, "clean")
    await tb.drain()
    assert int(dut.error.value) == 0
    tb.ram.errors = [(0x2_0000 + 8 * 37, 0x2_0000 + 8 * 38)]
    await tb.write(0x2_0000, 64, "slverr")
    await tb.write(0x3_0000, 20, "after")
    await tb.drain()
    assert int(dut.error.value) == ERROR_BRESP
    await tb.reset()
    assert int(dut.error.value) == 0, "error survived reset"


@cocotb.test()
async def test_tlast_errors(dut):
    """An early tlast and a missing tlast each set error bit 1 (not bit 0); the data are written
    exactly anyway (framing is by the commands' beats)."""
    tb = AxiWriteTB(dut, seed=5)
    await tb.reset()
    tb.set_stalls(p_in=0.3, p_w=0.3)
    await tb.write(0x1_0000, 10, "early", frames=[6, 4])  # tlast on beat 6 of 10
    await tb.drain()
    assert int(dut.error.value) == ERROR_STREAM
    await tb.reset()
    bus = tb.bus
    assert int(dut.error.value) == 0
    # two 4-beat commands sent as one 8-beat frame: no tlast on the first command's last beat
    data = tb.rng.randbytes(64)
    for k in range(2):
        bus.expect_command(0x3_0000 + 0x100 * k, 4)
        tb.scoreboard.expect(list(data[32 * k:32 * k + 32]), f"missing{k}")
        tb.model_write(0x3_0000 + 0x100 * k, data[32 * k:32 * k + 32])
        await tb.cmd.send(DmaCmdTransaction(addr=0x3_0000 + 0x100 * k, beats=4))
    await tb.source.send(AxiStreamFrame(data))
    await tb.drain()
    assert int(dut.error.value) == ERROR_STREAM


@cocotb.test()
async def test_flush(dut):
    """Flush with bursts in flight (W stalled, AW stalled, commands queued, flush held, flush while
    idle): no new AW, the owed W beats go out with wstrb 0, every B is collected, then idle; memory
    holds exactly the cut command's prefix written before the flush, and the next commands are exact."""
    tb = AxiWriteTB(dut, seed=6)
    await tb.reset()
    # (p_aw, p_w, p_b, flush cycles, W beats sent before the flush)
    cases = [(0.2, 0.8, 0.5, 1, 40), (0.9, 0.3, 0.3, 1, 20), (0.2, 0.5, 0.9, 3, 100), (0.0, 0.0, 0.0, 1, 300),
             (0.2, 0.2, 0.2, 1, 0)]
    zero_strobed = 0
    for k, (p_aw, p_w, p_b, hold, min_w) in enumerate(cases):
        tb.set_stalls(p_in=0.1, p_aw=p_aw, p_w=p_w, p_b=p_b)
        strobed0, w0 = tb.bus.strobed, tb.bus.w_beats
        addr = 0x5_0000 + 0x4000 * k + 8 * 3
        data = await tb.start_write(addr, 1000, f"cut{k}")
        await tb.start_write(0x6_0000 + 0x1000 * k, 50, f"queued{k}")
        for _ in range(5000):
            await RisingEdge(dut.clk)
            if tb.bus.w_beats - w0 >= min_w and tb.bus.aws > tb.bus.bs and tb.bus.w_bursts:
                break
        owed = tb.bus.aws - tb.bus.bs
        assert owed >= 1 and tb.bus.w_bursts, "flush test: nothing in flight"
        sent_before = tb.bus.w_beats - w0
        zs0 = tb.bus.zero_strobed
        dropped = await tb.flush(hold)
        written = tb.bus.strobed - strobed0
        dut._log.info(f"flush {k}: {owed} bursts awaiting B, {sent_before} W beats sent before, "
                      f"{tb.bus.zero_strobed - zs0} sent with wstrb 0 after, {written} written, {dropped} commands cut")
        zero_strobed += tb.bus.zero_strobed - zs0
        assert dropped == 2
        at_flush = tb.bus.strobed_at_flush - strobed0
        assert sent_before <= at_flush <= written <= at_flush + 1 < 1000  # at most the presented beat after it
        assert tb.bus.aws == tb.bus.bs and not tb.bus.w_bursts
        tb.model_write(addr, data[:written * DATA_BYTES])
        tb.check_memory()
        tb.set_stalls(p_in=0.2, p_aw=0.2, p_w=0.2, p_b=0.2)
        await tb.write(0x7_0000 + 0x1000 * k - 8 * 9, 77, f"next{k}")
        await tb.write(0x7_8000 + 0x100 * k, 5, f"next{k}b")
        await tb.drain()
    assert zero_strobed > 0, "no flush left W beats owed"
    await tb.flush(2)  # while idle: nothing happens
    await tb.write(0x9_0000, 33, "final")
    await tb.drain()
    assert tb.scoreboard.checked == 2 * len(cases) + 1


@cocotb.test()
async def test_reset_mid_command(dut):
    """A synchronous reset in the middle of a long write returns to idle (counters and errors
    cleared); with a fresh RAM behind it, the next command is exact and nothing else changes."""
    tb = AxiWriteTB(dut, seed=7)
    await tb.reset()
    tb.set_stalls(p_in=0.1, p_aw=0.2, p_w=0.3, p_b=0.3)
    tb.ram.errors = [(0xA_0000, 0xA_0008)]
    await tb.start_write(0xA_0000, 1000, "cut", frames=[20, 980])  # early tlast
    await tb.start_write(0xB_0000, 10, "queued")
    for _ in range(3000):
        await RisingEdge(dut.clk)
        if tb.bus.aws - tb.bus.bs >= 2 and tb.bus.w_beats >= 50:
            break
    assert int(dut.error.value) == ERROR_BRESP | ERROR_STREAM and not dut.idle.value
    for src in (tb.cmd, tb.source):
        src.clear()
    await tb.reset()
    tb.scoreboard.clear()
    assert dut.idle.value and int(dut.error.value) == 0 and int(dut.beats.value) == 0
    assert not dut.axi__awvalid.value and not dut.axi__wvalid.value
    tb.ram.errors = []
    tb.fresh_ram()
    await tb.write(0xA_0000 + 8 * 500, 300, "after-reset")
    await tb.drain()
    assert tb.scoreboard.checked == 1 and int(dut.error.value) == 0
