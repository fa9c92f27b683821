"""Masked softmax over one row of int32 attention scores (``numerics.softmax``), bit exact."""

from __future__ import annotations

from amaranth import Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, ceil_log2

from gpt_fpga.hw.axis import AxiStreamSignature
from gpt_fpga.hw.fifo import NO_RW_CHECK
from gpt_fpga.contract import numerics

__all__ = ["Softmax"]

MAX_LEN_LIMIT = 1 << 16

# z pipeline (pass 1): input register, partial products, sum, shift, round+saturate.
_Z_STAGES = 5
# e pipeline (passes 2 and 4): BRAM read, BRAM register, zmax - z, exp ROM read, ROM register, e.
_E_STAGES = 6
# output tail (pass 4): e * r, >> (k - 1), round into the output register.
_P_STAGES = 3


class Softmax(wiring.Component):
    """Masked softmax of one row of int32 scores into uint16 probabilities (15 fraction bits).

    Computes ``numerics.softmax(scores, mask, mult, shift)`` for one row, bit for bit:
    ``z = requantize(score, mult, shift, 32)``; ``zmax`` over visible positions;
    ``e = EXP2_TABLE[(zmax - z) & 255] >> min((zmax - z) >> 8, 16)`` (0 where masked);
    ``S = sum(e)``; ``r = RECIP_TABLE[...]`` after normalising ``max(S, 2**15)`` to its top 16 bits;
    ``p = round_shift(e * r, k)``. A row with no visible position gives all zeros.

    Rows are buffered in two banks, each a ``2**ceil(log2(max_len))`` x 33-bit simple dual-port memory
    (z and the visibility bit; 4 BRAM36 in all at ``max_len`` = 2048): the receiver writes one bank
    while the processor reads the other, both banks' words are registered, then the bank is chosen
    (no multiplexer between a block RAM and its register). A row passes
    four phases:

    1. receive (the receiver): one score per cycle; z is computed by a 5-stage pipeline, written to
       the row's bank, and ``zmax`` tracked; the row's length and ``zmax`` are kept with its bank;
    2. exp and sum (the processor): the bank is read once, ``S`` accumulated (``n + 6`` cycles);
    3. reciprocal: ``max(S, 2**15)`` is normalised by a binary search (one step per cycle) and
       ``RECIP_TABLE`` read;
    4. send: the bank is read again, e recomputed, multiplied by ``r`` and rounded; one
       probability per cycle unless ``m_probs`` stalls.

    The receiver and the processor work on different rows at once (ping-pong): while the processor
    runs row h's phases 2-4, the receiver takes row h + 1 into the other bank. Rows leave in the
    order they arrived. ``s_scores.tready`` is high whenever the next bank is free (its previous row
    has been sent), so a row is taken while the row before it waits for ``m_probs`` (the engine
    streams head h + 1's scores while head h's probabilities wait for its V rows). The processor
    starts a row the cycle after the row's bank is complete and it has sent the row before; it sees
    only registers the receiver sets (its ``filled`` flags, the bank's ``n`` and ``zmax``), and
    ``s_scores.tready`` is a function of registers only.

    With no stalls and the core idle, the first probability is valid ``latency(n)`` cycles after
    the transfer of the row's last score (``n + 31`` at ``max_len`` = 2048); rows offered back to
    back are taken without a gap between the first two, and in the steady state a row leaves every
    ``cycles_per_row(n)`` cycles (``2 n + 23`` at 2048: the processor's phases 2-4 and one cycle to
    take the next row; the receiver's ``n`` cycles are hidden) (:meth:`latency`,
    :meth:`cycles_per_row`; both linear in ``n``).
    Multipliers: 32x15 split into two 16x15 products, and one 16x16 (3 DSP48E1). Tables
    ``EXP2_TABLE`` (256 x 16) and ``RECIP_TABLE`` (1024 x 16) are ROMs initialised from
    ``numerics.exp2_table()`` and ``recip_table()``.

    ``mult`` and ``shift`` must be stable from the first score of a row until its last one has
    been received. A synchronous reset abandons every row in the core (being received, waiting or
    being sent); the next row is exact.

    Errors (``error``, sticky until reset, bit names in :attr:`ERROR_BITS`): bit 0
    ``row_too_long`` rises when a row's ``max_len + 1``-th score is offered (``s_scores.tvalid``
    with ``max_len`` scores of the row taken and no ``tlast`` yet). That score is not taken: the
    bank never wraps, the row is never processed (a row before it is still sent), and from then on
    the core takes nothing (``s_scores.tready`` low) until a
    synchronous reset of the domain (the engine's soft reset, e.g. through ``ResetInserter``),
    after which the next row is exact.

    Parameters
    ----------
    max_len : int
        Longest row, 1..65536 (the buffer depth).

    Attributes
    ----------
    s_scores : In(AxiStreamSignature(32, user_width=1))
        One signed int32 score per beat; ``tuser`` = 1 when the position is visible; ``tlast`` on
        the row's last score.
    m_probs : Out(AxiStreamSignature(16))
        One uint16 probability per position, in order; ``tlast`` on the last.
    mult : In(15)
        Requantization multiplier of the scores (unsigned).
    shift : In(6)
        Requantization shift, 0..63 (values above 47 give z = 0, as the contract does).
    error : Out(1)
        Sticky error bits (:attr:`ERROR_BITS`), see above.
    """

    ERROR_BITS = ("row_too_long",)  #: names of ``error``'s bits, bit 0 first

    def __init__(self, *, max_len: int = numerics.MAX_CONTEXT):
        if not isinstance(max_len, int) or isinstance(max_len, bool) or not 1 <= max_len <= MAX_LEN_LIMIT:
            raise ValueError(f"max_len must be an int in [1, {MAX_LEN_LIMIT}], got {max_len!r}")
        self.max_len = max_len
        self._sum_width = bits_for(max_len << numerics.EXP_FRAC)  # S <= max_len * 2**15
        self._norm_steps = self._steps(self._sum_width - 16)
        super().__init__({
            "s_scores": In(AxiStreamSignature(32, user_width=1)),
            "m_probs": Out(AxiStreamSignature(16)),
            "mult": In(numerics.MULT_BITS),
            "shift": In(6),
            "error": Out(len(self.ERROR_BITS)),
        })

    @staticmethod
    def _steps(max_shift: int) -> list[int]:
        """Binary-search shift steps (descending powers of two) that reach any shift <= max_shift."""
        return [1 << j for j in reversed(range(bits_for(max_shift)))] if max_shift > 0 else []

    def latency(self, n: int) -> int:
        """Cycles from the transfer of the last score of an ``n``-element row to the first
        probability's ``tvalid``, when nothing stalls and the processor is idle: z pipeline, the
        row's zmax into its bank, the processor seeing it (a register) and taking the row, exp
        pass, reciprocal (SAFE, normalisation steps, ROM address, ROM data), then the e and output
        pipelines."""
        return _Z_STAGES + 3 + (n + _E_STAGES) + (1 + len(self._norm_steps) + 2) + (1 + _E_STAGES + _P_STAGES)

    def cycles_per_row(self, n: int) -> int:
        """Cycles between the first probabilities of two back-to-back ``n``-element rows in the
        steady state (the next row's scores in before the processor is free, nothing stalling): the
        processor's exp pass, reciprocal and send, and one cycle to take the next row
        (``2 n + 23`` at ``max_len`` = 2048)."""
        return 1 + (n + _E_STAGES) + (1 + len(self._norm_steps) + 2) + (1 + _E_STAGES + _P_STAGES) + (n - 1)

    def elaborate(self, platform):
        m = Module()
        sw, aw = self._sum_width, max(1, ceil_log2(self.max_len))
        nw = bits_for(self.max_len)

        # two banks (bit aw of the address): the receiver writes one while the processor reads the other
        # one memory per bank: each bank's block RAMs feed registers directly, and the bank multiplexer
        # comes after them (one memory of both banks put a multiplexer behind the block RAMs' ~6 ns
        # clock-to-out). A bank is read only while the receiver does not own it, so a read never needs
        # the data written in the same cycle (NO_RW_CHECK: no collision logic)
        banks = [Memory(shape=unsigned(33), depth=1 << aw, init=[], attrs=NO_RW_CHECK) for _ in range(2)]
        m.submodules.bank0, m.submodules.bank1 = banks
        wps, rps = [b.write_port() for b in banks], [b.read_port() for b in banks]
        m.submodules.exp_rom = exp_rom = Memory(shape=unsigned(16), depth=256,
                                                init=[int(v) for v in numerics.exp2_table()])
        m.submodules.recip_rom = recip_rom = Memory(shape=unsigned(16), depth=1 << numerics.RECIP_INDEX_BITS,
                                                    init=[int(v) for v in numerics.recip_table()])
        exp_rp, recip_rp = exp_rom.read_port(), recip_rom.read_port()

        s_in, out = self.s_scores, self.m_probs
        # ---- receiver: rows go into the two banks in turn ----
        # owned[b]: bank b holds a row whose last score has been taken and that has not been sent yet
        # (set by the receiver, cleared by the processor). Every input of s_scores.tready is a register.
        owned0, owned1 = Signal(), Signal()
        in_bank = Signal()  # the bank the row being offered goes into
        rcnt = Signal(range(self.max_len + 1))  # scores of this row taken so far
        full = Signal()  # rcnt == max_len, as a register
        too_long = Signal()  # sticky: a row offered more than max_len scores
        in_free = Mux(in_bank, ~owned1, ~owned0)
        m.d.comb += [s_in.tready.eq(in_free & ~full & ~too_long), self.error.eq(too_long)]
        with m.If(s_in.tvalid & full):
            m.d.sync += too_long.eq(1)
        in_fire = s_in.tvalid & s_in.tready
        with m.If(in_fire):
            m.d.sync += [rcnt.eq(Mux(s_in.tlast, 0, rcnt + 1)), full.eq(~s_in.tlast & (rcnt == self.max_len - 1))]

        # ---- pass 1: z = saturate(round_shift(score * mult, shift), 32), free-running pipeline ----
        z1_v, z1_m, z1_l, z1_s = Signal(), Signal(), Signal(), Signal(signed(32))
        m.d.sync += z1_v.eq(in_fire)
        with m.If(in_fire):
            m.d.sync += [z1_s.eq(s_in.tdata), z1_m.eq(s_in.tuser), z1_l.eq(s_in.tlast)]
        z2_v, z2_m, z2_l = Signal(), Signal(), Signal()
        z2_hi, z2_lo = Signal(signed(32)), Signal(unsigned(31))
        m.d.sync += [z2_v.eq(z1_v), z2_m.eq(z1_m), z2_l.eq(z1_l),
                     z2_hi.eq(z1_s[16:32].as_signed() * self.mult), z2_lo.eq(z1_s[0:16] * self.mult)]
        z3_v, z3_m, z3_l, z3_p = Signal(), Signal(), Signal(), Signal(signed(48))
        m.d.sync += [z3_v.eq(z2_v), z3_m.eq(z2_m), z3_l.eq(z2_l), z3_p.eq((z2_hi << 16) + z2_lo)]
        # round_shift(p, s) == ((2p >> s) + 1) >> 1 for every s >= 0
        z4_v, z4_m, z4_l, z4_q = Signal(), Signal(), Signal(), Signal(signed(49))
        m.d.sync += [z4_v.eq(z3_v), z4_m.eq(z3_m), z4_l.eq(z3_l), z4_q.eq((z3_p << 1) >> self.shift)]
        z5_v, z5_m, z5_l, z5_z = Signal(), Signal(), Signal(), Signal(signed(32))
        # z5_c: the z as a candidate for the row's maximum, -2**31 where masked (the mask stays off the
        # running maximum's loop)
        z5_c = Signal(signed(32))
        m.d.sync += [z5_v.eq(z4_v), z5_m.eq(z4_m), z5_l.eq(z4_l)]
        with m.If(z4_q >= (1 << 32) - 1):
            m.d.sync += z5_z.eq((1 << 31) - 1)
        with m.Elif(z4_q <= -(1 << 32) - 2):
            m.d.sync += z5_z.eq(-(1 << 31))
        with m.Else():
            m.d.sync += z5_z.eq((z4_q[0:34].as_signed() + 1) >> 1)
        with m.If(~z4_m | (z4_q <= -(1 << 32) - 2)):
            m.d.sync += z5_c.eq(-(1 << 31))
        with m.Elif(z4_q >= (1 << 32) - 1):
            m.d.sync += z5_c.eq((1 << 31) - 1)
        with m.Else():
            m.d.sync += z5_c.eq((z4_q[0:34].as_signed() + 1) >> 1)

        wcnt = Signal(nw)            # scores of this row written so far
        wbank = Signal()             # the bank the z pipeline writes
        zmax = Signal(signed(32))    # the row's running maximum (meaningless while `fresh`)
        fresh = Signal(init=1)       # the next z starts a row: zmax is taken as -2**31
        # the row's zmax goes to its bank a cycle after its last z (`closing`), from the zmax register:
        # the running maximum's comparison stays off the bank registers' enables
        closing, close_bank = Signal(), Signal()
        zmax_next = Signal(signed(32))
        m.d.comb += zmax_next.eq(Mux(fresh | (z5_c > zmax), z5_c, zmax))
        # per bank: the row's length and zmax (both hold from the row's end until it is sent)
        n_b = [Signal(nw, name=f"n_bank{b}") for b in range(2)]
        zmax_b = [Signal(signed(32), name=f"zmax_bank{b}") for b in range(2)]
        single_b = [Signal(name=f"single_bank{b}") for b in range(2)]  # n == 1, as a register
        # `ready` (the bank holds a row the processor has not taken) is filled ^ taken: each flag has one
        # owner, so neither side's logic sits in front of the other's registers (the two sides are
        # placed apart, and a shared flag took a round trip across the die)
        filled = [Signal(name=f"filled_bank{b}") for b in range(2)]   # toggled by the receiver
        taken = [Signal(name=f"taken_bank{b}") for b in range(2)]     # toggled by the processor
        # the processor sees `filled` through a register of its own (the receiver sits elsewhere on the
        # die, and the take decision fans out to all the processor's registers)
        filled_p = [Signal(name=f"filled_p_bank{b}") for b in range(2)]
        m.d.sync += [filled_p[b].eq(filled[b]) for b in range(2)]
        ready = [filled_p[b] ^ taken[b] for b in range(2)]
        for b, wp in enumerate(wps):
            m.d.comb += [wp.addr.eq(wcnt[:aw]), wp.data.eq(Cat(z5_z, z5_m)), wp.en.eq(z5_v & (wbank == b))]
        m.d.sync += closing.eq(0)
        with m.If(z5_v):
            m.d.sync += [zmax.eq(zmax_next), fresh.eq(z5_l)]
            with m.If(z5_l):
                m.d.sync += [wcnt.eq(0), wbank.eq(~wbank), closing.eq(1), close_bank.eq(wbank)]
                for b in range(2):
                    with m.If(wbank == b):
                        m.d.sync += [n_b[b].eq(wcnt + 1), single_b[b].eq(wcnt == 0)]
            with m.Else():
                m.d.sync += wcnt.eq(wcnt + 1)
        for b in range(2):
            with m.If(closing & (close_bank == b)):
                m.d.sync += [zmax_b[b].eq(zmax), filled[b].eq(~filled[b])]

        # ---- processor: the rows' banks in turn (psel); its own copies of n and zmax ----
        psel = Signal()
        n_m2 = Signal(nw)  # the row's length minus 2 (the last-address test)
        zmax_p = Signal(signed(32))
        # n - 2 and zmax follow bank psel in every cycle: the bank's values are written before its row is
        # ready and hold until the row is sent, so the take needs no enable on them (the take decision
        # stays on the processor's state; its registers are spread over the die with its memories)
        n_sel = Mux(psel, n_b[1], n_b[0])
        m.d.sync += [n_m2.eq(n_sel - 2), zmax_p.eq(Mux(psel, zmax_b[1], zmax_b[0]))]

        # ---- the processor's phases, one flip-flop each (one-hot): every phase's next value and every
        # enable is a small function of its own flip-flops (a binary state's decode and transition
        # logic sat between registers the placer had spread over the die with the memories) ----
        idle, exp_ph, send_ph = Signal(init=1), Signal(), Signal()
        safe = Signal()
        norm_ph = [Signal(name=f"norm_step{i}") for i in range(len(self._norm_steps))]
        raddr_ph, rdata_ph = Signal(), Signal()

        # ---- passes 2 and 4: e from the buffer, shared pipeline, stalled as a whole by `adv` ----
        adv = ~out.tvalid | out.tready
        raddr = Signal(nw)
        # reading: addresses left to issue in this pass; at_last: raddr is the row's last address. Both are
        # registers kept one address ahead, so the read address's enable is `reading & adv` (no phase
        # decode or length comparison in front of it)
        reading, at_last = Signal(), Signal()
        issue = reading & adv
        m.d.comb += [rp.addr.eq(raddr[:aw]) for rp in rps] + [rp.en.eq(adv) for rp in rps]
        with m.If(issue):
            m.d.sync += [raddr.eq(raddr + 1), reading.eq(~at_last), at_last.eq(raddr == n_m2)]

        # BRAM and ROM outputs are registered before any logic (ECP5 DP16KD clk-to-q is ~6 ns)
        e1_v, e1_l = Signal(), Signal()
        e1_b = Signal()  # the bank read
        e2_v, e2_l, e2_b = Signal(), Signal(), Signal()
        e2_word = [Signal(33, name=f"e2_word{b}") for b in range(2)]  # both banks' words, registered
        e2_z, e2_m = Signal(signed(32)), Signal()
        m.d.comb += Cat(e2_z, e2_m).eq(Mux(e2_b, e2_word[1], e2_word[0]))
        e3_v, e3_l, e3_m, e3_lo, e3_sh = Signal(), Signal(), Signal(), Signal(8), Signal(5)
        e4_v, e4_l, e4_m, e4_sh = Signal(), Signal(), Signal(), Signal(5)
        e5_v, e5_l, e5_m, e5_sh, e5_x = Signal(), Signal(), Signal(), Signal(5), Signal(16)
        e6_v, e6_l, e6_e = Signal(), Signal(), Signal(16)
        diff = Signal(signed(34))
        m.d.comb += [diff.eq(zmax_p - e2_z), exp_rp.addr.eq(e3_lo), exp_rp.en.eq(adv)]
        with m.If(adv):
            m.d.sync += [
                e1_v.eq(issue), e1_l.eq(at_last), e1_b.eq(psel),
                e2_v.eq(e1_v), e2_l.eq(e1_l), e2_b.eq(e1_b), e2_word[0].eq(rps[0].data), e2_word[1].eq(rps[1].data),
                # diff >= 0 at visible positions; the table index is diff & 255, the shift
                # min(diff >> 8, 16)
                e3_v.eq(e2_v), e3_l.eq(e2_l), e3_m.eq(e2_m), e3_lo.eq(diff[0:8]),
                e3_sh.eq(Mux(diff[12:] != 0, 16, diff[8:12])),
                e4_v.eq(e3_v), e4_l.eq(e3_l), e4_m.eq(e3_m), e4_sh.eq(e3_sh),
                e5_v.eq(e4_v), e5_l.eq(e4_l), e5_m.eq(e4_m), e5_sh.eq(e4_sh), e5_x.eq(exp_rp.data),
                e6_v.eq(e5_v), e6_l.eq(e5_l), e6_e.eq(Mux(e5_m, e5_x >> e5_sh, 0)),
            ]

        total = Signal(sw)
        k16 = Signal(range(max(2, sw - 15)))   # k - 16, k = bit_length(max(S, 2**15))
        r = Signal(16)

        # pass 4 tail: p = round_shift(e * r, k) = ((e * r >> (k - 1)) + 1) >> 1
        p5_v, p5_l, p5_prod = Signal(), Signal(), Signal(32)
        p6_v, p6_l, p6_q = Signal(), Signal(), Signal(17)
        with m.If(adv):
            m.d.sync += [
                p5_v.eq(e6_v & send_ph), p5_l.eq(e6_l), p5_prod.eq(e6_e * r),
                p6_v.eq(p5_v), p6_l.eq(p5_l), p6_q.eq((p5_prod >> 15) >> k16),
                out.tvalid.eq(p6_v), out.tlast.eq(p6_l), out.tdata.eq((p6_q + 1) >> 1),
            ]

        # ---- reciprocal: normalise max(S, 2**15) so its top bit is bit sw-1 ----
        norm = Signal(sw)
        lz = Signal(range(sw))
        sent = Signal()  # the row's last probability is transferred
        # the reciprocal ROM reads in every cycle: no enable from the processor's state (whose
        # register was placed beside the ROM, far from the rest of its logic)
        m.d.comb += [recip_rp.addr.eq(norm[sw - 11: sw - 1]), recip_rp.en.eq(1)]

        ready_sel = Mux(psel, ready[1], ready[0])
        take = idle & ready_sel      # the next row in order (bank psel) is in: take it
        exp_done = exp_ph & e6_v & e6_l
        m.d.comb += sent.eq(send_ph & out.tvalid & out.tready & out.tlast)
        # a pass starts with raddr at 0 (cleared when the row before was sent, and in RDATA). The take may
        # come the cycle after `psel` changes, before n_m2 follows it: "n == 1" is the bank's own flag
        start = take | rdata_ph
        with m.If(start):
            m.d.sync += [reading.eq(1), at_last.eq(Mux(psel, single_b[1], single_b[0]))]
        chain = [safe, *norm_ph, raddr_ph, rdata_ph]
        m.d.sync += [
            idle.eq((idle & ~ready_sel) | sent),
            exp_ph.eq(take | (exp_ph & ~(e6_v & e6_l))),
            send_ph.eq(rdata_ph | (send_ph & ~sent)),
            chain[0].eq(exp_done),
        ] + [b.eq(a) for a, b in zip(chain, chain[1:])]
        with m.If(take):
            for b in range(2):
                with m.If(psel == b):
                    m.d.sync += taken[b].eq(~taken[b])
        with m.If(exp_ph & e6_v):
            m.d.sync += total.eq(total + e6_e)
        with m.If(safe):
            m.d.sync += [norm.eq(Mux(total < (1 << numerics.EXP_FRAC), 1 << numerics.EXP_FRAC, total)),
                         lz.eq(0), total.eq(0)]
        for step, ph in zip(self._norm_steps, norm_ph):
            with m.If(ph & (norm[sw - step:] == 0)):
                m.d.sync += [norm.eq(norm << step), lz.eq(lz + step)]
        with m.If(raddr_ph):  # the ROM reads norm's address in every cycle (norm holds here)
            m.d.sync += k16.eq(sw - 16 - lz)
        with m.If(rdata_ph):
            m.d.sync += [r.eq(recip_rp.data), raddr.eq(0)]
        with m.If(sent):
            m.d.sync += [psel.eq(~psel), raddr.eq(0)]

        # the bank's row is out: the receiver may fill it again (a set wins, but the receiver never
        # sets the bank the processor is sending from)
        with m.If(sent & ~psel):
            m.d.sync += owned0.eq(0)
        with m.If(sent & psel):
            m.d.sync += owned1.eq(0)
        with m.If(in_fire & s_in.tlast):
            m.d.sync += in_bank.eq(~in_bank)
            with m.If(in_bank):
                m.d.sync += owned1.eq(1)
            with m.Else():
                m.d.sync += owned0.eq(1)
        return m
