"""A register slice (skid buffer) for an AXI-Stream style stream: every output comes from a register."""

from __future__ import annotations

from amaranth import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from gpt_fpga.hw.axis import AxiStreamSignature

__all__ = ["RegisterSlice"]


class RegisterSlice(wiring.Component):
    """Cuts every combinational path through a stream: ``m.tvalid``, ``m.tdata``, ``m.tlast`` and
    ``s.tready`` are register outputs, so neither a block RAM's clock-to-out on the source side nor
    a consumer's ``tready`` logic reaches the other side within the cycle.

    A beat taken on ``s`` is offered on ``m`` the next cycle (:attr:`latency` 1). A second register
    (the skid) takes the beat that arrives in the cycle ``m`` stalls, so ``s.tready`` need not
    depend on ``m.tready``: one beat per cycle in steady state (:attr:`throughput` 1), whatever the
    stall pattern, and no beat is lost or repeated. A synchronous reset empties both registers.

    Parameters
    ----------
    data_bits : int
        Width of ``tdata``.

    Attributes
    ----------
    s : In(AxiStreamSignature(data_bits))
        The stream in.
    m : Out(AxiStreamSignature(data_bits))
        The same beats, in order, one cycle later at the earliest.
    """

    def __init__(self, data_bits: int):
        if not isinstance(data_bits, int) or isinstance(data_bits, bool) or data_bits < 1:
            raise ValueError(f"data_bits must be a positive int, got {data_bits!r}")
        self.data_bits = data_bits
        super().__init__({"s": In(AxiStreamSignature(data_bits)), "m": Out(AxiStreamSignature(data_bits))})

    @property
    def latency(self) -> int:
        """Cycles from a beat's ``s`` handshake to its ``m.tvalid`` (no stall): 1."""
        return 1

    @property
    def throughput(self) -> int:
        """Beats per cycle while ``m`` takes them: 1."""
        return 1

    def elaborate(self, platform):
        m = Module()
        s, o = self.s, self.m
        skid_valid = Signal()
        # the data registers have no reset (the valid flags say what they hold): a flip-flop with both
        # an enable and a synchronous reset costs a LUT in front of it on the ECP5
        skid_data, skid_last = Signal(self.data_bits, reset_less=True), Signal(reset_less=True)
        out_data, out_last = Signal(self.data_bits, reset_less=True), Signal(reset_less=True)
        m.d.comb += [s.tready.eq(~skid_valid), o.tdata.eq(out_data), o.tlast.eq(out_last)]
        with m.If(~o.tvalid | o.tready):  # the output register takes the skid's beat first, else the input's
            with m.If(skid_valid):
                m.d.sync += [out_data.eq(skid_data), out_last.eq(skid_last), o.tvalid.eq(1), skid_valid.eq(0)]
            with m.Else():
                m.d.sync += [out_data.eq(s.tdata), out_last.eq(s.tlast), o.tvalid.eq(s.tvalid)]
        with m.Elif(s.tvalid & ~skid_valid):  # the output stalls: the beat taken this cycle waits in the skid
            m.d.sync += [skid_data.eq(s.tdata), skid_last.eq(s.tlast), skid_valid.eq(1)]
        return m
