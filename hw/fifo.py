"""A block-RAM FIFO whose memory tells the synthesizer that read/write collisions need no logic."""
from __future__ import annotations

from amaranth.lib.fifo import SyncFIFOBuffered

__all__ = ["BlockRamFifo", "NO_RW_CHECK"]

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
