"""cocotb testbench for hw.axi_read_2port.TwoPortReadDma: every frame equals the RAM bytes it was read from.

Structure as sim/tb/axi_read.py, whose ``ReadRam`` (an AXI read subordinate with a fixed AR-to-R
latency, random stalls and per-address RRESP errors) is reused twice: ``axi0`` and ``axi1`` see the
same bytes but have their own latency, stalls and errors. The model is the RAM's bytes at each
command's range and the exact burst split (``split_bursts`` at 8-byte port beats), the k-th burst
since reset or flush going to port k mod 2. ``TwoPortMonitor`` checks, per port and cycle by cycle,
the AXI3 rules (arlen <= 15 and odd, no 4 KiB crossing, AR fields and stability, rready always
high, bursts in flight <= max_outstanding), that ``idle`` means nothing in flight and that nothing
leaves on ``m_data`` after a flush; it records timing. TB_PARAMS: ``max_outstanding``,
``fifo_depth``, ``ar_latency``, ``r_latency``, ``latency``.
"""

from __future__ import annotations

import random
from collections import deque

import cocotb
from cocotb.triggers import RisingEdge

from gpt_fpga.sim.tb import common
from gpt_fpga.sim.tb.axi_read import (DATA_BYTES, MAX_BURST, PAGE, RESP_DECERR, RESP_SLVERR, ReadDmaTB, ReadRam,
                                      split_bursts)
from gpt_fpga.sim.tb.common import PARAMS

BEAT_BYTES = 2 * DATA_BYTES  # a stream beat: one 8-byte beat from each half of a port burst
PORTS = ("axi0", "axi1")
MAX_OUTSTANDING = int(PARAMS.get("max_outstanding", 8))
FIFO_DEPTH = int(PARAMS.get("fifo_depth", 16 * MAX_OUTSTANDING))  # per port, in port beats


class PortState:
    """What the monitor knows of one port: bursts expected, counts, timing."""

    def __init__(self, dut, prefix: str):
        self.sig = {name: getattr(dut, f"{prefix}__{name}") for name in (
            "araddr", "arlen", "arsize", "arburst", "arcache", "arprot", "arid", "arvalid", "arready",
            "rvalid", "rready", "rlast")}
        self.name = prefix
        self.expected: deque = deque()  # (addr, port beats) still to be issued, in order
        self.clear()

    def clear(self):
        self.ars, self.rlasts, self.r_beats, self.max_in_flight = 0, 0, 0, 0
        self.ar_cycles, self.r_cycles = [], []
        self.stalled = None

    @property
    def in_flight(self) -> int:
        return self.ars - self.rlasts

    def check(self, c: int) -> bool:
        """One cycle's checks; returns whether an AR is presented and not accepted."""
        s = self.sig
        av, ar = bool(s["arvalid"].value), bool(s["arready"].value)
        pay = None
        if av:
            pay = tuple(int(s[k].value) for k in ("araddr", "arlen", "arsize", "arburst", "arcache", "arprot",
                                                  "arid"))
            if self.stalled is not None:
                assert pay == self.stalled, f"{self.name}: AR changed while stalled: {self.stalled} -> {pay}"
            addr, arlen, size, burst, cache, prot, arid = pay
            assert arlen <= MAX_BURST - 1 and arlen % 2 == 1, f"{self.name}: arlen {arlen}"
            assert addr % PAGE + (arlen + 1) * DATA_BYTES <= PAGE, f"{self.name}: 0x{addr:x}+{arlen + 1} crosses 4 KiB"
            assert addr % BEAT_BYTES == 0 and size == 3 and burst == 1 and cache == 0b0011 and prot == 0 \
                and arid == 0, f"{self.name}: bad AR fields {pay}"
            if ar:
                assert self.expected, f"{self.name}: unexpected AR 0x{addr:x} len {arlen + 1}"
                exp = self.expected.popleft()
                assert (addr, arlen + 1) == exp, \
                    f"{self.name}: AR (0x{addr:x}, {arlen + 1}), expected (0x{exp[0]:x}, {exp[1]})"
                self.ars += 1
                self.ar_cycles.append(c)
        self.stalled = pay if av and not ar else None
        if s["rvalid"].value:
            assert s["rready"].value, f"{self.name}: rready low while rvalid: R back-pressured"
            self.r_beats += 1
            self.r_cycles.append(c)
            if s["rlast"].value:
                self.rlasts += 1
        assert 0 <= self.in_flight <= MAX_OUTSTANDING, f"{self.name}: {self.in_flight} bursts in flight"
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return av and not ar


class TwoPortMonitor:
    """Cycle-by-cycle checks of both ports, ``m_data``, ``idle`` and ``flush`` (after the first reset)."""

    def __init__(self, dut):
        self.dut = dut
        self.ports = [PortState(dut, p) for p in PORTS]
        self.next_port = 0  # the port of the next burst the model splits off when both are used
        self.only = 0  # the DMA's `only` input: 1 or 2 puts every burst on port only - 1
        self.clear_counts()
        self.task = None

    def clear_counts(self):
        self.cycle = 0
        self.out_cycles, self.out_valid_cycles, self.cmd_cycles = [], [], []
        self.flushed = False  # since the last flush, no command taken yet
        self.draining = False  # a flush was seen, idle not yet
        for p in self.ports:
            p.clear()

    def expect(self, addr: int, beats: int):
        for burst in split_bursts(addr, 2 * beats):
            port = self.only - 1 if self.only in (1, 2) else self.next_port
            self.ports[port].expected.append(burst)
            self.next_port = 1 - port

    @property
    def expected_ars(self) -> int:
        return sum(len(p.expected) for p in self.ports)

    def start(self):
        if self.task is None:
            self.task = cocotb.start_soon(self._run())

    async def _run(self):
        d = self.dut
        while True:
            await RisingEdge(d.clk)
            if d.rst.value:
                for p in self.ports:
                    p.expected.clear()
                self.next_port = 0
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
            stuck = [p.check(c) for p in self.ports]
            if d.m_data__tvalid.value:
                assert not self.flushed, "m_data.tvalid after a flush"
                self.out_valid_cycles.append(c)
                if d.m_data__tready.value:
                    self.out_cycles.append(c)
            if d.idle.value:
                assert all(p.in_flight == 0 for p in self.ports) and not any(stuck), "idle with bursts in flight"
            if d.flush.value:
                self.draining = self.flushed = True
                # bursts not yet presented are never issued; a presented AR stays until accepted
                for p, s in zip(self.ports, stuck):
                    p.expected = deque([p.expected[0]] if s and p.expected else [])
                self.next_port = 0


class TwoPortReadTB(ReadDmaTB):
    def __init__(self, dut, seed: int, latency: tuple[int, int] = (8, 14)):
        super().__init__(dut, seed)
        self.rams = [ReadRam(dut, p, lat, random.Random(self.rng.random())) for p, lat in zip(PORTS, latency)]
        self.rams[0].fill()
        self.rams[1].mem = self.rams[0].mem  # one DDR behind both ports
        self.bus = TwoPortMonitor(dut)
        dut.only.value = 0

    def use_ports(self, only: int):
        """The DMA's `only` input (0 or 3: both ports; 1: port 0 alone; 2: port 1 alone), set while idle."""
        self.dut.only.value = self.bus.only = only

    def set_latency(self, lat0: int, lat1: int):
        self.rams[0].latency, self.rams[1].latency = lat0, lat1

    def set_errors(self, port: int, errors):
        for k, ram in enumerate(self.rams):
            ram.errors = list(errors) if k == port else []

    def set_stalls(self, p_cmd=0.0, p_ar=(0.0, 0.0), p_r=(0.0, 0.0), p_out=0.0):
        common.set_stalls(self.cmd, self.rng, p_cmd)
        for ram, a, r in zip(self.rams, p_ar, p_r):
            ram.set_stalls(a, r)
        common.set_stalls(self.sink, self.rng, p_out)

    async def read(self, addr: int, beats: int, tag: str):
        """Queue a command; the model: its bursts per port and the RAM bytes it covers."""
        self.bus.expect(addr, beats)
        self.scoreboard.expect(list(self.rams[0].read(addr, beats * BEAT_BYTES)), tag)
        await self.send(addr, beats)

    async def wait_in_flight(self, each: int, out_beats: int = 0, limit: int = 3000):
        """Until both ports have `each` bursts in flight and `out_beats` beats have left."""
        out0 = len(self.bus.out_cycles)
        for _ in range(limit):
            await RisingEdge(self.dut.clk)
            if all(p.in_flight >= each for p in self.bus.ports) and len(self.bus.out_cycles) - out0 >= out_beats:
                return
        raise AssertionError(f"never {each} bursts in flight on each port and {out_beats} beats out")


def starts(rng: random.Random) -> list[int]:
    """Start addresses: 4 KiB aligned, a few beats before a page end, mid-page, and near 2**32."""
    page = 0x1000 * rng.randrange(1, 200)
    return [page, page - BEAT_BYTES * 3, page - BEAT_BYTES * 8, page - BEAT_BYTES * 9,
            page + BEAT_BYTES * rng.randrange(1, 250), 0xFFF0_1000 - BEAT_BYTES * 5]


@cocotb.test()
async def test_random_commands(dut):
    """Random commands (single beats, lengths not a multiple of the burst, 4 KiB crossings, near
    2**32) back to back, both ports with different latencies and independent random stalls on
    every channel: exact data, exact per-port burst split, both ports used."""
    tb = TwoPortReadTB(dut, seed=1, latency=(9, 31))
    await tb.reset()
    tb.set_stalls(p_cmd=0.3, p_ar=(0.3, 0.1), p_r=(0.2, 0.5), p_out=0.3)
    total = n = 0
    for beats in [1, 2, 7, 8, 9, 17, 500]:
        for addr in starts(tb.rng):
            await tb.read(addr, beats, f"len{beats}@0x{addr:x}")
            total, n = total + beats, n + 1
    for k in range(30):
        beats = tb.rng.choice([1, tb.rng.randrange(1, 20), tb.rng.randrange(1, 400)])
        addr = BEAT_BYTES * tb.rng.randrange(0, (1 << 20) // BEAT_BYTES - beats)
        await tb.read(addr, beats, f"rand{k}")
        total, n = total + beats, n + 1
    await tb.drain()
    assert tb.scoreboard.checked == n
    assert all(p.max_in_flight >= 2 for p in tb.bus.ports), "a port never had two bursts in flight"
    assert int(dut.beats.value) == sum(p.r_beats for p in tb.bus.ports) == 2 * total
    assert not dut.error.value


@cocotb.test()
async def test_one_port_late_or_slow(dut):
    """One port much later (latency 90 against 5) or much slower (80 % R stalls) than the other, and
    then the other way round, with a slow consumer in between: no beat reordered or lost."""
    tb = TwoPortReadTB(dut, seed=2)
    await tb.reset()
    cases = [((5, 90), (0.0, 0.0), 0.0), ((90, 5), (0.0, 0.0), 0.0), ((6, 6), (0.8, 0.0), 0.0),
             ((6, 6), (0.0, 0.8), 0.0), ((40, 3), (0.3, 0.6), 0.8)]
    for k, (lat, p_r, p_out) in enumerate(cases):
        tb.set_latency(*lat)
        tb.set_stalls(p_r=p_r, p_out=p_out)
        for j in range(4):
            await tb.read(0x2_0000 + 0x1000 * (4 * k + j) - BEAT_BYTES * tb.rng.randrange(0, 20),
                          tb.rng.randrange(1, 300), f"case{k}.{j}")
        await tb.drain()
    assert tb.scoreboard.checked == 4 * len(cases)


@cocotb.test()
async def test_throughput_latency(dut):
    """No stalls: a 4096-beat read sustains >= 0.95 stream beats per cycle (both ports at one beat
    per cycle) at RAM latencies (24, 30) and (85, 70), counting from the command; the DMA adds
    ar_latency (cmd to AR) and r_latency (high half's R to m_data)."""
    results = {}
    tb = TwoPortReadTB(dut, seed=4)
    for lat in ((24, 30), (85, 70)):
        tb.set_latency(*lat)
        await tb.reset()
        addr = 0x8_0000 + BEAT_BYTES * 5  # unaligned: bursts are split at every 4 KiB boundary
        await tb.read(addr, 4096, f"tput-{lat}")
        await tb.drain()
        b, p0 = tb.bus, tb.bus.ports[0]
        cmd, first_out, last_out = b.cmd_cycles[0], b.out_valid_cycles[0], b.out_cycles[-1]
        total = 4096 / (last_out - cmd + 1)
        steady = 4096 / (last_out - first_out + 1)
        results[lat] = total
        dut._log.warning(f"axi_read_2port: RAM latencies {lat}: {total:.4f} beats/cycle from the command "
                         f"({steady:.4f} from the first beat); bursts in flight at most "
                         f"{[p.max_in_flight for p in b.ports]}; cmd->AR {p0.ar_cycles[0] - cmd}, "
                         f"high half R->m_data {first_out - p0.r_cycles[1]} cycles")
        assert p0.ar_cycles[0] - cmd == PARAMS["ar_latency"]
        assert first_out - p0.r_cycles[1] == PARAMS["r_latency"]
        # the DMA's latency plus the memory's, measured from AR to R handshake
        assert first_out - cmd == PARAMS["latency"] + p0.r_cycles[0] - p0.ar_cycles[0]
        assert total >= 0.95, f"throughput {total:.4f} < 0.95 beats/cycle at latencies {lat}"
    assert results[(24, 30)] >= 0.98


@cocotb.test()
async def test_one_port_alone(dut):
    """`only` = 1 or 2 puts every burst on one port (the other sees no AR) at up to half the rate (one
    port beat per cycle), data exact; `only` = 3 and 0 alternate again."""
    tb = TwoPortReadTB(dut, seed=8, latency=(20, 28))
    await tb.reset()
    for only in (1, 2, 3, 0):
        tb.use_ports(only)
        ars = [p.ars for p in tb.bus.ports]
        tb.set_stalls()
        out0, cmd0 = len(tb.bus.out_cycles), len(tb.bus.cmd_cycles)
        await tb.read(0xC_0000 + BEAT_BYTES * 3, 1024, f"only{only}-long")
        await tb.drain()
        rate = 1024 / (tb.bus.out_cycles[-1] - tb.bus.out_cycles[out0] + 1)
        dut._log.info(f"only={only}: {rate:.3f} beats/cycle")
        tb.set_stalls(p_ar=(0.2, 0.2), p_r=(0.3, 0.3), p_out=0.2)
        for k in range(4):
            await tb.read(0xD_0000 + 0x1000 * k - BEAT_BYTES * k, tb.rng.choice([1, 9, 77]), f"only{only}-{k}")
        await tb.drain()
        new = [p.ars - a for p, a in zip(tb.bus.ports, ars)]
        if only in (1, 2):
            assert new[2 - only] == 0 and new[only - 1] > 0, f"only={only}: ARs per port {new}"
            assert 0.45 <= rate <= 0.501, f"only={only}: {rate:.3f} beats/cycle from one port"
        else:
            assert min(new) >= 0.4 * sum(new), f"only={only}: ARs per port {new}"
            assert rate >= 0.95, f"only={only}: {rate:.3f} beats/cycle from both ports"
        assert len(tb.bus.cmd_cycles) - cmd0 == 5
    assert tb.scoreboard.checked == 20


@cocotb.test()
async def test_rresp_errors_per_port(dut):
    """SLVERR on port 0 and DECERR on port 1 each set the sticky error; the data are delivered,
    later commands are exact, only a reset clears it."""
    tb = TwoPortReadTB(dut, seed=5, latency=(10, 17))
    await tb.reset()
    tb.set_stalls(p_ar=(0.2, 0.2), p_r=(0.2, 0.3), p_out=0.2)
    await tb.read(0x1_0000, 100, "clean")
    await tb.drain()
    assert not dut.error.value
    for port, resp in ((0, RESP_SLVERR), (1, RESP_DECERR)):
        await tb.reset()
        assert not dut.error.value, "error survived reset"
        # burst k of a command starting on a page goes to port k mod 2; 128 bytes per burst
        bad = 0x2_0000 + 128 * (2 + port) + 8 * 5
        tb.set_errors(port, [(bad, bad + 8, resp)])
        await tb.read(0x2_0000, 64, f"err-port{port}")
        await tb.read(0x4_0000, 20, f"after-port{port}")
        await tb.drain()
        assert dut.error.value, f"RRESP {resp} on port {port} did not set error"
        tb.set_errors(port, [])


@cocotb.test()
async def test_flush(dut):
    """Flush with bursts in flight on both ports (consumer fast or stalled, a command queued behind,
    flush held for several cycles, a port stalled on AR, flush while idle): idle once every owed
    beat has arrived on both ports, nothing on m_data after the flush, the next commands exact."""
    tb = TwoPortReadTB(dut, seed=6, latency=(30, 45))
    await tb.reset()
    # (consumer stall probability, AR stall probabilities, flush cycles, bursts in flight per port, beats out)
    cases = [(0.0, (0.2, 0.2), 1, 2, 0), (0.0, (0.2, 0.2), 1, 2, 40), (0.7, (0.0, 0.9), 1, 1, 20),
             (0.3, (0.2, 0.2), 4, 1, 10), (0.0, (0.0, 0.0), 1, 6, 100)]
    for k, (p_out, p_ar, hold, in_flight, out) in enumerate(cases):
        tb.set_stalls(p_ar=p_ar, p_r=(0.2, 0.2), p_out=p_out)
        await tb.read(0x5_0000 + 0x1000 * k + BEAT_BYTES * 3, 1000, f"cut{k}")
        await tb.read(0x6_0000 + 0x1000 * k, 50, f"queued{k}")
        await tb.wait_in_flight(min(in_flight, MAX_OUTSTANDING, FIFO_DEPTH // MAX_BURST), out)  # credits allow
        dropped = await tb.flush(hold)
        assert dropped >= 1
        assert all(p.in_flight == 0 for p in tb.bus.ports)
        tb.set_stalls(p_ar=(0.2, 0.2), p_r=(0.2, 0.2), p_out=0.2)
        await tb.read(0x7_0000 + 0x1000 * k - BEAT_BYTES * 9, 77, f"next{k}")
        await tb.read(0x7_8000 + BEAT_BYTES * k, 1, f"next{k}b")
        await tb.drain()
    await tb.flush(2)  # while idle: nothing happens
    await tb.read(0x9_0000, 33, "final")
    await tb.drain()
    assert tb.scoreboard.checked == 2 * len(cases) + 1


@cocotb.test()
async def test_reset_mid_command(dut):
    """A synchronous reset in the middle of a long read (an error already flagged) returns to idle
    with counters and error cleared; with a fresh RAM behind it the next command is exact."""
    tb = TwoPortReadTB(dut, seed=7, latency=(16, 25))
    await tb.reset()
    tb.set_stalls(p_ar=(0.2, 0.2), p_r=(0.2, 0.2), p_out=0.3)
    tb.set_errors(1, [(0xA_0080, 0xA_0088, RESP_SLVERR)])
    await tb.read(0xA_0000, 1000, "cut")
    await tb.read(0xB_0000, 10, "queued")
    await tb.wait_in_flight(2, 1)
    for _ in range(200):
        if dut.error.value:
            break
        await RisingEdge(dut.clk)
    assert dut.error.value and not dut.idle.value
    tb.cmd.clear()
    await tb.reset()
    tb.scoreboard.clear()
    assert dut.idle.value and not dut.error.value and int(dut.beats.value) == 0
    assert not dut.m_data__tvalid.value and not dut.axi0__arvalid.value and not dut.axi1__arvalid.value
    tb.set_errors(1, [])
    tb.rams[0].fill()  # a fresh RAM: any stale beat would not match
    await tb.read(0xA_0000 + BEAT_BYTES * 500, 300, "after-reset")
    await tb.drain()
    assert tb.scoreboard.checked == 1 and not dut.error.value
