"""LayerNorm of one int32 residual row into int8 (``numerics.layernorm``), bit exact."""

from __future__ import annotations

import math

from amaranth import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from gpt_fpga.hw.axis import AxiStreamSignature
from gpt_fpga.contract.layout import LN_BETA_BITS, LN_GAMMA_BITS, LN_PARAM_BYTES
from gpt_fpga.contract import numerics

__all__ = ["LayerNorm"]

EPS_BITS = numerics.LN_EPS_BITS
SH_MAX = numerics.LN_MAX_SHIFT  # 17: bit_length(2**31) - 15, only for a row holding -2**31
EPS_DEPTH = 1 << ceil_log2(SH_MAX + 1)  # entries 0..SH_MAX are used
assert numerics.RESID_BITS - (numerics.LN_IN_BITS - 1) == SH_MAX  # mag >> 15 has SH_MAX bits
# pass pipelines
_FRONT = 4   # BRAM read, BRAM register, x >> sh, multiply (xs * xs or xs * d)
_TAIL = 9    # c, c*y halves, sum, shift, round, *gamma, +beta, shift, round+saturate (output register)


def _norm_steps(max_shift: int) -> list[int]:
    """Binary-search shift steps (descending powers of two) that reach any shift <= max_shift."""
    return [1 << j for j in reversed(range(bits_for(max_shift)))] if max_shift > 0 else []


class LayerNorm(wiring.Component):
    """LayerNorm of one row of int32 residual values into int8, as ``numerics.layernorm``.

    Per row of ``d`` values (``d`` = number of ``s_x`` beats up to ``tlast``), with the contract's
    names: ``sh`` from ``max|x|``; ``xs = x >> sh``; ``S = sum(xs)``, ``Q = sum(xs**2)``;
    ``V = d*Q - S**2``; ``(y, t) = rsqrt(V + E[sh])``; per element ``c = d*xs - S``,
    ``n = round_shift(c*y, 13 + t)``, ``out = sat8(round_shift(n*gamma_mult + beta, out_shift))``.

    The row is buffered in a ``max_d`` x 32-bit memory (4 BRAM36 at 4096). Phases per row:

    1. receive (one value per cycle): store, OR the magnitudes (``bit_length(max|x|)`` is the
       bit length of their OR);
    2. ``sh`` and ``E[sh]``; sums pass over the buffer: ``S`` and ``Q`` (``d + 4`` cycles);
    3. scalar: ``d*Q - S**2`` by a bit-serial multiplier (no DSP, one bit per cycle), ``+ E``,
       normalisation of ``u`` by binary search (one step per cycle), ``RSQRT_TABLE`` read;
    4. output pass over the buffer, one gamma/beta beat of ``s_params`` taken per element,
       one int8 per cycle unless ``m_y`` or ``s_params`` stalls.

    With no stalls the first output is valid :meth:`latency` ``(d)`` cycles after the transfer of
    the row's last value and a row occupies the core for :meth:`cycles_per_row` ``(d)`` cycles
    (both linear in ``d``, about ``3 d`` for long rows). ``s_x.tready`` is high only in phase 1.
    Multipliers: ``xs*xs`` / ``xs*d`` (shared), ``c*y`` in two halves, ``n*gamma``: 4 DSP48E1.
    ``RSQRT_TABLE`` is a ROM initialised from ``numerics.rsqrt_table()``.

    ``eps`` table: the host writes ``E[sh]`` for ``sh`` = 0..17, i.e.
    ``numerics.layernorm_eps_table(eps, d)``, at addresses 0..17 (17 is used only by a row
    holding ``-2**31``; addresses 18..31 are unused). Entries must be >= 1, as the contract's are.
    The table and ``out_shift`` must be stable while a row is processed; the table survives a
    synchronous reset, which abandons the row in progress.

    Errors (``error``, sticky until reset, bit names in :attr:`ERROR_BITS`): bit 0
    ``row_too_long`` rises when a row's ``max_d + 1``-th value is offered (``s_x.tvalid`` with
    ``max_d`` values of the row taken and no ``tlast`` yet). That value is not taken: the buffer
    never wraps, and from then on the core takes nothing (``s_x.tready`` low) until a synchronous
    reset of the domain (the engine's soft reset, e.g. through ``ResetInserter``), after which
    the next row is exact.

    Parameters
    ----------
    max_d : int
        Longest row, 1..``numerics.MAX_D_IN`` (4096; the contract's bit widths assume it).

    Attributes
    ----------
    s_x : In(AxiStreamSignature(32))
        int32 residual values; ``tlast`` on the row's last.
    s_params : In(AxiStreamSignature(64))
        Per element, in order, during the output pass: ``gamma_mult`` (int16) in ``tdata[0:16]``,
        ``beta`` (int32) in ``tdata[32:64]``; ``tlast`` is ignored.
    m_y : Out(AxiStreamSignature(8))
        int8 outputs; ``tlast`` on the row's last.
    out_shift : In(6)
        Output rounding shift, 0..63.
    eps_we : In(1)
        Write strobe of the eps table: ``E[eps_addr] <= eps_data`` on the clock edge.
    eps_addr : In(5)
        Table index: the input shift ``sh``.
    eps_data : In(48)
        ``E[sh]``, unsigned.
    error : Out(1)
        Sticky error bits (:attr:`ERROR_BITS`), see above.
    """

    ERROR_BITS = ("row_too_long",)  #: names of ``error``'s bits, bit 0 first

    def __init__(self, *, max_d: int = numerics.MAX_D_IN):
        if not isinstance(max_d, int) or isinstance(max_d, bool) or not 1 <= max_d <= numerics.MAX_D_IN:
            raise ValueError(f"max_d must be an int in [1, {numerics.MAX_D_IN}], got {max_d!r}")
        self.max_d = max_d
        # widths from the contract's bounds: |xs| <= 2**15, d <= max_d
        self._dw = bits_for(max_d)
        self._sw = bits_for(max_d << 15) + 1                   # S, signed
        self._qw = bits_for(max_d << 30)                       # Q
        self._vw = bits_for(max_d * (max_d << 30))             # d*Q and S**2 (V <= both)
        self._uw = max(self._vw, EPS_BITS) + 1                 # u = V + E
        self._cw = bits_for(max_d << 16) + 1                   # c = d*xs - S, signed
        # |n| <= 2**10 * sqrt(d) * (1 + 2**-10 table step + 2**-14 truncation) + 1
        self._nw = bits_for(math.ceil(1024 * math.sqrt(max_d) * 1.002) + 1) + 1
        self._u_steps = _norm_steps(self._uw - 1)
        self._sh_steps = _norm_steps(SH_MAX - 1)
        super().__init__({
            "s_x": In(AxiStreamSignature(32)),
            "s_params": In(AxiStreamSignature(8 * LN_PARAM_BYTES)),
            "m_y": Out(AxiStreamSignature(8)),
            "out_shift": In(6),
            "eps_we": In(1),
            "eps_addr": In(ceil_log2(EPS_DEPTH)),
            "eps_data": In(EPS_BITS),
            "error": Out(len(self.ERROR_BITS)),
        })

    def latency(self, d: int) -> int:
        """Cycles from the transfer of the last value of a ``d``-element row to the first
        output's ``tvalid`` when nothing stalls: magnitude OR, ``sh`` (normalisation steps, eps
        read), sums pass, serial ``d*Q - S**2``, ``+E``, the first step's zero test,
        normalisation of ``u``, table read, output pipeline."""
        front = 1 + 1 + len(self._sh_steps) + 2           # PEAK, SH, steps, EPS, EPSRD
        sums = d + _FRONT
        scalar = self._dw + (self._sw - 1) + 2 + len(self._u_steps) + 2   # MULQ, MULS, ADDE, UZ, steps, ROM
        return front + sums + scalar + (1 + _FRONT + _TAIL)

    def cycles_per_row(self, d: int) -> int:
        """Cycles between the first-value transfers of two back-to-back ``d``-element rows when
        nothing stalls: receive, latency, send."""
        return (d - 1) + self.latency(d) + d

    def elaborate(self, platform):
        m = Module()
        dw, sw, qw, vw, uw, cw, nw = self._dw, self._sw, self._qw, self._vw, self._uw, self._cw, self._nw
        aw = max(1, ceil_log2(self.max_d))

        m.submodules.buf = buf = Memory(shape=unsigned(32), depth=self.max_d, init=[])
        wp, rp = buf.write_port(), buf.read_port()
        m.submodules.eps = eps = Memory(shape=unsigned(EPS_BITS), depth=EPS_DEPTH, init=[])
        eps_wp, eps_rp = eps.write_port(), eps.read_port()
        m.d.comb += [eps_wp.addr.eq(self.eps_addr), eps_wp.data.eq(self.eps_data), eps_wp.en.eq(self.eps_we)]
        m.submodules.rsqrt_rom = rom = Memory(shape=unsigned(16), depth=len(numerics.RSQRT_TABLE),
                                              init=[int(v) for v in numerics.rsqrt_table()])
        rom_rp = rom.read_port()

        s_x, s_p, out = self.s_x, self.s_params, self.m_y

        # ---- phase 1: receive ----
        # s_x.tready from registers only: the input slice sits apart from the state machine, and the
        # handshake went from the state there and back into the state's enable in one cycle
        receiving = Signal(init=1)  # the state is RECV, as a register (set and cleared with it)
        wcnt = Signal(dw)
        too_long = Signal()  # sticky: a row offered more than max_d values
        full = Signal()  # wcnt == max_d, as a register
        m.d.comb += [s_x.tready.eq(receiving & ~full & ~too_long), self.error.eq(too_long)]
        with m.If(receiving & s_x.tvalid & full):
            m.d.sync += too_long.eq(1)
        in_fire = s_x.tvalid & s_x.tready
        m.d.comb += [wp.addr.eq(wcnt[:aw]), wp.data.eq(s_x.tdata), wp.en.eq(in_fire)]
        x1_v, x1 = Signal(), Signal(signed(32))
        mag = Signal(32)  # OR of |x|; bit_length(max|x|) == bit_length(OR|x|)
        m.d.sync += x1_v.eq(in_fire)
        with m.If(in_fire):
            m.d.sync += [x1.eq(s_x.tdata), wcnt.eq(wcnt + 1), full.eq(wcnt == self.max_d - 1)]
        with m.If(x1_v):
            m.d.sync += mag.eq(mag | Mux(x1 < 0, -x1, x1)[:32])

        # ---- row constants ----
        d = Signal(dw)
        sh = Signal(range(SH_MAX + 1))
        e_val = Signal(EPS_BITS)
        s_sum, q_sum = Signal(signed(sw)), Signal(qw)
        y, s_rnd = Signal(16), Signal(6)   # rsqrt mantissa and 13 + t

        # ---- shared front of the sums and output passes, stalled as a whole by `adv` ----
        adv = ~out.tvalid | out.tready
        summing, sending = Signal(), Signal()
        raddr = Signal(dw)
        more = Signal()  # raddr != d, as a register (its 12-bit compare stays off s_params.tready)
        m.d.comb += s_p.tready.eq(sending & more & adv)
        issue = Mux(sending, s_p.tvalid & s_p.tready, summing & more & adv)
        m.d.comb += [rp.addr.eq(raddr[:aw]), rp.en.eq(adv)]
        with m.If(issue):
            m.d.sync += [raddr.eq(raddr + 1), more.eq(raddr + 1 != d)]

        gamma_in = s_p.tdata[LN_GAMMA_BITS[0]:LN_GAMMA_BITS[1]].as_signed()
        beta_in = s_p.tdata[LN_BETA_BITS[0]:LN_BETA_BITS[1]].as_signed()
        # the BRAM output is registered before any logic (ECP5 DP16KD clk-to-q is ~6 ns)
        f1_v, f1_l, f1_g, f1_b = Signal(), Signal(), Signal(signed(16)), Signal(signed(32))
        f2_v, f2_l, f2_g, f2_b, f2_x = Signal(), Signal(), Signal(signed(16)), Signal(signed(32)), Signal(signed(32))
        f3_v, f3_l, f3_g, f3_b, f3_xs = Signal(), Signal(), Signal(signed(16)), Signal(signed(32)), Signal(signed(16))
        f3_mb = Signal(signed(max(16, dw + 1)))  # second multiplier operand, registered
        f4_v, f4_l, f4_g, f4_b, f4_xs = Signal(), Signal(), Signal(signed(16)), Signal(signed(32)), Signal(signed(16))
        f4_prod = Signal(signed(32))
        xs = f2_x >> sh
        with m.If(adv):
            m.d.sync += [
                f1_v.eq(issue), f1_l.eq(raddr == d - 1), f1_g.eq(gamma_in), f1_b.eq(beta_in),
                f2_v.eq(f1_v), f2_l.eq(f1_l), f2_g.eq(f1_g), f2_b.eq(f1_b), f2_x.eq(rp.data),
                f3_v.eq(f2_v), f3_l.eq(f2_l), f3_g.eq(f2_g), f3_b.eq(f2_b), f3_xs.eq(xs),
                f3_mb.eq(Mux(sending, d, xs)),   # one multiplier: xs * xs (sums), xs * d (output)
                f4_v.eq(f3_v), f4_l.eq(f3_l), f4_g.eq(f3_g), f4_b.eq(f3_b), f4_xs.eq(f3_xs),
                f4_prod.eq(f3_xs * f3_mb),
            ]

        # ---- output tail ----
        o4_v, o4_l, o4_g, o4_b, o4_c = Signal(), Signal(), Signal(signed(16)), Signal(signed(32)), Signal(signed(cw))
        o5_v, o5_l, o5_g, o5_b = Signal(), Signal(), Signal(signed(16)), Signal(signed(32))
        o5_hi, o5_lo = Signal(signed(cw - 17 + 17)), Signal(unsigned(33))
        o6_v, o6_l, o6_g, o6_b, o6_cy = Signal(), Signal(), Signal(signed(16)), Signal(signed(32)), Signal(signed(cw + 17))
        o7_v, o7_l, o7_g, o7_b, o7_q = Signal(), Signal(), Signal(signed(16)), Signal(signed(32)), Signal(signed(nw + 2))
        o8_v, o8_l, o8_g, o8_b, o8_n = Signal(), Signal(), Signal(signed(16)), Signal(signed(32)), Signal(signed(nw))
        o9_v, o9_l, o9_b, o9_ng = Signal(), Signal(), Signal(signed(32)), Signal(signed(nw + 16))
        vw2 = max(nw + 16, 32) + 1  # n * gamma + beta
        o10_v, o10_l, o10_v2 = Signal(), Signal(), Signal(signed(vw2))
        o11_v, o11_l, o11_w = Signal(), Signal(), Signal(signed(vw2 + 1))
        with m.If(adv):
            m.d.sync += [
                o4_v.eq(f4_v & sending), o4_l.eq(f4_l), o4_g.eq(f4_g), o4_b.eq(f4_b),
                o4_c.eq(f4_prod - s_sum),
                # c * y as two DSP-sized products: c = hi * 2**17 + lo
                o5_v.eq(o4_v), o5_l.eq(o4_l), o5_g.eq(o4_g), o5_b.eq(o4_b),
                o5_hi.eq(o4_c[17:].as_signed() * y), o5_lo.eq(o4_c[0:17] * y),
                o6_v.eq(o5_v), o6_l.eq(o5_l), o6_g.eq(o5_g), o6_b.eq(o5_b),
                o6_cy.eq((o5_hi << 17) + o5_lo),
                # round_shift(v, s) == ((2v >> s) + 1) >> 1; |n| < 2**(nw-1) so the top bits go
                o7_v.eq(o6_v), o7_l.eq(o6_l), o7_g.eq(o6_g), o7_b.eq(o6_b),
                o7_q.eq((o6_cy << 1) >> s_rnd),
                o8_v.eq(o7_v), o8_l.eq(o7_l), o8_g.eq(o7_g), o8_b.eq(o7_b),
                o8_n.eq((o7_q + 1) >> 1),
                o9_v.eq(o8_v), o9_l.eq(o8_l), o9_b.eq(o8_b), o9_ng.eq(o8_n * o8_g),
                o10_v.eq(o9_v), o10_l.eq(o9_l), o10_v2.eq(o9_ng + o9_b),
                o11_v.eq(o10_v), o11_l.eq(o10_l), o11_w.eq((o10_v2 << 1) >> self.out_shift),
                out.tvalid.eq(o11_v), out.tlast.eq(o11_l),
            ]
            # saturate((w + 1) >> 1, 8)
            with m.If(o11_w >= 255):
                m.d.sync += out.tdata.eq(127)
            with m.Elif(o11_w <= -258):
                m.d.sync += out.tdata.eq(-128)
            with m.Else():
                m.d.sync += out.tdata.eq((o11_w[0:10].as_signed() + 1) >> 1)

        # ---- scalar: u = d*Q - S**2 + E by one bit-serial multiplier; normalise; rsqrt ----
        acc = Signal(vw + 1)
        mcand = Signal(vw)
        mplier = Signal(max(dw, sw - 1))
        count = Signal(range(max(dw, sw) + 1))
        norm = Signal(uw)
        lz = Signal(range(uw + 1))
        m.d.comb += [eps_rp.addr.eq(sh), rom_rp.addr.eq(0)]
        bl = uw - lz  # bit_length(u) once normalised
        odd = bl[0]
        # m = u >> 2t (or << -2t) lies in [2**14, 2**16): its top 9 (odd bl) or 10 (even) bits
        idx = Mux(odd, norm[uw - 9: uw], norm[uw - 10: uw]) - 256

        # Normalisation by a binary search, one step per state. `top_zero` is the step's zero test
        # (the window's bits of `norm` are all zero), a register computed one state ahead from the
        # register values (both outcomes of the step before, selected by that step's own flag): no wide
        # OR of `norm` lies in front of its enables.
        top_zero = Signal()
        mag_top = Signal(uw)
        m.d.comb += mag_top.eq(mag[numerics.LN_IN_BITS - 1:])

        def zero(value, lo, hi):
            """value[lo:hi] == 0, where bits below 0 (shifted in) are zero."""
            lo = max(lo, 0)
            return Const(1) if hi <= lo else value[lo:hi] == 0

        def normalise(prefix, steps, top, after):
            """States prefix{step}: shift `norm` left by `step` while its `step` bits below `top` are zero."""
            for i, step in enumerate(steps):
                with m.State(f"{prefix}{step}"):
                    with m.If(top_zero):
                        m.d.sync += [norm.eq(norm << step), lz.eq(lz + step)]
                    if i + 1 < len(steps):
                        nxt = steps[i + 1]
                        m.d.sync += top_zero.eq(Mux(top_zero, zero(norm, top - step - nxt, top - step),
                                                    zero(norm, top - nxt, top)))
                        m.next = f"{prefix}{nxt}"
                    else:
                        m.next = after

        with m.FSM():
            with m.State("RECV"):
                with m.If(in_fire & s_x.tlast):
                    m.d.sync += receiving.eq(0)
                    m.next = "PEAK"
            with m.State("PEAK"):  # the last magnitude is ORed in at this edge
                m.d.sync += d.eq(wcnt)
                m.next = "SH"
            with m.State("SH"):  # sh = max(bit_length(mag) - 15, 0) = bit_length(mag >> 15)
                m.d.sync += [norm.eq(mag_top), lz.eq(0)]
                if self._sh_steps:
                    m.d.sync += top_zero.eq(zero(mag_top, SH_MAX - self._sh_steps[0], SH_MAX))
                    m.next = f"SH{self._sh_steps[0]}"
                else:
                    m.next = "EPS"
            normalise("SH", self._sh_steps, SH_MAX, "EPS")
            with m.State("EPS"):
                m.d.sync += sh.eq(Mux(norm[0:SH_MAX] == 0, 0, SH_MAX - lz))
                m.next = "EPSRD"
            with m.State("EPSRD"):
                m.d.comb += eps_rp.en.eq(1)
                m.d.sync += [raddr.eq(0), more.eq(1), s_sum.eq(0), q_sum.eq(0)]  # d >= 1
                m.next = "SUMS"
            with m.State("SUMS"):
                m.d.comb += summing.eq(1)
                with m.If(f4_v):
                    m.d.sync += [s_sum.eq(s_sum + f4_xs), q_sum.eq(q_sum + f4_prod)]
                    with m.If(f4_l):
                        m.next = "MULQ"
                m.d.sync += [e_val.eq(eps_rp.data), acc.eq(0), mcand.eq(q_sum + Mux(f4_v, f4_prod, 0)),
                             mplier.eq(d), count.eq(dw)]
            with m.State("MULQ"):  # acc = d * Q
                with m.If(mplier[0]):
                    m.d.sync += acc.eq(acc + mcand)
                m.d.sync += [mcand.eq(mcand << 1), mplier.eq(mplier >> 1), count.eq(count - 1)]
                with m.If(count == 1):
                    mag_s = Mux(s_sum < 0, -s_sum, s_sum)
                    m.d.sync += [mcand.eq(mag_s), mplier.eq(mag_s), count.eq(sw - 1)]
                    m.next = "MULS"
            with m.State("MULS"):  # acc -= S * S (acc stays >= V >= 0)
                with m.If(mplier[0]):
                    m.d.sync += acc.eq(acc - mcand)
                m.d.sync += [mcand.eq(mcand << 1), mplier.eq(mplier >> 1), count.eq(count - 1)]
                with m.If(count == 1):
                    m.next = "ADDE"
            with m.State("ADDE"):
                m.d.sync += [norm.eq(acc + e_val), lz.eq(0)]
                m.next = "UZ"
            with m.State("UZ"):  # the first step's zero test, from u in its register (not from the adder)
                m.d.sync += top_zero.eq(zero(norm, uw - self._u_steps[0], uw))
                m.next = f"U{self._u_steps[0]}"
            normalise("U", self._u_steps, uw, "RADDR")
            with m.State("RADDR"):
                m.d.comb += [rom_rp.addr.eq(idx), rom_rp.en.eq(1)]
                # s = 13 + t, t = (bl - 15) >> 1 (floor); bl >= 1 so s >= 6
                m.d.sync += s_rnd.eq(((bl + 11) >> 1))
                m.next = "RDATA"
            with m.State("RDATA"):
                m.d.sync += [y.eq(rom_rp.data), raddr.eq(0), more.eq(1)]
                m.next = "SEND"
            with m.State("SEND"):
                m.d.comb += sending.eq(1)
                with m.If(out.tvalid & out.tready & out.tlast):
                    m.d.sync += [wcnt.eq(0), full.eq(0), mag.eq(0), receiving.eq(1)]
                    m.next = "RECV"
        return m
