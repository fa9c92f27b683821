"""cocotb testbench for hw.regfile.RegisterFile: every register of contract/registers.REGISTERS
behaves as its access kind says, over a stalling AXI4-Lite bus.

Structure:

* :class:`RegisterModel` - the expected semantics, built from ``registers.REGISTERS`` only (offsets,
  access kinds, field masks; reserved bits read 0): what a read returns, what a write does, what an
  engine set does. It knows nothing of the gateware.
* :class:`RegScoreboard` - applies the host's writes to the model in bus order and keeps the state
  after each, so a read running concurrently with writes is checked against the states its window
  allows (the last write answered before the read was issued .. the last write issued before the
  read was answered); every response must be OKAY; the ``w1s`` pulses seen must equal those expected.
* :class:`RegfileTB` - clock, reset, a cocotbext-axi ``AxiLiteMaster`` (pause generators on all five
  channels), raw channel access for what the master cannot do (non-contiguous strobes, AW and W in a
  chosen order), and one monitor coroutine: AXI stability rules on B and R, ``w1s`` pulses
  (each exactly one cycle), handshake and ``bvalid``/``rvalid`` edges for the timing tests.

Ports are found by the naming rule of the task (register name in lower case, ``<reg>_set`` for a
w1c register's set input), not by importing the gateware. TB_PARAMS carries the DUT's documented
timing (``write_cycles``, ``read_cycles``, ``write_latency``, ``read_latency``).
"""

from __future__ import annotations

import random

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge, RisingEdge
from cocotbext.axi import AxiLiteBus, AxiLiteMaster, AxiResp

from gpt_fpga.contract import registers
from gpt_fpga.sim.tb.common import PARAMS, stalls

REGS = registers.REGISTERS
WORD = registers.REGISTER_BYTES
WORDS = 1 << (registers.ADDRESS_BITS - 2)
FULL = (1 << 8 * WORD) - 1
KINDS = ("ro", "rw", "w1s", "w1c")
TIMEOUT_US = 2000  # per test: a deadlock fails instead of hanging


def of_kind(kind: str) -> list[registers.Register]:
    return [r for r in REGS if r.access == kind]


def defined_bits(reg: registers.Register) -> int:
    m = 0
    for f in reg.fields:
        m |= f.mask
    return m


def byte_mask(strb: int) -> int:
    return sum(0xFF << 8 * i for i in range(WORD) if strb >> i & 1)


def port(reg: registers.Register) -> str:
    return reg.name.lower()


def set_port(reg: registers.Register) -> str:
    return f"{port(reg)}_set"


class RegisterModel:
    """What the register map promises, per access kind (see registers.py and hw/regfile.py)."""

    def __init__(self, regs=REGS):
        self.regs = regs
        self.by_word = {r.offset // WORD: r for r in regs}
        self.mask = {r.name: defined_bits(r) for r in regs}
        self.driven = {r.name: 0 for r in regs if r.access == "ro"}  # what the engine drives
        self.reset()

    def reset(self):
        self.held = {r.name: 0 for r in self.regs if r.access in ("rw", "w1c")}

    def register_at(self, addr: int) -> registers.Register | None:
        return self.by_word.get((addr % (1 << registers.ADDRESS_BITS)) // WORD)

    def read(self, addr: int) -> int:
        r = self.register_at(addr)
        if r is None or r.access == "w1s":
            return 0
        if r.access == "ro":
            return self.driven[r.name] & self.mask[r.name]
        return self.held[r.name]

    def write(self, addr: int, data: int, strb: int) -> tuple[str, int] | None:
        """Apply a host write; returns (register, bits) of the w1s pulse it makes, if any."""
        r = self.register_at(addr)
        if r is None or r.access == "ro":
            return None
        m = byte_mask(strb) & self.mask[r.name]
        if r.access == "rw":
            self.held[r.name] = (self.held[r.name] & ~m) | (data & m)
        elif r.access == "w1c":
            self.held[r.name] &= ~(data & m)
        elif data & m:
            return r.name, data & m
        return None

    def engine_set(self, name: str, bits: int):
        self.held[name] |= bits & self.mask[name]

    def snapshot(self) -> tuple[int, ...]:
        return tuple(self.read(w * WORD) for w in range(WORDS))


class RegScoreboard:
    """Writes applied in bus order; concurrent reads checked against the states their window allows."""

    def __init__(self, model: RegisterModel):
        self.model = model
        self.pulses_expected = {r.name: [] for r in of_kind("w1s")}
        self.reads_checked = self.writes_checked = 0
        self.epoch = 0
        self.begin()

    def begin(self):
        """A new window base: after a reset or a change the engine made (no transaction in flight)."""
        self.hist = [self.model.snapshot()]
        self.issued = self.done = 0

    def write_issued(self, addr: int, data: int, strb: int):
        pulse = self.model.write(addr, data, strb)
        if pulse:
            self.pulses_expected[pulse[0]].append(pulse[1])
        self.hist.append(self.model.snapshot())
        self.issued += 1

    def write_done(self, resp, what: str):
        assert resp == AxiResp.OKAY, f"{what}: bresp {resp!r}, expected OKAY"
        self.done += 1
        self.writes_checked += 1

    def read_done(self, addr: int, lo: int, got: int, resp, what: str):
        assert resp == AxiResp.OKAY, f"{what}: rresp {resp!r}, expected OKAY"
        allowed = [h[addr // WORD % WORDS] for h in self.hist[lo:self.issued + 1]]
        if got not in allowed:
            r = self.model.register_at(addr)
            raise AssertionError(f"{what}: read 0x{got:08X} from 0x{addr:02X} ({r.name if r else 'unmapped'}), "
                                 f"expected {' or '.join(f'0x{v:08X}' for v in dict.fromkeys(allowed))}")
        self.reads_checked += 1


class RegfileTB:
    def __init__(self, dut, seed: int, period_ns: int = 10):
        self.dut = dut
        self.rng = random.Random(seed)
        Clock(dut.clk, period_ns, unit="ns").start()
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi", bus_separator="__"), dut.clk, dut.rst)
        self.wr, self.rd = self.axil.write_if, self.axil.read_if
        for log in (self.wr.log, self.rd.log):
            log.setLevel("WARNING")
        self.channels = {"aw": self.wr.aw_channel, "w": self.wr.w_channel, "b": self.wr.b_channel,
                         "ar": self.rd.ar_channel, "r": self.rd.r_channel}
        self.model = RegisterModel()
        self.sb = RegScoreboard(self.model)
        self.covered = {k: set() for k in KINDS}
        self.stopping = False  # random_traffic issues nothing more once set
        for r in of_kind("ro"):
            self.sig(port(r)).value = 0
        for r in of_kind("w1c"):
            self.sig(set_port(r)).value = 0
        self.dut.rst.value = 0
        # monitor state
        self.cycle = 0
        self.errors: list[str] = []
        self.pulses = {r.name: [] for r in of_kind("w1s")}  # (cycle, bits)
        self.events = {k: [] for k in ("aw", "w", "ar", "b_rise", "r_rise", "b", "r")}
        self.monitor = cocotb.start_soon(self._monitor())

    def sig(self, name: str):
        return getattr(self.dut, name)

    def bus(self, name: str) -> int:
        return int(getattr(self.dut, f"s_axi__{name}").value)

    # ---- clock, reset, stalls

    async def reset(self, cycles: int = 3):
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, cycles)
        self.dut.rst.value = 0
        self.model.reset()
        self.sb.epoch += 1
        self.sb.begin()
        for name in self.pulses:
            self.pulses[name].clear()
            self.sb.pulses_expected[name].clear()
        await RisingEdge(self.dut.clk)

    def set_stalls(self, p: float | dict):
        """Pause probability per channel (one number for all five, or a dict by channel name)."""
        p = p if isinstance(p, dict) else {c: p for c in self.channels}
        for name, ch in self.channels.items():
            prob = p.get(name, 0.0)
            ch.set_pause_generator(stalls(self.rng, prob) if prob else None)
            if not prob:
                ch.pause = False  # removing a generator leaves its last value

    def hold(self, channel: str, held: bool):
        """Hold a channel paused (held=True) until released; for B and R this holds bready / rready low."""
        ch = self.channels[channel]
        ch.set_pause_generator(None)
        ch.pause = held

    # ---- monitor: protocol rules, pulses, handshakes

    async def _monitor(self):
        dut = self.dut
        pending = {"b": None, "r": None}  # payload of a valid not yet accepted
        last_pulse = {name: None for name in self.pulses}
        prev = {"b": 0, "r": 0}
        w1s = [(r.name, self.sig(port(r))) for r in of_kind("w1s")]
        while True:
            await RisingEdge(dut.clk)
            self.cycle += 1
            if dut.rst.value:
                pending = {"b": None, "r": None}
                prev = {"b": 0, "r": 0}
                continue
            s = {n: self.bus(n) for n in ("awvalid", "awready", "wvalid", "wready", "bvalid", "bready", "bresp",
                                          "arvalid", "arready", "rvalid", "rready", "rdata", "rresp")}
            for ch in ("aw", "w", "ar"):
                if s[f"{ch}valid"] and s[f"{ch}ready"]:
                    self.events[ch].append(self.cycle)
            for ch, payload in (("b", (s["bresp"],)), ("r", (s["rdata"], s["rresp"]))):
                valid, ready = s[f"{ch}valid"], s[f"{ch}ready"]
                if pending[ch] is not None:
                    if not valid:
                        self._error(f"{ch}valid dropped before {ch}ready (cycle {self.cycle})")
                    elif payload != pending[ch]:
                        self._error(f"{ch} payload changed while {ch}valid waited for {ch}ready (cycle {self.cycle})")
                if valid and not prev[ch]:
                    self.events[f"{ch}_rise"].append(self.cycle)
                if valid and ready:
                    self.events[ch].append(self.cycle)
                pending[ch] = payload if valid and not ready else None
                prev[ch] = valid
            for name, sg in w1s:
                bits = int(sg.value)
                if bits:
                    if last_pulse[name] == self.cycle - 1:
                        self._error(f"{name} pulse lasted more than one cycle (cycle {self.cycle})")
                    last_pulse[name] = self.cycle
                    self.pulses[name].append((self.cycle, bits))

    def _error(self, msg: str):
        self.errors.append(msg)
        self.dut._log.error(msg)

    def check_protocol(self):
        assert not self.errors, f"{len(self.errors)} protocol errors, first: {self.errors[0]}"

    def check_pulses(self):
        for name, expected in self.sb.pulses_expected.items():
            got = [bits for _, bits in self.pulses[name]]
            assert got == expected, f"{name} pulses: got {[hex(v) for v in got]}, expected {[hex(v) for v in expected]}"

    async def check_ports(self, what: str):
        """Every Out port equals the model (mid-cycle, no transaction in flight)."""
        await FallingEdge(self.dut.clk)
        for r in REGS:
            if r.access == "ro":
                continue
            got = int(self.sig(port(r)).value)
            exp = 0 if r.access == "w1s" else self.model.held[r.name]
            assert got == exp, f"{what}: port {port(r)} is 0x{got:08X}, expected 0x{exp:08X}"

    # ---- host side: through the master (concurrent-safe) or raw channels (sequential only)

    async def write(self, addr: int, data: int, strb: int = 0xF, what: str = "write"):
        """A host write through the AxiLiteMaster (strb must be contiguous: the master derives it from
        the address and length); the model follows in bus order."""
        lanes = [i for i in range(WORD) if strb >> i & 1]
        assert lanes, "the master cannot write with no strobe: use raw_write"
        assert lanes == list(range(lanes[0], lanes[-1] + 1)), f"strobe {strb:04b} is not contiguous"
        epoch = self.sb.epoch
        self.sb.write_issued(addr, data, strb)
        raw = (data & FULL).to_bytes(WORD, "little")[lanes[0]:lanes[-1] + 1]
        resp = await self.axil.write(addr - addr % WORD + lanes[0], raw)
        if resp is None or epoch != self.sb.epoch:
            return None  # flushed by a reset
        self.sb.write_done(resp.resp, what)
        return resp

    async def read(self, addr: int, what: str = "read") -> int | None:
        """A host read through the AxiLiteMaster, checked against the model; returns the data."""
        epoch, lo = self.sb.epoch, self.sb.done
        resp = await self.axil.read(addr, WORD)
        if resp is None or epoch != self.sb.epoch:
            return None
        got = int.from_bytes(resp.data, "little")
        self.sb.read_done(addr, lo, got, resp.resp, what)
        return got

    async def read_reg(self, name: str, what: str | None = None) -> int:
        r = registers.register(name)
        return await self.read(r.offset, what or f"read {name}")

    async def write_reg(self, name: str, data: int, strb: int = 0xF, what: str | None = None):
        r = registers.register(name)
        self.covered[r.access].add(name)
        return await self.write(r.offset, data, strb, what or f"write {name}")

    async def raw_write(self, addr: int, data: int, strb: int, order: str = "together", gap: int = 0,
                        what: str = "raw write", during=None):
        """One write on the raw channels: AW and W "together", or "aw_first" / "w_first" with the other
        sent `gap` cycles after the first was accepted. Before the second is sent, checks that the write
        has not happened (no B, ports unchanged). `during` (optional coroutine function) runs before B."""
        aw = self.wr.aw_channel._transaction_obj()
        aw.awaddr, aw.awprot = addr, 0
        w = self.wr.w_channel._transaction_obj()
        w.wdata, w.wstrb = data & FULL, strb
        chans = {"aw": (self.wr.aw_channel, aw), "w": (self.wr.w_channel, w)}
        if order == "together":
            await chans["aw"][0].send(aw)
            await chans["w"][0].send(w)
        else:
            first, second = ("aw", "w") if order == "aw_first" else ("w", "aw")
            ch, obj = chans[first]
            await ch.send(obj)
            await ch.wait()  # accepted
            await ClockCycles(self.dut.clk, gap)
            assert self.wr.b_channel.empty() and not self.bus("bvalid"), f"{what}: B before {second}"
            await self.check_ports(f"{what}: before {second}")
            ch, obj = chans[second]
            await ch.send(obj)
        self.sb.write_issued(addr, data, strb)
        if during is not None:
            await during()
        b = await self.wr.b_channel.recv()
        self.sb.write_done(AxiResp(int(b.bresp)), what)

    async def raw_read(self, addr: int, what: str = "raw read") -> int:
        ar = self.rd.ar_channel._transaction_obj()
        ar.araddr, ar.arprot = addr, 0
        lo = self.sb.done
        await self.rd.ar_channel.send(ar)
        r = await self.rd.r_channel.recv()
        got = int(r.rdata)
        self.sb.read_done(addr, lo, got, AxiResp(int(r.rresp)), what)
        return got

    # ---- engine side

    async def drive(self, name: str, value: int):
        """The engine drives ro register `name` (no transaction may be in flight)."""
        await FallingEdge(self.dut.clk)
        self.sig(port(registers.register(name))).value = value & FULL
        self.model.driven[name] = value & FULL
        self.sb.begin()

    async def engine_set(self, name: str, bits: int):
        """The engine pulses <reg>_set for one cycle (no transaction may be in flight)."""
        r = registers.register(name)
        await FallingEdge(self.dut.clk)
        self.sig(set_port(r)).value = bits & FULL
        await FallingEdge(self.dut.clk)
        self.sig(set_port(r)).value = 0
        self.model.engine_set(name, bits)
        self.sb.begin()

    async def quiesce(self, timeout: int = 5000):
        for _ in range(timeout):
            if self.axil.idle() and all(ch.idle() if hasattr(ch, "idle") else ch.empty()
                                        for ch in self.channels.values()):
                break
            await RisingEdge(self.dut.clk)
        else:
            raise AssertionError("timeout: the bus did not go idle (deadlock?)")
        await ClockCycles(self.dut.clk, 3)

    async def random_traffic(self, n_writes: int, n_reads: int, what: str, unmapped: bool = True):
        """Concurrent random writes (random registers incl. ro / unmapped, random contiguous strobes)
        and reads (every offset), several in flight on each side."""
        rng = self.rng

        def addr():
            if unmapped and rng.random() < 0.15:
                return rng.randrange(WORDS) * WORD
            return rng.choice(REGS).offset

        async def writer():
            tasks = []
            for i in range(n_writes):
                if self.stopping:
                    break
                a, lo = addr(), rng.randrange(WORD)
                hi = rng.randrange(lo, WORD)
                strb = sum(1 << k for k in range(lo, hi + 1))
                data = rng.getrandbits(32) if rng.random() < 0.7 else rng.choice([0, FULL])
                r = self.model.register_at(a)
                if r is not None:
                    self.covered[r.access].add(r.name)
                tasks.append(cocotb.start_soon(self.write(a, data, strb, f"{what}: write {i}")))
                if rng.random() < 0.5:
                    await ClockCycles(self.dut.clk, rng.randrange(1, 4))
                while len([t for t in tasks if not t.done()]) >= 3:
                    await RisingEdge(self.dut.clk)
            for t in tasks:
                await t

        async def reader():
            tasks = []
            for i in range(n_reads):
                if self.stopping:
                    break
                tasks.append(cocotb.start_soon(self.read(addr(), f"{what}: read {i}")))
                if rng.random() < 0.5:
                    await ClockCycles(self.dut.clk, rng.randrange(1, 4))
                while len([t for t in tasks if not t.done()]) >= 3:
                    await RisingEdge(self.dut.clk)
            for t in tasks:
                await t

        w, r = cocotb.start_soon(writer()), cocotb.start_soon(reader())
        await w
        await r
        await self.quiesce()


async def start(dut, seed: int) -> RegfileTB:
    tb = RegfileTB(dut, seed)
    await tb.reset()
    return tb


async def finish(tb: RegfileTB):
    await tb.quiesce()
    tb.check_protocol()
    tb.check_pulses()
    await tb.check_ports("end")


# ------------------------------------------------------------------------------------------------

@cocotb.test(timeout_time=TIMEOUT_US, timeout_unit="us")
async def test_reset_values_and_every_offset(dut):
    """After reset: every offset of the address space reads as the model says (rw and w1c 0, ro what
    the engine drives, w1s 0, unmapped 0), every Out port is 0."""
    tb = await start(dut, 1)
    await tb.check_ports("after reset")
    for r in of_kind("ro"):
        await tb.drive(r.name, tb.rng.getrandbits(32))
    mapped = {r.offset // WORD for r in REGS}
    for word in range(WORDS):
        await tb.read(word * WORD, f"offset 0x{word * WORD:02X}")
        for low in (1, 2, 3):  # the two low address bits are ignored
            await tb.raw_read(word * WORD + low, f"offset 0x{word * WORD + low:02X}")
    assert tb.sb.reads_checked == 4 * WORDS
    assert len(mapped) == len(REGS) < WORDS, "no unmapped offset to test"
    await finish(tb)


@cocotb.test(timeout_time=TIMEOUT_US, timeout_unit="us")
async def test_rw_strobes(dut):
    """Each rw register: full writes, then every wstrb pattern (0..15, non-contiguous included) of random
    data, each read back and checked on the port; reserved bits read 0."""
    tb = await start(dut, 2)
    for r in of_kind("rw"):
        for data in (FULL, 0, tb.rng.getrandbits(32)):
            await tb.write_reg(r.name, data)
            assert await tb.read_reg(r.name) == data & defined_bits(r)
            await tb.check_ports(f"{r.name} = 0x{data:08X}")
        for strb in range(16):
            data = tb.rng.getrandbits(32)
            await tb.raw_write(r.offset, data, strb, what=f"{r.name} strb {strb:04b}")
            await tb.read_reg(r.name, f"{r.name} after strb {strb:04b}")
            await tb.check_ports(f"{r.name} strb {strb:04b}")
        for f in r.fields:  # each field alone, via the contract's pack
            v = tb.rng.randrange(1 << f.width)
            await tb.write_reg(r.name, r.pack(**{f.name: v}))
            assert r.field(f.name).get(await tb.read_reg(r.name)) == v
    assert tb.covered["rw"] == {r.name for r in of_kind("rw")}
    await finish(tb)


@cocotb.test(timeout_time=TIMEOUT_US, timeout_unit="us")
async def test_ro_inputs(dut):
    """Each ro register reads what the engine drives (reserved bits 0), sampled at the read: a change
    after the AR handshake, while R is held off, does not change rdata. Writes to ro are ignored."""
    tb = await start(dut, 3)
    for r in of_kind("ro"):
        for value in (FULL, 0, tb.rng.getrandbits(32), tb.rng.getrandbits(32)):
            await tb.drive(r.name, value)
            assert await tb.read_reg(r.name) == value & defined_bits(r)
        await tb.write_reg(r.name, ~tb.model.driven[r.name] & FULL)  # ignored
        await tb.read_reg(r.name, f"{r.name} after a write")
        # sampled on the AR handshake: hold rready low, change the input, release
        tb.hold("r", True)
        old = tb.model.driven[r.name]
        task = cocotb.start_soon(tb.raw_read(r.offset, f"{r.name} sampled at AR"))
        for _ in range(50):
            await RisingEdge(dut.clk)
            if tb.bus("rvalid"):
                break
        await ClockCycles(dut.clk, 3)
        await FallingEdge(dut.clk)
        tb.sig(port(r)).value = ~old & FULL  # not via tb.drive: the model keeps the sampled value
        await ClockCycles(dut.clk, 5)
        tb.hold("r", False)
        assert await task == old & defined_bits(r)
        await tb.drive(r.name, ~old & FULL)
        tb.covered["ro"].add(r.name)
    assert tb.covered["ro"] == {r.name for r in of_kind("ro")}
    await finish(tb)


@cocotb.test(timeout_time=TIMEOUT_US, timeout_unit="us")
async def test_w1s_pulses(dut):
    """Each w1s register, each field: a write of 1 pulses exactly those bits for exactly one cycle, in
    the cycle bvalid rises; writing 0 or with the byte's strobe off pulses nothing; reads return 0."""
    tb = await start(dut, 4)
    for r in of_kind("w1s"):
        for f in r.fields:
            bits = f.mask
            n_before, b_before = len(tb.pulses[r.name]), len(tb.events["b_rise"])
            await tb.write_reg(r.name, bits)
            await tb.quiesce()
            assert len(tb.pulses[r.name]) == n_before + 1, \
                f"{r.name}.{f.name}: {len(tb.pulses[r.name]) - n_before} pulses, expected one"
            cycle, got = tb.pulses[r.name][-1]
            assert got == bits, f"{r.name}.{f.name}: pulsed 0x{got:X}, expected 0x{bits:X}"
            assert tb.events["b_rise"][b_before] == cycle, f"{r.name}.{f.name}: pulse not in bvalid's first cycle"
            assert await tb.read_reg(r.name) == 0
            strb_off = 0xF & ~(1 << f.lsb // 8)
            await tb.raw_write(r.offset, bits, strb_off, what=f"{r.name}.{f.name} strobe off")
            # a read accepted in the very cycle of the pulse still returns 0
            n_before = len(tb.pulses[r.name])

            async def read_in_pulse_cycle(r=r):
                cycle = None
                for _ in range(20):
                    await FallingEdge(dut.clk)
                    if cycle is None and all(tb.bus(s) for s in ("awvalid", "awready", "wvalid", "wready")):
                        cycle = 0
                    elif cycle is not None:
                        cycle += 1
                    if cycle == 1:  # the source drives arvalid from the next edge: high in cycle 2
                        return await tb.raw_read(r.offset, f"{r.name} read in its pulse cycle")
                raise AssertionError("no AW/W handshake")

            reader = cocotb.start_soon(read_in_pulse_cycle())
            await tb.raw_write(r.offset, bits, 0xF, what=f"{r.name}.{f.name} with a read")
            assert await reader == 0
            assert tb.pulses[r.name][n_before][0] in tb.events["ar"], "the read was not accepted in the pulse cycle"
        await tb.write_reg(r.name, 0)
        await tb.write_reg(r.name, FULL)  # all fields at once (reserved bits ignored)
        await tb.write_reg(r.name, ~defined_bits(r) & FULL)  # only reserved bits: nothing
        for _ in range(8):
            await tb.write_reg(r.name, tb.rng.getrandbits(32))
    await tb.quiesce()
    tb.check_pulses()
    assert tb.covered["w1s"] == {r.name for r in of_kind("w1s")}
    await finish(tb)


@cocotb.test(timeout_time=TIMEOUT_US, timeout_unit="us")
async def test_w1c_set_clear(dut):
    """Each w1c register: engine sets stick, host writes of 0 or with the strobe off keep them, a write
    of 1 clears; a set in the very cycle the clear takes effect wins (and the clear of a bit set the
    cycle before wins over that earlier set)."""
    tb = await start(dut, 5)
    for r in of_kind("w1c"):
        mask = defined_bits(r)
        for f in r.fields:
            await tb.engine_set(r.name, f.mask)
            assert await tb.read_reg(r.name) == f.mask
            await tb.write_reg(r.name, 0)
            assert await tb.read_reg(r.name) == f.mask
            await tb.raw_write(r.offset, f.mask, 0xF & ~(1 << f.lsb // 8), what=f"{r.name}.{f.name} strobe off")
            assert await tb.read_reg(r.name) == f.mask
            await tb.write_reg(r.name, f.mask)
            assert await tb.read_reg(r.name) == 0
            await tb.check_ports(f"{r.name}.{f.name}")
        await tb.engine_set(r.name, FULL)
        assert await tb.read_reg(r.name) == mask
        for _ in range(8):
            await tb.engine_set(r.name, tb.rng.getrandbits(32))
            await tb.write_reg(r.name, tb.rng.getrandbits(32))
            await tb.read_reg(r.name)
            await tb.check_ports(r.name)

        # set and clear around the effect edge: AW and W together, no stalls, accepted at the end of
        # cycle 0, effect at the end of cycle 1 (hw/regfile.py). set_cycle: the cycle set is high.
        for set_cycle, wins in ((1, True), (0, False), (2, True), ("held", True)):
            await tb.engine_set(r.name, FULL)  # everything set
            sp = tb.sig(set_port(r))

            async def pulse_set(set_cycle=set_cycle, sp=sp):
                cycle = None
                for _ in range(20):
                    await FallingEdge(dut.clk)
                    if cycle is None and all(tb.bus(s) for s in ("awvalid", "awready", "wvalid", "wready")):
                        cycle = 0
                    elif cycle is not None:
                        cycle += 1
                    if set_cycle == "held":
                        sp.value = mask
                    else:
                        sp.value = mask if cycle == set_cycle else 0
                    if cycle == 1:
                        assert not tb.bus("bvalid"), "bvalid before the effect edge"
                    if cycle == 2:
                        assert tb.bus("bvalid"), "bvalid not high in cycle 2 (write_latency)"
                    if cycle is not None and cycle >= 3:
                        break
                sp.value = 0

            setter = cocotb.start_soon(pulse_set())
            await tb.raw_write(r.offset, mask, 0xF, what=f"{r.name} clear, set in cycle {set_cycle}")
            await setter
            if wins:
                tb.model.engine_set(r.name, mask)
                tb.sb.begin()
            got = await tb.read_reg(r.name)
            assert got == (mask if wins else 0), f"{r.name}: set in cycle {set_cycle}: read 0x{got:X}"
        tb.covered["w1c"].add(r.name)
    assert tb.covered["w1c"] == {r.name for r in of_kind("w1c")}
    await finish(tb)


@cocotb.test(timeout_time=TIMEOUT_US, timeout_unit="us")
async def test_channel_orders(dut):
    """AW before W, W before AW (gaps of 0, 1 and 7 cycles), together; two AWs before their Ws and two
    Ws before their AWs: every write lands, in order, and none before both halves arrived."""
    tb = await start(dut, 6)
    rws = of_kind("rw")
    cases = [("together", 0)] + [(o, g) for o in ("aw_first", "w_first") for g in (0, 1, 7)]
    for i, (order, gap) in enumerate(cases * 2):
        r = rws[i % len(rws)]
        await tb.raw_write(r.offset, tb.rng.getrandbits(32), 0xF, order, gap, f"{r.name} {order} gap {gap}")
        await tb.read_reg(r.name)
        await tb.check_ports(f"{order} gap {gap}")
    # two of one channel before the other: the second waits in the manager, nothing is dropped
    for first in ("aw", "w"):
        regs = [rws[0], rws[1 % len(rws)]]
        data = [tb.rng.getrandbits(32) for _ in regs]
        aws, ws = [], []
        for r, d in zip(regs, data):
            aw = tb.wr.aw_channel._transaction_obj()
            aw.awaddr, aw.awprot = r.offset, 0
            w = tb.wr.w_channel._transaction_obj()
            w.wdata, w.wstrb = d, 0xF
            aws.append(aw)
            ws.append(w)
        one, other = (tb.wr.aw_channel, tb.wr.w_channel) if first == "aw" else (tb.wr.w_channel, tb.wr.aw_channel)
        for obj in (aws if first == "aw" else ws):
            await one.send(obj)
        await ClockCycles(dut.clk, 10)
        assert not tb.bus("bvalid"), f"{first} only: a write happened"
        for obj in (ws if first == "aw" else aws):
            await other.send(obj)
        for r, d in zip(regs, data):
            tb.sb.write_issued(r.offset, d, 0xF)
        for r in regs:
            b = await tb.wr.b_channel.recv()
            tb.sb.write_done(AxiResp(int(b.bresp)), f"two {first} first")
        for r in regs:
            await tb.read_reg(r.name)
        await tb.check_ports(f"two {first} first")
    await finish(tb)


@cocotb.test(timeout_time=TIMEOUT_US, timeout_unit="us")
async def test_backpressure(dut):
    """bready and rready held low for long stretches: bvalid/rvalid and their payloads hold (monitor),
    later requests wait, nothing is lost; then random traffic with B and R mostly stalled."""
    tb = await start(dut, 7)
    r = of_kind("rw")[0]
    for _ in range(3):
        tb.hold("b", True)
        tasks = [cocotb.start_soon(tb.write_reg(r.name, tb.rng.getrandbits(32))) for _ in range(3)]
        await ClockCycles(dut.clk, 30)
        assert tb.bus("bvalid"), "bvalid not held while bready is low"
        tb.hold("b", False)
        for t in tasks:
            await t
        tb.hold("r", True)
        tasks = [cocotb.start_soon(tb.read(rr.offset)) for rr in REGS[:4]]
        await ClockCycles(dut.clk, 30)
        assert tb.bus("rvalid"), "rvalid not held while rready is low"
        tb.hold("r", False)
        for t in tasks:
            await t
    tb.set_stalls({"aw": 0.2, "w": 0.2, "ar": 0.2, "b": 0.9, "r": 0.9})
    await tb.random_traffic(60, 60, "b/r stalled")
    tb.set_stalls(0.0)
    await finish(tb)


@cocotb.test(timeout_time=TIMEOUT_US, timeout_unit="us")
async def test_random_traffic(dut):
    """Concurrent random reads and writes of every register and unmapped offsets under random stalls on
    all five channels; between bursts the engine changes ro inputs and sets w1c bits."""
    tb = await start(dut, 8)
    for n, p in enumerate([0.0, 0.3, 0.6, {"aw": 0.7, "w": 0.0, "b": 0.3, "ar": 0.5, "r": 0.5},
                           {"aw": 0.0, "w": 0.7, "b": 0.0, "ar": 0.0, "r": 0.8}]):
        tb.set_stalls(p)
        for r in of_kind("ro"):
            await tb.drive(r.name, tb.rng.getrandbits(32))
        for r in of_kind("w1c"):
            await tb.engine_set(r.name, tb.rng.getrandbits(32))
        await tb.random_traffic(200, 200, f"burst {n}")
        await tb.check_ports(f"burst {n}")
    tb.set_stalls(0.0)
    assert all(tb.covered[k] == {r.name for r in of_kind(k)} for k in KINDS), tb.covered
    await finish(tb)


@cocotb.test(timeout_time=TIMEOUT_US, timeout_unit="us")
async def test_reset_mid_transaction(dut):
    """Reset with AW held but no W, with B pending, with R pending, and at random points of random
    traffic: the bus comes back idle, rw and w1c are 0, no pulse is left, the next transactions work."""
    tb = await start(dut, 9)
    rws, w1cs = of_kind("rw"), of_kind("w1c")

    async def fill():
        for r in rws:
            await tb.write_reg(r.name, tb.rng.getrandbits(32) | 1)
        for r in w1cs:
            await tb.engine_set(r.name, FULL)

    async def after_reset(what: str):
        assert not tb.bus("bvalid") and not tb.bus("rvalid"), f"{what}: response pending after reset"
        assert tb.bus("awready") and tb.bus("wready") and tb.bus("arready"), f"{what}: not ready after reset"
        await tb.check_ports(f"{what}: after reset")
        for r in REGS:
            await tb.read_reg(r.name, f"{what}: {r.name} after reset")
        r = rws[0]
        await tb.write_reg(r.name, 0x1234_5678)
        await tb.read_reg(r.name)
        await tb.check_ports(f"{what}: after reset and a write")
        tb.check_protocol()

    # AW accepted, W never sent
    await fill()
    aw = tb.wr.aw_channel._transaction_obj()
    aw.awaddr, aw.awprot = rws[0].offset, 0
    await tb.wr.aw_channel.send(aw)
    await tb.wr.aw_channel.wait()
    await ClockCycles(dut.clk, 3)
    await tb.reset()
    await after_reset("AW without W")
    # W accepted, AW never sent
    await fill()
    w = tb.wr.w_channel._transaction_obj()
    w.wdata, w.wstrb = 0, 0xF
    await tb.wr.w_channel.send(w)
    await tb.wr.w_channel.wait()
    await tb.reset()
    await after_reset("W without AW")
    # B pending
    await fill()
    tb.hold("b", True)
    cocotb.start_soon(tb.write_reg(rws[0].name, 7))
    for _ in range(50):
        await RisingEdge(dut.clk)
        if tb.bus("bvalid"):
            break
    assert tb.bus("bvalid")
    await tb.reset()
    tb.hold("b", False)
    await after_reset("B pending")
    # R pending
    await fill()
    tb.hold("r", True)
    cocotb.start_soon(tb.read_reg(rws[0].name))
    for _ in range(50):
        await RisingEdge(dut.clk)
        if tb.bus("rvalid"):
            break
    assert tb.bus("rvalid")
    await tb.reset()
    tb.hold("r", False)
    await after_reset("R pending")
    # random points of random traffic
    for n in range(6):
        await fill()
        tb.set_stalls(0.3)
        traffic = cocotb.start_soon(tb.random_traffic(40, 40, f"reset {n}"))
        await ClockCycles(dut.clk, tb.rng.randrange(5, 120))
        tb.stopping = True
        await tb.reset()
        await traffic  # what was in flight was flushed by the reset
        tb.stopping = False
        tb.set_stalls(0.0)
        await ClockCycles(dut.clk, 2)
        await after_reset(f"random reset {n}")
    await finish(tb)


@cocotb.test(timeout_time=TIMEOUT_US, timeout_unit="us")
async def test_timing(dut):
    """No stalls: back-to-back writes every `write_cycles`, bvalid `write_latency` cycles after the AW/W
    handshake; back-to-back reads every `read_cycles`, rvalid `read_latency` cycles after AR."""
    tb = await start(dut, 10)
    n = 24
    rws = of_kind("rw")
    tasks = [cocotb.start_soon(tb.write_reg(rws[i % len(rws)].name, tb.rng.getrandbits(32))) for i in range(n)]
    for t in tasks:
        await t
    aw, w, b = tb.events["aw"][-n:], tb.events["w"][-n:], tb.events["b_rise"][-n:]
    assert aw == w, "AW and W not accepted together"
    assert [y - x for x, y in zip(aw, b)] == [PARAMS["write_latency"]] * n, (aw, b)
    gaps = [y - x for x, y in zip(b, b[1:])]
    assert gaps[2:] == [PARAMS["write_cycles"]] * (n - 3), gaps  # steady state, once the master has queued
    tasks = [cocotb.start_soon(tb.read(REGS[i % len(REGS)].offset)) for i in range(n)]
    for t in tasks:
        await t
    ar, rr = tb.events["ar"][-n:], tb.events["r_rise"][-n:]
    assert [y - x for x, y in zip(ar, rr)] == [PARAMS["read_latency"]] * n, (ar, rr)
    gaps = [y - x for x, y in zip(ar, ar[1:])]
    assert gaps[2:] == [PARAMS["read_cycles"]] * (n - 3), gaps
    await finish(tb)
