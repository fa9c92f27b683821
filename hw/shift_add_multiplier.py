"""An unsigned product one bit of the multiplier per cycle, in adders and flip-flops (no multiplier block)."""

from __future__ import annotations

from amaranth import Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["ShiftAddMultiplier"]


class ShiftAddMultiplier(wiring.Component):
    """``p = a * b`` for unsigned ``a`` and ``b``, by shift and add: ``b_bits`` cycles, one adder.

    For products the engine needs once per command (descriptor sizes and offsets): a multiplier
    block on such a path sits wherever the placer finds a free one, and its routes in and out cost
    more than a cycle; these operands are stable for the whole command, so a few cycles cost
    nothing.

    Latency (:attr:`latency`): ``b_bits`` cycles from the cycle ``start`` is high to the first
    cycle ``done`` is high with ``p`` valid. ``a`` and ``b`` are sampled with ``start``; ``p``
    then holds until the next ``start``. ``done`` is also high before the first ``start`` (with
    ``p`` = 0). A ``start`` while busy begins anew.

    Parameters
    ----------
    a_bits, b_bits : int
        Widths of the factors (``b_bits`` >= 1 sets the latency).

    Attributes
    ----------
    start : In(1)
        Sample ``a`` and ``b`` and begin.
    a : In(a_bits)
    b : In(b_bits)
    p : Out(a_bits + b_bits)
        The product, exact.
    done : Out(1)
        ``p`` is the product of the last ``a`` and ``b`` sampled.
    """

    def __init__(self, a_bits: int, b_bits: int):
        for name, v in (("a_bits", a_bits), ("b_bits", b_bits)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.a_bits, self.b_bits = a_bits, b_bits
        super().__init__({"start": In(1), "a": In(a_bits), "b": In(b_bits), "p": Out(a_bits + b_bits),
                          "done": Out(1)})

    @property
    def latency(self) -> int:
        """Cycles from ``start`` to ``done`` with the product."""
        return self.b_bits

    def elaborate(self, platform):
        m = Module()
        a_sh = Signal(len(self.p))  # a << (bits of b used so far)
        b_sh = Signal(self.b_bits)  # b >> (bits of b used so far)
        left = Signal(range(self.b_bits + 1))  # bits of b still to add
        # `done` (left == 0) is a register: whoever waits on it decodes a flip-flop, not a comparison
        done = Signal(init=1)
        m.d.comb += self.done.eq(done)
        with m.If(self.start):
            m.d.sync += [self.p.eq(Mux(self.b[0], self.a, 0)), a_sh.eq(self.a << 1), b_sh.eq(self.b >> 1),
                         left.eq(self.b_bits - 1), done.eq(self.b_bits == 1)]
        with m.Elif(left != 0):
            m.d.sync += [self.p.eq(self.p + Mux(b_sh[0], a_sh, 0)), a_sh.eq(a_sh << 1), b_sh.eq(b_sh >> 1),
                         left.eq(left - 1), done.eq(left == 1)]
        return m
