"""Streaming matrix-vector product with per-row requantization (int8 or grouped int4 weights).

Arithmetic is :func:`numerics.matvec` bit for bit; the weight stream is the row layout of
:mod:`contract.layout`.
"""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from gpt_fpga.hw.axis import AxiStreamSignature
from gpt_fpga.hw.fifo import BlockRamFifo
from gpt_fpga.hw.lut_products import mul_int4, mul_int8_pairs
from gpt_fpga.contract.layout import (BUS_BITS_CHOICES, GROUP_CHOICES, ROW_HEADER_FIXED_BYTES, WEIGHT_FORMATS, ceil_div,
                                      header_bits)
from gpt_fpga.contract.numerics import ACC_BITS, MAX_D_IN, MAX_ROWS, MAX_SHIFT

__all__ = ["MatVec"]

ROWS_BITS = MAX_ROWS.bit_length()  # n_rows: up to numerics.MAX_ROWS (the largest matrix is an lm_head)
OUT_FIFO_DEPTH = 16  # results waiting for m_out; also bounds the rows in flight (credits)
TREE_LEVELS_PER_STAGE = 2  # adder-tree levels between pipeline registers


def _fits(value, bits: int):
    """``value`` (signed) is in the range of a ``bits``-bit signed integer: its bits from ``bits - 1``
    up are all 0 or all 1."""
    top = value[bits - 1:]
    return (top == 0) | (top == (1 << len(top)) - 1)


def _log2(n: int) -> int:
    assert n > 0 and n & (n - 1) == 0, n
    return n.bit_length() - 1


class MatVec(wiring.Component):
    """Matrix-vector product ``y = requantize(W a + bias)`` on streamed weights.

    The int8 activation vector arrives first on ``s_act`` and is kept on chip; then the matrix
    streams on ``s_weights`` row by row (header beats, then weight beats, exactly as
    :func:`layout.pack_matrix` writes them) and one requantized value per row leaves on
    ``m_out``. Each output equals ``numerics.matvec(w_eff, a, bias, mult, shift, 8 or 32)``
    with ``w_eff = w`` (int8) or ``expand_int4(w, group_scale, group)`` (int4).

    Parameters
    ----------
    bus_bits : int
        Width of ``s_act`` and ``s_weights``: 64 or 128.
    weights : str
        ``"int8"`` (``bus_bits / 8`` weights per beat) or ``"int4"`` (``bus_bits / 4`` weights per
        beat, two per byte, low nibble first, with one uint8 scale per ``group`` inputs).
    group : int
        int4 group size: 32, 64 or 128 (validated but unused for int8).
    max_d_in : int
        Largest input length; a multiple of the weights per beat, at most
        :data:`numerics.MAX_D_IN` (4096, the bound of the 32-bit accumulator argument). Sizes
        the activation memory.

    Attributes
    ----------
    s_act : In(AxiStreamSignature(bus_bits))
        Activations: byte ``k`` of beat ``n`` is ``a[n * bus_bits/8 + k]`` (int8); exactly
        ``ceil(d_in / (bus_bits/8))`` beats (bytes past ``d_in`` are ignored), ``tlast`` on the
        last of them and on no other. ``tready`` is high from reset, or from the cycle after the
        previous matvec's last weight beat, until the vector is complete (and never after an
        error).
    s_weights : In(AxiStreamSignature(bus_bits))
        ``n_rows`` rows of ``HwLayout.row_beats(d_in)`` beats each (header: bias int32, mult
        uint16 - all 16 bits are used -, shift 0..47, reserved byte, int4 group scales; weight
        beats zero past ``d_in``). ``tlast`` on the last beat of the whole matrix and on no other
        (one DMA transfer per matrix raises it there).
    m_out : Out(AxiStreamSignature(32))
        One signed result per row, sign-extended to 32 bits; ``tlast`` on the last row.
    d_in : In(range(max_d_in + 1))
        Input length, 1..max_d_in.
    n_rows : In(16)
        Output length (rows), 1..65535.
    out_int8 : In(1)
        1: saturate results to int8; 0: to int32.
    error : Out(4)
        Sticky error bits (:attr:`ERROR_BITS`), cleared only by the domain's reset; see below.

    ``d_in``, ``n_rows`` and ``out_int8`` are sampled while the activations are received: they must
    be stable from the cycle before the first ``s_act`` beat of a matvec (the activation count's end
    is registered from ``d_in``) until its last ``s_act`` beat is accepted, and may then change for the next matvec while this one's weights still stream.

    Errors: a bit of ``error`` rises on the clock edge that accepts the offending beat:

    * bit 0 ``config``: an ``s_act`` beat while ``d_in`` is 0 or above ``max_d_in``, or
      ``n_rows`` is 0;
    * bit 1 ``act_tlast``: ``s_act.tlast`` missing on the vector's last beat, or present on an
      earlier one (a long or short activation transfer); not checked on a ``config`` error;
    * bit 2 ``weights_tlast``: ``s_weights.tlast`` missing on the matrix's last beat, or present
      on an earlier one (a long or short matrix transfer, or one transfer per row);
    * bit 3 ``shift``: a row header's shift byte above ``numerics.MAX_SHIFT`` (47), which
      ``fixed_model.Matrix.from_stream`` refuses too (``ImageError``).

    From the cycle after an error the core takes no more beats on ``s_act`` or ``s_weights``
    (``tready`` low) until reset; results already in its pipeline still leave on ``m_out``, and
    the command must be abandoned. A synchronous reset of the domain (the engine's soft reset,
    e.g. through ``ResetInserter``) clears ``error`` and every stream state, and the next matvec
    is exact.

    Notes
    -----
    Throughput: one ``s_weights`` beat (header or weight) per cycle, with no bubble between rows
    or between back-to-back matvecs, as long as ``m_out`` keeps up (it carries one value per row,
    so any ``m_out`` duty cycle of at least ``1 / row_beats`` is enough). The activation load
    costs ``ceil(d_in / (bus_bits/8))`` cycles per matvec. A credit counter stops new rows
    (never a row in progress) when ``OUT_FIFO_DEPTH - 1`` results are waiting or in flight.

    Latency (:attr:`latency`): cycles from the handshake of a row's last weight beat to
    ``m_out.tvalid`` for that row when the output queue is empty: 15 (int8, and int4 at 64 bits),
    16 (int4, 128-bit).

    Datapath: act memory (one weight beat's worth of activations per word, one block RAM) read in
    step with the weight beat and registered again before the multipliers; ``bus_bits/8``
    int8 x int8 products per cycle as shift-and-add in LUTs (pairs of partial products, then
    their sum, a register between), or ``bus_bits/4`` int4 x int8 products as shift-and-add in
    LUTs; a pipelined adder tree (a register every two levels);
    int4: the beat sum (17 bits) times the group's
    uint8 scale (every beat lies in one group, and ``sum_g q_g sum_i w_i a_i`` is the same
    integer as ``sum_beats q_g(beat) * beat_sum``); a 32-bit accumulator seeded with the bias;
    then requantization overlapped with the next row: ``acc * mult`` as two 16x16 partial
    products, round half up as ``(floor(p / 2**(shift-1)) + 1) >> 1`` (equal to
    ``floor((p + 2**(shift-1)) / 2**shift)``) through a two-stage barrel shifter, and saturation.
    The datapath uses the low 6 bits of the header's shift byte (a larger one raises
    ``error.shift``). Multipliers: 2 (int4: 3); the per-lane products are in LUTs.
    """

    ERROR_BITS = ("config", "act_tlast", "weights_tlast", "shift")  #: names of ``error``'s bits, bit 0 first

    def __init__(self, *, bus_bits: int = 64, weights: str = "int8", group: int = 32,
                 max_d_in: int = MAX_D_IN):
        if bus_bits not in BUS_BITS_CHOICES:
            raise ValueError(f"bus_bits must be one of {BUS_BITS_CHOICES}, got {bus_bits!r}")
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {weights!r}")
        if group not in GROUP_CHOICES:
            raise ValueError(f"group must be one of {GROUP_CHOICES}, got {group!r}")
        per_beat = bus_bits // 8 * (2 if weights == "int4" else 1)
        if weights == "int4" and group % per_beat:
            raise ValueError(f"group must be a multiple of the {per_beat} int4 weights per beat, so that "
                             f"every beat lies in one group; got {group}")
        if not isinstance(max_d_in, int) or max_d_in < per_beat or max_d_in % per_beat:
            raise ValueError(f"max_d_in must be a positive multiple of the {per_beat} weights per beat "
                             f"(bus_bits={bus_bits}, weights={weights!r}), got {max_d_in!r}")
        if max_d_in > MAX_D_IN:
            raise ValueError(f"max_d_in must be <= {MAX_D_IN} (numerics.MAX_D_IN: the bound under "
                             f"which the {ACC_BITS}-bit accumulator cannot overflow), got {max_d_in}")
        self.bus_bits, self.weights, self.group, self.max_d_in = bus_bits, weights, group, max_d_in
        self.bus_bytes = bus_bits // 8
        self.weights_per_beat = per_beat
        super().__init__({
            "s_act": In(AxiStreamSignature(bus_bits)),
            "s_weights": In(AxiStreamSignature(bus_bits)),
            "m_out": Out(AxiStreamSignature(32)),
            "d_in": In(range(max_d_in + 1)),
            "n_rows": In(ROWS_BITS),
            "out_int8": In(1),
            "error": Out(len(self.ERROR_BITS)),
        })

    # ---- static pipeline shape -------------------------------------------------------------
    @property
    def _int4(self) -> bool:
        return self.weights == "int4"

    @property
    def _tree_stages(self) -> int:
        levels = _log2(self.weights_per_beat)
        return ceil_div(levels, TREE_LEVELS_PER_STAGE)

    @property
    def latency(self) -> int:
        """Cycles from the handshake of a row's last weight beat to its ``m_out.tvalid`` (queue empty)."""
        # S1 (beat, act word), S2 (multiplier inputs), S3 (products, or int8's partial products),
        # tree, int4 scale or (before the tree) int8's S3b, accumulator, 6 requant stages (the last
        # one writes the output queue), 2 cycles through SyncFIFOBuffered.
        return 3 + self._tree_stages + 1 + 1 + 6 + 2

    @property
    def max_header_beats(self) -> int:
        extra = ceil_div(self.max_d_in, self.group) if self._int4 else 0
        return ceil_div(ROW_HEADER_FIXED_BYTES + extra, self.bus_bytes)

    # ---- gateware ----------------------------------------------------------------------------
    def elaborate(self, platform):
        m = Module()
        B, P = self.bus_bytes, self.weights_per_beat
        lg_b, lg_p = _log2(B), _log2(P)
        ratio = P // B  # activation beats per weight beat: 1 (int8) or 2 (int4)
        int4 = self._int4
        sw, sa, mo = self.s_weights, self.s_act, self.m_out

        def reg(shape, name, init=0, reset_less=True):
            return Signal(shape, name=name, init=init, reset_less=reset_less)

        def delay(sig, n, name, data=True):
            for i in range(n):
                r = Signal(sig.shape(), name=f"{name}_d{i + 1}", reset_less=data)
                m.d.sync += r.eq(sig)
                sig = r
            return sig

        # ---- geometry of this matvec, from the live config (sampled during the act load)
        act_beats = (self.d_in + (B - 1)) >> lg_b
        wt_beats = (self.d_in + (P - 1)) >> lg_p
        if int4:
            n_groups = (self.d_in + (self.group - 1)) >> _log2(self.group)
            hdr_beats = (n_groups + (ROW_HEADER_FIXED_BYTES + B - 1)) >> lg_b
        else:
            hdr_beats = 1
        max_wb = self.max_d_in // P
        # the last index of each count, registered (counters compare for equality, no adder in front)
        r_hb = Signal(range(self.max_header_beats + 1))  # header beats - 1
        act_last_at = Signal(range(self.max_d_in // B + 1))  # activation beats - 1, from the live d_in
        m.d.sync += act_last_at.eq(act_beats - 1)
        r_out8 = Signal()

        # ---- errors: sticky until reset; any of them stops both inputs
        errors = Signal(len(self.ERROR_BITS))
        # registers set with the error bits (not their OR: no loop through the handshakes), one per
        # input: each is set next to its own handshake, and the other input sees it as a flip-flop
        halted_act, halted_w = Signal(), Signal()
        halted = halted_act | halted_w
        m.d.comb += self.error.eq(errors)

        def flag(name, cond, halt):
            with m.If(cond):
                m.d.sync += [errors[self.ERROR_BITS.index(name)].eq(1), halt.eq(1)]

        # "this is the row's last weight beat" and "this is the last row" are registers, kept one beat
        # ahead of the counters: no wide comparison between the weight handshake and the error bits'
        # enables or the counters' own
        wt_last = Signal()  # wt_cnt == weight beats - 1
        row_last = Signal()  # row_cnt == rows - 1
        wb_one = Signal()  # a row of one weight beat
        wb_before_last = Signal(range(max_wb + 1))  # weight beats - 2 (wraps for one beat: never reached)
        rows_before_last = Signal(ROWS_BITS)  # rows - 2 (likewise)

        # ---- activation load
        running = Signal()  # 0: loading activations, 1: streaming this matvec's weights
        act_cnt = Signal(range(self.max_d_in // B))
        act_mem = m.submodules.act_mem = Memory(shape=unsigned(8 * P), depth=max_wb, init=[])
        act_wr = act_mem.write_port(granularity=8 * B if ratio > 1 else None)
        act_rd = act_mem.read_port(domain="sync")
        m.d.comb += [
            sa.tready.eq(~running & ~halted),
            act_wr.addr.eq(act_cnt >> (ratio - 1)),
            act_wr.data.eq(Cat(*[sa.tdata] * ratio)),
        ]
        act_take = sa.tvalid & sa.tready
        act_last = act_cnt == act_last_at
        # the configuration's check, registered from the live values (stable from the cycle before the
        # first beat): no comparison between the ports and the error bits' enables. Not reset, so a
        # beat in the first cycle after a soft reset is judged on the (stable) config like any other
        cfg_ok = Signal(reset_less=True)
        m.d.sync += cfg_ok.eq((self.d_in != 0) & (self.d_in <= self.max_d_in) & (self.n_rows != 0))
        flag("config", act_take & ~cfg_ok, halted_act)
        flag("act_tlast", act_take & cfg_ok & (sa.tlast != act_last), halted_act)
        if ratio > 1:
            m.d.comb += act_wr.en.eq(Mux(act_take, Mux(act_cnt[0], 0b10, 0b01), 0))
        else:
            m.d.comb += act_wr.en.eq(act_take)
        with m.If(act_take):
            with m.If(act_last):
                m.d.sync += [act_cnt.eq(0), running.eq(1), r_hb.eq(hdr_beats - 1), r_out8.eq(self.out_int8),
                             wt_last.eq(wt_beats == 1), wb_one.eq(wt_beats == 1), wb_before_last.eq(wt_beats - 2),
                             row_last.eq(self.n_rows == 1), rows_before_last.eq(self.n_rows - 2)]
            with m.Else():
                m.d.sync += act_cnt.eq(act_cnt + 1)

        # ---- weight stream: S0 (handshake)
        hdr_phase = Signal(init=1)
        hdr_cnt = Signal(range(max(2, self.max_header_beats)))  # >= 1 bit: a 0-bit signal lints as [-1:0]
        wt_cnt = Signal(range(max_wb))
        row_cnt = Signal(ROWS_BITS)
        credits = OUT_FIFO_DEPTH - 1
        in_flight = Signal(range(credits + 1))  # rows started and not yet taken from m_out
        row_start = hdr_phase & (hdr_cnt == 0)
        w_ready = running & ~halted & (~row_start | (in_flight < credits))
        m.d.comb += sw.tready.eq(w_ready)
        take = w_ready & sw.tvalid
        flag("weights_tlast", take & (sw.tlast != (~hdr_phase & wt_last & row_last)), halted_w)
        s_lo, s_hi = header_bits("shift")
        flag("shift", take & row_start & (sw.tdata[s_lo:s_hi] > MAX_SHIFT), halted_w)
        with m.If(take):
            with m.If(hdr_phase):
                with m.If(hdr_cnt == r_hb):
                    m.d.sync += [hdr_cnt.eq(0), hdr_phase.eq(0)]
                with m.Else():
                    m.d.sync += hdr_cnt.eq(hdr_cnt + 1)
            with m.Else():
                with m.If(wt_last):
                    m.d.sync += [wt_cnt.eq(0), wt_last.eq(wb_one), hdr_phase.eq(1)]
                    with m.If(row_last):
                        m.d.sync += [row_cnt.eq(0), running.eq(0)]
                    with m.Else():
                        m.d.sync += [row_cnt.eq(row_cnt + 1), row_last.eq(row_cnt == rows_before_last)]
                with m.Else():
                    m.d.sync += [wt_cnt.eq(wt_cnt + 1), wt_last.eq(wt_cnt == wb_before_last)]

        out_take = mo.tvalid & mo.tready
        with m.If(take & row_start & ~out_take):
            m.d.sync += in_flight.eq(in_flight + 1)
        with m.Elif(out_take & ~(take & row_start)):
            m.d.sync += in_flight.eq(in_flight - 1)

        # Row parameters from header beat 0. They stay valid for the row's weight beats through S1:
        # the next row's header is accepted at the earliest in the cycle the last beat is in S1.
        row_bias = reg(signed(32), "row_bias")
        row_mult = reg(unsigned(16), "row_mult")
        row_shift = reg(unsigned(6), "row_shift")
        with m.If(take & row_start):
            (b_lo, b_hi), (m_lo, m_hi) = (header_bits(f) for f in ("bias", "mult"))
            m.d.sync += [row_bias.eq(sw.tdata[b_lo:b_hi]), row_mult.eq(sw.tdata[m_lo:m_hi]),
                         row_shift.eq(sw.tdata[s_lo:s_lo + 6])]  # shifts are 0..47 (else error): 6 bits

        m.d.comb += act_rd.addr.eq(wt_cnt)  # read in step with the beat: the word is there in S1

        # int4: the header beats (group scales from byte 8) go to a small memory, read per group.
        if int4:
            scale_mem = m.submodules.scale_mem = Memory(shape=unsigned(8 * B), depth=self.max_header_beats,
                                                        init=[])
            sc_wr = scale_mem.write_port()
            sc_rd = scale_mem.read_port(domain="sync")
            scale_byte = (wt_cnt >> _log2(self.group // P)) + ROW_HEADER_FIXED_BYTES
            m.d.comb += [sc_wr.addr.eq(hdr_cnt), sc_wr.data.eq(sw.tdata), sc_wr.en.eq(take & hdr_phase),
                         sc_rd.addr.eq(scale_byte >> lg_b)]
            s1_sel = reg(range(B), "s1_sel")
            m.d.sync += s1_sel.eq(scale_byte[:lg_b])

        # ---- S1: the weight beat; the act memory's word arrives
        s1_valid, s1_first, s1_last, s1_lastrow = (Signal(name=n) for n in
                                                   ("s1_valid", "s1_first", "s1_last", "s1_lastrow"))
        s1_w = reg(8 * B, "s1_w")
        m.d.sync += [s1_valid.eq(take & ~hdr_phase), s1_first.eq(wt_cnt == 0), s1_last.eq(wt_last),
                     s1_lastrow.eq(row_last), s1_w.eq(sw.tdata)]

        # ---- S2: registered multiplier inputs (the block RAM's clock-to-out is slow); row
        # parameters and the int4 group scale are picked up here
        act_q = reg(8 * P, "act_q")
        w_q = reg(8 * B, "w_q")
        m.d.sync += [act_q.eq(act_rd.data), w_q.eq(s1_w)]
        s2_valid, s2_first, s2_last, s2_lastrow = (delay(s, 1, s.name, data=False)
                                                   for s in (s1_valid, s1_first, s1_last, s1_lastrow))
        s2_bias, s2_mult, s2_shift, s2_out8 = (delay(s, 1, n) for s, n in
                                               ((row_bias, "s2_bias"), (row_mult, "s2_mult"),
                                                (row_shift, "s2_shift"), (r_out8, "s2_out8")))
        if int4:
            s2_scale = reg(unsigned(8), "s2_scale")
            m.d.sync += s2_scale.eq(sc_rd.data.word_select(s1_sel, 8))
        acts = [act_q.word_select(i, 8).as_signed() for i in range(P)]
        if int4:
            wts = [w_q.word_select(i, 4).as_signed() for i in range(P)]
        else:
            wts = [w_q.word_select(i, 8).as_signed() for i in range(P)]

        # ---- S3: products in LUTs: int4 x int8 as four partial products; int8 x int8 as four
        # pairs of partial products, added in S3b. On multiplier blocks, placed wherever the placer
        # finds free ones, their routes in and out took more than a cycle.
        prods = []
        for i in range(P):
            if int4:
                p = reg(signed(12), f"prod{i}")
                m.d.sync += p.eq(mul_int4(acts[i], wts[i]))
            else:
                pairs = [reg(signed(16), f"prod{i}_pp{j}") for j in range(4)]
                m.d.sync += [r.eq(t) for r, t in zip(pairs, mul_int8_pairs(acts[i], wts[i]))]
                p = reg(signed(16), f"prod{i}")
                m.d.sync += p.eq((pairs[0] + pairs[1]) + (pairs[2] + pairs[3]))
            prods.append(p)
        s3_valid, s3_first, s3_last, s3_lastrow = (delay(s, 1, s.name, data=False)
                                                   for s in (s2_valid, s2_first, s2_last, s2_lastrow))
        s3_bias, s3_mult, s3_shift, s3_out8 = (delay(s, 1, s.name) for s in (s2_bias, s2_mult, s2_shift, s2_out8))
        if int4:
            s3_scale = delay(s2_scale, 1, "s3_scale")

        # ---- adder tree, a register every TREE_LEVELS_PER_STAGE levels
        terms, level, stage = prods, 0, 0
        while len(terms) > 1:
            terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i]
                     for i in range(0, len(terms), 2)]
            level += 1
            if level % TREE_LEVELS_PER_STAGE == 0 or len(terms) == 1:
                stage += 1
                regs = [reg(t.shape(), f"tree{stage}_{j}") for j, t in enumerate(terms)]
                m.d.sync += [r.eq(t) for r, t in zip(regs, terms)]
                terms = regs
        assert stage == self._tree_stages
        beat_sum = terms[0]
        n = stage + 1  # and S3b (int8) or the scale product (int4)
        t_valid, t_first, t_last, t_lastrow = (delay(s, n, f"t_{k}", data=False) for k, s in
                                               (("valid", s3_valid), ("first", s3_first), ("last", s3_last),
                                                ("lastrow", s3_lastrow)))
        t_bias, t_mult, t_shift, t_out8 = (delay(s, n, f"t_{k}") for k, s in
                                           (("bias", s3_bias), ("mult", s3_mult), ("shift", s3_shift),
                                            ("out8", s3_out8)))
        if int4:  # beat sum (17 bits) x group scale (uint8): one 25x18 multiplier
            t_scale = delay(s3_scale, stage, "scale_t")
            term = reg(signed(26), "scaled_sum")
            m.d.sync += term.eq(beat_sum * t_scale)
        else:
            term = beat_sum

        # ---- accumulator, seeded with the bias on the row's first beat
        acc = reg(signed(ACC_BITS), "acc")
        with m.If(t_valid):
            m.d.sync += acc.eq(Mux(t_first, t_bias, acc) + term)
        rq_valid = Signal(name="rq_valid")
        m.d.sync += rq_valid.eq(t_valid & t_last)
        rq_lastrow, rq_mult, rq_shift, rq_out8 = (delay(s, 1, n) for s, n in
                                                  ((t_lastrow, "rq_lastrow"), (t_mult, "rq_mult"),
                                                   (t_shift, "rq_shift"), (t_out8, "rq_out8")))

        # ---- requantization: overlaps the next row's accumulation
        # R1: acc * mult as two 16 x 16 partial products (DSP48 / MULT18X18 sized)
        p_lo = reg(unsigned(32), "p_lo")
        p_hi = reg(signed(33), "p_hi")
        m.d.sync += [p_lo.eq(acc[0:16] * rq_mult), p_hi.eq(acc[16:32].as_signed() * rq_mult)]
        r1_valid = delay(rq_valid, 1, "r1_valid", data=False)
        r1_lastrow, r1_shift, r1_out8 = (delay(s, 1, n) for s, n in
                                         ((rq_lastrow, "r1_lastrow"), (rq_shift, "r1_shift"),
                                          (rq_out8, "r1_out8")))
        # R2: p = acc * mult (|p| < 2**47); s1 = max(shift - 1, 0)
        prod = reg(signed(48), "prod")
        sm1 = reg(unsigned(6), "shift_m1")
        m.d.sync += [prod.eq((p_hi << 16) + p_lo), sm1.eq(Mux(r1_shift == 0, 0, r1_shift - 1))]
        r2_valid = delay(r1_valid, 1, "r2_valid", data=False)
        r2_lastrow, r2_out8, r2_round = (delay(s, 1, n) for s, n in
                                         ((r1_lastrow, "r2_lastrow"), (r1_out8, "r2_out8"),
                                          (r1_shift != 0, "r2_round")))
        # R3, R4: t = p >> s1, coarse (multiples of 8) then fine
        coarse = reg(signed(48), "shift_coarse")
        m.d.sync += coarse.eq(prod >> Cat(C(0, 3), sm1[3:6]))
        sm1_fine = delay(sm1[0:3], 1, "shift_fine")
        fine = reg(signed(48), "shift_fine_out")
        m.d.sync += fine.eq(coarse >> sm1_fine)
        r4_valid = delay(r2_valid, 2, "r4_valid", data=False)
        r4_lastrow, r4_out8, r4_round = (delay(s, 2, n) for s, n in
                                         ((r2_lastrow, "r4_lastrow"), (r2_out8, "r4_out8"),
                                          (r2_round, "r4_round")))
        # R5: round half up: (t + 1) >> 1 (shift > 0), t (shift == 0)
        rounded = reg(signed(48), "rounded")
        m.d.sync += rounded.eq(Mux(r4_round, (fine + 1) >> 1, fine))
        r5_valid = delay(r4_valid, 1, "r5_valid", data=False)
        r5_lastrow, r5_out8 = (delay(s, 1, n) for s, n in ((r4_lastrow, "r5_lastrow"), (r4_out8, "r5_out8")))
        # R6: saturate to int8 or int32. A value fits b bits when its bits from b - 1 up all equal
        # its sign: two reductions, no comparison (a 48-bit carry chain) on the path.
        hi = Mux(r5_out8, 127, (1 << 31) - 1)
        lo = Mux(r5_out8, -128, -(1 << 31))
        result = reg(signed(32), "result")
        fits = Mux(r5_out8, _fits(rounded, 8), _fits(rounded, 32))
        m.d.sync += result.eq(Mux(fits, rounded, Mux(rounded[-1], lo, hi)))
        r6_valid = delay(r5_valid, 1, "r6_valid", data=False)
        r6_lastrow = delay(r5_lastrow, 1, "r6_lastrow")

        # ---- output queue (never full: the credit counter bounds the rows in flight)
        fifo = m.submodules.out_fifo = BlockRamFifo(width=33, depth=OUT_FIFO_DEPTH)
        m.d.comb += [
            fifo.w_en.eq(r6_valid),
            fifo.w_data.eq(Cat(result, r6_lastrow)),
            mo.tvalid.eq(fifo.r_rdy),
            mo.tdata.eq(fifo.r_data[0:32]),
            mo.tlast.eq(fifo.r_data[32]),
            fifo.r_en.eq(mo.tready),
        ]
        return m
