"""AXI4 write DMA: (address, beats) commands and an AXI-Stream of data in, INCR bursts out.

The engine writes its KV cache and results to DDR through this core. Bursts follow the Zynq-7000
HP port rules of :mod:`hw.axi` (AXI3: at most 16 beats, never across a 4 KiB boundary, one ID);
a burst's address goes out only once all its data are buffered, so W never stalls the bus.
"""

from __future__ import annotations

from amaranth import Cat, Module, Mux, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from gpt_fpga.hw.axi import BURST_INCR, MAX_BURST_BEATS, Axi4WriteSignature
from gpt_fpga.hw.axi_read import (ARCACHE, CMD_BEATS_BITS, DEFAULT_MAX_OUTSTANDING, BurstSplitter,
                                  DmaCommandSignature, check_dma_params)
from gpt_fpga.hw.axis import AxiStreamSignature
from gpt_fpga.hw.fifo import BlockRamFifo
from gpt_fpga.hw.ping_pong_slice import PingPongSlice

__all__ = ["AxiWriteDma", "ERROR_BRESP", "ERROR_STREAM"]

ERROR_BRESP = 0b01  # error bit 0 ("bresp"): some B response was SLVERR or DECERR
ERROR_STREAM = 0b10  # error bit 1 ("stream"): s_data's tlast was missing or early
CMD_QUEUE_DEPTH = 2  # commands taken ahead of the one being split / received


class AxiWriteDma(wiring.Component):
    """AXI4 (AXI3-compatible) write DMA: data buffered per burst, several bursts awaiting B.

    Each command ``(addr, beats)`` taken on ``cmd`` consumes exactly ``beats`` beats of ``s_data``
    (framing is by count: ``tlast`` is only checked, on the last beat) and writes them as INCR
    bursts of at most 16 beats that never cross a 4 KiB boundary (a burst ends at
    ``min(16 beats, the command's end, the page end)``), ``awid`` 0, ``awsize = log2(data_bits/8)``,
    ``awcache = 0b0011``, ``awprot = 0``, every byte strobed (buffers are whole beats). Commands
    queue back to back (two may wait behind the one in progress).

    Ordering: a burst's AW is issued only when all its beats are in the data FIFO, and its W beats
    start only after its AW handshake, so W never precedes AW and, once AW is accepted, ``wvalid``
    stays high to ``wlast`` (the interconnect never waits for us). At most ``max_outstanding``
    bursts await their B response; ``bready`` is always 1.

    Parameters
    ----------
    data_bits : int
        Bus and stream width: a power of two, 8..1024 (64 for the Zynq-7000 HP ports).
    addr_bits : int
        AXI address width, 12..64.
    max_outstanding : int
        Bursts issued (AW loaded) whose B response has not arrived, 1..64; default 8.
    fifo_depth : int or None
        Data FIFO entries (beats), 16..4096; default ``16 * max_outstanding``. It must hold a whole
        burst; 32 or more lets ``s_data`` fill the next burst while the previous one drains.

    Attributes
    ----------
    cmd : In(DmaCommandSignature(addr_bits))
        Commands: ``addr`` (byte address, bus-aligned; low bits ignored), ``beats`` (1 .. 2**24-1;
        0 is taken and ignored). ``cmd.ready`` is low while the command queue is full, during
        ``flush`` and until a flush has drained.
    s_data : In(AxiStreamSignature(data_bits))
        The data, ``beats`` beats per command in command order, ``tlast`` on each command's last
        beat. ``tready`` is low while no command is waiting for data, while the FIFO is full and
        while a flush drains.
    axi : Out(Axi4WriteSignature(addr_bits=addr_bits, data_bits=data_bits))
        AW, W and B channels of the manager port.
    error : Out(2)
        Sticky until reset (:attr:`ERROR_BITS` ``("bresp", "stream")``). Bit 0
        (:data:`ERROR_BRESP`): some BRESP was SLVERR or DECERR. Bit 1 (:data:`ERROR_STREAM`): an
        ``s_data`` beat had ``tlast`` where the command does not end, or not where it does (the data
        are written anyway, framed by ``beats``).
    beats : Out(32)
        W beats sent since reset (wraps at 2**32), including the zero-strobe beats of a flush.
    idle : Out(1)
        No command pending, no data buffered, and every burst's B response received: what was
        written can be read back.
    flush : In(1)
        Abort, in any cycle it is high: queued commands and the command being received are dropped
        (``s_data.tready`` falls; the rest of the frame must not be sent: the producer is flushed
        too), no new AW is issued (an AW already presented stays until accepted, as AXI requires),
        the W beats owed to issued AWs are sent with ``wstrb = 0`` (nothing more is written; a beat
        already presented when the flush comes keeps its strobes, as AXI requires), the rest of the
        buffered data is discarded, and every B is collected. Then ``idle`` rises and ``cmd.ready``
        returns.

    Notes
    -----
    Throughput: one beat per cycle on ``s_data`` and W in steady state (no back-pressure, write
    response latency covered by ``max_outstanding``). Measured over a 4096-beat write with a
    40-cycle B latency (sim/tb/axi_write.py): ``s_data`` 1 beat/cycle, W 0.995 beats/cycle counted
    from the command (1.000 from the first W beat). Between commands ``s_data`` has no bubble; W
    may pause while a short burst's successor is still being buffered. AW issues at most one burst
    every other cycle (only while ``awvalid`` is low, from a slot the splitter refills), so bursts
    of two beats or more keep W busy.

    Latency (:attr:`latency`, no stalls): a burst's ``awvalid`` rises :attr:`latency` (2) cycles
    after the ``s_data`` handshake that completes its data, and its first ``wvalid``
    :attr:`w_latency` (3) cycles after its AW handshake. The first burst of a command therefore
    starts about ``min(16, beats) + 5`` cycles after its first data beat.
    """

    ERROR_BITS = ("bresp", "stream")  #: names of ``error``'s bits, bit 0 first

    def __init__(self, *, data_bits: int = 64, addr_bits: int = 32,
                 max_outstanding: int = DEFAULT_MAX_OUTSTANDING, fifo_depth: int | None = None):
        self.fifo_depth = check_dma_params(self, data_bits, addr_bits, max_outstanding, fifo_depth)
        self.data_bits, self.addr_bits, self.max_outstanding = data_bits, addr_bits, max_outstanding
        self.data_bytes = data_bits // 8
        self.size = self.data_bytes.bit_length() - 1  # awsize
        super().__init__({
            "cmd": In(DmaCommandSignature(addr_bits)),
            "s_data": In(AxiStreamSignature(data_bits)),
            "axi": Out(Axi4WriteSignature(addr_bits=addr_bits, data_bits=data_bits)),
            "error": Out(2),
            "beats": Out(32),
            "idle": Out(1),
            "flush": In(1),
        })

    @property
    def latency(self) -> int:
        """Cycles from the ``s_data`` handshake completing a burst's data to its ``awvalid``: 2."""
        return 2

    @property
    def w_latency(self) -> int:
        """Cycles from an AW handshake to the burst's first ``wvalid``: 3 (the last through the W
        slice)."""
        return 3

    @property
    def throughput(self) -> int:
        """Beats per cycle in steady state without back-pressure: 1."""
        return 1

    def elaborate(self, platform):
        m = Module()
        ax, cmd, s, flush = self.axi, self.cmd, self.s_data, self.flush
        depth = self.fifo_depth
        dropping = Signal()  # a flush is draining

        # --- command queues (one for the data side, one for the burst splitter); a flush empties them
        lenq = SyncFIFO(width=CMD_BEATS_BITS, depth=CMD_QUEUE_DEPTH)
        cmdq = SyncFIFO(width=self.addr_bits + CMD_BEATS_BITS, depth=CMD_QUEUE_DEPTH)
        m.submodules.lenq = ResetInserter(flush)(lenq)
        m.submodules.cmdq = ResetInserter(flush)(cmdq)
        take = lenq.w_rdy & cmdq.w_rdy & ~flush & ~dropping
        push_cmd = cmd.valid & take & (cmd.beats != 0)
        m.d.comb += [
            cmd.ready.eq(take),
            lenq.w_en.eq(push_cmd), lenq.w_data.eq(cmd.beats),
            cmdq.w_en.eq(push_cmd), cmdq.w_data.eq(Cat(cmd.beats, cmd.addr)),
        ]

        # --- data side: s_data -> FIFO, counting beats per command, checking tlast
        fifo = BlockRamFifo(width=self.data_bits, depth=depth)
        m.submodules.fifo = fifo
        in_rem = Signal(CMD_BEATS_BITS)  # beats still expected for the command being received
        # in_rem != 0 and in_rem == 1 as registers, updated beside in_rem (timing: no comparison of
        # the count on the path from s_data's handshake to the queues)
        in_any, in_last = Signal(), Signal()
        m.d.comb += s.tready.eq(in_any & fifo.w_rdy & ~dropping)
        s_fire = s.tvalid & s.tready
        m.d.comb += [fifo.w_en.eq(s_fire), fifo.w_data.eq(s.tdata)]
        with m.If(s_fire & (s.tlast != in_last)):
            m.d.sync += self.error[1].eq(1)
        with m.If(flush):
            m.d.sync += [in_rem.eq(0), in_any.eq(0), in_last.eq(0)]
        with m.Elif((~in_any | (s_fire & in_last)) & lenq.r_rdy):  # next command, no bubble
            m.d.sync += [in_rem.eq(lenq.r_data), in_any.eq(lenq.r_data != 0), in_last.eq(lenq.r_data == 1)]
            m.d.comb += lenq.r_en.eq(1)
        with m.Elif(s_fire):
            m.d.sync += [in_rem.eq(in_rem - 1), in_any.eq(~in_last), in_last.eq(in_rem == 2)]

        # --- burst splitter / AW issue
        m.submodules.split = split = BurstSplitter(addr_bits=self.addr_bits, data_bytes=self.data_bytes)
        avail = Signal(range(depth + 1))  # beats in the FIFO not yet claimed by an AW
        claimed = Signal(range(depth + 1))  # beats claimed by an AW, not yet sent on W
        b_owed = Signal(range(self.max_outstanding + 1))  # bursts issued whose B has not arrived

        # the next burst waits in a slot of registers, which the splitter refills when it is empty: the
        # issue decision (the data count's comparison) reaches the slot's flag and the AW registers, not
        # the splitter's output registers. AW is issued only while awvalid is low: awready (a port of
        # the design, which may sit anywhere) reaches only awvalid's own enable. A burst issues at most
        # every other cycle; a burst of two beats or more keeps W busy.
        slot_valid, slot_addr = Signal(), Signal.like(split.burst_addr)
        blen = Signal.like(split.burst_len)
        b_room = Signal(init=1)  # b_owed < max_outstanding, as a register
        issue = slot_valid & ~ax.awvalid & (avail >= blen) & b_room & ~flush
        load = split.burst_valid & ~slot_valid
        m.d.comb += [
            split.flush.eq(flush), split.burst_ready.eq(~slot_valid),
            split.cmd.valid.eq(cmdq.r_rdy), split.cmd.beats.eq(cmdq.r_data[:CMD_BEATS_BITS]),
            split.cmd.addr.eq(cmdq.r_data[CMD_BEATS_BITS:]), cmdq.r_en.eq(split.cmd.ready),
        ]
        with m.If(flush | issue):
            m.d.sync += slot_valid.eq(0)
        with m.Elif(load):
            m.d.sync += slot_valid.eq(1)
        with m.If(load):
            m.d.sync += [slot_addr.eq(split.burst_addr), blen.eq(split.burst_len)]
        with m.If(issue):
            m.d.sync += [ax.awaddr.eq(slot_addr), ax.awlen.eq(blen - 1), ax.awvalid.eq(1)]
        with m.Elif(ax.awready):
            m.d.sync += ax.awvalid.eq(0)
        m.d.comb += [ax.awsize.eq(self.size), ax.awburst.eq(BURST_INCR), ax.awid.eq(0),
                     ax.awcache.eq(ARCACHE), ax.awprot.eq(0)]

        with m.If(flush):
            m.d.sync += avail.eq(0)  # unclaimed data are discarded
        with m.Else():
            m.d.sync += avail.eq(avail + s_fire - Mux(issue, blen, 0))

        # --- W: lengths of AW-accepted bursts, in order
        m.submodules.wlens = wlens = SyncFIFO(width=4, depth=max(2, self.max_outstanding))
        m.d.comb += [wlens.w_en.eq(ax.awvalid & ax.awready), wlens.w_data.eq(ax.awlen[:4])]
        # W leaves through a ping-pong slice: wvalid, wdata and wlast come from its flip-flops (a 2:1
        # multiplexer after them), so neither the burst count nor the FIFO's read side lies between the
        # interconnect's wready and a register, and the FIFO's block RAM output (no output register on
        # the ECP5) goes into the entries' data inputs with no logic in front
        m.submodules.w_slice = w_slice = PingPongSlice(self.data_bits)
        w_left = Signal(range(MAX_BURST_BEATS + 1))  # beats of the current W burst still to move
        w_in = w_slice.s
        w_move = w_in.tvalid & w_in.tready  # a beat from the FIFO into the slice
        w_fire = ax.wvalid & ax.wready
        strb_off = Signal()  # flushing: beats go out with wstrb = 0
        m.d.comb += [
            w_in.tvalid.eq((w_left != 0) & fifo.r_rdy), w_in.tdata.eq(fifo.r_data), w_in.tlast.eq(w_left == 1),
            ax.wvalid.eq(w_slice.m.tvalid), ax.wdata.eq(w_slice.m.tdata), ax.wlast.eq(w_slice.m.tlast),
            w_slice.m.tready.eq(ax.wready),
            ax.wstrb.eq(Mux(strb_off, 0, (1 << self.data_bytes) - 1)),
        ]
        with m.If(((w_left == 0) | (w_move & w_in.tlast)) & wlens.r_rdy):  # next burst, no bubble
            m.d.sync += w_left.eq(wlens.r_data + 1)
            m.d.comb += wlens.r_en.eq(1)
        with m.Elif(w_move):
            m.d.sync += w_left.eq(w_left - 1)
        with m.If(~ax.wvalid | ax.wready):  # the W payload may change only between beats
            m.d.sync += strb_off.eq(flush | dropping)
        m.d.sync += claimed.eq(claimed + Mux(issue, blen, 0) - w_move)
        discard = dropping & (claimed == 0)  # after the owed beats, the rest of the FIFO is dropped
        m.d.comb += fifo.r_en.eq(w_move | discard)
        with m.If(w_fire):
            m.d.sync += self.beats.eq(self.beats + 1)

        # --- B
        m.d.comb += ax.bready.eq(1)
        b_owed_next = Signal.like(b_owed)
        m.d.comb += b_owed_next.eq(b_owed + issue - ax.bvalid)
        m.d.sync += [b_owed.eq(b_owed_next), b_room.eq(b_owed_next != self.max_outstanding)]
        with m.If(ax.bvalid & ax.bresp[1]):  # SLVERR (2) or DECERR (3)
            m.d.sync += self.error[0].eq(1)

        drained = (claimed == 0) & (b_owed == 0) & (fifo.level == 0) & ~ax.awvalid & ~ax.wvalid
        with m.If(flush):
            m.d.sync += dropping.eq(1)
        with m.Elif(drained):
            m.d.sync += dropping.eq(0)
        m.d.comb += self.idle.eq(drained & ~split.busy & ~slot_valid & ~in_any & ~lenq.r_rdy & ~cmdq.r_rdy & ~flush)
        return m
