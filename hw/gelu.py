"""GELU as an int8 -> int8 table lookup (``numerics.gelu``), one beat per cycle."""

from __future__ import annotations

from amaranth import Cat, Module, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from gpt_fpga.hw.axis import AxiStreamSignature

__all__ = ["Gelu"]

MAX_LANES = 64


class Gelu(wiring.Component):
    """Element-wise GELU on int8 lanes: ``y = table[x + 128]``, as ``numerics.gelu``.

    The 256-entry table is not fixed: the host loads ``numerics.gelu_table(in_scale,
    out_scale)`` for the layer through the table write port, entry ``i`` being the output for the
    input ``i - 128``. Every lane reads its own port of the table memory (one BRAM18 or a few
    LUT-RAMs per lane pair on 7-series).

    Latency is 1 cycle (``m_y`` is valid the cycle after the ``s_x`` transfer) and throughput is one
    beat of ``lanes`` elements per cycle. ``s_x.tready`` is ``~m_y.tvalid | m_y.tready`` (one
    output register, no bubble). ``tlast`` is carried through unchanged.

    The table survives a synchronous reset (memory is not reset); in-flight beats are dropped.
    Writing the table while beats are in flight gives each of those beats either the old or the new
    entry; load it between streams.

    ``error`` is always 0: every input beat is valid. It exists so that every core has one
    (the engine ORs them); :attr:`ERROR_BITS` is empty.

    Parameters
    ----------
    lanes : int
        int8 elements per beat, 1..64; lane ``j`` is ``tdata[8*j : 8*j+8]``.

    Attributes
    ----------
    s_x : In(AxiStreamSignature(8 * lanes))
        int8 inputs.
    m_y : Out(AxiStreamSignature(8 * lanes))
        int8 outputs, same lanes and ``tlast``.
    table_we : In(1)
        Write strobe: ``table[table_addr] <= table_data`` on the clock edge.
    table_addr : In(8)
        Table index, ``x + 128``.
    table_data : In(8)
        Table entry (int8 bit pattern).
    error : Out(1)
        Always 0 (no error cause).
    """

    ERROR_BITS = ()  #: names of ``error``'s bits: none

    def __init__(self, *, lanes: int = 1):
        if not isinstance(lanes, int) or isinstance(lanes, bool) or not 1 <= lanes <= MAX_LANES:
            raise ValueError(f"lanes must be an int in [1, {MAX_LANES}], got {lanes!r}")
        self.lanes = lanes
        super().__init__({
            "s_x": In(AxiStreamSignature(8 * lanes)),
            "m_y": Out(AxiStreamSignature(8 * lanes)),
            "table_we": In(1),
            "table_addr": In(8),
            "table_data": In(8),
            "error": Out(1),
        })

    @property
    def latency(self) -> int:
        """Cycles from an ``s_x`` transfer to the matching ``m_y.tvalid`` (no stalls): 1."""
        return 1

    @property
    def throughput(self) -> int:
        """Beats accepted per cycle when ``m_y`` never stalls: 1."""
        return 1

    def elaborate(self, platform):
        m = Module()
        m.submodules.table = table = Memory(shape=unsigned(8), depth=256, init=[])
        wp = table.write_port()
        m.d.comb += [wp.addr.eq(self.table_addr), wp.data.eq(self.table_data), wp.en.eq(self.table_we)]

        adv = ~self.m_y.tvalid | self.m_y.tready
        m.d.comb += [self.s_x.tready.eq(adv), self.error.eq(0)]

        outs = []
        for lane in range(self.lanes):
            rp = table.read_port()
            x = self.s_x.tdata[8 * lane: 8 * lane + 8]
            # index x + 128 of an int8 is the bit pattern with the sign bit flipped
            m.d.comb += [rp.addr.eq(Cat(x[:7], ~x[7])), rp.en.eq(adv)]
            outs.append(rp.data)
        m.d.comb += self.m_y.tdata.eq(Cat(*outs))

        with m.If(adv):
            m.d.sync += [self.m_y.tvalid.eq(self.s_x.tvalid), self.m_y.tlast.eq(self.s_x.tlast)]
        return m
