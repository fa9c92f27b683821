"""The decoder engine: one GPT layer, or the head, per command, streamed from DDR.

See docs/engine.md for the dataflow and the reasons behind it; the register map is
``contract/registers.py`` and the descriptor table ``contract/descriptors.py``.
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.hdl import ResetInserter
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from gpt_fpga.hw.attn_context import AttnContext
from gpt_fpga.hw.attn_scores import AttnScores
from gpt_fpga.hw.axi import Axi4ReadSignature, Axi4WriteSignature, AxiLiteSignature
from gpt_fpga.hw.axi_read import CMD_BEATS_BITS, AxiReadDma
from gpt_fpga.hw.axi_read_2port import TwoPortReadDma
from gpt_fpga.hw.axi_write import AxiWriteDma
from gpt_fpga.hw.axis_downsize import StreamDownsizer
from gpt_fpga.hw.fifo import NO_RW_CHECK, BlockRamFifo
from gpt_fpga.hw.gelu import Gelu
from gpt_fpga.hw.layernorm import LayerNorm
from gpt_fpga.hw.matvec import MatVec
from gpt_fpga.hw.regfile import RegisterFile
from gpt_fpga.hw.ping_pong_slice import PingPongSlice
from gpt_fpga.hw.register_slice import RegisterSlice
from gpt_fpga.hw.shift_add_multiplier import ShiftAddMultiplier
from gpt_fpga.hw.softmax import Softmax
from gpt_fpga.contract import descriptors as dsc
from gpt_fpga.contract import numerics as nx
from gpt_fpga.contract import registers as rm
from gpt_fpga.contract.image import FORMAT_VERSION
from gpt_fpga.contract.layout import (BUS_BITS_CHOICES, DEFAULT_GROUP, GROUP_CHOICES, LN_PARAM_BYTES, ROW_HEADER_FIXED_BYTES,
                                      WEIGHT_FORMATS)

__all__ = ["Engine"]

# read-stream destinations (the tag queued with each read command)
T_DESC, T_EPS, T_RESID, T_LNP, T_W, T_GELU, T_K, T_V = range(8)
T_COUNT = 8
STEP = {name: i for i, name in enumerate(rm.STEPS)}
EPS_ENTRIES = nx.LN_MAX_SHIFT + 1
GELU_TABLE_BYTES = 256


def _lg(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


class Engine(wiring.Component):
    """Runs one decoder layer (LAYER) or the final LayerNorm and lm_head (HEAD) per command.

    The host writes the descriptor table (``descriptors.build_table``) and the int32 residual into
    DDR, sets COMMAND / POSITION / DESC_ADDR and writes CONTROL.start. The engine fetches the model
    record and the command's record, checks every field, then streams each weight section and the
    visible part of the KV cache from DDR once, and writes back the residual (LAYER) or the int32
    logits (HEAD). Every value equals ``sim/fixed_model.py`` for one token.

    LAYER steps: load residual, LN1, QKV matvec (q, k, v kept on chip in head rows), write this
    token's k and v rows to the KV cache, then per head: scores (AttnScores) -> Softmax ->
    AttnContext over the visible keys, attn_out matvec + residual, LN2, fc matvec -> GELU,
    proj matvec + residual, store residual. HEAD: load residual, LNf, lm_head -> logits.

    Throughput: every matvec takes one weight beat per cycle from the read DMA (several bursts in
    flight), so a command's time is about its weight beats plus the LayerNorm passes (~3 d cycles
    each) and the heads' K and V beats: the reads go K0, K1, V0, K2, V1, ..., V(H-1), and Softmax
    (two row banks) sums head h while K(h + 1) streams, so the bus stays busy. CYCLES, BEATS_READ
    and BEATS_WRITTEN count every command.

    Errors (ERROR register): an AXI error response, a stream whose length or tlast disagrees
    (flagged by a core or the write DMA), a descriptor field out of range, or a bad command end the
    command: the DMAs are flushed (outstanding reads are drained, owed write beats go out with no
    byte enabled), the cores are reset, and STATUS.done, STATUS.error and the interrupt rise.
    CONTROL.abort does the same at any time. Nothing is written before the descriptor checks pass,
    and then only the residual, the logits and this position's K/V rows that the descriptor names.

    Parameters
    ----------
    weights, group, bus_bits : the stream layout (``layout.HwLayout``) the engine reads.
    ports : int
        AXI managers to DDR: 1 (default; one ``bus_bits`` port reads and writes) or 2 (``bus_bits``
        128 only: two 64-bit ports, PYNQ-Z2 S_AXI_HP0 and S_AXI_HP2; every long read is split over
        both by :class:`hw.axi_read_2port.TwoPortReadDma`, writes go out on port 0 at 64 bits).
    max_d : int
        Largest d_model and d_ff (on-chip vectors), a multiple of 16, at most ``numerics.MAX_D_IN``.
    max_context : int
        Largest n_ctx (keys per head), at most ``numerics.MAX_CONTEXT``.
    max_head_dim : int
        Largest head_dim, at most ``numerics.MAX_HEAD_DIM``.
    max_heads : int
        Sizes the q/k/v head-row buffer: ``n_head * ceil(head_dim / bus_bytes)`` must be at most
        ``max_d / bus_bytes + max_heads``.

    Attributes
    ----------
    s_axi : In(AxiLiteSignature)
        Registers (contract/registers.py).
    m_axi_r, m_axi_w : Out(Axi4ReadSignature), Out(Axi4WriteSignature)
        DDR, one AXI4 manager (read and write halves), bursts of at most 16 beats;
        ``bus_bits / ports`` wide.
    m_axi1_r : Out(Axi4ReadSignature(data_bits=64))
        With ``ports=2`` only: the second manager (reads only).
    interrupt : Out(1)
        Level: IRQ_STATUS & IRQ_ENABLE.
    """

    def __init__(self, *, weights: str = "int8", group: int = DEFAULT_GROUP, bus_bits: int = 64, ports: int = 1,
                 max_d: int = nx.MAX_D_IN, max_context: int = nx.MAX_CONTEXT, max_head_dim: int = nx.MAX_HEAD_DIM,
                 max_heads: int = 64):
        if weights not in WEIGHT_FORMATS or group not in GROUP_CHOICES or bus_bits not in BUS_BITS_CHOICES:
            raise ValueError(f"unsupported layout: weights={weights!r} group={group!r} bus_bits={bus_bits!r}")
        if ports not in rm.PORT_CHOICES or isinstance(ports, bool) or (ports == 2 and bus_bits != 128):
            raise ValueError(f"ports must be 1, or 2 with bus_bits=128 (two 64-bit ports), got ports={ports!r} "
                             f"with bus_bits={bus_bits!r}")
        if not (16 <= max_d <= nx.MAX_D_IN and max_d % 16 == 0):
            raise ValueError(f"max_d must be a multiple of 16 in [16, {nx.MAX_D_IN}], got {max_d}")
        if not 1 <= max_context <= nx.MAX_CONTEXT or not 1 <= max_head_dim <= nx.MAX_HEAD_DIM:
            raise ValueError("max_context / max_head_dim exceed the contract's limits")
        self.weights, self.group, self.bus_bits, self.ports = weights, group, bus_bits, ports
        self.bus_bytes = bus_bits // 8
        self.port_bits = bus_bits // ports  # width of each AXI manager
        self.max_d, self.max_context, self.max_head_dim, self.max_heads = max_d, max_context, max_head_dim, max_heads
        self.head_words = max_d // self.bus_bytes + max_heads  # q (or k, or v) rows of all heads, in beats
        members = {
            "s_axi": In(AxiLiteSignature(addr_bits=rm.ADDRESS_BITS)),
            "m_axi_r": Out(Axi4ReadSignature(data_bits=self.port_bits)),
            "m_axi_w": Out(Axi4WriteSignature(data_bits=self.port_bits)),
        }
        if ports == 2:
            members["m_axi1_r"] = Out(Axi4ReadSignature(data_bits=self.port_bits))
        super().__init__({**members, "interrupt": Out(1)})

    def identity(self) -> dict[str, int]:
        """Values of the identity registers (the host compares them with the image)."""
        return {
            "ID": rm.ENGINE_MAGIC,
            "VERSION": rm.register("VERSION").pack(contract=nx.CONTRACT_VERSION, image_format=FORMAT_VERSION,
                                                   regmap=rm.REGMAP_VERSION),
            "HW_CONFIG": rm.register("HW_CONFIG").pack(bus_bits=self.bus_bits, weights=rm.WEIGHT_CODES[self.weights],
                                                       group=self.group if self.weights == "int4" else 0,
                                                       ports=self.ports),
            "MAX_D_IN": self.max_d, "MAX_CONTEXT": self.max_context, "MAX_HEAD_DIM": self.max_head_dim,
        }

    def elaborate(self, platform):
        m = Module()
        B = self.bus_bytes
        lgB = _lg(B)
        int4 = self.weights == "int4"
        per_beat = B * (2 if int4 else 1)  # weights per beat

        # ---- submodules ------------------------------------------------------------------------
        m.submodules.regs = regs = RegisterFile()
        wiring.connect(m, wiring.flipped(self.s_axi), regs.s_axi)
        # The DMAs are reset only at the end of a command, when nothing is in flight on the bus: that
        # clears their sticky error flags without abandoning an AXI transaction.
        dma_rst = Signal()  # registers, see enter_reset
        core_rst = Signal()  # soft reset of the datapath: abort and error recovery
        rd_ports = [self.m_axi_r] + ([self.m_axi1_r] if self.ports == 2 else [])
        if self.ports == 1:
            rd = AxiReadDma(data_bits=self.bus_bits)
            wiring.connect(m, wiring.flipped(self.m_axi_r), rd.axi)
        else:
            rd = TwoPortReadDma(data_bits=self.bus_bits)
            wiring.connect(m, wiring.flipped(self.m_axi_r), rd.axi0)
            wiring.connect(m, wiring.flipped(self.m_axi1_r), rd.axi1)
            m.d.comb += rd.only.eq(regs.read_ports[:2])  # READ_PORTS.only: board-check measures each port
        wr = AxiWriteDma(data_bits=self.port_bits)
        m.submodules.rd = ResetInserter(dma_rst)(rd)
        m.submodules.wr = ResetInserter(dma_rst)(wr)
        wiring.connect(m, wiring.flipped(self.m_axi_w), wr.axi)
        # The beats to write pass a register slice: the write DMA's tready (its burst and FIFO logic)
        # does not reach the sequencer's streamers and packers within the cycle.
        wr_slice = RegisterSlice(self.bus_bits)
        m.submodules.wr_slice = ResetInserter(core_rst)(wr_slice)
        wr_in = wr_slice.s  # the stream of bus beats to write
        if self.ports == 2:
            # port 0 writes at 64 bits: each bus beat leaves as two, so every write command's beats double
            m.submodules.wr_narrow = narrow = ResetInserter(core_rst)(StreamDownsizer(data_bits=self.bus_bits))
            # and a slice after it: the write DMA's FIFO level (its tready) reaches the downsizer's
            # handshake, which would pass it on to the write slice's enables
            wr_port_slice = RegisterSlice(self.port_bits)
            m.submodules.wr_port_slice = ResetInserter(core_rst)(wr_port_slice)
            wiring.connect(m, narrow.m_data, wr_port_slice.s)
            wiring.connect(m, wr_port_slice.m, wr.s_data)
            wiring.connect(m, wr_slice.m, narrow.s_data)
        else:
            wiring.connect(m, wr_slice.m, wr.s_data)
        ln = LayerNorm(max_d=self.max_d)
        mv = MatVec(bus_bits=self.bus_bits, weights=self.weights, group=self.group, max_d_in=self.max_d)
        gelu = Gelu(lanes=1)
        sm = Softmax(max_len=self.max_context)
        qk = AttnScores(bus_bits=self.bus_bits, max_head_dim=self.max_head_dim, max_keys=self.max_context)
        pv = AttnContext(bus_bits=self.bus_bits, max_head_dim=self.max_head_dim, max_keys=self.max_context)
        for name, core in (("ln", ln), ("mv", mv), ("gelu", gelu), ("sm", sm), ("qk", qk), ("pv", pv)):
            m.submodules[name] = ResetInserter(core_rst)(core)

        ident = self.identity()
        for name, value in ident.items():
            m.d.comb += getattr(regs, name.lower()).eq(value)

        def fld(word, reg, field):
            f = rm.register(reg).field(field)
            return word[f.lsb:f.lsb + f.width]

        control, command = regs.control, regs.command
        start = fld(control, "CONTROL", "start")
        abort = fld(control, "CONTROL", "abort")
        op = fld(command, "COMMAND", "op")
        layer = fld(command, "COMMAND", "layer")
        position = regs.position

        # ---- descriptor records ----------------------------------------------------------------
        rec_beats = dsc.RECORD_BYTES // B
        rec_model = Signal(8 * dsc.RECORD_BYTES)
        rec_cmd = Signal(8 * dsc.RECORD_BYTES)

        def dfield(rec, kind, name):
            lsb, width = dsc.field_bits(kind, name)
            return rec[lsb:lsb + width]

        n_layer = dfield(rec_model, "model", "n_layer")
        n_head = dfield(rec_model, "model", "n_head")
        d_model = dfield(rec_model, "model", "d_model")
        head_dim = dfield(rec_model, "model", "head_dim")
        d_ff = dfield(rec_model, "model", "d_ff")
        n_ctx = dfield(rec_model, "model", "n_ctx")
        vocab = dfield(rec_model, "model", "vocab")

        def lf(name):
            return dfield(rec_cmd, "layer", name)

        def hf(name):
            return dfield(rec_cmd, "head", name)

        # derived per-command constants (registered in the CHECK state)
        row_beats_kv = Signal(range(self.max_head_dim // B + 2))  # beats of one K/V row
        kv_row_bytes = Signal(16)
        lo = Signal(16)  # first visible key
        n_keys = Signal(16)
        ctx_stride = Signal(32)  # bytes between heads in a K/V region: n_ctx * kv_row_bytes
        hd_n = Signal(32)  # head_dim * n_head (must equal d_model)
        nh_rb = Signal(32)  # n_head * row_beats_kv: words of q (or k, or v) head rows
        kv_beats = Signal(32)  # n_keys * row_beats_kv: one head's K (or V) transfer
        k_rd_addr, v_rd_addr = Signal(32), Signal(32)  # this head's visible K (V) rows: cache + head * ctx_stride
        # + lo_off, kept incrementally (no adder between the sequencer and the read command)
        kv_wr_addr = Signal(32)  # next K/V row write (kept incrementally)
        pos_off = Signal(32)  # position * kv_row_bytes
        lo_off = Signal(32)  # lo * kv_row_bytes
        # registered: head_dim is fixed once the model record is in (FETCH), so CHECK's products start
        # from a register, not from an adder
        m.d.sync += row_beats_kv.eq((head_dim + (B - 1)) >> lgB)
        # The per-command products, by shift and add (at most 16 cycles, once per command): on
        # multiplier blocks, placed wherever the placer finds free ones, their routes in and out
        # took more than a cycle. Each product holds from CHECK to the next command's CHECK.
        mul = {}
        for key, a, b in (("hd_n", n_head, head_dim), ("nh_rb", n_head, row_beats_kv),
                          ("ctx", n_ctx, row_beats_kv), ("pos", position, row_beats_kv),
                          ("lo", lo, row_beats_kv), ("kv", n_keys, row_beats_kv)):
            mul[key] = m.submodules[f"mul_{key}"] = ShiftAddMultiplier(len(a), len(b))
            m.d.comb += [mul[key].a.eq(a), mul[key].b.eq(b)]
        m.d.comb += [hd_n.eq(mul["hd_n"].p), nh_rb.eq(mul["nh_rb"].p), ctx_stride.eq(mul["ctx"].p << lgB),
                     pos_off.eq(mul["pos"].p << lgB), lo_off.eq(mul["lo"].p << lgB), kv_beats.eq(mul["kv"].p)]
        # bounds of the head loops, registered (no adder in front of their comparisons)
        last_head = Signal(16)  # n_head - 1
        kv_last_row = Signal(17)  # 2 * n_head - 1: the last of the K/V row writes
        m.d.sync += [last_head.eq(n_head - 1), kv_last_row.eq((n_head << 1) - 1)]
        # scores_softmax: heads after `head`, counted down, and "head is the last" as a register (a
        # 16-bit comparison stays off the step's decisions)
        heads_after = Signal(16)
        head_at_last = Signal()
        kv_more = Signal()  # write_kv: row writes left (a register: no head comparison before the issue)
        m.d.comb += kv_row_bytes.eq(row_beats_kv << lgB)

        # ---- on-chip vectors -------------------------------------------------------------------
        # x: int32 residual; a: int8 activations (8 per word); h: q|k|v head rows (8 per word)
        m.submodules.xbuf = xbuf = Memory(shape=unsigned(32), depth=self.max_d, init=[])
        x_wp, x_rp = xbuf.write_port(), xbuf.read_port()
        a_words = self.max_d // B
        m.submodules.abuf = abuf = Memory(shape=unsigned(8 * B), depth=a_words, init=[])
        a_wp, a_rp = abuf.write_port(granularity=8), abuf.read_port()
        # h is written only in step qkv (through a register: its address adder stays off the block RAM's
        # pins) and read only in later steps, so no read meets a write: no collision logic (NO_RW_CHECK;
        # yosys's old-data emulation put a multiplexer behind the block RAM's ~6 ns clock-to-out)
        m.submodules.hbuf = hbuf = Memory(shape=unsigned(8 * B), depth=3 * self.head_words, init=[],
                                          attrs=NO_RW_CHECK)
        h_wport, h_rp = hbuf.write_port(granularity=8), hbuf.read_port()
        h_wp = h_wport.signature.create(path=("h_wp",))  # the sink's write, a cycle before the memory's
        m.d.sync += [h_wport.addr.eq(h_wp.addr), h_wport.data.eq(h_wp.data), h_wport.en.eq(h_wp.en)]

        def write_byte(wp, index, byte, en):
            """Byte `index` of a vector of 8-bit values packed B per word."""
            m.d.comb += [wp.addr.eq(index >> lgB), wp.data.eq(Cat(*([byte[:8]] * B))),
                         wp.en.eq(Mux(en, 1 << index[:lgB], 0))]

        # ---- sequencer state ---------------------------------------------------------------------
        step = Signal(range(len(rm.STEPS)))
        # a one-hot copy of the step for the sinks' decode (each sink's condition is one flip-flop); the
        # sequencer decodes the binary step (see RUN)
        step_oh = Signal(len(rm.STEPS), init=1 << STEP["idle"])

        def on(one_hot, *names):
            """One of these steps, from a one-hot copy of the step: an OR of its bits.

            Not `m.Switch` with a `m.Case` pattern per step: Amaranth's cases are tried in order, and
            the patterns `--1-` and `-1--` overlap, so a case's condition would AND the negations of
            every earlier bit (a priority chain three LUTs deep in front of the steps' enables)."""
            return Cat(one_hot[STEP[n]] for n in names).any()
        head = Signal(16)  # also counts the 2 * n_head K/V row writes
        busy = Signal()
        done = Signal()
        err = Signal(len(rm.ERROR_BITS))
        err_bit = {name: i for i, name in enumerate(rm.ERROR_BITS)}
        cycles = Signal(32)
        # AXI data handshakes of this command, in port beats (ports - 1 more bits: a register counts bus beats)
        beats_read, beats_written = Signal(32 + self.ports - 1), Signal(32 + self.ports - 1)
        def word(reg, **values):
            """A register word from signals placed at their fields' bit positions."""
            out = Const(0, 32)
            for name, value in values.items():
                f = rm.register(reg).field(name)
                out = out | (value[:f.width].as_unsigned() << f.lsb)
            return out[:32]

        m.d.comb += [
            regs.status.eq(word("STATUS", busy=busy, done=done, error=err.any())),
            regs.error.eq(err),
            regs.cycles.eq(cycles),
            regs.beats_read.eq(beats_read[self.ports - 1:]),
            regs.beats_written.eq(beats_written[self.ports - 1:]),
            regs.step.eq(word("STEP", step=step, head=head)),
            self.interrupt.eq((regs.irq_status & regs.irq_enable) != 0),
        ]
        with m.If(busy):
            m.d.sync += cycles.eq(cycles + 1)
        m.d.sync += beats_read.eq(beats_read + sum(p.rvalid & p.rready for p in rd_ports))
        with m.If(self.m_axi_w.wvalid & self.m_axi_w.wready):
            m.d.sync += beats_written.eq(beats_written + 1)

        # ---- read commands and the destination of their data -----------------------------------
        # the destination of each command's data, one-hot (a bit per tag: no decoder in the dispatch)
        tags = BlockRamFifo(width=T_COUNT, depth=4)
        m.submodules.tags = ResetInserter(core_rst)(tags)
        rd_out = Signal(3)  # read commands issued whose last beat has not been consumed yet
        rd_addr, rd_n, rd_tag, rd_go = Signal(32), Signal(32), Signal(3), Signal()
        # The sequencer's read request is a register: it is taken when the register is empty (one
        # flag), so neither the command slice's ready nor the tag FIFO's level reaches the sequencer's
        # decode, and the decode reaches only these registers.
        rq_valid, rq_addr = Signal(), Signal(32)
        rq_n, rq_tag = Signal(CMD_BEATS_BITS), Signal(T_COUNT)
        # Read commands pass through a register slice: the DMA's cmd.ready (which may follow arready and
        # its data FIFO within the cycle) does not reach the request register.
        rd_cmd = RegisterSlice(32 + CMD_BEATS_BITS)
        m.submodules.rd_cmd = ResetInserter(core_rst)(rd_cmd)
        m.d.comb += [rd_cmd.s.tdata.eq(Cat(rq_addr, rq_n)), tags.w_data.eq(rq_tag),
                     rd.cmd.addr.eq(rd_cmd.m.tdata[:32]), rd.cmd.beats.eq(rd_cmd.m.tdata[32:]),
                     rd.cmd.valid.eq(rd_cmd.m.tvalid), rd_cmd.m.tready.eq(rd.cmd.ready)]
        rq_taken = Signal()
        m.d.comb += [rd_cmd.s.tvalid.eq(rq_valid & tags.w_rdy), tags.w_en.eq(rq_valid & rd_cmd.s.tready),
                     rq_taken.eq(rq_valid & rd_cmd.s.tready & tags.w_rdy)]
        # while the register is empty its fields follow the sequencer's request, whether or not it is
        # made: their enable is one flip-flop, and the step decode reaches only their data and rq_valid
        with m.If(~rq_valid):
            m.d.sync += [rq_valid.eq(rd_go), rq_addr.eq(rd_addr), rq_n.eq(rd_n[:CMD_BEATS_BITS]),
                         rq_tag.eq(1 << rd_tag)]
        with m.Elif(rq_taken):
            m.d.sync += rq_valid.eq(0)
        with m.If(core_rst):
            m.d.sync += rq_valid.eq(0)
        rd_quiet = Signal()  # no read requested, in flight or unconsumed

        # The read DMA's FIFO is a block RAM without an output register: a slice keeps its
        # clock-to-out (and the cores' tready logic) off the tag decode and the cores' stream checks.
        # A ping-pong slice: the dispatch's ready below (late: the destinations' readiness and the
        # tag) moves only its read pointer, not the enable of 2 x bus_bits data flip-flops.
        rd_slice = PingPongSlice(self.bus_bits)
        m.submodules.rd_slice = ResetInserter(core_rst)(rd_slice)
        wiring.connect(m, rd.m_data, rd_slice.s)
        src = rd_slice.m
        # the tag FIFO's head passes a ping-pong slice: a command's last beat moves that slice's read
        # pointer, not the FIFO's level and block of flip-flops (the pop is late: the destinations'
        # readiness)
        tag_head = PingPongSlice(T_COUNT)
        m.submodules.tag_head = ResetInserter(core_rst)(tag_head)
        m.d.comb += [tag_head.s.tdata.eq(tags.r_data), tag_head.s.tlast.eq(0), tag_head.s.tvalid.eq(tags.r_rdy),
                     tags.r_en.eq(tag_head.s.tready)]
        dest = tag_head.m.tdata  # one-hot
        tag_pop = Signal()

        def to(tag):
            return dest[tag]

        d_valid = src.tvalid & tag_head.m.tvalid
        d_ready = Signal()
        # Each destination's readiness, whatever the tag (a register or one LUT each); the tag selects
        # with one AND-OR (the tags are one-hot), not a priority chain: this path ends in the enable
        # of rd_slice's wide output register.
        ready_for = {}
        m.d.comb += [src.tready.eq(d_ready & tag_head.m.tvalid), tag_pop.eq(src.tvalid & src.tready & src.tlast),
                     tag_head.m.tready.eq(tag_pop)]
        m.d.sync += rd_out.eq(rd_out + rq_taken - tag_pop)
        m.d.comb += rd_quiet.eq((rd_out == 0) & ~rq_valid)
        with m.If(core_rst):
            m.d.sync += rd_out.eq(0)

        wr_addr, wr_n, wr_go = Signal(32), Signal(32), Signal()
        # write commands pass a register slice too (the write DMA's queues stay off the sequencer's decode)
        wr_cmd = RegisterSlice(32 + CMD_BEATS_BITS)
        m.submodules.wr_cmd = ResetInserter(core_rst)(wr_cmd)
        # The sequencer's write request is a register, as the read request is: its fields follow the
        # request while it is empty (enable: one flip-flop), and the sequencer sees it taken when it was
        # empty. The write slice's enables see only registers.
        wq_valid, wq_addr, wq_n = Signal(), Signal(32), Signal(CMD_BEATS_BITS)
        with m.If(~wq_valid):
            m.d.sync += [wq_valid.eq(wr_go), wq_addr.eq(wr_addr), wq_n.eq((wr_n << (self.ports - 1))[:CMD_BEATS_BITS])]
        with m.Elif(wr_cmd.s.tready):
            m.d.sync += wq_valid.eq(0)
        with m.If(core_rst):
            m.d.sync += wq_valid.eq(0)
        m.d.comb += [wr_cmd.s.tdata.eq(Cat(wq_addr, wq_n)),
                     wr_cmd.s.tvalid.eq(wq_valid),
                     wr.cmd.addr.eq(wr_cmd.m.tdata[:32]), wr.cmd.beats.eq(wr_cmd.m.tdata[32:]),
                     wr.cmd.valid.eq(wr_cmd.m.tvalid), wr_cmd.m.tready.eq(wr.cmd.ready)]
        # every write command and beat has left the slices and the DMA is idle: a register (the write
        # DMA's FIFO level and burst state stay off the sequencer's step decisions), and false the cycle
        # after a command or beat enters a slice, so it is never stale
        wr_idle = Signal()
        slices_empty = ~wr_slice.m.tvalid & (~wr_port_slice.m.tvalid if self.ports == 2 else 1)
        m.d.sync += wr_idle.eq(wr.idle & ~wr_cmd.m.tvalid & slices_empty & ~wq_valid & ~wr_go & ~wr_in.tvalid)

        # descriptor capture
        rec_sel = Signal()  # 0: model record, 1: command record
        rec_addr = Signal(32)  # the command's record: registered from the model record (sequencer, FETCH)
        ready_for[T_DESC] = Const(1, 1)
        with m.If(to(T_DESC) & d_valid):
            with m.If(rec_sel):
                m.d.sync += rec_cmd.eq(Cat(rec_cmd[8 * B:], src.tdata))
            with m.Else():
                m.d.sync += rec_model.eq(Cat(rec_model[8 * B:], src.tdata))

        # eps table -> LayerNorm
        # eps table and LayerNorm parameters: 8-byte entries, B/8 per beat, taken one per cycle
        per8 = B // 8
        eps_i = Signal(range(EPS_ENTRIES + per8 + 1))
        lane8 = Signal(range(per8)) if per8 > 1 else Const(0, 1)
        with m.If(to(T_EPS) & d_valid):
            m.d.comb += [ln.eps_we.eq(eps_i < EPS_ENTRIES), ln.eps_addr.eq(eps_i),
                         ln.eps_data.eq(src.tdata.word_select(lane8, 64))]
            m.d.sync += eps_i.eq(eps_i + 1)
            if per8 > 1:
                m.d.sync += lane8.eq(lane8 + 1)
        ready_for[T_EPS] = lane8 == per8 - 1
        lnp_left = Signal(range(self.max_d + 1))  # real parameters not yet offered to LayerNorm
        lnp_real = Signal()  # lnp_left != 0, as a register
        if per8 > 1:
            with m.If(core_rst):
                m.d.sync += lane8.eq(0)

        # LayerNorm parameters and matrix weights go to their cores, each through its own register
        # slice: the tready the dispatch sees is a register, and a core's tready logic stays next to
        # the core (on the ECP5-85k these paths crossed the die twice in one cycle).
        # Two slices each: one beside the dispatch (the tready it sees is a flip-flop next to it) and
        # one beside the core; the wires across the die run between the two, register to register.
        feeds = {}
        for name, port in (("w", mv.s_weights), ("k", qk.s_k), ("v", pv.s_v), ("lnp", ln.s_params)):
            # LayerNorm decides its tready late (from its read counter and output handshake): its
            # parameters' slice moves a read pointer on it, not the data registers
            feed = (PingPongSlice if name == "lnp" else RegisterSlice)(len(port.tdata))
            m.submodules[f"{name}_feed"] = ResetInserter(core_rst)(feed)
            wiring.connect(m, feed.m, port)
            hop = RegisterSlice(len(port.tdata))
            m.submodules[f"{name}_hop"] = ResetInserter(core_rst)(hop)
            wiring.connect(m, hop.m, feed.s)
            feeds[name] = hop.s
        m.d.comb += [feeds["lnp"].tdata.eq(src.tdata.word_select(lane8, 8 * LN_PARAM_BYTES)),
                     feeds["lnp"].tlast.eq(src.tlast & (lane8 == per8 - 1))]
        for tag, name in ((T_W, "w"), (T_K, "k"), (T_V, "v")):
            m.d.comb += [feeds[name].tdata.eq(src.tdata), feeds[name].tlast.eq(src.tlast)]
            ready_for[tag] = feeds[name].tready
            with m.If(to(tag)):
                m.d.comb += feeds[name].tvalid.eq(d_valid)
        with m.If(to(T_LNP)):
            real = lnp_real  # padding entries of the last beat are dropped
            m.d.comb += feeds["lnp"].tvalid.eq(d_valid & real)
            take = d_valid & (feeds["lnp"].tready | ~real)
            with m.If(take & real):
                m.d.sync += [lnp_left.eq(lnp_left - 1), lnp_real.eq(lnp_left != 1)]
            with m.If(take):
                if per8 > 1:
                    m.d.sync += lane8.eq(lane8 + 1)
        ready_for[T_LNP] = (feeds["lnp"].tready | ~lnp_real) & (lane8 == per8 - 1)

        # residual load: one beat -> B/4 int32 values, one per cycle
        res_i = Signal(range(self.max_d + B))  # next x index
        res_lane = Signal(range(B // 4))
        with m.If(to(T_RESID) & d_valid):
            m.d.comb += [x_wp.addr.eq(res_i), x_wp.data.eq(src.tdata.word_select(res_lane, 32)),
                         x_wp.en.eq(res_i < d_model)]
            m.d.sync += [res_i.eq(res_i + 1), res_lane.eq(res_lane + 1)]
        ready_for[T_RESID] = res_lane == B // 4 - 1

        # GELU table: one beat -> B table entries, one per cycle
        gt_i = Signal(range(GELU_TABLE_BYTES + 1))
        with m.If(to(T_GELU) & d_valid):
            m.d.comb += [gelu.table_we.eq(1), gelu.table_addr.eq(gt_i),
                         gelu.table_data.eq(src.tdata.word_select(gt_i[:lgB], 8))]
            m.d.sync += gt_i.eq(gt_i + 1)
        ready_for[T_GELU] = gt_i[:lgB] == B - 1
        assert sorted(ready_for) == list(range(T_COUNT))
        m.d.comb += d_ready.eq(Cat(dest[t] & ready_for[t] for t in range(T_COUNT)).any())

        # ---- vector streamers (memory -> stream, one word per cycle, stalls hold the read) ---------
        def streamer(name, rp, port, *, out_reg=False):
            """Stream `count` words rp[base], rp[base + 1], ... into `port`; tlast on the last. Returns (go,
            base, count, active): in the cycle `go` is high, `base` and `count` (comb) are taken. The read
            address and the words left are registers (no adder or comparison between the step decode and
            the block RAM's address). With `out_reg`, the block RAM's output passes a register with only an
            enable in front of it (a pipeline stage; the ECP5's block RAM has a ~6 ns clock-to-out and may
            sit far from the consumer)."""
            base, count = Signal(16, name=f"{name}_base"), Signal(16, name=f"{name}_count")
            addr, left = Signal(16, name=f"{name}_addr"), Signal(16, name=f"{name}_left")
            more = Signal(name=f"{name}_more")  # left != 0, kept as a register
            active, valid, last = Signal(name=f"{name}_active"), Signal(name=f"{name}_valid"), Signal(name=f"{name}_last")
            go = Signal(name=f"{name}_go")
            # `go`, `base` and `count` are registered first: the run starts a cycle after `go` (the
            # sequencer's decode stays off the streamer's counters); `active` rises at once
            go_r, base_r, count_r = Signal(name=f"{name}_go_r"), Signal.like(base), Signal.like(count)
            m.d.sync += [go_r.eq(go), base_r.eq(base), count_r.eq(count)]
            if out_reg:
                # valid/last describe the block RAM's output word; the stage (q_*) takes it when it is
                # empty or the port takes its word
                q_data = Signal(len(rp.data), name=f"{name}_q_data", reset_less=True)
                q_valid, q_last = Signal(name=f"{name}_q_valid"), Signal(name=f"{name}_q_last")
                take = ~q_valid | port.tready
                with m.If(take):
                    m.d.sync += [q_data.eq(rp.data), q_valid.eq(valid), q_last.eq(last)]
                m.d.comb += [port.tvalid.eq(q_valid), port.tlast.eq(q_last), port.tdata.eq(q_data)]
                drained = ~valid & ~q_valid
            else:
                take = port.tready
                m.d.comb += [port.tvalid.eq(valid), port.tlast.eq(last), port.tdata.eq(rp.data)]
                drained = ~valid
            adv = (~valid | take) & more
            m.d.comb += [rp.addr.eq(addr), rp.en.eq(adv)]
            with m.If(adv):
                m.d.sync += [addr.eq(addr + 1), left.eq(left - 1), more.eq(left != 1), valid.eq(1),
                             last.eq(left == 1)]
            with m.Elif(take):
                m.d.sync += valid.eq(0)
            with m.If(go_r):
                m.d.sync += [addr.eq(base_r), left.eq(count_r), more.eq(count_r != 0), valid.eq(0)]
            with m.Elif(active & ~more & drained):
                m.d.sync += active.eq(0)
            with m.If(go):
                m.d.sync += active.eq(1)
            return go, base, count, active

        # a -> MatVec activations
        act_words = Signal(16)  # registered, from the step's (registered) matvec geometry
        act_port = mv.s_act
        act_go, act_base, act_count, _ = streamer("act", a_rp, act_port)
        m.d.comb += [act_base.eq(0), act_count.eq(act_words)]

        # h -> AttnScores query, or -> write DMA (K and V rows)
        # step write_kv: h rows go to the write DMA. A register, a cycle behind the step (the rows start
        # later than that): the step decode stays off the write path's muxes.
        h_to_wr = Signal()
        m.d.sync += h_to_wr.eq(step == STEP["write_kv"])
        # each vector streamer feeds a register slice: its block RAM's output (no output register on the
        # ECP5) goes straight into a register, not through the consumers' muxes
        h_slice = RegisterSlice(8 * B)
        m.submodules.h_slice = ResetInserter(core_rst)(h_slice)
        h_go, h_first, h_count, h_streaming = streamer("hrow", h_rp, h_slice.s, out_reg=True)
        hq = h_slice.m
        h_active = Signal()  # words still in the streamer or its slice
        m.d.comb += h_active.eq(h_streaming | hq.tvalid)
        h_base = Signal(16)  # first word of this head's q row (scores_softmax)
        # K/V rows to DDR need tlast per row (one write command per row)
        kvrow_i = Signal(16)
        # kvrow_i == row_beats_kv - 1, as a register: the write slice's tlast sees only registers
        kvrow_last = Signal()
        kvrow_one, kvrow_before_last = Signal(), Signal(16)  # row_beats_kv == 1, row_beats_kv - 2 (stable)
        m.d.sync += [kvrow_one.eq(row_beats_kv == 1), kvrow_before_last.eq(row_beats_kv - 2)]
        with m.If(h_to_wr):
            m.d.comb += hq.tready.eq(wr_in.tready)
            with m.If(hq.tvalid & wr_in.tready):
                with m.If(kvrow_last):
                    m.d.sync += [kvrow_i.eq(0), kvrow_last.eq(kvrow_one)]
                with m.Else():
                    m.d.sync += [kvrow_i.eq(kvrow_i + 1), kvrow_last.eq(kvrow_i == kvrow_before_last)]
        with m.Else():
            m.d.comb += [qk.s_q.tdata.eq(hq.tdata), qk.s_q.tvalid.eq(hq.tvalid), hq.tready.eq(qk.s_q.tready),
                         qk.s_q.tlast.eq(hq.tlast)]

        # x -> LayerNorm input (one int32 per cycle), or -> write DMA (residual store, B/4 per beat)
        x_to_wr = Signal()  # step store_residual, registered as h_to_wr is
        m.d.sync += x_to_wr.eq(step == STEP["store_residual"])
        x_slice = RegisterSlice(32)
        m.submodules.x_slice = ResetInserter(core_rst)(x_slice)
        x_go, x_first, x_count, x_streaming = streamer("xvec", x_rp, x_slice.s, out_reg=True)
        # the x run starts from a register set by the step (its decode, with the read request's or the
        # write command's handshake, stays off the streamer's enables): one cycle later
        x_go_next = Signal()
        m.d.sync += x_go_next.eq(0)
        m.d.comb += x_go.eq(x_go_next)
        # LayerNorm takes x through a slice of its own, placed next to it: its tready (from its state)
        # and the handshake that moves that state stay inside LayerNorm's corner of the die
        ln_x = RegisterSlice(32)
        m.submodules.ln_x = ResetInserter(core_rst)(ln_x)
        wiring.connect(m, ln_x.m, ln.s_x)
        xs = x_slice.m
        x_active = Signal()  # words still in the streamer or its slice
        m.d.comb += x_active.eq(x_streaming | xs.tvalid)
        m.d.comb += [x_first.eq(0), x_count.eq(d_model)]
        pack = Signal(8 * B)
        pack_n = Signal(range(B // 4 + 1))
        pack_last = Signal()
        pack_full = Signal()  # a register: pack_n == B / 4
        with m.If(x_to_wr):
            # gather B/4 values into one beat; the tail beat is padded with zeros
            with m.If(pack_full):
                with m.If(wr_in.tready):
                    m.d.sync += [pack_n.eq(0), pack.eq(0), pack_full.eq(0)]
            with m.Elif(xs.tvalid):
                m.d.comb += xs.tready.eq(1)
                m.d.sync += [pack.word_select(pack_n, 32).eq(xs.tdata), pack_last.eq(xs.tlast),
                             pack_n.eq(Mux(xs.tlast, B // 4, pack_n + 1)), pack_full.eq(xs.tlast | (pack_n == B // 4 - 1))]
        with m.Else():
            m.d.comb += [ln_x.s.tdata.eq(xs.tdata), ln_x.s.tvalid.eq(xs.tvalid), xs.tready.eq(ln_x.s.tready),
                         ln_x.s.tlast.eq(xs.tlast)]

        # ---- sinks --------------------------------------------------------------------------------
        sink_i = Signal(range(max(self.max_d, nx.MAX_ROWS) + 1))  # values received by the step's sink
        # this step's values: registered (below), one cycle behind the step, long before any value
        sink_target = Signal(range(max(self.max_d, nx.MAX_ROWS) + 1))
        sink_done = Signal()  # registered (cleared when a step begins): sink_i reached sink_target
        m.d.sync += sink_done.eq(sink_i == sink_target)
        fresh = Signal()  # the first cycle of a step
        m.d.sync += fresh.eq(0)

        # qkv matvec out -> h (q rows, then k rows, then v rows, each head's row padded to whole words)
        e_i = Signal(range(self.max_head_dim + 1))  # element within the head row
        row_word = Signal(range(3 * self.head_words + 1))  # first word of the current head row
        hd_last = Signal.like(head_dim)  # head_dim - 1, registered (fixed once the model record is in)
        m.d.sync += hd_last.eq(head_dim - 1)
        # attn_out / proj matvec out -> x += y (saturating), a pipeline taking one value per cycle: A0
        # reads x, A1 registers it (no adder behind the block RAM's output), A2 adds and saturates into
        # a register, A3 writes it (no adder in front of the block RAM's data). Each value has its own
        # element of x, so no stage reads what a later one has yet to write.
        add_take = Signal()  # A0: a value is taken (and its x element read)
        add_v = Signal(3)  # A1, A2, A3 hold a value
        add_rd = Signal.like(sink_i)  # the next element of x to read (sink_i counts the writes)
        add_y0, add_y1, add_x, add_sum = Signal(32), Signal(32), Signal(32), Signal(32)
        add_pending = Signal()
        m.d.comb += add_pending.eq(add_v.any())
        m.d.sync += [add_v.eq(Cat(add_take, add_v[:2])), add_x.eq(x_rp.data), add_y1.eq(add_y0)]
        add_total = Signal(signed(33))
        m.d.comb += add_total.eq(add_x.as_signed() + add_y1.as_signed())
        int32_hi, int32_lo = (1 << 31) - 1, -(1 << 31)
        m.d.sync += add_sum.eq(Mux(add_total > int32_hi, int32_hi, Mux(add_total < int32_lo, int32_lo, add_total)))
        # lm_head out -> logits beats -> write DMA
        lg_pack = Signal(8 * B)
        lg_n = Signal(range(B // 4 + 1))
        lg_last = Signal()
        lg_full = Signal()  # a register: lg_n == B / 4
        lg_to_wr = Signal()  # step lm_head, registered as h_to_wr is
        m.d.sync += lg_to_wr.eq(step == STEP["lm_head"])
        sink_last = Signal.like(sink_target)  # sink_target - 1, registered two cycles behind the step
        m.d.sync += sink_last.eq(sink_target - 1)

        # GELU's table is a block RAM without an output register: its value goes straight into a register
        gelu_y, gelu_valid = Signal(8), Signal()
        m.d.sync += [gelu_y.eq(gelu.m_y.tdata), gelu_valid.eq(0)]
        # one block per step (`on`): each step's sink. It follows the step a cycle late (a copy of the
        # register, next to the sinks: the step's fan-out and decode stay off the buffers' write ports);
        # no value reaches a sink in a step's first cycle
        sink_step = Signal.like(step_oh)
        m.d.sync += sink_step.eq(step_oh)
        with m.If(on(sink_step, "ln1", "ln2", "lnf")):  # LayerNorm out -> a
            m.d.comb += ln.m_y.tready.eq(1)
            write_byte(a_wp, sink_i, ln.m_y.tdata, ln.m_y.tvalid)
            with m.If(ln.m_y.tvalid):
                m.d.sync += sink_i.eq(sink_i + 1)
        with m.If(on(sink_step, "qkv")):
            m.d.comb += mv.m_out.tready.eq(1)
            with m.If(mv.m_out.tvalid):
                m.d.comb += [h_wp.addr.eq(row_word + (e_i >> lgB)), h_wp.data.eq(Cat(*([mv.m_out.tdata[:8]] * B))),
                             h_wp.en.eq(1 << e_i[:lgB])]
                m.d.sync += sink_i.eq(sink_i + 1)
                with m.If(e_i == hd_last):
                    m.d.sync += [e_i.eq(0), row_word.eq(row_word + row_beats_kv)]
                with m.Else():
                    m.d.sync += e_i.eq(e_i + 1)
        with m.If(on(sink_step, "attn_out", "proj")):
            m.d.comb += [mv.m_out.tready.eq(1), add_take.eq(mv.m_out.tvalid)]
            with m.If(mv.m_out.tvalid):
                m.d.comb += [x_rp.addr.eq(add_rd), x_rp.en.eq(1)]
                m.d.sync += [add_y0.eq(mv.m_out.tdata), add_rd.eq(add_rd + 1)]
        with m.If(on(sink_step, "fc_gelu")):  # fc matvec out -> GELU -> (register) -> a
            m.d.comb += [gelu.s_x.tdata.eq(mv.m_out.tdata[:8]), gelu.s_x.tvalid.eq(mv.m_out.tvalid),
                         mv.m_out.tready.eq(gelu.s_x.tready), gelu.s_x.tlast.eq(mv.m_out.tlast),
                         gelu.m_y.tready.eq(1)]
            m.d.sync += gelu_valid.eq(gelu.m_y.tvalid)
            write_byte(a_wp, sink_i, gelu_y, gelu_valid)
            with m.If(gelu_valid):
                m.d.sync += sink_i.eq(sink_i + 1)
        with m.If(on(sink_step, "lm_head")):
            with m.If(~lg_full):
                m.d.comb += mv.m_out.tready.eq(1)
                with m.If(mv.m_out.tvalid):
                    is_last = sink_i == sink_last
                    m.d.sync += [lg_pack.word_select(lg_n, 32).eq(mv.m_out.tdata), lg_last.eq(is_last),
                                 lg_n.eq(Mux(is_last, B // 4, lg_n + 1)), lg_full.eq(is_last | (lg_n == B // 4 - 1)),
                                 sink_i.eq(sink_i + 1)]
        # The beats to write: each source's flag is a register (its step, registered, and "a beat is
        # full"), and they are exclusive, so the write slice's input is one AND-OR of registers.
        with m.If(lg_to_wr & lg_full & wr_in.tready):
            m.d.sync += [lg_n.eq(0), lg_pack.eq(0), lg_full.eq(0)]
        m.d.comb += [
            wr_in.tvalid.eq((h_to_wr & hq.tvalid) | (x_to_wr & pack_full) | (lg_to_wr & lg_full)),
            wr_in.tdata.eq(Mux(h_to_wr, hq.tdata, 0) | Mux(x_to_wr, pack, 0) | Mux(lg_to_wr, lg_pack, 0)),
            wr_in.tlast.eq((h_to_wr & kvrow_last) | (x_to_wr & pack_last) | (lg_to_wr & lg_last)),
        ]
        with m.If(add_v[2]):  # A3: outside the step's case, so the write data's mux sees only registers
            m.d.comb += [x_wp.addr.eq(sink_i), x_wp.data.eq(add_sum), x_wp.en.eq(1)]
            m.d.sync += sink_i.eq(sink_i + 1)
        with m.If(core_rst):
            m.d.sync += [add_v.eq(0), gelu_valid.eq(0)]
        # a step begins with its sink empty: cleared from a register set by begin() (the conditions
        # that end a step stay off these counters' inputs)
        with m.If(fresh):  # and the packers of the write steps start empty
            m.d.sync += [sink_i.eq(0), add_rd.eq(0), sink_done.eq(0), pack_n.eq(0), pack.eq(0), pack_full.eq(0),
                         lg_n.eq(0), lg_pack.eq(0), lg_full.eq(0)]

        # attention: scores -> softmax -> context -> a (ctx[h * head_dim + e])
        # each hop passes a register slice: a core's tready (from its state) reaches the neighbour's
        # state machine only as a register (the softmax's row handshake crossed the die to AttnContext
        # and back in one cycle)
        scores_slice = RegisterSlice(len(qk.m_scores.tdata))
        m.submodules.scores_slice = ResetInserter(core_rst)(scores_slice)
        probs_slice = RegisterSlice(len(sm.m_probs.tdata))
        m.submodules.probs_slice = ResetInserter(core_rst)(probs_slice)
        for src_, slc, dst in ((qk.m_scores, scores_slice, sm.s_scores), (sm.m_probs, probs_slice, pv.s_p)):
            m.d.comb += [slc.s.tdata.eq(src_.tdata), slc.s.tvalid.eq(src_.tvalid), slc.s.tlast.eq(src_.tlast),
                         src_.tready.eq(slc.s.tready),
                         dst.tdata.eq(slc.m.tdata), dst.tvalid.eq(slc.m.tvalid), dst.tlast.eq(slc.m.tlast),
                         slc.m.tready.eq(dst.tready)]
        m.d.comb += sm.s_scores.tuser.eq(1)
        ctx_beat = Signal(8 * B)
        ctx_have = Signal()
        ctx_lane = Signal(range(B))
        ctx_e = Signal(range(self.max_head_dim + 1))  # element of this head written so far
        # the byte of a the next context byte goes to: ctx_head * head_dim + ctx_e, counted (heads are
        # contiguous in a), so no adder sits in front of a's write port
        ctx_addr = Signal(range(self.max_d + 1))
        ctx_head = Signal(16)  # the head whose context comes next (AttnContext's jobs are in head order)
        ctx_all = Signal()  # the last head's context is in a (cleared when scores_softmax starts)
        ctx_clear = Signal()  # set on the way into scores_softmax: its first cycle clears the context counters
        m.d.sync += ctx_clear.eq(0)
        m.d.comb += pv.m_ctx.tready.eq(~ctx_have)
        with m.If(pv.m_ctx.tvalid & ~ctx_have):
            m.d.sync += [ctx_beat.eq(pv.m_ctx.tdata), ctx_have.eq(1), ctx_lane.eq(0)]
        with m.If(ctx_have):
            write_byte(a_wp, ctx_addr, ctx_beat.word_select(ctx_lane, 8), ctx_e < head_dim)
            m.d.sync += [ctx_lane.eq(ctx_lane + 1), ctx_e.eq(ctx_e + 1), ctx_addr.eq(ctx_addr + 1)]
            with m.If(ctx_e == hd_last):  # the head's last byte: the next head's context follows
                m.d.sync += [ctx_have.eq(0), ctx_e.eq(0),
                             ctx_head.eq(ctx_head + 1), ctx_all.eq(ctx_head == last_head)]
            with m.Elif(ctx_lane == B - 1):
                m.d.sync += ctx_have.eq(0)
        with m.If(ctx_clear):
            m.d.sync += [ctx_e.eq(0), ctx_head.eq(0), ctx_all.eq(0), ctx_addr.eq(0)]

        # The attention cores' job parameters pass a register: they are set in FETCH and CHECK, long
        # before the first query, and the extra stage lets the placer split the route from the
        # descriptor records to the cores (it crossed the die into AttnScores' query logic).
        m.d.sync += [qk.head_dim.eq(head_dim), qk.n_keys.eq(n_keys), pv.head_dim.eq(head_dim), pv.n_keys.eq(n_keys),
                     sm.mult.eq(lf("score_mult")), sm.shift.eq(lf("score_shift")),
                     pv.ctx_mult.eq(lf("ctx_mult")), pv.ctx_shift.eq(lf("ctx_shift"))]

        # ---- matvec geometry: a function of the step, registered (one cycle behind the step, which
        # waits a cycle before it uses them), stable for the step's duration ---------------------------
        mv_d_in, mv_rows, mv_int8 = Signal(range(self.max_d + 1)), Signal(16), Signal()
        d3 = Signal(18)  # 3 * d_model, rows of the qkv matrix (a shift and an add, not a multiplier)
        m.d.sync += d3.eq((d_model << 1) + d_model)
        m.d.sync += mv_int8.eq(0)  # registered: a step that does not set it must clear it
        with m.Switch(step):
            with m.Case(STEP["qkv"]):
                m.d.sync += [mv_d_in.eq(d_model), mv_rows.eq(d3), mv_int8.eq(1), sink_target.eq(d3)]
            with m.Case(STEP["attn_out"]):
                m.d.sync += [mv_d_in.eq(d_model), mv_rows.eq(d_model), sink_target.eq(d_model)]
            with m.Case(STEP["fc_gelu"]):
                m.d.sync += [mv_d_in.eq(d_model), mv_rows.eq(d_ff), mv_int8.eq(1), sink_target.eq(d_ff)]
            with m.Case(STEP["proj"]):
                m.d.sync += [mv_d_in.eq(d_ff), mv_rows.eq(d_model), sink_target.eq(d_model)]
            with m.Case(STEP["lm_head"]):
                m.d.sync += [mv_d_in.eq(d_model), mv_rows.eq(vocab), sink_target.eq(vocab)]
            with m.Default():
                m.d.sync += sink_target.eq(d_model)  # the LayerNorm steps
        m.d.comb += [mv.d_in.eq(mv_d_in), mv.n_rows.eq(mv_rows), mv.out_int8.eq(mv_int8)]
        # a row's beats from d_in, one adder per register stage (valid two cycles after mv_d_in):
        # act_beats_r and the int4 group count, then the header's beats, then their sum into row_beats_r
        act_beats_r, hdr_beats_r = Signal(16), Signal(8)
        m.d.sync += act_beats_r.eq((mv_d_in + (per_beat - 1)) >> _lg(per_beat))
        if int4:
            groups_r = Signal(16)
            m.d.sync += [groups_r.eq((mv_d_in + (self.group - 1)) >> _lg(self.group)),
                         hdr_beats_r.eq((groups_r + (ROW_HEADER_FIXED_BYTES + B - 1)) >> lgB)]
        else:
            m.d.comb += hdr_beats_r.eq((ROW_HEADER_FIXED_BYTES + B - 1) >> lgB)
        row_beats = Signal(16)
        row_beats_r = Signal(16)
        mv_rows_r = Signal(16)
        mat_beats = Signal(32)
        # the matrix's beats by shift and add (16 cycles once per matvec step), as the per-command
        # products: a multiplier block between these registers was placed far from both
        m.submodules.mul_mat = mat_mul = ShiftAddMultiplier(16, 16)
        m.d.comb += [mat_mul.a.eq(mv_rows_r), mat_mul.b.eq(row_beats_r), mat_beats.eq(mat_mul.p)]
        mat_start = Signal()  # a register: the step decode stays off the multiplier's enables
        m.d.sync += mat_start.eq(0)
        m.d.comb += mat_mul.start.eq(mat_start)
        m.d.comb += row_beats.eq(hdr_beats_r + act_beats_r)
        m.d.sync += act_words.eq((mv_d_in + (B - 1)) >> lgB)

        # ---- errors -------------------------------------------------------------------------------
        def flagged(core):
            return core.error.any() if hasattr(core, "error") else Const(0)

        core_err = Signal()
        m.d.comb += core_err.eq(flagged(ln) | flagged(mv) | flagged(sm) | flagged(qk) | flagged(pv) | wr.error[1])
        live_err = Signal(len(err))
        m.d.comb += [live_err[err_bit["axi_read"]].eq(rd.error), live_err[err_bit["axi_write"]].eq(wr.error[0]),
                     live_err[err_bit["stream"]].eq(core_err)]

        # ---- the sequencer ------------------------------------------------------------------------
        sub = Signal(3)  # sub-state within a step
        is_head = Signal()
        ln_shift = Signal(6)
        m.d.comb += ln.out_shift.eq(ln_shift)

        # the beats of the residual, LayerNorm parameter and logits transfers, registered (fixed once the
        # model record is in): no adder between the step decode and the request registers
        resid_beats, ln_beats, logits_beats = Signal(16), Signal(16), Signal(24)
        m.d.sync += [resid_beats.eq((d_model + (B // 4 - 1)) >> _lg(B // 4)), ln_beats.eq((d_model + (per8 - 1)) >> _lg(per8)),
                     logits_beats.eq((vocab + (B // 4 - 1)) >> _lg(B // 4))]

        def begin(name):
            m.d.sync += [step.eq(STEP[name]), step_oh.eq(1 << STEP[name]), sub.eq(0), fresh.eq(1)]

        def read(addr, beats, tag, go=1):
            """Request a read when ``go``. The fields are set whatever ``go`` is (they matter only with
            it): a condition such as "the product is done" stays off the request's data."""
            m.d.comb += [rd_addr.eq(addr), rd_n.eq(beats), rd_tag.eq(tag), rd_go.eq(go)]

        def matvec(addr, first_sub=0):
            """From sub `first_sub`: three cycles for the geometry registers to follow the step (mv_d_in,
            then the row's beats in two stages), the matrix's beats (registered, then by shift and add: no
            multiplier on the path to the DMA), then the weights read with the activations; returns 'the
            step's values are in'."""
            with m.Switch(sub):
                with m.Case(first_sub, first_sub + 1, first_sub + 2):
                    m.d.sync += sub.eq(sub + 1)
                with m.Case(first_sub + 3):
                    m.d.sync += [row_beats_r.eq(row_beats), mv_rows_r.eq(mv_rows), sub.eq(first_sub + 4),
                                 mat_start.eq(1)]
                with m.Case(first_sub + 4):  # mat_start, set on the way here, starts the product
                    m.d.sync += sub.eq(first_sub + 5)
                with m.Case(first_sub + 5):
                    read(addr, mat_beats, T_W, go=mat_mul.done)
                    with m.If(mat_mul.done & ~rq_valid):  # the request is taken
                        m.d.comb += act_go.eq(1)
                        m.d.sync += sub.eq(first_sub + 6)
            return (sub == first_sub + 6) & sink_done

        def layernorm(addr, shift, nxt):
            with m.If(sub == 0):
                m.d.sync += ln_shift.eq(shift)
                read(addr, ln_beats, T_LNP)
                with m.If(~rq_valid):  # the request is taken
                    m.d.sync += x_go_next.eq(1)
                    m.d.sync += [lnp_left.eq(d_model), lnp_real.eq(1), sub.eq(1)]
            with m.Elif(sink_done):
                begin(nxt)

        # An error or CONTROL.abort ends the command. The errors are registered first (no path from
        # the cores' and DMAs' error logic into the whole sequencer): the sequencer sees an error one
        # cycle late, so END also takes the errors of the cycle RUN left for it.
        live_err_r = Signal(len(err))
        m.d.sync += live_err_r.eq(live_err)
        stop = Signal()  # registered: CONTROL.abort takes effect a cycle after its write
        m.d.sync += stop.eq(live_err.any() | abort)
        from_run = Signal()  # END comes straight from RUN (not from ABORT / DRAIN)
        dma_flush = Signal()  # high in ABORT's one cycle (set on the way in)
        m.d.comb += [rd.flush.eq(dma_flush), wr.flush.eq(dma_flush)]

        def enter_reset(state):
            """Go to ABORT or END. The soft resets are registers, high from the state entered to END
            (the DMAs': in END): decoded from the state, they crossed the die within one cycle."""
            m.next = state
            m.d.sync += core_rst.eq(1)
            if state == "END":
                m.d.sync += dma_rst.eq(1)
            else:  # ABORT flushes the DMAs for its one cycle: a register too
                m.d.sync += dma_flush.eq(1)

        dmas_idle = Signal()  # both DMAs were idle in the last cycle (cleared in ABORT, for DRAIN)
        m.d.sync += dmas_idle.eq(rd.idle & wr.idle)
        with m.FSM(name="seq") as seq:
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [busy.eq(1), done.eq(0), err.eq(0), cycles.eq(0), head.eq(0),
                                 beats_read.eq(0), beats_written.eq(0), is_head.eq(op == rm.OP_HEAD)]
                    begin("fetch_descriptor")
                    with m.If(op > rm.OP_HEAD):
                        m.d.sync += err[err_bit["command"]].eq(1)
                        enter_reset("END")
                    with m.Else():
                        m.next = "FETCH"
            with m.State("FETCH"):
                with m.If(stop):
                    m.d.sync += err.eq(err | live_err_r)
                    enter_reset("ABORT")
                with m.Elif(sub == 0):
                    m.d.sync += rec_sel.eq(0)
                    read(regs.desc_addr, rec_beats, T_DESC)
                    with m.If(~rq_valid):  # the request is taken
                        m.d.sync += sub.eq(1)
                with m.Elif(sub == 1):  # the model record gives n_layer, needed to find the HEAD record
                    index = Mux(is_head, n_layer, layer)
                    m.d.sync += rec_addr.eq(regs.desc_addr + ((index + 1) << _lg(dsc.RECORD_BYTES)))
                    with m.If(rd_quiet):
                        m.d.sync += [rec_sel.eq(1), sub.eq(2)]
                with m.Elif(sub == 2):
                    read(rec_addr, rec_beats, T_DESC)
                    with m.If(~rq_valid):  # the request is taken
                        m.d.sync += sub.eq(3)
                with m.Elif(sub == 3):
                    read(dfield(rec_model, "model", "eps_addr"), -(-EPS_ENTRIES // per8), T_EPS)
                    with m.If(~rq_valid):  # the request is taken
                        m.d.sync += [eps_i.eq(0), sub.eq(4)]
                with m.Elif(sub == 4):
                    with m.If(rd_quiet):
                        m.d.sync += sub.eq(5)
                with m.Elif(sub == 5):  # the layer's GELU table (the HEAD has none)
                    with m.If(is_head | (layer >= n_layer)):
                        m.next = "CHECK"
                    with m.Else():
                        read(lf("gelu_addr"), GELU_TABLE_BYTES // B, T_GELU)
                        with m.If(~rq_valid):  # the request is taken
                            m.d.sync += [gt_i.eq(0), sub.eq(6)]
                with m.Elif(rd_quiet):
                    m.next = "CHECK"
            with m.State("CHECK"):
                # products of descriptor fields (shift and add, see above), ready before anything
                # compares or uses them
                window = lf("window")
                m.d.comb += [mul[k].start.eq(1) for k in ("hd_n", "nh_rb", "ctx", "pos")]
                m.d.sync += lo.eq(Mux((window != 0) & (position >= window), position - window + 1, 0))
                m.next = "CHECK2"
            with m.State("CHECK2"):
                m.d.comb += mul["lo"].start.eq(1)
                m.d.sync += n_keys.eq(position - lo + 1)
                m.next = "CHECK_KV"
            with m.State("CHECK_KV"):
                m.d.comb += mul["kv"].start.eq(1)
                m.next = "CHECK_PRODUCTS"
            with m.State("CHECK_PRODUCTS"):
                with m.If(Cat(*[x.done for x in mul.values()]).all()):
                    m.next = "CHECK3"
            with m.State("CHECK3"):
                bad, bad_cmd = Signal(name="bad"), Signal(name="bad_cmd")

                checks = [
                    dfield(rec_model, "model", "magic") != dsc.DESC_MAGIC,
                    n_layer == 0, n_head == 0, head_dim == 0, head_dim > self.max_head_dim,
                    d_model == 0, d_model > self.max_d, hd_n != d_model,
                    d_ff == 0, d_ff > self.max_d, n_ctx == 0, n_ctx > self.max_context,
                    vocab == 0, vocab > nx.MAX_ROWS, position >= n_ctx,
                    nh_rb > self.head_words,
                ]
                layer_checks = [lf("score_shift") > nx.MAX_SHIFT, lf("ctx_shift") > nx.MAX_SHIFT,
                                lf("ln1_shift") > nx.LN_MAX_OUT_SHIFT, lf("ln2_shift") > nx.LN_MAX_OUT_SHIFT,
                                lf("window") >= n_ctx]
                # each check is a flip-flop here, their OR one in CHECK4 (a comparison and a 22-input OR
                # in one cycle was the whole engine's critical path)
                terms = [*checks, *(~is_head & c for c in layer_checks),
                         is_head & (hf("lnf_shift") > nx.LN_MAX_OUT_SHIFT)]
                check_bits = Signal(len(terms), name="check_bits")
                m.d.sync += check_bits.eq(Cat(*terms))
                m.d.sync += bad_cmd.eq(~is_head & (layer >= n_layer))
                m.next = "CHECK4"
            with m.State("CHECK4"):
                m.d.sync += bad.eq(check_bits.any())
                m.next = "CHECK5"
            with m.State("CHECK5"):  # the checks' verdict, registered in CHECK3 and CHECK4
                with m.If(bad_cmd):
                    m.d.sync += err[err_bit["command"]].eq(1)
                    enter_reset("ABORT")
                with m.Elif(bad):
                    m.d.sync += err[err_bit["descriptor"]].eq(1)
                    enter_reset("ABORT")
                with m.Else():
                    begin("load_residual")
                    m.next = "RUN"
            with m.State("RUN"):
                with m.If(stop):
                    m.d.sync += err.eq(err | live_err_r)
                    enter_reset("ABORT")
                with m.Else():
                    # One case per value of the binary step: the cases are distinct constants, so each
                    # signal the steps assign (sub, the request fields) is one parallel multiplexer
                    # under a 4-bit decode (one LUT). Not a block per bit of step_oh: a signal assigned
                    # in several such blocks becomes a chain of multiplexers, one per block (the last
                    # one wins), and `sub` was the critical path.
                    with m.Switch(step):
                        with m.Case(STEP["load_residual"]):
                            with m.If(sub == 0):
                                read(dfield(rec_model, "model", "resid_addr"), resid_beats, T_RESID)
                                with m.If(~rq_valid):  # the request is taken
                                    m.d.sync += [res_i.eq(0), res_lane.eq(0), sub.eq(1)]
                            with m.Elif(rd_quiet):
                                with m.If(is_head):
                                    begin("lnf")
                                with m.Else():
                                    begin("ln1")
                        with m.Case(STEP["ln1"]):
                            layernorm(lf("ln1_addr"), lf("ln1_shift"), "qkv")
                        with m.Case(STEP["qkv"]):
                            with m.If(sub == 0):
                                m.d.sync += [e_i.eq(0), row_word.eq(0)]
                            with m.If(matvec(lf("qkv_addr"))):
                                begin("write_kv")
                        with m.Case(STEP["write_kv"]):
                            # 2 * n_head row writes (all k rows, then all v rows) fed by one linear read of h
                            with m.If(sub == 0):
                                m.d.sync += [kvrow_i.eq(0), kvrow_last.eq(kvrow_one), head.eq(0),
                                             kv_wr_addr.eq(lf("k_cache_addr") + pos_off), kv_more.eq(1), sub.eq(1)]
                                m.d.comb += [h_go.eq(1), h_first.eq(nh_rb), h_count.eq(nh_rb << 1)]
                            with m.Elif(sub == 1):
                                m.d.comb += [wr_addr.eq(kv_wr_addr), wr_n.eq(row_beats_kv), wr_go.eq(kv_more)]
                                with m.If(kv_more & ~wq_valid):  # this row's write command is taken
                                    m.d.sync += [head.eq(head + 1), kv_more.eq(head != kv_last_row),
                                                 kv_wr_addr.eq(Mux(head == last_head, lf("v_cache_addr") + pos_off,
                                                                   kv_wr_addr + ctx_stride))]
                                with m.If(~kv_more & ~h_active):
                                    m.d.sync += sub.eq(2)
                            with m.Elif(wr_idle):
                                m.d.sync += [head.eq(0), heads_after.eq(last_head), head_at_last.eq(last_head == 0),
                                             ctx_clear.eq(1), k_rd_addr.eq(lf("k_cache_addr") + lo_off),
                                             v_rd_addr.eq(lf("v_cache_addr") + lo_off), h_base.eq(0)]
                                begin("scores_softmax")
                        with m.Case(STEP["scores_softmax"]):
                            # Reads K0, K1, V0, K2, V1, ..., K(H-1), V(H-2), V(H-1) (one head: K0, V0), so that
                            # Softmax's exp-and-sum of head h runs while K(h + 1) streams. Each consumer drains
                            # its stream in command order: AttnScores gets q(h) with the K(h) read (the read
                            # DMA may hold a command back until the one before it is split into bursts, which
                            # needs AttnScores to drain K, which needs the query); Softmax takes row h + 1
                            # into its second bank while row h waits for V(h); row h + 2 (after V(h)) needs
                            # the bank row h has left. The h streamer holds one q row: a K read is issued only
                            # once the previous q row is in AttnScores (it takes q(h + 1) after K(h)'s last
                            # beat). `head` is the head whose V read comes next; h_base and k_rd_addr step
                            # with the K reads, v_rd_addr with the V reads (no multiplier). The context
                            # bytes go to a in head order (ctx_head below); the step ends when the last
                            # head's are in.
                            with m.Switch(sub):
                                with m.Case(0):  # K0 and q0
                                    read(k_rd_addr, kv_beats, T_K)
                                    with m.If(~rq_valid):  # the request is taken
                                        m.d.comb += [h_go.eq(1), h_first.eq(h_base), h_count.eq(row_beats_kv)]
                                        m.d.sync += [h_base.eq(h_base + row_beats_kv),
                                                     k_rd_addr.eq(k_rd_addr + ctx_stride), sub.eq(1)]
                                with m.Case(1):  # K(head + 1) and its q row, unless head is the last
                                    read(k_rd_addr, kv_beats, T_K, go=~head_at_last & ~h_active)
                                    with m.If(head_at_last):
                                        m.d.sync += sub.eq(2)
                                    with m.Elif(~h_active):
                                        with m.If(~rq_valid):  # the request is taken
                                            m.d.comb += [h_go.eq(1), h_first.eq(h_base), h_count.eq(row_beats_kv)]
                                            m.d.sync += [h_base.eq(h_base + row_beats_kv),
                                                         k_rd_addr.eq(k_rd_addr + ctx_stride), sub.eq(2)]
                                with m.Case(2):  # V(head)
                                    read(v_rd_addr, kv_beats, T_V)
                                    with m.If(~rq_valid):  # the request is taken
                                        m.d.sync += v_rd_addr.eq(v_rd_addr + ctx_stride)
                                        with m.If(head_at_last):
                                            m.d.sync += sub.eq(3)
                                        with m.Else():
                                            m.d.sync += [head.eq(head + 1), heads_after.eq(heads_after - 1),
                                                         head_at_last.eq(heads_after == 1), sub.eq(1)]
                                with m.Default():  # every head's context is in a
                                    with m.If(ctx_all):
                                        begin("attn_out")
                        with m.Case(STEP["attn_out"]):
                            with m.If(matvec(lf("attn_out_addr")) & ~add_pending):
                                begin("ln2")
                        with m.Case(STEP["ln2"]):
                            layernorm(lf("ln2_addr"), lf("ln2_shift"), "fc_gelu")
                        with m.Case(STEP["fc_gelu"]):
                            with m.If(matvec(lf("fc_addr"))):
                                begin("proj")
                        with m.Case(STEP["proj"]):
                            with m.If(matvec(lf("proj_addr")) & ~add_pending):
                                begin("store_residual")
                        with m.Case(STEP["store_residual"]):
                            with m.If(sub == 0):
                                m.d.comb += [wr_addr.eq(dfield(rec_model, "model", "resid_addr")),
                                             wr_n.eq(resid_beats), wr_go.eq(1)]
                                with m.If(~wq_valid):  # the write command is taken
                                    m.d.sync += [x_go_next.eq(1), sub.eq(1)]
                            with m.Elif(~x_active & (pack_n == 0) & wr_idle):
                                enter_reset("END")
                        with m.Case(STEP["lnf"]):
                            layernorm(hf("lnf_addr"), hf("lnf_shift"), "lm_head")
                        with m.Case(STEP["lm_head"]):
                            lm_done = matvec(hf("lm_head_addr"), first_sub=1)  # subs 1..7
                            with m.If(sub == 0):  # the logits' write command first, then the matvec
                                m.d.comb += [wr_addr.eq(dfield(rec_model, "model", "logits_addr")),
                                             wr_n.eq(logits_beats), wr_go.eq(1)]
                                with m.If(~wq_valid):  # the write command is taken
                                    m.d.sync += sub.eq(1)
                            with m.Elif(lm_done & (lg_n == 0) & wr_idle):
                                enter_reset("END")
            with m.State("ABORT"):
                # flush the DMAs (one cycle); the cores are in reset (core_rst) from here to END
                m.d.sync += [dma_flush.eq(0), dmas_idle.eq(0)]
                m.next = "DRAIN"
            with m.State("DRAIN"):
                # reads cannot be cancelled: their beats are dropped; owed write beats go out unstrobed.
                # Both DMAs' idle, a cycle late (a register: the DMAs sit on opposite sides of the die);
                # nothing starts a transfer in DRAIN, so idle stays idle
                with m.If(dmas_idle):
                    enter_reset("END")
            with m.State("END"):
                m.d.sync += [core_rst.eq(0), dma_rst.eq(0)]
                m.d.comb += regs.irq_status_set.eq(1 << rm.register("IRQ_STATUS").field("done").lsb)
                end_err = err | Mux(from_run, live_err_r, 0)
                m.d.sync += [busy.eq(0), done.eq(1), err.eq(end_err)]
                with m.If(end_err == 0):
                    m.d.sync += [step.eq(STEP["done"]), step_oh.eq(1 << STEP["done"])]
                m.next = "IDLE"
        m.d.sync += from_run.eq(seq.ongoing("RUN"))
        return m
