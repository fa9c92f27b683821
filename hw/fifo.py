"""A block-RAM FIFO whose memory tells the synthesizer that read/write collisions need no logic."""
from __future__ import annotations

from amaranth import Elaboratable, Module, Mux, Signal
from amaranth.lib.fifo import FIFOInterface, SyncFIFOBuffered

__all__ = ["BlockRamFifo", "NO_RW_CHECK", "RegisterFifo"]

# yosys memory attribute: a read of the address written in the same cycle may return anything, so
# the mapper adds no collision logic (a write-data register and a multiplexer behind the block RAM's
# ~6 ns clock-to-out on the ECP5's 36-bit pseudo dual-port mode). Other tools ignore it.
NO_RW_CHECK = {"no_rw_check": 1}


class BlockRamFifo(SyncFIFOBuffered):
    """:class:`amaranth.lib.fifo.SyncFIFOBuffered`, its storage marked :data:`NO_RW_CHECK`.

    The FIFO never reads the entry it writes in the same cycle: the read and write addresses are
    equal only when the inner queue is empty (no read) or full (no write). So the collision
    behaviour the memory would otherwise have to keep (old data) is never observed, and the
    attribute changes no result, only the logic the synthesizer builds.

    Ports, latency and throughput: those of ``SyncFIFOBuffered`` (``r_data`` one cycle after
    ``r_en``; one beat per cycle each way).
    """

    def elaborate(self, platform):
        m = super().elaborate(platform)
        if self.depth >= 2:  # depths 0 and 1 have no memory
            m.submodules.storage.attrs.update(NO_RW_CHECK)
        return m


class RegisterFifo(Elaboratable, FIFOInterface):
    """A short first-word-fall-through FIFO in flip-flops whose head is a register.

    Entry 0 is the head: ``r_data`` is that register, with no multiplexer or memory read behind it
    (a small ``SyncFIFO`` reads its head through a LUT RAM, which the ECP5 places only in some slice
    types, so it may sit far from the logic it feeds). A read moves every entry down one; a write
    fills the first entry left empty.

    Ports, latency and throughput: those of ``SyncFIFO`` (a word written in one cycle is readable
    in the next; one word per cycle each way). ``w_rdy`` is low when the FIFO is full, even in a
    cycle that reads; ``level`` (as ``w_level`` and ``r_level``) counts the words held.
    """

    def __init__(self, *, width: int, depth: int):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        super().__init__(width=width, depth=depth)
        self.level = Signal(range(depth + 1))

    def elaborate(self, platform):
        m = Module()
        n = self.depth
        valid = [Signal(name=f"valid{i}") for i in range(n)]  # thermometer: entries 0..level-1
        data = [Signal(self.width, name=f"data{i}") for i in range(n)]
        read = self.r_en & valid[0]
        write = self.w_en & self.w_rdy
        m.d.comb += [self.r_rdy.eq(valid[0]), self.r_data.eq(data[0]), self.w_rdy.eq(~valid[n - 1]),
                     self.level.eq(sum(valid)), self.w_level.eq(self.level), self.r_level.eq(self.level)]
        # after the read's shift, entry i holds what entry i (or i + 1) held; the write takes the first
        # entry that is empty then
        kept = [Mux(read, valid[i + 1] if i + 1 < n else 0, valid[i]) for i in range(n)]
        for i in range(n):
            into = write & ~kept[i] & (kept[i - 1] if i else 1)
            with m.If(into):
                m.d.sync += [data[i].eq(self.w_data), valid[i].eq(1)]
            with m.Else():
                m.d.sync += valid[i].eq(kept[i])
                if i + 1 < n:
                    with m.If(read):
                        m.d.sync += data[i].eq(data[i + 1])
        return m
