"""Attention context of one head: ``requantize(numerics.attention_context(p, v), mult, shift, 8)``, bit exact."""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, exact_log2

from gpt_fpga.hw.attn_scores import check_attention_params
from gpt_fpga.hw.axis import AxiStreamSignature
from gpt_fpga.hw.lut_products import mul_int8_pairs
from gpt_fpga.contract import numerics
from gpt_fpga.contract.layout import ceil_div

__all__ = ["AttnContext", "ERROR_BITS"]

# Names of the bits of the sticky `error` output, bit 0 first.
ERROR_BITS = ("head_dim", "n_keys", "ctx_shift", "p_tlast_early", "p_tlast_missing", "v_tlast_early",
              "v_tlast_missing")
HEAD_DIM_BITS = bits_for(numerics.MAX_HEAD_DIM)  # 9: values above the maximum reach the core, to be refused
N_KEYS_BITS = bits_for(numerics.MAX_CONTEXT)  # 12
SHIFT_BITS = bits_for(numerics.MAX_SHIFT)  # 6: 48..63 are refused
PROB_BITS = 16  # s_p: the Softmax core's uint16 probabilities (15 fraction bits, at most 2**15 + 16)
ACC_BITS = numerics.ACC_BITS  # per-element accumulators; the contract bounds them by 2**24

# Read-out pipeline from the accumulator read to the output FIFO: the read, a register, acc * mult
# as two partial products, their sum, the coarse and fine shifts, the rounded byte and the
# saturation flags, then the byte into the beat.
_DRAIN_STAGES = 8
# Output beats the read-out may have issued and not yet handed over on m_ctx. The read-out never
# stalls: it reads a word only when the FIFO will have room for its beat (a credit), so m_ctx.tready
# reaches no enable of the pipeline. 16 is one distributed-RAM cell deep.
_OUT_FIFO_DEPTH = 16
# Cycles from the job's first beat to the read-out's multiply when the job is one beat: S1..S4, the
# switch to the read-out, D1, D2. The per-lane copies of the requantization parameters (a chain, one
# lane per cycle) must have reached the last lane by then.
_FIRST_BEAT_TO_MULTIPLY = 7



class AttnContext(wiring.Component):
    """Attention context of one head: ``ctx[e] = requantize(sum_j p[j] * v[j, e], ctx_mult, ctx_shift, 8)``.

    Each output equals ``numerics.requantize(numerics.attention_context(p, v), ctx_mult, ctx_shift,
    8)`` bit for bit (``numerics.ACT_BITS`` = 8). A job is one query's probabilities against
    ``n_keys`` cached value rows. Each value row arrives on ``s_v`` together with its probability
    on ``s_p`` (the probability is taken with the row's first beat, so ``s_p`` connects straight to
    ``Softmax.m_probs``); every beat adds ``p * v`` (``bus_bits / 8`` uint16 x int8 products) into
    the row's accumulators, a memory of ``ceil(max_head_dim / (bus_bits / 8))`` words of
    ``bus_bits / 8`` int32 accumulators read and written back once per beat (the read of a beat
    is forwarded from the write of the beat before it when both hit the same word, so rows of a
    single beat, ``head_dim <= bus_bits / 8``, stream without a hazard). The first row overwrites
    the accumulators, so nothing is cleared between jobs. After the last beat the accumulators are
    read out one word at a time into a shift register and requantized ``requant_lanes`` values
    per cycle (``acc * mult`` as two 16 x 15 partial products, round half up by ``((2p >> shift) +
    1) >> 1``, saturate to int8); the bytes gather into one ``m_ctx`` beat per word. Lanes past
    ``head_dim`` multiply by ``p = 0``, so their accumulators stay 0 and give the 0 padding.
    Multipliers: ``2 * requant_lanes`` of 16 x 15 (requantization), 2 by default; the ``bus_bits /
    8`` products ``p * v`` (17 x 8 bits) are in LUTs. One requantization lane is the default
    because the engine writes the context into its activation buffer one byte per cycle: a beat
    every ``bus_bits / 8`` cycles is what it takes, and 16 multiplier blocks per lane group placed
    far from their registers limited the clock.

    A row's first value beat and its probability are taken in the same cycle: ``s_v.tready``
    depends on ``s_p.tvalid`` there and ``s_p.tready`` on ``s_v.tvalid`` (never on the other's
    ``tready``), as AXI-Stream allows.

    Accumulation is exact while ``|acc| < 2**31``: the contract bounds it by ``2**24`` (softmax
    probabilities sum to about ``2**15``, ``|v| <= 128``), and any ``p <= 2**15 + 16`` is exact for up
    to 511 keys whatever their sum.

    Throughput: one ``s_v`` beat per cycle, with no bubble between rows, as long as ``s_p`` has a
    probability ready at each row's first beat. The end of a job (accumulator read-out,
    requantization, output) takes :attr:`latency` ``+ (ceil(head_dim / (bus_bits / 8)) - 1) *``
    :attr:`out_interval` cycles when ``m_ctx`` does not stall. The beats pass a 16-deep FIFO, so the
    next job's first beat is taken in the cycle of the last ``m_ctx.tvalid`` (once the last beat is
    in the FIFO): ``cycles_per_job(n_keys, head_dim)`` cycles per job in all.

    Latency (:attr:`latency`): ``14 + copy_wait + out_interval - 1`` cycles (21 at 64 bits and 29
    at 128 with one requantization lane) from the transfer of the job's last ``s_v`` beat to the
    first ``m_ctx.tvalid``; then one output beat every :attr:`out_interval` (``bus_bits / 8 /
    requant_lanes``) cycles. The read-out never stalls: it reads an accumulator word only when the
    output FIFO will have room for its beat, so a stalled ``m_ctx`` pauses it once the FIFO is full
    (16 beats in the FIFO and the pipeline together), and ``m_ctx.tready`` is the FIFO's read
    enable and nothing else. Each
    requantization lane keeps its own copy of ``ctx_mult`` / ``ctx_shift`` next to its
    multipliers, passed along a chain one lane per cycle from the job's first beat; the read-out
    waits :attr:`copy_wait` cycles after the last write (``max(0, requant_lanes - 7)``, 0 by
    default) so that the last lane has the job's values.

    Errors: ``error`` bit ``i`` is set when the condition ``ERROR_BITS[i]`` is seen and stays set
    until a reset. ``head_dim`` / ``n_keys`` / ``ctx_shift``: the value on the port is 0 or above
    the maximum (a shift above ``numerics.MAX_SHIFT``) in the cycle before a job's first beat is
    offered (``s_p.tvalid`` or ``s_v.tvalid`` high at a job start); ``p_tlast_*``: ``tlast`` on a
    probability before the job's last, or missing on the last; ``v_tlast_*``: the same for the last
    beat of the last value row. The beat that raises an error is taken and dropped, and from the
    next cycle the core takes no more beats on ``s_p`` or ``s_v`` (``tready`` low) and produces no
    output; the job must be abandoned. Nothing waits on a count it cannot reach: a bad configuration
    is refused before any beat is used. Only a synchronous reset (e.g. the engine's soft reset
    through ``ResetInserter``) clears ``error`` and returns the core to work.

    A synchronous reset at any time abandons the job in progress (including its output) and the next
    job is exact.

    Parameters
    ----------
    bus_bits : int
        Width of ``s_v`` and ``m_ctx``: 64 or 128 (``bus_bits / 8`` int8 lanes).
    max_head_dim : int
        Largest ``head_dim``, 1..``numerics.MAX_HEAD_DIM`` (256); sizes the accumulator memory.
    max_keys : int
        Largest ``n_keys``, 1..``numerics.MAX_CONTEXT`` (2048).
    requant_lanes : int
        Values requantized per cycle in the read-out, a divisor of ``bus_bits / 8`` (default 1).

    Attributes
    ----------
    s_p : In(AxiStreamSignature(16))
        One uint16 probability per key (``Softmax.m_probs``), ``tlast`` on the last.
    s_v : In(AxiStreamSignature(bus_bits))
        ``n_keys`` value rows from the int8 KV cache: byte ``k`` of beat ``n`` of a row is
        ``v[j, n * bus_bits/8 + k]``, ``ceil(head_dim / (bus_bits/8))`` beats per row (bytes past
        ``head_dim`` are ignored), ``tlast`` only on the last beat of the last row.
    m_ctx : Out(AxiStreamSignature(bus_bits))
        The int8 context, packed like a value row, padding bytes 0, ``tlast`` on the last beat.
    head_dim : In(9)
        Elements per value row, 1..``max_head_dim``.
    n_keys : In(12)
        Keys (probabilities and value rows) of the job, 1..``max_keys``.
    ctx_mult : In(15)
        Requantization multiplier (``numerics.MULT_BITS`` bits, unsigned).
    ctx_shift : In(6)
        Requantization shift, 0..``numerics.MAX_SHIFT`` (47).
    error : Out(7)
        Sticky error bits, named by :attr:`ERROR_BITS`.

    ``head_dim``, ``n_keys``, ``ctx_mult`` and ``ctx_shift`` pass a register: they must hold the
    job's values from the cycle before its first beat (its first ``s_v`` transfer, which also
    takes the first probability), and may change for the next job from that beat's cycle on.
    """

    ERROR_BITS = ERROR_BITS  #: names of ``error``'s bits, bit 0 first

    def __init__(self, *, bus_bits: int = 64, max_head_dim: int = numerics.MAX_HEAD_DIM,
                 max_keys: int = numerics.MAX_CONTEXT, requant_lanes: int = 1):
        check_attention_params(bus_bits, max_head_dim, max_keys)
        self.bus_bits, self.max_head_dim, self.max_keys = bus_bits, max_head_dim, max_keys
        self.lanes = bus_bits // 8
        if (isinstance(requant_lanes, bool) or not isinstance(requant_lanes, int) or requant_lanes < 1
                or requant_lanes > self.lanes or self.lanes % requant_lanes):
            raise ValueError(f"requant_lanes must divide bus_bits / 8 = {self.lanes}, got {requant_lanes!r}")
        self.requant_lanes = requant_lanes
        self.max_beats = ceil_div(max_head_dim, self.lanes)
        super().__init__({
            "s_p": In(AxiStreamSignature(PROB_BITS)),
            "s_v": In(AxiStreamSignature(bus_bits)),
            "m_ctx": Out(AxiStreamSignature(bus_bits)),
            "head_dim": In(HEAD_DIM_BITS),
            "n_keys": In(N_KEYS_BITS),
            "ctx_mult": In(numerics.MULT_BITS),
            "ctx_shift": In(SHIFT_BITS),
            "error": Out(len(ERROR_BITS)),
        })

    @property
    def latency(self) -> int:
        """Cycles from the transfer of the job's last ``s_v`` beat to the first ``m_ctx.tvalid``."""
        # S1 (beat), S2 (multiplier inputs), S3 (products, accumulator read), S4 (accumulate and
        # write back), the wait for the parameter copies, the switch to the read-out, the read-out
        # pipeline, then the output FIFO.
        return 4 + self.copy_wait + 1 + _DRAIN_STAGES + self.out_interval - 1 + 1

    @property
    def out_interval(self) -> int:
        """Cycles per ``m_ctx`` beat in the read-out (``bus_bits / 8 / requant_lanes``)."""
        return self.lanes // self.requant_lanes

    @property
    def copy_wait(self) -> int:
        """Cycles the read-out waits after the last write so that every lane's copy of ``ctx_mult``
        and ``ctx_shift`` (a chain, one lane further per cycle) holds the job's values."""
        return max(0, self.requant_lanes - _FIRST_BEAT_TO_MULTIPLY)

    @property
    def throughput(self) -> int:
        """``s_v`` beats accepted per cycle while ``s_p`` keeps up: 1."""
        return 1

    def beats(self, head_dim: int) -> int:
        """Beats per value row (and of the output)."""
        return ceil_div(head_dim, self.lanes)

    def cycles_per_job(self, n_keys: int, head_dim: int) -> int:
        """Cycles between the first ``s_v`` transfers of two back-to-back jobs when nothing stalls."""
        nb = self.beats(head_dim)
        # values, then latency - 1 cycles to the first output beat, nb output beats out_interval
        # cycles apart; the next job's first beat is in the last one's cycle (it left the read-out
        # for the FIFO the cycle before)
        return n_keys * nb + self.latency - 1 + (nb - 1) * self.out_interval

    def elaborate(self, platform):
        m = Module()
        L, nbm = self.lanes, self.max_beats
        lg = exact_log2(L)
        sp, sv, mo = self.s_p, self.s_v, self.m_ctx

        def reg(shape, name, reset_less=True):
            return Signal(shape, name=name, reset_less=reset_less)

        acc_mem = m.submodules.acc_mem = Memory(shape=unsigned(ACC_BITS * L), depth=max(2, nbm), init=[])
        acc_wr, acc_rd = acc_mem.write_port(), acc_mem.read_port(domain="sync")

        # an error was seen: take nothing more until reset. A register set with the error bits (not
        # their OR: the OR sat in front of the handshake and every counter's enable)
        halted = Signal()
        draining = Signal()  # the job's accumulators are being read out (until its last beat is in the output FIFO)
        r_hd = Signal(HEAD_DIM_BITS)  # the job's configuration, from its first beat on
        r_nk = Signal(N_KEYS_BITS)
        r_nb = Signal(range(nbm + 1))
        r_mult = Signal(numerics.MULT_BITS)
        r_shift = Signal(SHIFT_BITS)

        # ---- S0: handshake; a row's first beat also takes its probability. The job's first beat
        # uses the ports (decoded without arithmetic, to keep the handshake logic shallow); later
        # beats use flags computed one beat ahead (no counter comparison on the handshake path).
        v_beat = Signal(range(max(2, nbm)))  # the beat's accumulator word
        v_row = Signal(range(max(2, self.max_keys)))
        first_row = Signal(init=1)  # v_row == 0
        row_start = Signal(init=1)  # v_beat == 0
        beat_last = Signal()  # v_beat + 1 == r_nb (valid after the job's first beat)
        rows_last = Signal()  # v_row + 1 == r_nk (valid after the job's first beat)
        start = first_row & row_start
        # The job's configuration passes a register first (with the decodes the first beat needs), so
        # the first beat's handshake and checks start from flip-flops, not from the ports.
        # (no reset: they follow the ports in every cycle, a reset's included)
        hd_p, nk_p = reg(HEAD_DIM_BITS, "hd_p"), reg(N_KEYS_BITS, "nk_p")
        mult_p, shift_p = reg(numerics.MULT_BITS, "mult_p"), reg(SHIFT_BITS, "shift_p")
        nb_p = reg(range(nbm + 1), "nb_p")
        hd_one, nk_one = reg(1, "hd_one"), reg(1, "nk_one")  # head_dim <= L, n_keys == 1
        bad_hd, bad_nk, bad_sh = reg(1, "bad_hd"), reg(1, "bad_nk"), reg(1, "bad_sh")
        last_keep_p = reg(L, "last_keep_p")  # lanes kept on a row's last beat
        hd_rem = self.head_dim[:lg]
        m.d.sync += [hd_p.eq(self.head_dim), nk_p.eq(self.n_keys), mult_p.eq(self.ctx_mult),
                     shift_p.eq(self.ctx_shift), nb_p.eq((self.head_dim + (L - 1)) >> lg),
                     hd_one.eq(self.head_dim <= L), nk_one.eq(self.n_keys == 1),
                     bad_hd.eq((self.head_dim == 0) | (self.head_dim > self.max_head_dim)),
                     bad_nk.eq((self.n_keys == 0) | (self.n_keys > self.max_keys)),
                     bad_sh.eq(self.ctx_shift > numerics.MAX_SHIFT),
                     last_keep_p.eq(Mux(hd_rem == 0, (1 << L) - 1, (C(1, L) << hd_rem) - 1))]
        r_last_keep = Signal(L)
        v_last = Mux(start, hd_one, beat_last)
        row_last = Mux(start, nk_one, rows_last)
        final = v_last & row_last
        accum = ~halted & ~draining
        m.d.comb += [sv.tready.eq(accum & (~row_start | sp.tvalid)), sp.tready.eq(accum & row_start & sv.tvalid)]
        take = accum & sv.tvalid & (~row_start | sp.tvalid)
        offered = accum & start & (sv.tvalid | sp.tvalid)
        e_hd, e_nk, e_sh = offered & bad_hd, offered & bad_nk, offered & bad_sh
        cfg_bad = e_hd | e_nk | e_sh
        p_take = take & row_start & ~cfg_bad
        e_p_early = p_take & sp.tlast & ~row_last
        e_p_missing = p_take & row_last & ~sp.tlast
        v_take = take & ~cfg_bad
        e_v_early = v_take & sv.tlast & ~final
        e_v_missing = v_take & final & ~sv.tlast
        new_err = Cat(e_hd, e_nk, e_sh, e_p_early, e_p_missing, e_v_early, e_v_missing)
        ok = take & ~new_err.any()  # the beat's valid flag
        m.d.sync += self.error.eq(self.error | new_err)
        with m.If(new_err.any()):
            m.d.sync += halted.eq(1)

        p_row = reg(PROB_BITS, "p_row")  # the probability of the row in progress
        p_use = Mux(row_start, sp.tdata, p_row)
        # the configuration follows the ports until the job's first beat is taken, and holds from
        # then to the end of its read-out (an enable without the handshake in it)
        with m.If(start & ~draining):
            m.d.sync += [r_hd.eq(hd_p), r_nk.eq(nk_p), r_nb.eq(nb_p), r_mult.eq(mult_p), r_shift.eq(shift_p),
                         r_last_keep.eq(last_keep_p)]
        nb, nk = Mux(start, nb_p, r_nb), Mux(start, nk_p, r_nk)
        # The counters follow every beat taken, also one that raises an error: the core halts from
        # the next cycle, so what such a beat does to them is never used, and their enables stay
        # free of the error logic. Only the data's valid flags (ctl below) exclude it.
        with m.If(take):
            m.d.sync += [row_start.eq(v_last), first_row.eq(Mux(v_last, final, first_row))]
            with m.If(v_last):  # the next beat starts row v_row + 1
                m.d.sync += [beat_last.eq(nb == 1), rows_last.eq(v_row + 2 == nk)]
            with m.Else():
                m.d.sync += [beat_last.eq(v_beat + 2 == nb), rows_last.eq(Mux(start, nk_one, rows_last))]
            with m.If(row_start):
                m.d.sync += p_row.eq(sp.tdata)
            with m.If(v_last):
                m.d.sync += v_beat.eq(0)
                with m.If(row_last):
                    m.d.sync += [v_row.eq(0), draining.eq(1)]
                with m.Else():
                    m.d.sync += v_row.eq(v_row + 1)
            with m.Else():
                m.d.sync += v_beat.eq(v_beat + 1)

        # lanes past head_dim (on a row's last beat) multiply by p = 0: their accumulators stay 0,
        # which requantizes to the 0 padding of the output. Each lane has its own copy of p, placed
        # at its multiplier.
        keep = Signal(L)
        m.d.comb += keep.eq(Mux(~v_last, (1 << L) - 1, Mux(start, last_keep_p, r_last_keep)))

        # ---- S1: the beat and its probability. Control (valid, last beat of the job, first row,
        # accumulator word) travels with the data: ctl[k] holds stage k + 1's.
        ctl = [dict(valid=ok, final=ok & final, first=first_row, addr=v_beat)]
        for k in range(1, 5):
            stage = {}
            for key, sig in ctl[-1].items():
                r = Signal(sig.shape(), name=f"s{k}_{key}", reset_less=key in ("first", "addr"))
                m.d.sync += r.eq(sig)
                stage[key] = r
            ctl.append(stage)
        s1_p = reg(PROB_BITS, "s1_p")
        s1_keep = reg(L, "s1_keep")
        s1_v = reg(8 * L, "s1_v")
        m.d.sync += [s1_p.eq(p_use), s1_keep.eq(keep), s1_v.eq(sv.tdata)]

        # ---- S2: registered multiplier inputs, one copy of p per lane (placed at its multiplier)
        s2_p = [reg(PROB_BITS, f"s2_p{i}") for i in range(L)]
        s2_v = reg(8 * L, "s2_v")
        m.d.sync += [s2_p[i].eq(Mux(s1_keep[i], s1_p, 0)) for i in range(L)]
        m.d.sync += s2_v.eq(s1_v)

        # ---- S3, S4: products p * v (uint16 x int8) in LUTs: pairs of partial products (S3), then
        # their sum (S4), next to the accumulators; the accumulator word of the beat is read in S3.
        # On multiplier blocks the products would sit wherever the placer finds free ones, far from
        # the accumulators.
        prods = []
        for i in range(L):
            pairs = mul_int8_pairs(s2_p[i], s2_v.word_select(i, 8).as_signed())
            p3 = [reg(signed(PROB_BITS + 9), f"prod{i}_pp{j}") for j in range(len(pairs))]
            p4 = reg(signed(PROB_BITS + 9), f"prod{i}")
            m.d.sync += [r.eq(t) for r, t in zip(p3, pairs)]
            m.d.sync += p4.eq((p3[0] + p3[1]) + (p3[2] + p3[3]))
            prods.append(p4)
        s3, s4 = ctl[3], ctl[4]

        # ---- S4: add to the accumulators (the word read in S3, or the one written in the cycle of
        # that read, which the read did not see) and write back; the first row overwrites
        fwd = Signal(name="fwd")  # the word read in S3 was written in the same cycle: use that write
        m.d.sync += fwd.eq(s4["valid"] & (s4["addr"] == s3["addr"]))
        lw_data = reg(ACC_BITS * L, "lw_data")  # the word written in the previous cycle
        old = Mux(fwd, lw_data, acc_rd.data)
        sums = [Mux(s4["first"], 0, old.word_select(i, ACC_BITS).as_signed()) + prods[i] for i in range(L)]
        new = Cat(*[s[:ACC_BITS] for s in sums])
        m.d.comb += [acc_wr.addr.eq(s4["addr"]), acc_wr.data.eq(new), acc_wr.en.eq(s4["valid"])]
        m.d.sync += lw_data.eq(new)

        # ---- read-out: starts the cycle after the last beat's write, and never stalls. Each
        # accumulator word is loaded into a shift register and requantized ``requant_lanes`` values
        # per cycle (``out_interval`` cycles per word); the bytes shift into the output beat, which
        # enters the output FIFO. A word is read only with a credit: a place in the FIFO for its beat.
        R, G = self.requant_lanes, self.out_interval
        out_fifo = m.submodules.out_fifo = SyncFIFO(width=self.bus_bits + 1, depth=_OUT_FIFO_DEPTH)
        credits = Signal(range(_OUT_FIFO_DEPTH + 1), init=_OUT_FIFO_DEPTH)  # beats neither issued nor in the FIFO
        has_credit = Signal(init=1)  # credits >= 2 a cycle ago: at least 1 now (one read per cycle)
        d_go = Signal()  # the last write is done and the lanes have the job's parameters: issue reads
        d_cnt = Signal(range(nbm + 1))
        go = s4["final"]
        for k in range(self.copy_wait):
            delayed = Signal(name=f"go_wait{k}")
            m.d.sync += delayed.eq(go)
            go = delayed
        with m.If(go):
            m.d.sync += [d_go.eq(1), d_cnt.eq(0)]
        # D1: the word read (the read port holds it until the next read); D2: the shift register
        rd_pend = Signal()  # a word was read in the last cycle: the shift register takes it
        pend_last = Signal()  # that word is the job's last
        shreg = reg(ACC_BITS * L, "rq_words")
        w_valid, w_last = Signal(name="w_valid"), Signal(name="w_last")
        w_grp = Signal(range(G), name="w_grp")  # the group of lanes at the bottom of the shift register
        # a read now is taken by the shift register in the next cycle: it must be empty then, or on
        # its last group
        room = 1 if G == 1 else ~rd_pend & (~w_valid | (w_grp >= G - 2))
        issue = d_go & (d_cnt != r_nb) & has_credit & room
        with m.If(issue):
            m.d.sync += d_cnt.eq(d_cnt + 1)
        # a beat that left the FIFO returns its credit a cycle later: the FIFO's level and the
        # consumer's tready stay off the credit count's adder
        pop = Signal()
        m.d.sync += pop.eq(mo.tvalid & mo.tready)
        m.d.sync += [credits.eq(credits - issue + pop), has_credit.eq(credits >= 2)]
        m.d.sync += [rd_pend.eq(issue), pend_last.eq(d_cnt + 1 == r_nb)]
        with m.If(rd_pend):
            m.d.sync += [shreg.eq(acc_rd.data), w_valid.eq(1), w_grp.eq(0), w_last.eq(pend_last)]
        with m.Elif(w_valid):
            m.d.sync += [shreg.eq(shreg >> (R * ACC_BITS)), w_grp.eq(w_grp + 1), w_valid.eq(w_grp != G - 1)]
        m.d.comb += [acc_rd.addr.eq(Mux(d_go, d_cnt, s3["addr"])), acc_rd.en.eq(Mux(d_go, issue, 1))]

        # D2: the group at the bottom of the shift register; D3: partial products acc * mult; D4: their
        # sum; D5, D6: coarse and fine shift; D7: the rounded byte and the saturation flags; then the
        # saturated bytes into the output beat, which enters the FIFO once its last group is in.
        g_valid, g_full, g_end = [w_valid], [w_grp == G - 1], [w_last & (w_grp == G - 1)]
        for k in range(3, _DRAIN_STAGES):
            v, full, end = Signal(name=f"d{k}_valid"), Signal(name=f"d{k}_full"), Signal(name=f"d{k}_end")
            m.d.sync += [v.eq(g_valid[-1]), full.eq(g_full[-1]), end.eq(g_end[-1])]
            g_valid.append(v)
            g_full.append(full)
            g_end.append(end)
        beat = reg(self.bus_bits, "out_beat")
        beat_valid, beat_last = Signal(name="out_beat_valid"), Signal(name="out_beat_last")
        m.d.sync += [beat_valid.eq(g_valid[-1] & g_full[-1]), beat_last.eq(g_end[-1])]
        m.d.comb += [out_fifo.w_en.eq(beat_valid), out_fifo.w_data.eq(Cat(beat, beat_last)),
                     mo.tvalid.eq(out_fifo.r_rdy), mo.tdata.eq(out_fifo.r_data[:-1]), mo.tlast.eq(out_fifo.r_data[-1]),
                     out_fifo.r_en.eq(mo.tready)]
        with m.If(beat_valid & beat_last):  # the job's last beat is in the FIFO: the next job may start
            m.d.sync += [d_go.eq(0), draining.eq(0)]
        # Each lane has its own copy of the requantization parameters, next to its two multipliers
        # and its shifters. Lane i's copy is lane i - 1's one cycle later (lane 0 uses r_mult,
        # r_shift): copies of one register would be merged by synthesis, a chain keeps them apart.
        lane_cfg = [Cat(r_mult, r_shift)]
        for i in range(1, R):
            copy = reg(len(lane_cfg[0]), f"rq_cfg{i}")
            m.d.sync += copy.eq(lane_cfg[-1])
            lane_cfg.append(copy)
        outs = []
        for i in range(R):
            mult, shift = lane_cfg[i][:numerics.MULT_BITS], lane_cfg[i][numerics.MULT_BITS:]
            fine_bits = shift[:3]
            coarse_bits = Cat(C(0, 3), shift[3:])
            acc = shreg.word_select(i, ACC_BITS)
            p_lo = reg(unsigned(16 + numerics.MULT_BITS), f"p_lo{i}")
            p_hi = reg(signed(16 + numerics.MULT_BITS + 1), f"p_hi{i}")
            prod = reg(signed(ACC_BITS + numerics.MULT_BITS + 1), f"rq_prod{i}")  # |acc * mult| < 2**46
            coarse = reg(signed(ACC_BITS + numerics.MULT_BITS + 2), f"rq_coarse{i}")
            fine = reg(signed(ACC_BITS + numerics.MULT_BITS + 2), f"rq_fine{i}")
            # round_shift(p, s) == ((2p >> s) + 1) >> 1 == (fine + 1) >> 1 for every s >= 0. Its low
            # byte needs only fine's low 9 bits; it is above 127 exactly when fine >= 255 and below
            # -128 exactly when fine <= -258 (two compares of fine, beside a 9-bit adder)
            low = reg(8, f"rq_low{i}")
            over, under = reg(1, f"rq_over{i}"), reg(1, f"rq_under{i}")
            m.d.sync += [
                p_lo.eq(acc[:16] * mult), p_hi.eq(acc[16:].as_signed() * mult),
                prod.eq((p_hi << 16) + p_lo),
                coarse.eq((prod << 1) >> coarse_bits),
                fine.eq(coarse >> fine_bits),
                low.eq((fine[:9] + 1) >> 1), over.eq(fine >= 255), under.eq(fine <= -258),
            ]
            outs.append(Mux(over, 127, Mux(under, -128, low))[:8])
        with m.If(g_valid[-1]):  # the group's bytes enter at the top; after G groups, lane 0 is at the bottom
            m.d.sync += beat.eq(Cat(beat, *outs)[8 * R:])
        return m
