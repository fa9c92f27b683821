"""A two-entry stream buffer whose consumer's ``tready`` drives two flip-flops, not the data registers."""

from __future__ import annotations

from amaranth import Cat, Module, Mux, Signal

from gpt_fpga.hw.register_slice import RegisterSlice

__all__ = ["PingPongSlice"]


class PingPongSlice(RegisterSlice):
    """Cuts the path from a stream's source to its consumer like :class:`RegisterSlice`, for a wide
    stream whose consumer decides ``m.tready`` late in the cycle.

    A register slice's output register is enabled by ``m.tready``: on a wide stream that is one
    late net fanning out to every data flip-flop. Here a beat is written into one of two entries
    (alternately) when it is taken on ``s``, whatever the consumer does; ``m.tready`` only moves a
    one-bit read pointer and clears the entry's valid flag. ``m.tdata`` is the read pointer's entry
    (a 2:1 multiplexer after the registers). ``s.tready``, ``m.tvalid`` and ``m.tdata`` depend on
    this component's registers only.

    :attr:`latency` 1 (a beat taken on ``s`` is offered on ``m`` the next cycle), :attr:`throughput`
    1 beat per cycle whatever the stall pattern; a synchronous reset empties both entries.
    Parameters and ports: those of :class:`RegisterSlice`.
    """

    def elaborate(self, platform):
        m = Module()
        s, o = self.s, self.m
        # tdata, tlast; no reset (a reset empties the entries through their flags): a flip-flop with
        # both an enable and a synchronous reset costs a LUT in front of it on the ECP5
        entry = [Signal(self.data_bits + 1, name=f"entry{i}", reset_less=True) for i in range(2)]
        full = [Signal(name=f"full{i}") for i in range(2)]
        wp, rp = Signal(), Signal()  # the entry the next beat goes into / comes out of
        m.d.comb += [s.tready.eq(~Mux(wp, full[1], full[0])), o.tvalid.eq(Mux(rp, full[1], full[0])),
                     Cat(o.tdata, o.tlast).eq(Mux(rp, entry[1], entry[0]))]
        push, pop = s.tvalid & s.tready, o.tvalid & o.tready
        for i in range(2):
            with m.If(push & (wp == i)):  # the data registers' enable: the source side only
                m.d.sync += [entry[i].eq(Cat(s.tdata, s.tlast)), full[i].eq(1)]
            with m.Elif(pop & (rp == i)):
                m.d.sync += full[i].eq(0)
        with m.If(push):
            m.d.sync += wp.eq(~wp)
        with m.If(pop):
            m.d.sync += rp.eq(~rp)
        return m
