"""cocotb testbench of the decoder engine (hw/engine.py) through its Vivado-facing top (hw/top.py).

The model is ``sim/fixed_model.FixedModel`` on the same weight image: each LAYER command's residual
and K/V rows, and each HEAD command's int32 logits, must equal it exactly. The host side (placing the
image, writing descriptors and the residual, starting commands) is done here as the driver will do
it, with cocotbext-axi: an AXI4-Lite manager on ``s_axi`` and a DDR model on ``m_axi`` (an
``AxiSlave`` over an ``AddressSpace``: addresses outside the RAM answer SLVERR) with random
back-pressure on every channel. A two-port engine's second manager ``m_axi1`` (reads only) reads
the same DDR through its own model; there each port's bursts start a fixed number of cycles after
their AR (``latency``, different per port), each port has its own stalls and can be made to answer
SLVERR on an address range of its own (``EngineTB.port_errors``).

TB_PARAMS: ``image`` (path), ``ids`` (prompt token ids), ``stall`` (probability, 0..1), ``ports``
(1 or 2; default 1), ``stall1`` and ``latency`` (two-port engine: port 1's stall probability, and
the AR-to-R latency of each port in cycles).
"""

from __future__ import annotations

import random
import struct

import cocotb
import numpy as np
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import (AddressSpace, AxiBus, AxiLiteBus, AxiLiteMaster, AxiReadBus, AxiSlave, AxiSlaveRead,
                           AxiSlaveWrite, AxiWriteBus, MemoryRegion)

from gpt_fpga.contract import descriptors as dsc
from gpt_fpga.contract import numerics as nx
from gpt_fpga.contract import registers as rm
from gpt_fpga.contract.image import data_start, read_image
from gpt_fpga.sim.fixed_model import FixedModel
from gpt_fpga.sim.tb.common import PARAMS, stalls

RAM_BYTES = 8 << 20
WEIGHTS_BASE = 0x10000
REG = rm.register
PORTS = int(PARAMS.get("ports", 1))


class PortTarget:
    """One read port's view of the DDR: reads in `errors` ((start, end) byte ranges) fail (SLVERR)."""

    def __init__(self, space: AddressSpace):
        self.space = space
        self.errors: list[tuple[int, int]] = []

    async def read(self, address: int, length: int) -> bytes:
        if any(s < address + length and address < e for s, e in self.errors):
            raise ValueError(f"injected read error at 0x{address:x}")
        return await self.space.read(address, length)


def delayed_reads(port: AxiSlaveRead, latency: int) -> AxiSlaveRead:
    """Each burst's R beats start `latency` cycles after the model takes its AR (bursts in sequence)."""
    recv = port.ar_channel.recv

    async def recv_late():
        ar = await recv()
        await ClockCycles(port.clock, latency)
        return ar

    port.ar_channel.recv = recv_late
    return port


class EngineTB:
    """Clock, reset, register access and DDR of the engine top; the host's side of a command."""

    def __init__(self, dut, image_path: str, stall: float = 0.0, seed: int = 1):
        self.dut = dut
        Clock(dut.aclk, 10, unit="ns").start()
        self.space = AddressSpace(2 ** 32)
        self.ram = MemoryRegion(RAM_BYTES)
        self.space.register_region(self.ram, 0)
        clk, rst = dut.aclk, dut.aresetn
        if PORTS == 1:
            self.ddr = AxiSlave(AxiBus.from_prefix(dut, "m_axi"), clk, rst, target=self.space,
                                reset_active_level=False)
            reads, write = [self.ddr.read_if], self.ddr.write_if
        else:
            self.port_errors = [PortTarget(self.space) for _ in range(PORTS)]
            reads = [delayed_reads(AxiSlaveRead(AxiReadBus.from_prefix(dut, prefix), clk, rst, target=target,
                                                reset_active_level=False), latency)
                     for prefix, target, latency in zip(("m_axi", "m_axi1"), self.port_errors, PARAMS["latency"])]
            write = AxiSlaveWrite(AxiWriteBus.from_prefix(dut, "m_axi"), clk, rst, target=self.space,
                                  reset_active_level=False)
        self.regs = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi"), clk, rst, reset_active_level=False)
        for sub in (*reads, write, self.regs.read_if, self.regs.write_if):
            sub.log.setLevel("WARNING")
        rng = random.Random(seed)
        for k, port in enumerate(reads):
            p = PARAMS.get("stall1", stall) if k else stall
            if p:
                for ch in (port.ar_channel, port.r_channel):
                    ch.set_pause_generator(stalls(random.Random(rng.random()), p))
        if stall:
            for ch in (write.aw_channel, write.w_channel, write.b_channel):
                ch.set_pause_generator(stalls(rng, stall))
        self.r_beats = [0] * len(reads)  # R handshakes per port
        self.w_beats = 0  # W handshakes
        cocotb.start_soon(self._count_beats([getattr(dut, f"{p}_r{s}") for p in ("m_axi", "m_axi1")[:PORTS]
                                             for s in ("valid", "ready")]))
        self.image = read_image(image_path)
        self.model = FixedModel(self.image)
        h = self.image.header
        self.cfg = self.model.cfg
        self.bus_bytes = self.image.hw.bus_bytes
        self.state = dsc.plan_state(h, self.bus_bytes)
        with open(image_path, "rb") as f:
            f.seek(data_start(self.image.header_length))
            self.weights = f.read()
        self.state_base = WEIGHTS_BASE + -(-len(self.weights) // 4096) * 4096 + 4096
        assert self.state_base + self.state.total <= RAM_BYTES, "the test image does not fit the DDR model"
        self.place = dsc.placement(h, WEIGHTS_BASE, self.state_base, self.state)
        self.desc_addr = self.state_base + self.state.desc

    async def _count_beats(self, handshake):
        while True:
            await RisingEdge(self.dut.aclk)
            for k in range(len(self.r_beats)):
                if handshake[2 * k].value and handshake[2 * k + 1].value:
                    self.r_beats[k] += 1
            if self.dut.m_axi_wvalid.value and self.dut.m_axi_wready.value:
                self.w_beats += 1

    async def reset(self):
        self.dut.aresetn.value = 0
        await ClockCycles(self.dut.aclk, 4)
        self.dut.aresetn.value = 1
        await ClockCycles(self.dut.aclk, 2)

    # ---- memory ------------------------------------------------------------------------------
    def poke(self, addr: int, data: bytes):
        self.ram[addr:addr + len(data)] = data

    def peek(self, addr: int, n: int) -> bytes:
        return bytes(self.ram[addr:addr + n])

    def load(self):
        """The image's data region, the descriptor table and the eps table, as the driver places them."""
        self.poke(WEIGHTS_BASE, self.weights)
        self.poke(self.desc_addr, dsc.build_table(self.image.header, self.place))
        self.poke(self.place.eps_addr, dsc.eps_table_bytes(self.image.header["ln_eps_table"]))

    def write_resid(self, x):
        self.poke(self.place.resid_addr, np.asarray(x, dtype="<i4").tobytes())

    def read_resid(self) -> np.ndarray:
        return np.frombuffer(self.peek(self.place.resid_addr, 4 * self.cfg.d_model), "<i4").astype(np.int64)

    def read_logits(self) -> np.ndarray:
        return np.frombuffer(self.peek(self.place.logits_addr, 4 * self.cfg.vocab_size), "<i4").astype(np.int64)

    def kv_row(self, which: str, layer: int, head: int, pos: int) -> np.ndarray:
        base = (self.place.k_cache if which == "k" else self.place.v_cache)[layer]
        off = dsc.kv_row_offset(head, pos, self.cfg.n_ctx, self.cfg.head_dim, self.bus_bytes)
        return np.frombuffer(self.peek(base + off, self.cfg.head_dim), np.int8).astype(np.int64)

    # ---- registers -----------------------------------------------------------------------------
    async def read_reg(self, name: str) -> int:
        return await self.regs.read_dword(REG(name).offset)

    async def write_reg(self, name: str, value: int):
        await self.regs.write_dword(REG(name).offset, value)

    async def run(self, op: int, layer: int, position: int, timeout_cycles: int = 2_000_000,
                  desc_addr: int | None = None) -> dict:
        """One command; returns STATUS, ERROR, STEP, CYCLES, BEATS_* as dicts/ints."""
        await self.write_reg("DESC_ADDR", self.desc_addr if desc_addr is None else desc_addr)
        await self.write_reg("POSITION", position)
        await self.write_reg("COMMAND", REG("COMMAND").pack(op=op, layer=layer))
        await self.write_reg("IRQ_ENABLE", REG("IRQ_ENABLE").pack(done=1))
        await self.write_reg("CONTROL", REG("CONTROL").pack(start=1))
        r0, w0 = sum(self.r_beats), self.w_beats
        for _ in range(timeout_cycles // 64):
            await ClockCycles(self.dut.aclk, 64)
            if self.dut.interrupt.value:
                break
        else:
            raise AssertionError(f"command op={op} layer={layer} pos={position} did not finish in "
                                 f"{timeout_cycles} cycles; STATUS={REG('STATUS').unpack(await self.read_reg('STATUS'))}")
        out = {name: await self.read_reg(name) for name in ("STATUS", "ERROR", "STEP", "CYCLES", "BEATS_READ",
                                                            "BEATS_WRITTEN")}
        await self.write_reg("IRQ_STATUS", REG("IRQ_STATUS").pack(done=1))
        await RisingEdge(self.dut.aclk)
        assert not self.dut.interrupt.value, "interrupt still high after IRQ_STATUS was cleared"
        # BEATS_* count bus beats: with two 64-bit ports, the port beats halved
        assert (out["BEATS_READ"], out["BEATS_WRITTEN"]) == ((sum(self.r_beats) - r0) >> (PORTS - 1),
                                                             (self.w_beats - w0) >> (PORTS - 1)), out
        out["status"] = REG("STATUS").unpack(out["STATUS"])
        out["error"] = {k: v for k, v in REG("ERROR").unpack(out["ERROR"]).items() if v}
        out["step"] = rm.STEPS[REG("STEP").unpack(out["STEP"])["step"]]
        return out


def expect_ok(result: dict, what: str):
    assert result["status"]["done"] and not result["status"]["busy"], f"{what}: {result}"
    assert not result["status"]["error"] and not result["error"], f"{what}: ended with errors {result}"


async def token_step(tb: EngineTB, tok: int, pos: int, check_kv: bool = True) -> np.ndarray:
    """Embed on the host, run every LAYER and the HEAD, compare each with the fixed model; returns logits."""
    model, cfg = tb.model, tb.cfg
    x = model.embed([tok], pos)
    tb.write_resid(x[0])
    for layer in range(cfg.n_layer):
        r = await tb.run(rm.OP_LAYER, layer, pos)
        expect_ok(r, f"LAYER {layer} at {pos}")
        x = model.block(x, layer, pos)
        got = tb.read_resid()
        bad = np.nonzero(got != x[0])[0]
        assert not len(bad), (f"LAYER {layer} pos {pos}: residual differs at {len(bad)} of {cfg.d_model} "
                              f"elements, first [{bad[0]}] rtl {got[bad[0]]} model {x[0, bad[0]]}")
        if check_kv:
            for h in range(cfg.n_head):
                for which, cache in (("k", model.k_cache), ("v", model.v_cache)):
                    want = cache[layer, h, pos].astype(np.int64)
                    assert np.array_equal(tb.kv_row(which, layer, h, pos), want), \
                        f"LAYER {layer} pos {pos}: {which} row of head {h} differs"
    r = await tb.run(rm.OP_HEAD, 0, pos)
    expect_ok(r, f"HEAD at {pos}")
    model.length = pos + 1
    a = model.lnf(x, model.eps_table)
    want = model.head(a, nx.RESID_BITS)[0]
    got = tb.read_logits()
    bad = np.nonzero(got != want)[0]
    assert not len(bad), f"HEAD pos {pos}: logits differ at {len(bad)} of {cfg.vocab_size}, first [{bad[0]}]"
    return got


async def _setup(dut, stall=None):
    tb = EngineTB(dut, PARAMS["image"], stall=PARAMS.get("stall", 0.0) if stall is None else stall)
    await tb.reset()
    tb.load()
    return tb


@cocotb.test()
async def test_identity(dut):
    """The identity registers say what the image needs to match."""
    tb = await _setup(dut)
    assert await tb.read_reg("ID") == rm.ENGINE_MAGIC
    v = REG("VERSION").unpack(await tb.read_reg("VERSION"))
    assert v == {"contract": nx.CONTRACT_VERSION, "image_format": tb.image.header["format_version"],
                 "regmap": rm.REGMAP_VERSION}, v
    hw = REG("HW_CONFIG").unpack(await tb.read_reg("HW_CONFIG"))
    assert hw["bus_bits"] == tb.image.hw.bus_bits and hw["weights"] == rm.WEIGHT_CODES[tb.image.hw.weights], hw
    assert hw["ports"] == PORTS, hw


@cocotb.test()
async def test_tokens_equal_fixed_model(dut):
    """Prompt tokens one at a time: every layer's residual, K/V rows and the logits equal the fixed model."""
    tb = await _setup(dut)
    for pos, tok in enumerate(PARAMS["ids"]):
        beats0 = list(tb.r_beats)
        await token_step(tb, tok, pos)
        if PORTS == 2:  # the long reads are split evenly over both ports
            per_port = [b - b0 for b, b0 in zip(tb.r_beats, beats0)]
            assert sum(per_port) and min(per_port) >= 0.4 * sum(per_port), \
                f"R beats per port at position {pos}: {per_port}"


@cocotb.test()
async def test_bad_descriptor_writes_nothing(dut):
    """A bad magic, a layer beyond n_layer and a position beyond n_ctx end the command with the named
    error bit, the interrupt, and no byte written."""
    tb = await _setup(dut)
    before = tb.peek(tb.state_base, tb.state.total)
    bad = bytearray(dsc.build_table(tb.image.header, tb.place))
    struct.pack_into("<I", bad, 0, 0x12345678)
    tb.poke(tb.desc_addr, bytes(bad))
    r = await tb.run(rm.OP_LAYER, 0, 0)
    assert r["status"]["error"] and r["error"] == {"descriptor": 1}, r
    tb.load()
    before = tb.peek(tb.state_base, tb.state.total)
    r = await tb.run(rm.OP_LAYER, tb.cfg.n_layer, 0)
    assert r["error"] == {"command": 1}, r
    r = await tb.run(rm.OP_LAYER, 0, tb.cfg.n_ctx)
    assert r["error"] == {"descriptor": 1}, r
    assert tb.peek(tb.state_base, tb.state.total) == before, "a refused command wrote to memory"
    # and the engine still works
    await token_step(tb, PARAMS["ids"][0], 0)


@cocotb.test()
async def test_axi_error_ends_the_command(dut):
    """A descriptor whose weights lie outside DDR: the read answers SLVERR, the command ends with axi_read."""
    tb = await _setup(dut)
    bad = bytearray(dsc.build_table(tb.image.header, tb.place))
    off, _ = dsc.field_bits("layer", "qkv_addr")
    struct.pack_into("<I", bad, dsc.record_offset("layer", 0) + off // 8, RAM_BYTES + 0x1000)
    tb.poke(tb.desc_addr, bytes(bad))
    tb.write_resid(tb.model.embed([PARAMS["ids"][0]], 0)[0])
    r = await tb.run(rm.OP_LAYER, 0, 0)
    assert r["status"]["error"] and r["error"].get("axi_read"), r
    tb.load()
    await token_step(tb, PARAMS["ids"][0], 0)


@cocotb.test(skip=PORTS != 2)
async def test_axi_error_on_one_port(dut):
    """Two ports: an SLVERR from either port alone (on 256 bytes of the QKV weights, which both ports
    read in turn) ends the command with axi_read; the next token is exact."""
    tb = await _setup(dut)
    qkv = dsc.field_bits("layer", "qkv_addr")[0] // 8 + dsc.record_offset("layer", 0)
    qkv_addr = struct.unpack_from("<I", dsc.build_table(tb.image.header, tb.place), qkv)[0]
    for port in range(PORTS):
        tb.write_resid(tb.model.embed([PARAMS["ids"][0]], 0)[0])
        bad = qkv_addr + 512
        tb.port_errors[port].errors = [(bad, bad + 256)]
        r = await tb.run(rm.OP_LAYER, 0, 0)
        assert r["status"]["error"] and r["error"] == {"axi_read": 1}, (port, r)
        tb.port_errors[port].errors = []
    tb.load()
    await token_step(tb, PARAMS["ids"][0], 0)


@cocotb.test()
async def test_abort_and_reset_mid_command(dut):
    """CONTROL.abort, and a reset, in the middle of a LAYER: back to idle, and the next command is exact."""
    tb = await _setup(dut)
    tb.write_resid(tb.model.embed([PARAMS["ids"][0]], 0)[0])
    await tb.write_reg("DESC_ADDR", tb.desc_addr)
    await tb.write_reg("POSITION", 0)
    await tb.write_reg("COMMAND", REG("COMMAND").pack(op=rm.OP_LAYER, layer=0))
    await tb.write_reg("CONTROL", REG("CONTROL").pack(start=1))
    await ClockCycles(dut.aclk, 300)
    assert REG("STATUS").unpack(await tb.read_reg("STATUS"))["busy"]
    await tb.write_reg("CONTROL", REG("CONTROL").pack(abort=1))
    for _ in range(200):
        await ClockCycles(dut.aclk, 10)
        if not REG("STATUS").unpack(await tb.read_reg("STATUS"))["busy"]:
            break
    else:
        raise AssertionError("abort did not return the engine to idle")
    await tb.write_reg("IRQ_STATUS", REG("IRQ_STATUS").pack(done=1))
    tb.load()
    await token_step(tb, PARAMS["ids"][0], 0)
    # a reset in the middle of the next position's first layer
    await tb.write_reg("POSITION", 1)
    await tb.write_reg("CONTROL", REG("CONTROL").pack(start=1))
    await ClockCycles(dut.aclk, 500)
    await tb.reset()
    tb.model.length = 1
    await token_step(tb, PARAMS["ids"][1 % len(PARAMS["ids"])], 1)
