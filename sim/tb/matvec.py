"""cocotb testbench for hw/matvec.py: every output checked for equality with the integer model.

Run through tests/test_hw_matvec.py (sim/tb/runner.run_cocotb), which builds the core for one
parameter set and passes it here as JSON in TB_PARAMS:
``bus_bits, weights, group, max_d_in`` (the core's elaboration parameters), ``latency`` (the core's
``latency`` property), ``big`` (run the d_in 3072 random case; default true), ``throughput``
(run the 768 x 3072 throughput test; default false) and optionally ``result_json`` (a file the
throughput test writes ``{weights: {beats, cycles, efficiency}}`` to).

Structure (after cocotb's matrix_multiplier example and taxi's AXI-Stream tests):
* :class:`Case` - one matvec: the integer arrays, packed into the weight stream by
  contract/layout.pack_matrix;
* :func:`model` - the expected outputs: the packed stream read back by ``sim/fixed_model.Matrix``
  (the very object ``--backend fixed`` uses: ``Matrix.from_stream`` unpacks it with
  contract/layout.unpack_matrix, and calling it is contract/numerics.matvec);
* :class:`TB` - clock, reset, cocotbext-axi sources/sink (sim/tb/common.StreamTB) with pause
  generators (common.set_stalls), a cycle monitor on the weight stream (common.CycleMonitor) and
  the scoreboard (common.Scoreboard), fed by a monitor coroutine with each m_out frame (tlast
  delimits it) and comparing it with the model's outputs, in order, by equality. Every matvec
  must leave the sticky ``error`` output at 0; test_errors provokes each of its causes
  (``MatVec.ERROR_BITS``) and checks the recovery through a reset.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import cocotb
import numpy as np
from cocotb.triggers import ClockCycles

from gpt_fpga.hw.matvec import MatVec
from gpt_fpga.contract.layout import HwLayout, ceil_div, pack_matrix
from gpt_fpga.sim.fixed_model import Matrix
from gpt_fpga.contract import numerics as nx
from gpt_fpga.sim.tb.common import PARAMS, CycleMonitor, Scoreboard, StreamTB, set_stalls

LAYOUT = HwLayout(bus_bits=PARAMS.get("bus_bits", 64), weights=PARAMS.get("weights", "int8"),
                  group=PARAMS.get("group", 32))
MAX_D_IN = PARAMS.get("max_d_in", nx.MAX_D_IN)
INT4 = LAYOUT.weights == "int4"
W_MIN, W_MAX = (nx.INT4_MIN, nx.INT4_MAX) if INT4 else (-128, 127)
PERIOD_NS = 10


# ---- stimulus and model ---------------------------------------------------------------------
@dataclass
class Case:
    """One matvec: w [d_out, d_in] (int8, or int4 values), group scales (int4), a [d_in], row params."""

    name: str
    w: np.ndarray
    gs: np.ndarray | None
    a: np.ndarray
    bias: np.ndarray
    mult: np.ndarray
    shift: np.ndarray
    out_int8: bool

    @property
    def d_out(self) -> int:
        return self.w.shape[0]

    @property
    def d_in(self) -> int:
        return self.w.shape[1]

    def weight_stream(self) -> bytes:
        return pack_matrix(self.w, self.gs, self.bias, self.mult, self.shift, LAYOUT)

    def act_stream(self, rng) -> bytes:
        """The activations, padded to whole beats with random bytes (the weights there are zero)."""
        pad = ceil_div(self.d_in, LAYOUT.bus_bytes) * LAYOUT.bus_bytes - self.d_in
        return self.a.astype(np.int8).tobytes() + rng.integers(0, 256, pad, dtype=np.uint8).tobytes()


def model(case: Case) -> np.ndarray:
    """Expected m_out values: the packed stream through the very Matrix that --backend fixed uses."""
    matrix = Matrix.from_stream(case.weight_stream(), case.d_out, case.d_in, LAYOUT)
    return matrix(np.asarray(case.a)[None], 8 if case.out_int8 else 32)[0]


def shifts_for(w_eff, a, bias, mult, rng, spread=(-2, 3)) -> np.ndarray:
    """Per-row shifts putting most outputs in range and some past it (test data, not expectations)."""
    p = np.abs(nx.matvec_acc(w_eff, a, bias) * mult)
    return np.clip(nx.bit_length(p) - 7 + rng.integers(*spread, size=p.shape), 0, nx.MAX_SHIFT)


def random_case(rng, name, d_out, d_in, out_int8, bias_bits=20) -> Case:
    w = rng.integers(W_MIN, W_MAX + 1, (d_out, d_in))
    gs = rng.integers(1, nx.GROUP_SCALE_MAX + 1, (d_out, ceil_div(d_in, LAYOUT.group))) if INT4 else None
    a = rng.integers(-128, 128, d_in)
    bias = rng.integers(-(1 << bias_bits), 1 << bias_bits, d_out)
    mult = rng.integers(1 << 14, 1 << 15, d_out)
    w_eff = nx.expand_int4(w, gs, LAYOUT.group) if INT4 else w
    if out_int8:
        shift = shifts_for(w_eff, a, bias, mult, rng)
    else:
        shift = rng.integers(0, nx.MAX_SHIFT + 1, d_out)
    return Case(name, w, gs, a, bias, mult, shift, out_int8)


def extreme_case(out_int8: bool) -> Case:
    """d_in = max_d_in, a = -128: the accumulator's contract bounds, saturation at both ends, shift 0/47."""
    d_in, big = MAX_D_IN, nx.MAX_BIAS
    rows = [  # (weight fill, bias, mult, shift)
        (W_MIN, big, (1 << 15) - 1, 0),        # largest positive acc -> saturate high
        (W_MAX, -big, (1 << 15) - 1, 0),       # largest negative acc -> saturate low
        (W_MIN, big, (1 << 15) - 1, 47),       # |acc * mult| near 2**46, shifted by 47
        (W_MAX, -big, (1 << 15) - 1, 47),
        (W_MIN, big, 0xFFFF, 47),              # |acc * mult| > 2**46: shift 47 gives +-1
        (W_MAX, -big, 0xFFFF, 47),
        (0, big, 1, 0),                        # bias +2**30 alone
        (0, -big, 1, 0),                       # bias -2**30 alone
        (W_MIN, 0, 1 << 14, 30),
        (W_MAX, big, 0xFFFF, 20),              # the header's full uint16 multiplier
        (W_MIN, -big, 0, 5),                   # mult 0
        ("alt", 12345, (1 << 15) - 1, 24),     # alternating min / max weights
    ]
    w = np.zeros((len(rows), d_in), np.int64)
    for r, (fill, *_rest) in enumerate(rows):
        w[r] = np.where(np.arange(d_in) % 2, W_MAX, W_MIN) if fill == "alt" else fill
    gs = np.full((len(rows), ceil_div(d_in, LAYOUT.group)), nx.GROUP_SCALE_MAX) if INT4 else None
    col = lambda i: np.array([row[i] for row in rows])  # noqa: E731
    return Case(f"extremes-out{8 if out_int8 else 32}", w, gs, np.full(d_in, -128), col(1), col(2), col(3),
                out_int8)


def rounding_case(rng, out_int8: bool) -> Case:
    """Every shift 0..47; exact round-half ties of both signs (acc * mult = odd * 2**(shift-1)).
    (Shifts above 47 are refused: test_errors.)"""
    d_in = LAYOUT.weights_per_beat + 3
    bias, mult, shift = [], [], []
    for s in range(nx.MAX_SHIFT + 1):
        for sign in (1, -1):
            if 1 <= s <= 46:
                j = min(s - 1, 15)  # mult = 2**j (j = 15 uses the header's 16th bit)
                odd = int(rng.integers(0, 1 << max(0, 14 - (s - 1 - j)))) * 2 + 1
                bias.append(sign * odd * (1 << (s - 1 - j)))
                mult.append(1 << j)
            else:
                bias.append(sign * int(rng.integers(1 << 29, 1 << 30)))
                mult.append(int(rng.integers(1 << 14, 1 << 15)))
            shift.append(s)
        bias.append(int(rng.integers(-(1 << 30), 1 << 30)))  # and a random row with this shift
        mult.append(int(rng.integers(1 << 14, 1 << 15)))
        shift.append(s)
    n = len(shift)
    w = np.zeros((n, d_in), np.int64)
    w[2::3] = rng.integers(W_MIN, W_MAX + 1, (n // 3, d_in))  # the random rows get weights too
    gs = rng.integers(1, 256, (n, ceil_div(d_in, LAYOUT.group))) if INT4 else None
    return Case(f"rounding-out{8 if out_int8 else 32}", w, gs, rng.integers(-128, 128, d_in),
                np.array(bias), np.array(mult), np.array(shift), out_int8)


def corner_values_case(rng, out_int8: bool, d_out=24, d_in=200) -> Case:
    """Weights and activations drawn from the corners of their ranges (-128, int4 -8, +-1, 0, max)."""
    w = rng.choice([W_MIN, W_MIN + 1, -1, 0, 1, W_MAX], (d_out, d_in))
    gs = rng.choice([1, 2, 128, 255], (d_out, ceil_div(d_in, LAYOUT.group))) if INT4 else None
    a = rng.choice([-128, -127, -1, 0, 1, 127], d_in)
    bias = rng.choice([-nx.MAX_BIAS, -1, 0, 1, nx.MAX_BIAS], d_out)
    mult = rng.choice([0, 1, 1 << 14, (1 << 15) - 1], d_out)
    shift = rng.choice([0, 1, 7, 15, 31, 46, 47], d_out)
    return Case(f"corners-out{8 if out_int8 else 32}", w, gs, a, bias, mult, shift, out_int8)


# ---- testbench ------------------------------------------------------------------------------
class TB(StreamTB):
    ERROR_BITS = MatVec.ERROR_BITS

    def __init__(self, dut, seed: int = 0):
        super().__init__(dut, PERIOD_NS)
        self.log = logging.getLogger("cocotb.tb")
        self.rng = np.random.default_rng(seed)  # stimulus
        self.pause_rng = random.Random(seed)    # stall patterns
        self.act = self.axis_source("s_act")
        self.wts = self.axis_source("s_weights")
        self.out = self.axis_sink("m_out")
        self.monitor = CycleMonitor(dut, "s_weights")
        self.scoreboard = Scoreboard()
        self.discard = False  # drop m_out frames (an error case: the command is abandoned)
        self._frames = cocotb.start_soon(self._receive())
        dut.d_in.value = 1
        dut.n_rows.value = 1
        dut.out_int8.value = 1

    async def _receive(self):
        """Monitor: every m_out frame (tlast-delimited) goes to the scoreboard."""
        while True:
            frame = await self.out.recv()
            if not self.discard:
                self.scoreboard.compare(np.frombuffer(bytes(frame.tdata), "<i4").tolist())

    def stalls(self, act=0.0, wts=0.0, out=0.0):
        """Random valid stalls on the inputs and ready stalls on the output, with these probabilities."""
        for end, p in ((self.act, act), (self.wts, wts), (self.out, out)):
            set_stalls(end, self.pause_rng, p)

    def configure(self, case: Case):
        self.dut.d_in.value = case.d_in
        self.dut.n_rows.value = case.d_out
        self.dut.out_int8.value = int(case.out_int8)

    async def drive(self, cases):
        """Queue the matvecs back to back. The config of the next one is applied once this one's
        activations have all been accepted (the core samples it during the activation load)."""
        for case in cases:
            self.configure(case)
            await self.act.send(case.act_stream(self.rng))
            self.wts.send_nowait(case.weight_stream())  # one transfer: tlast on the matrix's last beat
            await self.act.wait()

    def expect(self, case: Case):
        """The model's outputs for `case` go to the scoreboard; a mismatch names the row's parameters."""
        def detail(r):
            return f"d_in {case.d_in}, out_int8 {case.out_int8}, row {r}: bias {case.bias[r]}, " \
                   f"mult {case.mult[r]}, shift {case.shift[r]}"
        self.scoreboard.expect(model(case).tolist(), f"{case.name} ({case.d_out} x {case.d_in})", detail)

    async def run(self, cases):
        """Drive the matvecs and wait until every output has been checked."""
        for case in cases:
            self.expect(case)
        driver = cocotb.start_soon(self.drive(cases))
        budget = sum(4 * c.d_out * LAYOUT.row_beats(c.d_in) + 4 * ceil_div(c.d_in, LAYOUT.bus_bytes) for c in cases)
        await self.scoreboard.wait_empty(self.dut.clk, 50 * budget + 1000)
        await driver
        self.assert_no_error(", ".join(c.name for c in cases))
        for case in cases:
            self.log.info("%s: %d outputs match", case.name, case.d_out)

    async def recover(self, tag: str, d_in: int = 768):
        """Abandon whatever is queued or in flight, reset (the engine's soft reset), check that
        ``error`` is clear, and run one normal matvec, which must be exact."""
        self.act.clear()
        self.wts.clear()
        await self.reset()
        self.out.clear()
        self.scoreboard.clear()
        self.discard = False
        self.out.pause = False
        self.assert_no_error(f"right after the reset ({tag})")
        await self.run([random_case(self.rng, f"after-{tag}", 10, d_in, True)])


async def start(dut, seed=0) -> TB:
    tb = TB(dut, seed)
    await tb.reset()
    return tb


# ---- tests ----------------------------------------------------------------------------------
@cocotb.test(timeout_time=100, timeout_unit="us")
async def test_random_small(dut):
    """Small random matvecs (d_in not a multiple of the beat or the group, d_in 1), both output modes."""
    tb = await start(dut, 1)
    cases = [random_case(tb.rng, "small-out8", 9, 37 if not INT4 else 100, True),
             random_case(tb.rng, "small-out32", 7, 37 if not INT4 else 100, False),
             random_case(tb.rng, "d_in-1", 5, 1, True),
             random_case(tb.rng, "one-row", 1, LAYOUT.weights_per_beat, True)]
    await tb.run(cases)
    tb.stalls(act=0.3, wts=0.3, out=0.3)
    await tb.run([random_case(tb.rng, "small-stalls", 11, 45 if not INT4 else 160, True)])


@cocotb.test(timeout_time=500, timeout_unit="us")
async def test_random_768(dut):
    """d_in 768 (GPT-2 small width) with random stalls on all three streams."""
    tb = await start(dut, 2)
    tb.stalls(act=0.2, wts=0.2, out=0.5)
    await tb.run([random_case(tb.rng, "768-out8", 8, 768, True),
                  random_case(tb.rng, "768-out32", 4, 768, False, bias_bits=30)])


@cocotb.test(timeout_time=500, timeout_unit="us", skip=not PARAMS.get("big", True))
async def test_random_3072(dut):
    """d_in 3072 (GPT-2 MLP projection input) with random stalls."""
    tb = await start(dut, 3)
    tb.stalls(act=0.1, wts=0.1, out=0.3)
    await tb.run([random_case(tb.rng, "3072-out8", 4, 3072, True)])


@cocotb.test(timeout_time=2000, timeout_unit="us")
async def test_edges(dut):
    """Saturation at both ends (int8 and int32 out), -128 / int4 -8 extremes, shift 0..47 with ties,
    bias +-2**30, mult 0 and 0xFFFF."""
    tb = await start(dut, 4)
    await tb.run([extreme_case(True), extreme_case(False)])
    tb.stalls(wts=0.2, out=0.2)
    await tb.run([rounding_case(tb.rng, True), rounding_case(tb.rng, False),
                  corner_values_case(tb.rng, True), corner_values_case(tb.rng, False)])


@cocotb.test(timeout_time=500, timeout_unit="us")
async def test_back_to_back(dut):
    """Five matvecs of different shapes and output modes queued back to back, with and without
    m_out back-pressure; no weight bubble inside a matvec when m_out keeps up."""
    tb = await start(dut, 5)
    shapes = [(6, 96, True), (3, 200, False), (12, 17, True), (1, 64, False), (20, 8, True)]
    cases = [random_case(tb.rng, f"b2b-{i}", o, i_, q) for i, (o, i_, q) in enumerate(shapes)]
    tb.monitor.start()
    await tb.run(cases)
    tb.monitor.stop()
    act_cycles = sum(ceil_div(c.d_in, LAYOUT.bus_bytes) for c in cases[1:])
    beats = sum(c.d_out * LAYOUT.row_beats(c.d_in) for c in cases)
    got, span = tb.monitor.count("s_weights"), tb.monitor.span("s_weights")
    assert got == beats, (got, beats)
    # between the first and the last weight beat only the activation loads of matvecs 2..5 may stall
    assert span <= beats + act_cycles + 4 * len(cases), (span, beats, act_cycles)
    tb.stalls(act=0.3, wts=0.3, out=0.7)
    await tb.run([random_case(tb.rng, f"b2b-stall-{i}", o, i_, q) for i, (o, i_, q) in enumerate(shapes)])


@cocotb.test(timeout_time=2000, timeout_unit="us")
async def test_reset_mid_stream(dut):
    """A synchronous reset during the activations, during the weights, and with results held back by
    m_out; each is followed by a correct matvec."""
    tb = await start(dut, 6)
    d_in = 768

    async def abort(after_cycles, hold_output=False):
        case = random_case(tb.rng, "aborted", 16, d_in, True)
        tb.out.pause = hold_output
        driver = cocotb.start_soon(tb.drive([case]))
        await ClockCycles(dut.clk, after_cycles)
        driver.cancel()
        tb.assert_no_error("aborted matvec")
        await tb.recover(f"reset-{after_cycles}")

    await abort(20)  # inside the activation load (96 or 48 beats)
    await abort(150 + ceil_div(d_in, LAYOUT.bus_bytes))  # inside the weights, mid-row
    await abort(16 * LAYOUT.row_beats(d_in), hold_output=True)  # queue full, credits out, m_out held
    tb.stalls(act=0.3, wts=0.3, out=0.3)
    await abort(400)


@cocotb.test(timeout_time=2000, timeout_unit="us")
async def test_errors(dut):
    """Each error cause raises exactly its bit of ``error``, which stays up while the core takes no
    more input, without and with random stalls; after a reset the next matvec is exact. Causes:
    d_in 0, d_in above max_d_in, n_rows 0; s_act tlast one beat early or missing (a beat long);
    s_weights tlast a row early, mid-row, missing (a row long) or on every row (one transfer per
    row); a row shift of 48 or 255 (which the model refuses too, tests/test_stream_checks.py)."""
    tb = await start(dut, 10)
    B = LAYOUT.bus_bytes
    d_in, d_out = 3 * LAYOUT.weights_per_beat + 5, 6  # several activation and weight beats per row
    row = LAYOUT.row_beats(d_in) * B

    def scenarios():
        c = random_case(tb.rng, "provoke", d_out, d_in, True)
        act, blob = c.act_stream(tb.rng), c.weight_stream()
        yield "d_in 0", ("config",), dict(d_in=0), [act[:B]], []
        if MAX_D_IN + 1 < 1 << len(dut.d_in):
            yield "d_in above max_d_in", ("config",), dict(d_in=MAX_D_IN + 1), [act], [blob]
        yield "n_rows 0", ("config",), dict(n_rows=0), [act], [blob]
        # no weights: the activation stream alone must raise these
        yield "s_act tlast a beat early", ("act_tlast",), {}, [act[:-B]], []
        yield "s_act tlast missing", ("act_tlast",), {}, [act + act[:B]], []
        yield "s_weights tlast a row early", ("weights_tlast",), {}, [act], [blob[:-row]]
        yield "s_weights tlast mid-row", ("weights_tlast",), {}, [act], [blob[:2 * row + row // 2 // B * B]]
        yield "s_weights tlast missing", ("weights_tlast",), {}, [act], [blob + blob[:row]]
        yield "s_weights tlast on every row", ("weights_tlast",), {}, [act], \
            [blob[r * row:(r + 1) * row] for r in range(d_out)]
        for r, bad in ((2, nx.MAX_SHIFT + 1), (0, 255)):
            c.shift[r] = bad
            yield f"row {r} shift {bad}", ("shift",), {}, [act], [c.weight_stream()]
            c.shift[r] = 0

    for stall in (0.0, 0.3):
        tb.stalls(act=stall, wts=stall, out=stall)
        for tag, bits, config, act_frames, weight_frames in scenarios():
            tb.log.info("error case: %s", tag)
            tb.discard = True
            dut.d_in.value = config.get("d_in", d_in)
            dut.n_rows.value = config.get("n_rows", d_out)
            dut.out_int8.value = 1
            await ClockCycles(dut.clk, 1)  # the configuration is stable from the cycle before the first beat
            for frame in act_frames:
                tb.act.send_nowait(frame)
            for frame in weight_frames:
                tb.wts.send_nowait(frame)
            try:
                await tb.expect_error(*bits, timeout=2000, stopped=("s_act", "s_weights"))
            except AssertionError as e:
                raise AssertionError(f"{tag} (stalls {stall}): {e}") from None
            await tb.recover(tag.replace(" ", "-"), d_in=d_in)


@cocotb.test(timeout_time=500, timeout_unit="us")
async def test_output_backpressure(dut):
    """m_out held while many short rows stream: the core stops taking weights (no result is lost),
    then everything drains in order once m_out is released."""
    tb = await start(dut, 9)
    case = random_case(tb.rng, "held-output", 48, LAYOUT.weights_per_beat, True)
    total = case.d_out * LAYOUT.row_beats(case.d_in)
    tb.expect(case)
    tb.out.pause = True
    tb.monitor.start()
    driver = cocotb.start_soon(tb.drive([case]))
    await ClockCycles(dut.clk, 4 * total)
    held = tb.monitor.count("s_weights")
    assert 0 < held < total, f"s_weights took {held} of {total} beats while m_out was held"
    assert dut.m_out__tvalid.value == 1
    tb.out.pause = False
    await tb.scoreboard.wait_empty(dut.clk, 100 * total)
    await driver
    tb.monitor.stop()
    assert tb.monitor.count("s_weights") == total


@cocotb.test(timeout_time=50, timeout_unit="us")
async def test_latency(dut):
    """Cycles from the last weight beat of a row to m_out.tvalid equal the core's latency property."""
    tb = await start(dut, 7)
    case = random_case(tb.rng, "latency", 1, 2 * LAYOUT.weights_per_beat, True)
    mon = CycleMonitor(dut, "s_weights", "m_out").start()
    await tb.run([case])
    mon.stop()
    beats = LAYOUT.row_beats(case.d_in)
    assert mon.count("s_weights") == beats
    measured = mon.frame_valid["m_out"][0] - mon.beats["s_weights"][-1]
    assert measured == PARAMS["latency"], f"latency measured {measured}, property says {PARAMS['latency']}"


@cocotb.test(timeout_time=10, timeout_unit="ms", skip=not PARAMS.get("throughput"))
async def test_throughput(dut):
    """768 x 3072 matvec with no back-pressure: weight beats / cycles (first to last beat) >= 0.98."""
    tb = await start(dut, 8)
    results = {}
    case = random_case(tb.rng, "throughput-768x3072", 768, 3072, True)
    tb.monitor.start()
    await tb.run([case])
    tb.monitor.stop()
    expect = case.d_out * LAYOUT.row_beats(case.d_in)
    beats, cycles = tb.monitor.count("s_weights"), tb.monitor.span("s_weights")
    assert beats == expect, (beats, expect)
    eff = beats / cycles
    results[LAYOUT.weights] = {"beats": beats, "cycles": cycles, "efficiency": eff}
    tb.log.info("throughput %s: %d beats in %d cycles, efficiency %.5f", LAYOUT.weights, beats, cycles, eff)
    if PARAMS.get("result_json"):
        Path(PARAMS["result_json"]).write_text(json.dumps(results))
    assert eff >= 0.98, f"efficiency {eff:.4f} < 0.98"
