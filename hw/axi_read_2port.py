"""Two-port AXI4 read DMA: one wide stream fed by two half-width managers (S_AXI_HP0 and S_AXI_HP2).

One 64-bit HP port of the Zynq-7000 carries 1.14 GB/s at 142.857 MHz, less than the PYNQ-Z2's
DDR gives (about 1.785 GB/s); two ports on two DDR-controller ports carry it. This core splits every
command into bursts of at most 16 half-width beats, sends them alternately to the two ports, and
rebuilds the full-width stream in address order (docs/engine.md, "Two ports").
"""

from __future__ import annotations

from amaranth import Cat, Module, Mux, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from gpt_fpga.hw.axi import BURST_INCR, MAX_BURST_BEATS, Axi4ReadSignature
from gpt_fpga.hw.axi_read import ARCACHE, DEFAULT_MAX_OUTSTANDING, BurstSplitter, DmaCommandSignature, \
    check_dma_params
from gpt_fpga.hw.axis import AxiStreamSignature
from gpt_fpga.hw.fifo import BlockRamFifo
from gpt_fpga.hw.ping_pong_slice import PingPongSlice

__all__ = ["TwoPortReadDma", "PORTS"]

PORTS = 2
STREAM_BITS_CHOICES = (16, 32, 64, 128, 256, 512, 1024, 2048)


class TwoPortReadDma(wiring.Component):
    """AXI4 (AXI3-compatible) read DMA with a ``data_bits`` stream and two ``data_bits / 2`` managers.

    Same ``cmd``, ``m_data``, ``error``, ``idle`` and ``flush`` as :class:`hw.axi_read.AxiReadDma`
    at ``data_bits``. A command ``(addr, beats)`` (stream beats) is split by a
    :class:`hw.axi_read.BurstSplitter` into bursts of at most 8 stream beats that never cross a
    4 KiB boundary; each becomes one port burst of twice as many half-width beats (at most 16, so
    AXI3-legal), issued alternately on ``axi0`` and ``axi1`` (the first burst after reset or a
    flush on ``axi0``), ``arid`` 0, ``arsize = log2(data_bits / 16)``, ``arcache = 0b0011``,
    ``arprot = 0``. So a long read is split evenly over both ports, each with up to
    ``max_outstanding`` bursts in flight.

    Reorder: each port returns its bursts in order; two consecutive R beats of a port make one
    stream beat (low half first, as in memory) written to that port's FIFO, tagged with command
    end and burst end (the R beat with ``rlast``). A queue of the port of every issued burst, in
    address order, says which port's FIFO the next stream beats come from, up to a beat tagged
    burst end, so a port that answers later or slower than the other only delays the stream, never
    reorders it.

    Flow control as in AxiReadDma, per port: a burst is issued only when its port's FIFO has room
    for a longest burst (8 stream beats) counting the beats in flight (credits) and the port has
    fewer than ``max_outstanding`` bursts in flight, so ``rready`` is always 1 on both ports. The
    room is a register: the issue decision selects between two comparisons of the credits without
    its own burst (room for one longest burst, or for two if it issues), so no comparison or credit
    adder is on the loop from the issue decision back into the credits (timing). The port of the
    next burst and the free burst slots are registers too. A port issues only while its AR channel
    is empty (``arready`` reaches only ``arvalid``), so a port's bursts leave at least two cycles
    apart; a burst is 8 stream beats, so this costs no bandwidth. A beat's credit returns the cycle
    after it leaves its FIFO, into a register slice: the FIFO's block RAM output feeds a register,
    not the order mux.

    Parameters
    ----------
    data_bits : int
        Stream width, a power of two 16..2048 (128 on the PYNQ-Z2); each port is half as wide.
    addr_bits : int
        AXI address width, 12..64.
    max_outstanding : int
        Bursts in flight per port, 1..64 (default 8: 128 port beats, one beat per cycle per port
        up to a read latency of about 105 cycles, as AxiReadDma).
    fifo_depth : int or None
        Per port, its FIFO in port beats (even, 16..4096); default ``16 * max_outstanding``. Each FIFO
        holds ``fifo_depth / 2`` stream beats.

    Attributes
    ----------
    cmd : In(DmaCommandSignature(addr_bits))
        Commands in stream beats (``addr`` aligned to ``data_bits / 8``; low bits ignored).
    m_data : Out(AxiStreamSignature(data_bits))
        The data in address order, ``tlast`` on the last beat of each command.
    axi0, axi1 : Out(Axi4ReadSignature(addr_bits=addr_bits, data_bits=data_bits // 2))
        AR and R of the two managers (PYNQ-Z2: S_AXI_HP0 and S_AXI_HP2).
    error : Out(1)
        Sticky until reset (:attr:`ERROR_BITS` ``("rresp",)``): an R beat on either port had RRESP
        SLVERR or DECERR; its data are delivered anyway.
    beats : Out(32)
        R beats received on both ports together since reset (port beats, wraps at 2**32).
    idle : Out(1)
        No command in progress, no burst in flight on either port, no data waiting.
    only : In(2)
        0 or 3: alternate bursts over both ports; 1: every burst on ``axi0``; 2: every burst on ``axi1``
        (each port's bandwidth alone; change it only while idle).
    flush : In(1)
        Abort, exactly as AxiReadDma's: queued and partly issued commands are dropped, no new AR is
        issued (a presented AR stays until accepted), the FIFOs and the order queue empty at once
        (``m_data.tvalid`` falls the next cycle), the R beats still owed on both ports are received
        and dropped, and ``cmd.ready`` stays low until the last has arrived (then ``idle`` rises).

    Notes
    -----
    Throughput (:attr:`throughput`): one stream beat per cycle when both ports deliver one beat
    per cycle and the consumer keeps up (each port carries every other burst).

    Latency (:attr:`latency`, no stalls): a command's first ``arvalid`` (on ``axi0``) comes
    :attr:`ar_latency` (3) cycles after ``cmd``; a stream beat reaches ``m_data.tvalid``
    :attr:`r_latency` (5) cycles after the R handshake of its high half, which follows its low half
    by one cycle. The first beat thus appears ``latency`` (9) cycles plus the memory's AR-to-R
    latency after the command.

    A synchronous reset drops everything; bursts in flight on either port must be reset with it.
    """

    ERROR_BITS = ("rresp",)  #: names of ``error``'s bits, bit 0 first

    def __init__(self, *, data_bits: int = 128, addr_bits: int = 32,
                 max_outstanding: int = DEFAULT_MAX_OUTSTANDING, fifo_depth: int | None = None):
        if isinstance(data_bits, bool) or data_bits not in STREAM_BITS_CHOICES:
            raise ValueError(f"data_bits must be a power of two in [16, 2048] (two ports of half), got {data_bits!r}")
        self.port_bits = data_bits // 2
        self.fifo_depth = check_dma_params(self, self.port_bits, addr_bits, max_outstanding, fifo_depth)
        if self.fifo_depth % 2:
            raise ValueError(f"fifo_depth must be even (whole stream beats), got {fifo_depth!r}")
        self.data_bits, self.addr_bits, self.max_outstanding = data_bits, addr_bits, max_outstanding
        self.data_bytes = data_bits // 8
        self.size = (self.data_bytes // 2).bit_length() - 1  # arsize of a port
        port = Axi4ReadSignature(addr_bits=addr_bits, data_bits=self.port_bits)
        super().__init__({
            "cmd": In(DmaCommandSignature(addr_bits)),
            "m_data": Out(AxiStreamSignature(data_bits)),
            "axi0": Out(port),
            "axi1": Out(port),
            "error": Out(1),
            "beats": Out(32),
            "idle": Out(1),
            "flush": In(1),
            "only": In(2),
        })

    @property
    def ar_latency(self) -> int:
        """Cycles from a ``cmd`` handshake to the command's first ``arvalid`` (no stalls): 3."""
        return 3

    @property
    def r_latency(self) -> int:
        """Cycles from the R handshake of a stream beat's high half to its ``m_data.tvalid``: 5."""
        return 5

    @property
    def latency(self) -> int:
        """Cycles the DMA adds to a command's first beat: ``ar_latency + 1 + r_latency`` (9), the 1
        being the high half's R beat after the low half's."""
        return self.ar_latency + 1 + self.r_latency

    @property
    def throughput(self) -> int:
        """Stream beats per cycle in steady state (both ports at one beat per cycle): 1."""
        return 1

    def elaborate(self, platform):
        m = Module()
        cmd, flush = self.cmd, self.flush
        depth = self.fifo_depth // 2  # stream beats per port FIFO
        axis = (self.axi0, self.axi1)

        self.max_burst = MAX_BURST_BEATS // 2  # stream beats
        m.submodules.split = split = BurstSplitter(addr_bits=self.addr_bits, data_bytes=self.data_bytes,
                                                   max_beats=self.max_burst)
        # the port of every issued burst whose data have not all left, in address order (each beat carries
        # its burst's end: no beat count or comparison on the pop of a finished burst)
        order = BlockRamFifo(width=1, depth=4 * self.max_outstanding)
        m.submodules.order = ResetInserter(flush)(order)

        blen = split.burst_len  # stream beats, 1..8
        # the port of the next burst: a register (alternating when both are used), so `only` and the turn
        # stay off the issue decision, which fans out to both ports, the splitter and the order queue
        sel = Signal()
        dropping = Signal()  # a flush is draining: R beats owed are dropped
        issue = Signal()
        fifos, owed_all, can, outs = [], [], [], []
        for p, ax in enumerate(axis):
            # data FIFO: stream beat, command end, burst end; a flush empties it at once
            fifo = BlockRamFifo(width=self.data_bits + 2, depth=depth)
            m.submodules[f"fifo{p}"] = ResetInserter(flush)(fifo)
            # last-burst-of-command flag of each burst in flight on this port, in AR order
            bursts = SyncFIFO(width=1, depth=max(2, self.max_outstanding))
            m.submodules[f"bursts{p}"] = bursts
            owed = Signal(range(depth + 1), name=f"owed{p}")  # stream beats requested, not yet paired
            free = Signal(range(depth + 1), init=depth, name=f"free{p}")  # credits: depth - owed - level
            free_next = Signal(range(depth + 1), name=f"free{p}_next")
            go = Signal(name=f"issue{p}")
            m.d.comb += go.eq(issue & (sel == p))
            # room for the longest burst, as a register: the credit comparison is not on the path from
            # the issue decision back into the credit count (a shorter last burst waits for that room too).
            # It compares the credits without this cycle's burst, with room for two longest bursts if one
            # is issued now: the issue decision only selects between the two comparisons
            room = Signal(init=1, name=f"room{p}")
            free_kept = Signal(range(depth + 2), name=f"free{p}_kept")  # without a flush
            free_flushed = Signal(range(depth + 2), name=f"free{p}_flushed")  # with one (no burst issues)
            # the flush (an engine register that may sit far away) selects between the two finished
            # results, in the last logic level before the registers
            m.d.sync += [free.eq(Mux(flush, free_flushed, free_next)),
                         room.eq(Mux(flush, free_flushed >= self.max_burst,
                                     Mux(go, free_kept >= 2 * self.max_burst, free_kept >= self.max_burst)))]
            # a free burst slot, as a register from the burst FIFO's next level (its level compare stays
            # off the issue decision)
            slot = Signal(init=1, name=f"slot{p}")
            m.d.sync += slot.eq(bursts.level + go - (bursts.r_en & bursts.r_rdy) < self.max_outstanding)
            fifos.append(fifo)
            owed_all.append(owed)
            # a port issues only while its AR register is empty: arready (a port of the design, which
            # may sit anywhere) reaches only arvalid's own enable, not the issue decision and the credit
            # counts behind it. A port's bursts are at least two cycles apart; the ports alternate.
            can.append(~ax.arvalid & room & slot)

            with m.If(go):
                m.d.sync += [ax.araddr.eq(split.burst_addr), ax.arlen.eq((blen << 1) - 1), ax.arvalid.eq(1)]
            with m.Elif(ax.arready):
                m.d.sync += ax.arvalid.eq(0)
            m.d.comb += [bursts.w_en.eq(go), bursts.w_data.eq(split.burst_last),
                         ax.arsize.eq(self.size), ax.arburst.eq(BURST_INCR), ax.arid.eq(0),
                         ax.arcache.eq(ARCACHE), ax.arprot.eq(0)]

            # R: never back-pressured; registered once, then two beats paired into one stream beat
            m.d.comb += ax.rready.eq(1)
            r_valid, r_last = Signal(name=f"r{p}_valid"), Signal(name=f"r{p}_last")
            r_data, r_resp = Signal(self.port_bits, name=f"r{p}_data"), Signal(2, name=f"r{p}_resp")
            m.d.sync += [r_valid.eq(ax.rvalid), r_data.eq(ax.rdata), r_last.eq(ax.rlast), r_resp.eq(ax.rresp)]
            high = Signal(name=f"high{p}")  # the next R beat is a high half (bursts are whole pairs)
            low = Signal(self.port_bits, name=f"low{p}")
            with m.If(r_valid):
                m.d.sync += high.eq(~high)
                with m.If(~high):
                    m.d.sync += low.eq(r_data)
            pair = r_valid & high
            m.d.comb += [
                fifo.w_en.eq(pair & ~dropping),
                fifo.w_data.eq(Cat(low, r_data, r_last & bursts.r_data, r_last)),
                bursts.r_en.eq(r_valid & r_last),
            ]
            m.d.sync += owed.eq(owed + Mux(go, blen, 0) - pair)
            # the FIFO's block RAM output goes straight into the data registers of a ping-pong slice
            # (a register slice would put its skid multiplexer behind the block RAM's clock-to-out)
            out = PingPongSlice(self.data_bits + 2)
            m.submodules[f"out{p}"] = ResetInserter(flush)(out)
            m.d.comb += [out.s.tdata.eq(fifo.r_data[:self.data_bits + 2]), out.s.tlast.eq(0),
                         out.s.tvalid.eq(fifo.r_rdy), fifo.r_en.eq(out.s.tready)]
            outs.append(out)
            # a beat that left the FIFO returns its credit a cycle later (the pop stays off the credit sum)
            pop = Signal(name=f"pop{p}")
            m.d.sync += pop.eq(fifo.r_en & fifo.r_rdy & ~flush)
            # a flush empties the FIFO. Otherwise a dropped beat frees its credit on arrival, a delivered
            # one after it leaves
            m.d.comb += [free_flushed.eq(depth - owed + pair),
                         free_kept.eq(free + (pair & dropping) + pop), free_next.eq(free_kept - Mux(go, blen, 0))]
            with m.If(r_valid & r_resp[1]):  # SLVERR (2) or DECERR (3)
                m.d.sync += self.error.eq(1)

        # --- issue: in address order, alternating ports; a port without room holds both back. A burst's
        # port enters the order queue a cycle after its issue (a register: the issue decision fans out
        # to both ports, and the queue sat far from them); its first R beat comes later than that. The
        # queue's room is a register: at most one entry is added per cycle, so "three free entries a
        # cycle ago" means one is free when this cycle's issue is written (its level compare stays off
        # the issue decision).
        order_room = Signal()
        order_w, order_port = Signal(), Signal()
        m.d.sync += [order_room.eq(order.w_level < order.depth - 2), order_w.eq(issue), order_port.eq(sel)]
        m.d.comb += issue.eq(split.burst_valid & Mux(sel, can[1], can[0]) & order_room & ~flush)
        m.d.comb += [
            split.flush.eq(flush), split.burst_ready.eq(issue),
            split.cmd.addr.eq(cmd.addr), split.cmd.beats.eq(cmd.beats), split.cmd.valid.eq(cmd.valid & ~dropping),
            cmd.ready.eq(split.cmd.ready & ~dropping),
            order.w_en.eq(order_w), order.w_data.eq(order_port),
        ]
        turn, turn_next = Signal(), Signal()  # the port of the next burst when both are used
        with m.If(flush):
            m.d.comb += turn_next.eq(0)
        with m.Elif(issue):
            m.d.comb += turn_next.eq(~sel)
        with m.Else():
            m.d.comb += turn_next.eq(turn)
        m.d.sync += [turn.eq(turn_next), sel.eq(Mux(self.only == 1, 0, Mux(self.only == 2, 1, turn_next)))]
        owed_none = (owed_all[0] == 0) & (owed_all[1] == 0)
        with m.If(flush):
            m.d.sync += dropping.eq(1)
        with m.Elif(owed_none):
            m.d.sync += dropping.eq(0)
        m.d.sync += self.beats.eq(self.beats + self.axi0.rvalid + self.axi1.rvalid)

        # --- m_data: from the FIFO of the port the order queue names. The queue's head passes a
        # ping-pong slice: the pop of a finished burst moves that slice's read pointer, next to the port
        # slices and the multiplexer, not the queue's level counters (on the ECP5-85k those sat 30
        # columns away, and the pop crossed there and back in one cycle)
        order_head = PingPongSlice(1)
        m.submodules.order_head = ResetInserter(flush)(order_head)
        m.d.comb += [order_head.s.tdata.eq(order.r_data), order_head.s.tlast.eq(0),
                     order_head.s.tvalid.eq(order.r_rdy), order.r_en.eq(order_head.s.tready)]
        head = order_head.m.tdata[0]
        entry = Mux(head, outs[1].m.tdata, outs[0].m.tdata)
        valid = order_head.m.tvalid & Mux(head, outs[1].m.tvalid, outs[0].m.tvalid)
        # the reordered stream leaves through a ping-pong slice of its own: the order queue, the port
        # slices and this multiplexer stay together, and only registers face the consumer (on the
        # ECP5-85k the consumer's tready crossed the die into the port slices' read pointers and back)
        last_slice = PingPongSlice(self.data_bits)
        m.submodules.m_slice = ResetInserter(flush)(last_slice)
        wiring.connect(m, last_slice.m, wiring.flipped(self.m_data))
        take = order_head.m.tvalid & last_slice.s.tready
        burst_done = valid & last_slice.s.tready & entry[self.data_bits + 1]
        m.d.comb += [
            last_slice.s.tvalid.eq(valid),
            last_slice.s.tdata.eq(entry[:self.data_bits]),
            last_slice.s.tlast.eq(entry[self.data_bits]),
            outs[0].m.tready.eq(take & ~head),
            outs[1].m.tready.eq(take & head),
            order_head.m.tready.eq(burst_done),
            self.idle.eq(~split.busy & owed_none & (fifos[0].level == 0) & (fifos[1].level == 0) & ~outs[0].m.tvalid
                          & ~outs[1].m.tvalid & ~last_slice.m.tvalid & ~flush),
        ]
        return m
