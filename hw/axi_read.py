"""AXI4 read DMA: (address, beats) commands in, one AXI-Stream frame of data per command out.

The engine streams its weights and KV cache from DDR through this core at one bus beat per cycle,
so its throughput is the decode speed. Bursts follow the Zynq-7000 HP port rules of
:mod:`hw.axi` (AXI3: at most 16 beats, never across a 4 KiB boundary, one ID), and several are
kept in flight to hide the DDR read latency.
"""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from gpt_fpga.hw.axi import BOUNDARY_BYTES, BURST_INCR, MAX_BURST_BEATS, Axi4ReadSignature
from gpt_fpga.hw.axis import AxiStreamSignature
from gpt_fpga.hw.fifo import BlockRamFifo

__all__ = ["AxiReadDma", "BurstSplitter", "DmaCommandSignature", "check_dma_params", "CMD_BEATS_BITS",
           "ARCACHE", "DEFAULT_MAX_OUTSTANDING"]

CMD_BEATS_BITS = 24  # a command moves 1 .. 2**24 - 1 beats (128 MiB at 64 bits)
ARCACHE = 0b0011  # normal non-cacheable bufferable (AxCACHE, AXI4 encoding)
DEFAULT_MAX_OUTSTANDING = 8  # 8 x 16 beats in flight cover the HP port's ~85-cycle read latency


class DmaCommandSignature(wiring.Signature):
    """One DMA command, from the issuer's side (``In(DmaCommandSignature(...))`` on the DMA).

    Members: ``addr`` (byte address, aligned to the bus width: the low ``log2(data_bits / 8)`` bits
    are ignored), ``beats`` (bus beats to move, 1 .. 2**24 - 1; 0 is accepted and does nothing),
    ``valid`` / ``ready`` (the command is taken on a clock edge where both are high).
    """

    def __init__(self, addr_bits: int = 32):
        self.addr_bits = addr_bits
        super().__init__({"addr": Out(addr_bits), "beats": Out(CMD_BEATS_BITS), "valid": Out(1), "ready": In(1)})

    def __eq__(self, other):
        return isinstance(other, DmaCommandSignature) and self.addr_bits == other.addr_bits

    def __repr__(self):
        return f"DmaCommandSignature({self.addr_bits})"


def check_dma_params(component, data_bits, addr_bits, max_outstanding, fifo_depth) -> int:
    """Validate the parameters shared by the read and write DMAs; return the FIFO depth."""
    def bad(msg):  # a rejected core's never-used warning is filtered once, in pyproject.toml
        raise ValueError(msg)

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    # arsize / awsize is 3 bits (up to 128 bytes) and a 4 KiB page must hold whole 16-beat bursts
    if not is_int(data_bits) or data_bits not in (8, 16, 32, 64, 128, 256, 512, 1024):
        bad(f"data_bits must be a power of two in [8, 1024], got {data_bits!r}")
    if not is_int(addr_bits) or not 12 <= addr_bits <= 64:
        bad(f"addr_bits must be an int in [12, 64], got {addr_bits!r}")
    if not is_int(max_outstanding) or not 1 <= max_outstanding <= 64:
        bad(f"max_outstanding must be an int in [1, 64], got {max_outstanding!r}")
    if fifo_depth is None:
        fifo_depth = MAX_BURST_BEATS * max_outstanding
    if not is_int(fifo_depth) or not MAX_BURST_BEATS <= fifo_depth <= 4096:
        bad(f"fifo_depth must be an int in [{MAX_BURST_BEATS}, 4096] (a whole burst must fit), got {fifo_depth!r}")
    return fifo_depth


class BurstSplitter(wiring.Component):
    """Splits commands into bursts of at most ``max_beats`` (default 16) beats that never cross a
    4 KiB boundary, one burst per cycle, into an output register (so the DMAs' issue logic sees
    registered lengths).

    A command taken on ``cmd`` gives its first burst on ``burst_*`` 2 cycles later; the next
    command is taken in the cycle after its last burst is split off. ``cmd.ready`` is a register
    (the splitter is idle) and ``burst_ready`` reaches only the output and skid registers: a
    burst that cannot move on waits in the skid, so the split (address and count arithmetic)
    never waits on the consumer's issue logic within a cycle (timing). One burst per cycle while
    ``burst_ready`` is high. ``flush`` drops the command in progress and the bursts held.
    ``busy``: a command or a burst is held.
    """

    def __init__(self, *, addr_bits: int, data_bytes: int, max_beats: int = MAX_BURST_BEATS):
        assert max_beats & (max_beats - 1) == 0 and 1 < max_beats <= BOUNDARY_BYTES // data_bytes, max_beats
        self.addr_bits, self.data_bytes, self.max_beats = addr_bits, data_bytes, max_beats
        self.size = data_bytes.bit_length() - 1
        super().__init__({
            "cmd": In(DmaCommandSignature(addr_bits)),
            "burst_valid": Out(1), "burst_ready": In(1),
            "burst_addr": Out(addr_bits),  # byte address, bus-aligned
            "burst_len": Out(range(max_beats + 1)),  # beats, 1..max_beats
            "burst_last": Out(1),  # the last burst of its command
            "flush": In(1), "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        act = Signal()  # a command is being split
        cur = Signal(self.addr_bits - self.size)  # beat address of its next burst
        rem = Signal(CMD_BEATS_BITS)  # its beats not yet in a burst
        # A page holds a whole number of max_beats blocks, so a burst crosses the page end only if it
        # starts in the page's last block: there it may take at most max_beats - (cur mod max_beats).
        mb, lg = self.max_beats, self.max_beats.bit_length() - 1
        page_bits = (BOUNDARY_BYTES // self.data_bytes).bit_length() - 1  # log2(beats per page) >= lg
        near_end = cur[lg:page_bits].all() if page_bits > lg else C(1, 1)
        limit = Signal(range(mb + 1))  # 1..max_beats beats allowed from cur
        m.d.comb += limit.eq(Mux(near_end, mb - cur[:lg], mb))
        # The command's last burst takes what is left; every other burst takes `limit` beats, so
        # the address and count updates do not wait for the comparison.
        last = (rem[lg + 1:] == 0) & (rem[:lg + 1] <= limit)
        blen = Mux(last, rem[:lg + 1], limit)
        # a burst is split off whenever the skid is free: only registers decide it
        skid_valid, skid_addr = Signal(), Signal.like(self.burst_addr)
        skid_len, skid_last = Signal.like(self.burst_len), Signal()
        step = act & ~skid_valid
        take = ~act & ~self.flush
        m.d.comb += [self.cmd.ready.eq(take), self.busy.eq(act | self.burst_valid | skid_valid)]
        new_burst = (Cat(C(0, self.size), cur), blen, last)
        with m.If(step):
            m.d.sync += [cur.eq(cur + limit), rem.eq(rem - limit)]
            with m.If(last):
                m.d.sync += act.eq(0)
        outputs = (self.burst_addr, self.burst_len, self.burst_last)
        with m.If(~self.burst_valid | self.burst_ready):  # the output register takes the skid first
            with m.If(skid_valid):
                m.d.sync += [o.eq(v) for o, v in zip(outputs, (skid_addr, skid_len, skid_last))]
                m.d.sync += [self.burst_valid.eq(1), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += [o.eq(v) for o, v in zip(outputs, new_burst)]
                m.d.sync += self.burst_valid.eq(step)
        with m.Elif(step):  # the output stalls: the burst split off this cycle waits in the skid
            m.d.sync += [o.eq(v) for o, v in zip((skid_addr, skid_len, skid_last), new_burst)]
            m.d.sync += skid_valid.eq(1)
        with m.If(self.cmd.valid & take):
            m.d.sync += [act.eq(self.cmd.beats != 0), cur.eq(self.cmd.addr[self.size:]), rem.eq(self.cmd.beats)]
        with m.If(self.flush):
            m.d.sync += [act.eq(0), self.burst_valid.eq(0), skid_valid.eq(0)]
        return m


class AxiReadDma(wiring.Component):
    """AXI4 (AXI3-compatible) read DMA with several bursts in flight and credit-based flow control.

    Each command ``(addr, beats)`` taken on ``cmd`` becomes INCR bursts of at most 16 beats that
    never cross a 4 KiB boundary (a burst ends at ``min(16 beats, the command's end, the page
    end)``), issued in address order on ``axi`` AR with ``arid`` 0, ``arsize = log2(data_bits/8)``,
    ``arcache = 0b0011`` and ``arprot = 0``. The data come out on ``m_data`` in order, one frame
    per command, ``tlast`` on its last beat. Commands queue back to back: the next command is taken
    in the cycle after its predecessor's last burst is split off (:class:`BurstSplitter`, one or
    two bursts ahead of AR), so ``m_data`` sees no bubble between commands while bursts are in flight.

    Flow control: a burst's AR is issued only when the data FIFO has room for all its beats, counting
    the beats of every burst already in flight (credits), and at most ``max_outstanding`` bursts are
    in flight. So ``rready`` is always 1 (R is never back-pressured and the interconnect is never
    blocked by a slow ``m_data`` consumer); a stalled ``m_data`` only stops new ARs.

    Parameters
    ----------
    data_bits : int
        Bus and stream width: a power of two, 8..1024 (64 for the Zynq-7000 HP ports).
    addr_bits : int
        AXI address width, 12..64.
    max_outstanding : int
        Bursts in flight (AR issued, last R beat not yet received), 1..64. The default, 8, with the
        default FIFO holds 128 beats in flight: one beat per cycle up to a read latency of about
        105 cycles (measured: 1.000 beats/cycle at 100, 0.97 at 110, 0.90 at 120).
    fifo_depth : int or None
        Data FIFO entries (beats), 16..4096; default ``16 * max_outstanding`` (one BRAM36 at 64 bits).
        It bounds the beats in flight, so 1 beat/cycle needs ``fifo_depth`` above the read latency
        plus :attr:`latency` plus 16.

    Attributes
    ----------
    cmd : In(DmaCommandSignature(addr_bits))
        Commands: ``addr`` (byte address, bus-aligned; low bits ignored), ``beats`` (1 .. 2**24-1;
        0 is taken and ignored). ``cmd.ready`` is low while the splitter holds a command whose
        last burst is not yet split off, during ``flush`` and until a flush has drained; it may
        depend combinationally on ``arready`` and ``m_data.tready``.
    m_data : Out(AxiStreamSignature(data_bits))
        The data, ``tlast`` on the last beat of each command.
    axi : Out(Axi4ReadSignature(addr_bits=addr_bits, data_bits=data_bits))
        AR and R channels of the manager port.
    error : Out(1)
        Sticky until reset (:attr:`ERROR_BITS` ``("rresp",)``): some R beat had RRESP SLVERR or
        DECERR. Its data are delivered anyway (whatever the subordinate returned).
    beats : Out(32)
        R beats received since reset (wraps at 2**32), dropped ones included.
    idle : Out(1)
        No command in progress, no burst in flight, no data waiting in the FIFO.
    flush : In(1)
        Abort, in any cycle it is high: queued and partly issued commands are dropped, no new AR is
        issued (an AR already presented stays until accepted, as AXI requires), the data in the FIFO
        are discarded at once (``m_data.tvalid`` falls the next cycle, the frame in progress ends
        without ``tlast``), and the R beats still owed are received and dropped. ``cmd.ready`` stays
        low until the last of them has arrived; then ``idle`` rises and the next command's data are
        exact.

    Notes
    -----
    Throughput: one beat per cycle on ``m_data`` (and R) in steady state when the consumer keeps up
    and the read latency is below the in-flight capacity above. Measured over a 4096-beat read
    (sim/tb/axi_read.py), counted from the command: 0.992 beats/cycle with a 24-cycle memory,
    0.978 with an 85-cycle one (the HP port's worst), 1.000 from the first beat on.

    Latency (:attr:`latency`, no stalls): a command's first ``arvalid`` comes :attr:`ar_latency`
    (3) cycles after its ``cmd`` handshake (burst splitter, then the AR register), and an R beat
    reaches ``m_data.tvalid`` :attr:`r_latency` (3) cycles after its R handshake (a register on
    the R inputs, then the two-cycle FIFO); the first beat of a command thus appears ``latency``
    (6) cycles plus the memory's AR-to-R latency after the command.

    A synchronous reset drops everything; bursts still in flight on the interconnect must be reset
    with it (their beats would otherwise be taken for the next command's).
    """

    ERROR_BITS = ("rresp",)  #: names of ``error``'s bits, bit 0 first

    def __init__(self, *, data_bits: int = 64, addr_bits: int = 32,
                 max_outstanding: int = DEFAULT_MAX_OUTSTANDING, fifo_depth: int | None = None):
        self.fifo_depth = check_dma_params(self, data_bits, addr_bits, max_outstanding, fifo_depth)
        self.data_bits, self.addr_bits, self.max_outstanding = data_bits, addr_bits, max_outstanding
        self.data_bytes = data_bits // 8
        self.size = self.data_bytes.bit_length() - 1  # arsize
        super().__init__({
            "cmd": In(DmaCommandSignature(addr_bits)),
            "m_data": Out(AxiStreamSignature(data_bits)),
            "axi": Out(Axi4ReadSignature(addr_bits=addr_bits, data_bits=data_bits)),
            "error": Out(1),
            "beats": Out(32),
            "idle": Out(1),
            "flush": In(1),
        })

    @property
    def ar_latency(self) -> int:
        """Cycles from a ``cmd`` handshake to the command's first ``arvalid`` (no stalls): 3."""
        return 3

    @property
    def r_latency(self) -> int:
        """Cycles from an R handshake to that beat's ``m_data.tvalid`` (empty FIFO): 3."""
        return 3

    @property
    def latency(self) -> int:
        """Cycles the DMA adds to a command's first beat: ``ar_latency + r_latency`` (6); the first
        ``m_data.tvalid`` is this many cycles plus the memory's AR-to-R latency after ``cmd``."""
        return self.ar_latency + self.r_latency

    @property
    def throughput(self) -> int:
        """Beats per cycle in steady state (consumer keeping up, latency covered by the credits): 1."""
        return 1

    def elaborate(self, platform):
        m = Module()
        ax, cmd, flush = self.axi, self.cmd, self.flush
        depth = self.fifo_depth

        # --- data FIFO (data + tlast); a flush empties it at once
        fifo = BlockRamFifo(width=self.data_bits + 1, depth=depth)
        m.submodules.fifo = ResetInserter(flush)(fifo)
        # last-burst-of-command flag of each burst in flight, in AR order
        m.submodules.bursts = bursts = SyncFIFO(width=1, depth=max(2, self.max_outstanding))

        # --- splitter / AR issue
        m.submodules.split = split = BurstSplitter(addr_bits=self.addr_bits, data_bytes=self.data_bytes)
        owed = Signal(range(depth + 1))  # beats requested (AR loaded) not yet in the R register
        free = Signal(range(depth + 1), init=depth)  # credits: depth - owed - fifo.level
        dropping = Signal()  # a flush is draining: R beats owed are dropped

        blen = split.burst_len
        ar_free = ~ax.arvalid | ax.arready
        issue = split.burst_valid & ar_free & (free >= blen) & (bursts.level != self.max_outstanding) & ~flush
        m.d.comb += [
            split.flush.eq(flush), split.burst_ready.eq(issue),
            split.cmd.addr.eq(cmd.addr), split.cmd.beats.eq(cmd.beats), split.cmd.valid.eq(cmd.valid & ~dropping),
            cmd.ready.eq(split.cmd.ready & ~dropping),
        ]
        with m.If(issue):
            m.d.sync += [ax.araddr.eq(split.burst_addr), ax.arlen.eq(blen - 1), ax.arvalid.eq(1)]
        with m.Elif(ax.arready):
            m.d.sync += ax.arvalid.eq(0)
        m.d.comb += [bursts.w_en.eq(issue), bursts.w_data.eq(split.burst_last)]
        m.d.comb += [ax.arsize.eq(self.size), ax.arburst.eq(BURST_INCR), ax.arid.eq(0),
                     ax.arcache.eq(ARCACHE), ax.arprot.eq(0)]

        # --- R: never back-pressured; registered once, then into the FIFO
        m.d.comb += ax.rready.eq(1)
        r_valid, r_last = Signal(), Signal()
        r_data, r_resp = Signal(self.data_bits), Signal(2)
        m.d.sync += [r_valid.eq(ax.rvalid), r_data.eq(ax.rdata), r_last.eq(ax.rlast), r_resp.eq(ax.rresp)]
        m.d.comb += [
            fifo.w_en.eq(r_valid & ~dropping),
            fifo.w_data.eq(Cat(r_data, r_last & bursts.r_data)),
            bursts.r_en.eq(r_valid & r_last),
        ]
        m.d.sync += owed.eq(owed + Mux(issue, blen, 0) - r_valid)
        pop = self.m_data.tvalid & self.m_data.tready
        with m.If(flush):  # the FIFO empties; no burst is issued
            m.d.sync += free.eq(depth - owed + r_valid)
        with m.Else():  # a dropped beat frees its credit on arrival, a delivered one when it leaves
            m.d.sync += free.eq(free - Mux(issue, blen, 0) + (r_valid & dropping) + pop)
        with m.If(flush):
            m.d.sync += dropping.eq(1)
        with m.Elif(owed == 0):
            m.d.sync += dropping.eq(0)

        with m.If(r_valid & r_resp[1]):  # SLVERR (2) or DECERR (3)
            m.d.sync += self.error.eq(1)
        with m.If(ax.rvalid):
            m.d.sync += self.beats.eq(self.beats + 1)

        # --- m_data
        m.d.comb += [
            self.m_data.tvalid.eq(fifo.r_rdy),
            self.m_data.tdata.eq(fifo.r_data[:self.data_bits]),
            self.m_data.tlast.eq(fifo.r_data[self.data_bits]),
            fifo.r_en.eq(self.m_data.tready),
            self.idle.eq(~split.busy & (owed == 0) & (fifo.level == 0) & ~flush),
        ]
        return m
