"""Attention scores of one head, ``numerics.attention_scores`` (K . q), bit exact, one key beat per cycle."""

from __future__ import annotations

from amaranth import C, Cat, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import bits_for, exact_log2

from gpt_fpga.hw.axis import AxiStreamSignature
from gpt_fpga.hw.fifo import BlockRamFifo
from gpt_fpga.hw.lut_products import mul_int8_pairs
from gpt_fpga.contract import numerics
from gpt_fpga.contract.layout import BUS_BITS_CHOICES, ceil_div

__all__ = ["AttnScores", "ERROR_BITS"]

# Names of the bits of the sticky `error` output, bit 0 first.
ERROR_BITS = ("head_dim", "n_keys", "q_tlast_early", "q_tlast_missing", "k_tlast_early", "k_tlast_missing")
HEAD_DIM_BITS = bits_for(numerics.MAX_HEAD_DIM)  # 9: values above the maximum reach the core, to be refused
N_KEYS_BITS = bits_for(numerics.MAX_CONTEXT)  # 12
SCORE_BITS = 32  # m_scores carries raw int32 scores (|s| <= 2**22), the Softmax core's input format
OUT_FIFO_DEPTH = 16  # scores waiting for m_scores; also bounds the rows in flight (credits)
TREE_LEVELS_PER_STAGE = 2  # adder-tree levels between pipeline registers


def _check_int(name: str, value, lo: int, hi: int):
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")


def check_attention_params(bus_bits, max_head_dim, max_keys):
    """The parameters AttnScores and AttnContext share (a rejected core's never-used warning is
    filtered once, in pyproject.toml)."""
    if bus_bits not in BUS_BITS_CHOICES or isinstance(bus_bits, bool):
        raise ValueError(f"bus_bits must be one of {BUS_BITS_CHOICES}, got {bus_bits!r}")
    _check_int("max_head_dim", max_head_dim, 1, numerics.MAX_HEAD_DIM)
    _check_int("max_keys", max_keys, 1, numerics.MAX_CONTEXT)


class AttnScores(wiring.Component):
    """Attention scores of one head: ``scores[j] = sum_e q[e] * k[j, e]`` (int8 . int8, int32 out).

    Each score equals ``numerics.attention_scores(q, k)`` bit for bit, before any requantization:
    the Softmax core applies the layer's score ``(mult, shift)`` itself, so ``m_scores`` has exactly
    the signature of ``Softmax.s_scores`` (int32 ``tdata``, a 1-bit ``tuser`` = visible) and the two
    connect directly. ``tuser`` is always 1: in decode the host streams only visible keys.

    A job is one query against ``n_keys`` cached keys. The query arrives on ``s_q`` and is kept on
    chip as it comes; the key bytes past ``head_dim`` on each row's last beat are zeroed before
    they multiply, so padding in either stream contributes 0; then the keys stream on
    ``s_k`` row after row, each row multiplied by the query as it passes (``bus_bits / 8``
    int8 x int8 products per beat into a pipelined adder tree and a row accumulator), and one score
    per key leaves on ``m_scores``. Once the last key beat is accepted, ``s_q`` is ready for the next
    job, whose query load overlaps this job's pipeline. Multipliers: none; ``bus_bits / 8`` products of 8 x 8 bits in LUTs.

    Throughput: one ``s_k`` beat per cycle, with no bubble between rows (also for ``head_dim <=
    bus_bits / 8``, one beat per row) or between a row and the next job's query, as long as
    ``m_scores`` keeps up with one score per row. The query load costs ``ceil(head_dim / (bus_bits /
    8))`` cycles per job, so back-to-back jobs take ``cycles_per_job(n_keys, head_dim) = (n_keys +
    1) * ceil(head_dim / (bus_bits / 8))`` cycles each. When ``m_scores`` stalls, a credit counter
    stops new rows (never a row in progress) once ``OUT_FIFO_DEPTH - 1`` scores are waiting or in
    flight.

    Latency (:attr:`latency`): 9 cycles at ``bus_bits`` 64 and 128 from the transfer of a row's last
    ``s_k`` beat to ``m_scores.tvalid`` for that row, when the output queue is empty.

    Errors: ``error`` bit ``i`` is set when the condition ``ERROR_BITS[i]`` is seen and stays set
    until a reset. ``head_dim`` / ``n_keys``: the value on the port is 0 or above the maximum in
    the cycle before the job's first ``s_q`` beat is taken; ``*_tlast_early``: ``tlast`` on a beat before the
    stream's last one (the query's last beat, or the last beat of the last key row);
    ``*_tlast_missing``: no ``tlast`` on that last beat. The beat that raises an error is taken and
    dropped, and from the next cycle the core takes no more beats on ``s_q`` or ``s_k`` (``tready``
    low) and computes nothing more; scores already complete still leave on ``m_scores`` (without a
    ``tlast``), and the job must be abandoned. Nothing waits on a count it cannot reach: a bad
    ``head_dim`` or ``n_keys`` is refused before any beat is used. Only a synchronous reset (e.g.
    the engine's soft reset through ``ResetInserter``) clears ``error`` and returns the core to
    work.

    A synchronous reset at any time abandons the job in progress (the output queue is emptied) and
    the next job is exact.

    Parameters
    ----------
    bus_bits : int
        Width of ``s_q`` and ``s_k``: 64 or 128 (``bus_bits / 8`` int8 lanes).
    max_head_dim : int
        Largest ``head_dim``, 1..``numerics.MAX_HEAD_DIM`` (256); sizes the query memory.
    max_keys : int
        Largest ``n_keys``, 1..``numerics.MAX_CONTEXT`` (2048).

    Attributes
    ----------
    s_q : In(AxiStreamSignature(bus_bits))
        The query: byte ``k`` of beat ``n`` is ``q[n * bus_bits/8 + k]`` (int8), ``ceil(head_dim /
        (bus_bits/8))`` beats, ``tlast`` on the last (bytes past ``head_dim`` are ignored).
    s_k : In(AxiStreamSignature(bus_bits))
        ``n_keys`` key rows from the int8 KV cache, each laid out like the query (``ceil(head_dim /
        (bus_bits/8))`` beats, padding bytes ignored), ``tlast`` only on the last beat of the last
        row (one DMA transfer).
    m_scores : Out(AxiStreamSignature(32, user_width=1))
        One signed int32 score per key, in order; ``tuser`` = 1; ``tlast`` on the last key.
    head_dim : In(9)
        Elements per query / key row, 1..``max_head_dim``.
    n_keys : In(12)
        Keys of the job, 1..``max_keys``.
    error : Out(6)
        Sticky error bits, named by :attr:`ERROR_BITS`.

    ``head_dim`` and ``n_keys`` pass a register: they must hold the job's values from the cycle
    before its first ``s_q`` transfer, and may change for the next job from that transfer's cycle on.
    """

    ERROR_BITS = ERROR_BITS  #: names of ``error``'s bits, bit 0 first

    def __init__(self, *, bus_bits: int = 64, max_head_dim: int = numerics.MAX_HEAD_DIM,
                 max_keys: int = numerics.MAX_CONTEXT):
        check_attention_params(bus_bits, max_head_dim, max_keys)
        self.bus_bits, self.max_head_dim, self.max_keys = bus_bits, max_head_dim, max_keys
        self.lanes = bus_bits // 8
        self.max_beats = ceil_div(max_head_dim, self.lanes)
        super().__init__({
            "s_q": In(AxiStreamSignature(bus_bits)),
            "s_k": In(AxiStreamSignature(bus_bits)),
            "m_scores": Out(AxiStreamSignature(SCORE_BITS, user_width=1)),
            "head_dim": In(HEAD_DIM_BITS),
            "n_keys": In(N_KEYS_BITS),
            "error": Out(len(ERROR_BITS)),
        })

    @property
    def _tree_stages(self) -> int:
        return ceil_div(exact_log2(self.lanes), TREE_LEVELS_PER_STAGE)

    @property
    def latency(self) -> int:
        """Cycles from the transfer of a row's last ``s_k`` beat to its ``m_scores.tvalid`` (queue empty)."""
        # S1 (beat, query word read), S2 (multiplier inputs), S3 (partial products), S4 (products),
        # tree, accumulator, 2 cycles through SyncFIFOBuffered.
        return 4 + self._tree_stages + 1 + 2

    @property
    def throughput(self) -> int:
        """``s_k`` beats accepted per cycle when ``m_scores`` never stalls: 1."""
        return 1

    def beats(self, head_dim: int) -> int:
        """Beats per query or key row."""
        return ceil_div(head_dim, self.lanes)

    def cycles_per_job(self, n_keys: int, head_dim: int) -> int:
        """Cycles between the first ``s_q`` transfers of two back-to-back jobs, nothing stalling."""
        return (n_keys + 1) * self.beats(head_dim)

    def elaborate(self, platform):
        m = Module()
        L, nbm = self.lanes, self.max_beats
        lg = exact_log2(L)
        sq, sk, mo = self.s_q, self.s_k, self.m_scores

        def delay(sig, n, name):
            for i in range(n):
                r = Signal(sig.shape(), name=f"{name}_d{i + 1}")
                m.d.sync += r.eq(sig)
                sig = r
            return sig

        # an error was seen: take nothing more until reset. A register set with the error bits (not
        # their OR, which would close a loop from the error bits through the handshakes back into them)
        halted = Signal()
        keys = Signal()  # 0: loading the query, 1: streaming the keys
        r_hd = Signal(HEAD_DIM_BITS)  # the job's configuration, from its first query beat on
        r_nk = Signal(N_KEYS_BITS)
        r_nb = Signal(range(nbm + 1))

        # ---- query load. The first beat uses the ports (decoded without arithmetic, to keep the
        # handshake logic shallow) and registers them; later beats use the registers.
        q_mem = m.submodules.q_mem = Memory(shape=unsigned(8 * L), depth=max(2, nbm), init=[])
        q_wr, q_rd = q_mem.write_port(), q_mem.read_port(domain="sync")
        q_cnt = Signal(range(max(2, nbm)))
        q_first = q_cnt == 0
        # The job's configuration passes a register first (with the decodes the first beat needs; no
        # reset, they follow the ports in every cycle): the first beat's handshake and checks start
        # from flip-flops, not from the ports.
        hd_p = Signal(HEAD_DIM_BITS, name="hd_p", reset_less=True)
        nk_p = Signal(N_KEYS_BITS, name="nk_p", reset_less=True)
        nb_p = Signal(range(nbm + 1), name="nb_p", reset_less=True)
        hd_one, hd_two = Signal(name="hd_one", reset_less=True), Signal(name="hd_two", reset_less=True)
        nk_one = Signal(name="nk_one", reset_less=True)
        bad_hd, bad_nk = Signal(name="bad_hd", reset_less=True), Signal(name="bad_nk", reset_less=True)
        hd = self.head_dim
        m.d.sync += [hd_p.eq(hd), nk_p.eq(self.n_keys), nb_p.eq((hd + (L - 1)) >> lg),
                     hd_one.eq(hd <= L), hd_two.eq((hd > L) & (hd <= 2 * L)), nk_one.eq(self.n_keys == 1),
                     bad_hd.eq((hd == 0) | (hd > self.max_head_dim)),
                     bad_nk.eq((self.n_keys == 0) | (self.n_keys > self.max_keys))]
        q_last_next = Signal()  # the next beat is the query's last (a flag, not a comparison)
        r_nb_one, r_nk_one = Signal(), Signal()  # the job's rows are one beat long; the job has one key
        # the next key beat is its row's last; its row is the job's last (flags, set from the
        # configuration and counted on: no adder or comparison in front of the handshake and the errors)
        k_last, row_last = Signal(), Signal()
        q_last = Mux(q_first, hd_one, q_last_next)
        q_ready = ~keys & ~halted
        m.d.comb += sq.tready.eq(q_ready)
        q_take = sq.tvalid & q_ready
        # the error checks judge a beat offered while not halted as if taken: `halted` stays off them,
        # so no path runs from `halted` through the handshake and the checks back into it (once halted,
        # the bits no longer change: see new_err below)
        q_seen = sq.tvalid & ~keys
        e_hd = q_seen & q_first & bad_hd
        e_nk = q_seen & q_first & bad_nk
        cfg_bad = e_hd | e_nk
        e_q_early = q_seen & ~cfg_bad & ~q_last & sq.tlast
        e_q_missing = q_seen & ~cfg_bad & q_last & ~sq.tlast
        # Counters and memories follow every beat taken, also one that raises an error: the core
        # halts from the next cycle, so what such a beat does to them is never used, and their
        # enables stay free of the error logic (which crosses the core, through tlast, in one cycle).
        # Only the data's valid flags exclude it.
        m.d.comb += [q_wr.addr.eq(q_cnt), q_wr.en.eq(q_take), q_wr.data.eq(sq.tdata)]
        with m.If(q_take):
            m.d.sync += q_last_next.eq(Mux(q_first, hd_two, q_cnt + 2 == r_nb))
            with m.If(q_first):
                m.d.sync += [r_hd.eq(hd_p), r_nk.eq(nk_p), r_nb.eq(nb_p), r_nb_one.eq(hd_one), r_nk_one.eq(nk_one)]
            with m.If(q_last):
                m.d.sync += [q_cnt.eq(0), keys.eq(1), k_last.eq(Mux(q_first, hd_one, r_nb_one)),
                             row_last.eq(Mux(q_first, nk_one, r_nk_one))]
            with m.Else():
                m.d.sync += q_cnt.eq(q_cnt + 1)

        # ---- key stream: S0 (handshake)
        k_beat = Signal(range(max(2, nbm)))
        k_row = Signal(range(max(2, self.max_keys)))
        row_start = k_beat == 0
        final = k_last & row_last
        credits = OUT_FIFO_DEPTH - 1
        in_flight = Signal(range(credits + 1))  # rows started and not yet taken from m_scores
        k_room = ~row_start | (in_flight < credits)
        k_ready = keys & ~halted & k_room
        m.d.comb += sk.tready.eq(k_ready)
        k_take = sk.tvalid & k_ready
        k_seen = sk.tvalid & keys & k_room
        e_k_early = k_seen & sk.tlast & ~final
        e_k_missing = k_seen & final & ~sk.tlast
        k_ok = k_take & ~e_k_early & ~e_k_missing  # the beat's valid flag
        with m.If(k_take):
            with m.If(k_last):
                m.d.sync += [k_beat.eq(0), k_last.eq(r_nb_one)]
                with m.If(row_last):
                    m.d.sync += [k_row.eq(0), keys.eq(0)]
                with m.Else():
                    m.d.sync += [k_row.eq(k_row + 1), row_last.eq(k_row + 2 == r_nk)]
            with m.Else():
                m.d.sync += [k_beat.eq(k_beat + 1), k_last.eq(k_beat + 2 == r_nb)]
        m.d.comb += q_rd.addr.eq(k_beat)  # the query word of this beat is there in S1

        new_err = Cat(e_hd, e_nk, e_q_early, e_q_missing, e_k_early, e_k_missing)
        m.d.sync += [self.error.eq(self.error | Mux(halted, 0, new_err)), halted.eq(halted | new_err.any())]

        out_take = mo.tvalid & mo.tready
        row_in = k_take & row_start
        with m.If(row_in & ~out_take):
            m.d.sync += in_flight.eq(in_flight + 1)
        with m.Elif(out_take & ~row_in):
            m.d.sync += in_flight.eq(in_flight - 1)

        # ---- S1: the key beat; the query word arrives
        s1_valid, s1_first, s1_last, s1_lastrow = (Signal(name=n) for n in
                                                   ("s1_valid", "s1_first", "s1_last", "s1_lastrow"))
        s1_k = Signal(8 * L, name="s1_k", reset_less=True)
        m.d.sync += [s1_valid.eq(k_ok), s1_first.eq(row_start), s1_last.eq(k_last), s1_lastrow.eq(row_last),
                     s1_k.eq(sk.tdata)]

        # ---- S2: registered multiplier inputs. Lanes past head_dim on a row's last beat are zeroed in
        # the key (q x 0 = 0), by a mask kept as a register from r_hd: the query is stored as it comes,
        # so neither the head_dim port nor a shift decode lies on the query memory's write data. The
        # mask follows r_hd one cycle later, and a job's last key beat is in S1 before the next
        # job's r_hd can reach it (next query beat, then r_hd, then the mask: two cycles).
        last_keep = Signal(L, name="last_keep")  # lanes kept on a row's last beat
        rem = r_hd[:lg]
        m.d.sync += last_keep.eq(Mux(rem == 0, (1 << L) - 1, (C(1, L) << rem) - 1))
        keep = Mux(s1_last, last_keep, (1 << L) - 1)
        q_r = Signal(8 * L, name="q_r", reset_less=True)
        k_r = Signal(8 * L, name="k_r", reset_less=True)
        m.d.sync += [q_r.eq(q_rd.data), k_r.eq(s1_k & Cat(*[keep[k].replicate(8) for k in range(L)]))]
        ctl = [delay(s, 1, s.name) for s in (s1_valid, s1_first, s1_last, s1_lastrow)]

        # ---- S3, S4: int8 x int8 products in LUTs, as pairs of partial products (S3), then their
        # sum (S4). On multiplier blocks the products would sit wherever the placer finds free
        # ones, far from the query registers and the adder tree (the engine's matrix cores use most).
        prods = []
        for i in range(L):
            pairs = mul_int8_pairs(q_r.word_select(i, 8).as_signed(), k_r.word_select(i, 8).as_signed())
            regs = [Signal(signed(16), name=f"prod{i}_pp{j}", reset_less=True) for j in range(len(pairs))]
            m.d.sync += [r.eq(t) for r, t in zip(regs, pairs)]
            p = Signal(signed(16), name=f"prod{i}", reset_less=True)
            m.d.sync += p.eq((regs[0] + regs[1]) + (regs[2] + regs[3]))
            prods.append(p)
        ctl = [delay(s, 2, f"s3_{k}") for s, k in zip(ctl, ("valid", "first", "last", "lastrow"))]

        # ---- adder tree, a register every TREE_LEVELS_PER_STAGE levels
        terms, level, stage = prods, 0, 0
        while len(terms) > 1:
            terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
            level += 1
            if level % TREE_LEVELS_PER_STAGE == 0 or len(terms) == 1:
                stage += 1
                regs = [Signal(t.shape(), name=f"tree{stage}_{j}", reset_less=True) for j, t in enumerate(terms)]
                m.d.sync += [r.eq(t) for r, t in zip(regs, terms)]
                terms = regs
        assert stage == self._tree_stages
        beat_sum = terms[0]
        t_valid, t_first, t_last, t_lastrow = (delay(s, stage, f"t_{k}") for s, k in
                                               zip(ctl, ("valid", "first", "last", "lastrow")))

        # ---- row accumulator (|score| <= 2**22), then the output queue
        acc = Signal(signed(SCORE_BITS), name="acc", reset_less=True)
        with m.If(t_valid):
            m.d.sync += acc.eq(Mux(t_first, 0, acc) + beat_sum)
        acc_valid = delay(t_valid & t_last, 1, "acc_valid")
        acc_lastrow = delay(t_lastrow, 1, "acc_lastrow")
        fifo = m.submodules.out_fifo = BlockRamFifo(width=SCORE_BITS + 1, depth=OUT_FIFO_DEPTH)
        m.d.comb += [
            fifo.w_en.eq(acc_valid),
            fifo.w_data.eq(Cat(acc, acc_lastrow)),
            mo.tvalid.eq(fifo.r_rdy),
            mo.tdata.eq(fifo.r_data[:SCORE_BITS]),
            mo.tlast.eq(fifo.r_data[SCORE_BITS]),
            mo.tuser.eq(1),
            fifo.r_en.eq(mo.tready),
        ]
        return m
