"""A 2:1 AXI-Stream width converter: each wide beat leaves as two half-width beats, low half first.

The two-port engine writes through its 64-bit port 0 (S_AXI_HP0) while its datapath is 128 bits
wide; this core sits between the datapath and the write DMA.
"""

from __future__ import annotations

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from gpt_fpga.hw.axis import AxiStreamSignature

__all__ = ["StreamDownsizer"]


class StreamDownsizer(wiring.Component):
    """``s_data`` (``data_bits``) to ``m_data`` (``data_bits / 2``): low half, then high half.

    ``tlast`` of a wide beat goes out with its high half, so a frame of ``n`` beats becomes a frame
    of ``2 n`` beats (byte order in memory unchanged).

    Parameters
    ----------
    data_bits : int
        Input width, even, at least 2.

    Attributes
    ----------
    s_data : In(AxiStreamSignature(data_bits))
    m_data : Out(AxiStreamSignature(data_bits // 2))

    Notes
    -----
    Latency (:attr:`latency`): 1 cycle from an ``s_data`` handshake to the low half on ``m_data``
    (one register holds the wide beat). Throughput: one ``m_data`` beat per cycle, i.e. one
    ``s_data`` beat every 2 cycles; ``s_data.tready`` follows ``m_data.tready`` combinationally
    when the register empties, so there is no bubble between wide beats.
    """

    def __init__(self, *, data_bits: int = 128):
        if isinstance(data_bits, bool) or not isinstance(data_bits, int) or data_bits < 2 or data_bits % 2:
            raise ValueError(f"data_bits must be an even int >= 2, got {data_bits!r}")
        self.data_bits = data_bits
        super().__init__({
            "s_data": In(AxiStreamSignature(data_bits)),
            "m_data": Out(AxiStreamSignature(data_bits // 2)),
        })

    @property
    def latency(self) -> int:
        """Cycles from an ``s_data`` handshake to its low half's ``m_data.tvalid``: 1."""
        return 1

    def elaborate(self, platform):
        m = Module()
        s, o = self.s_data, self.m_data
        half = self.data_bits // 2
        held = Signal(self.data_bits)
        last = Signal()
        full = Signal()  # a wide beat is held
        high = Signal()  # its low half has left
        leaves = full & high & o.tready  # the held beat's last half goes this cycle
        m.d.comb += [
            o.tvalid.eq(full),
            o.tdata.eq(Mux(high, held[half:], held[:half])),
            o.tlast.eq(last & high),
            s.tready.eq(~full | leaves),
        ]
        with m.If(full & o.tready):
            m.d.sync += high.eq(~high)
        with m.If(leaves):
            m.d.sync += full.eq(0)
        with m.If(s.tvalid & s.tready):
            m.d.sync += [held.eq(s.tdata), last.eq(s.tlast), full.eq(1), high.eq(0)]
        return m
