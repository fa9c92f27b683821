"""Helpers shared by the cocotb testbenches of the cores (sim/tb/*.py).

* :data:`PARAMS` - the testbench parameters, JSON in TB_PARAMS (set by sim/tb/runner.run_cocotb);
  :func:`linear` evaluates a cycle-count formula passed there as (constant, per-element);
* :class:`StreamTB` - base of the testbench classes: clock on ``clk``, synchronous reset on
  ``rst``, cocotbext-axi sources / sinks on the core's AXI-Stream ports, and checks of the core's
  sticky ``error`` output (:meth:`StreamTB.expect_error`, :meth:`StreamTB.assert_no_error`);
* :func:`stalls` - a random pause generator for those sources and sinks; :func:`set_stalls`
  installs one on a source or sink (or removes it, leaving the end unpaused);
* :class:`Scoreboard` - expected rows in order, each received row compared by equality;
* :class:`CycleMonitor` - cycle numbers of the handshakes, frame ends and first ``tvalid`` of each
  frame on some ports (throughput, latency and cycles-per-row tests); :func:`watch_rows` is the
  per-row view of it that the row cores' timing tests read.
"""

from __future__ import annotations

import json
import os
import random
from collections import deque
from collections.abc import Mapping

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, ReadWrite, RisingEdge
from cocotb.types import LogicArray
from cocotbext.axi import AxiStreamBus, AxiStreamSink, AxiStreamSource

PARAMS = json.loads(os.environ.get("TB_PARAMS", "{}"))


class Cocotb2Stream:
    """cocotbext-axi 0.1.28 (pinned; its newest release) drives its stream ends with handle calls that
    the pinned cocotb 2.1 deprecates, one DeprecationWarning each: ``setimmediatevalue`` for the initial
    values, ``Edge(signal)`` to watch the reset, ``Task.kill()`` on reset and on a new pause generator.
    Mixed in before the library's class, this does the same with cocotb 2's API: the library's own
    initial values are switched off (class attributes) and deposited here with ``handle.value = ...``
    (what ``setimmediatevalue`` does in cocotb 2.1, applied at the time step's write phase, before any
    clock edge; ``Immediate`` would not do: Icarus drops a no-delay write to a top-level input), the
    reset watcher awaits ``signal.value_change``, and tasks are ended with ``cancel()`` before the
    library would kill them."""

    _init_x = False
    _valid_init = None
    _ready_init = None
    INITIAL: dict[str, int] = {}  # signal -> value set at construction; other signals X (sources)
    X_OTHERS = False

    def __init__(self, bus, *args, **kw):
        super().__init__(bus, *args, **kw)
        for sig in self._signals + self._optional_signals:
            if not hasattr(bus, sig):
                continue
            handle = getattr(bus, sig)
            if sig in self.INITIAL:
                handle.value = self.INITIAL[sig]
            elif self.X_OTHERS and sig not in ("tvalid", "tready"):
                handle.value = LogicArray("X" * len(handle))

    async def _run_reset(self, reset_signal, active_level):
        while True:
            await reset_signal.value_change
            try:
                level = bool(int(reset_signal.value))
            except ValueError:
                continue
            self._ext_reset = active_level if level else not active_level
            self._update_reset()

    def _handle_reset(self, state):
        if state and self._run_cr is not None:
            self._run_cr.cancel()
            self._run_cr = None
        super()._handle_reset(state)

    def set_pause_generator(self, generator=None):
        if self._pause_cr is not None:
            self._pause_cr.cancel()
            self._pause_cr = None
        super().set_pause_generator(generator)


class StreamSource(Cocotb2Stream, AxiStreamSource):
    """AxiStreamSource: tvalid 0 and the other signals X from the start, as the library's own."""

    INITIAL = {"tvalid": 0}
    X_OTHERS = True


class StreamSink(Cocotb2Stream, AxiStreamSink):
    """AxiStreamSink: tready 0 from the start."""

    INITIAL = {"tready": 0}


def linear(key: str, n: int) -> int:
    """PARAMS[key] = (c0, c1), a formula linear in the row length n: c0 + c1 * n."""
    c0, c1 = PARAMS[key]
    return c0 + c1 * n


def stalls(rng: random.Random, p: float):
    """Endless pause pattern: True (stall) with probability p per cycle."""
    while True:
        yield rng.random() < p


def set_stalls(end, rng: random.Random, p: float):
    """Random stalls with probability `p` per cycle on a cocotbext-axi source or sink; p = 0 removes
    the pause generator and unpauses the end (a removed generator would otherwise leave its last
    value, possibly a pause, in place)."""
    if p > 0:
        end.set_pause_generator(stalls(rng, p))
    else:
        end.clear_pause_generator()
        end.pause = False


def int8_values(tdata) -> list[int]:
    """The bytes of an AXI-Stream frame as signed int8 values."""
    return [int(v) - 256 if v >= 128 else int(v) for v in tdata]


class StreamTB:
    """Clock, reset and AXI-Stream ends of a core with ``clk``, ``rst`` and ``<port>__<signal>`` ports.

    Cores with an ``error`` output (a sticky bit vector, one bit per cause, cleared by ``rst``)
    name its bits, bit 0 first, in their ``ERROR_BITS``; a testbench copies them to its own
    ``ERROR_BITS``, and :meth:`expect_error` and :meth:`assert_no_error` check ``error`` by name.
    """

    ERROR_BITS: tuple[str, ...] = ()

    async def drive_config(self, **values: int):
        """Drive configuration ports (``name=value``) that the core passes through a register, so they
        must change at least a cycle before the job's first beat: waiting for ReadWrite lets every
        stream source act on this edge first, so a beat queued after this call is offered from the
        next edge on and taken one edge later at the earliest, with the new values in the register."""
        await ReadWrite()
        for name, value in values.items():
            getattr(self.dut, name).value = value

    def __init__(self, dut, period_ns: int = 10):
        self.dut = dut
        Clock(dut.clk, period_ns, unit="ns").start()

    def _bus(self, prefix: str) -> AxiStreamBus:
        return AxiStreamBus.from_prefix(self.dut, prefix, bus_separator="__")

    def axis_source(self, prefix: str, **kw) -> AxiStreamSource:
        """A cocotbext-axi source driving port `prefix`, without per-frame logging."""
        source = StreamSource(self._bus(prefix), self.dut.clk, self.dut.rst, **kw)
        source.log.setLevel("WARNING")
        return source

    def axis_sink(self, prefix: str, **kw) -> AxiStreamSink:
        """A cocotbext-axi sink draining port `prefix`, without per-frame logging."""
        sink = StreamSink(self._bus(prefix), self.dut.clk, self.dut.rst, **kw)
        sink.log.setLevel("WARNING")
        return sink

    async def reset(self, cycles: int = 3):
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, cycles)
        self.dut.rst.value = 0
        await RisingEdge(self.dut.clk)

    # ---- the core's sticky error output ----
    def error_names(self, value: int) -> list[str]:
        """Names of the bits set in an ``error`` value."""
        names = self.ERROR_BITS
        return [names[i] if i < len(names) else f"bit{i}" for i in range(value.bit_length()) if value >> i & 1]

    def error_value(self) -> int:
        return int(self.dut.error.value)

    def assert_no_error(self, what: str = ""):
        value = self.error_value()
        assert value == 0, f"{what + ': ' if what else ''}error raised: {self.error_names(value)}"

    async def expect_error(self, *names: str, timeout: int = 1000, hold: int = 32, stopped: tuple[str, ...] = ()):
        """Wait (at most `timeout` cycles) until ``error`` is non-zero; it must then hold exactly the
        bits `names` and keep them, unchanged, for `hold` more cycles (sticky until reset), while the
        input ports named in `stopped` keep ``tready`` low (the core takes nothing more)."""
        want = sum(1 << self.ERROR_BITS.index(n) for n in names)
        for _ in range(timeout):
            await RisingEdge(self.dut.clk)
            if self.error_value():
                break
        got = self.error_value()
        assert got == want, f"error is {self.error_names(got)} (waited {timeout} cycles at most), expected {list(names)}"
        readies = [(p, getattr(self.dut, f"{p}__tready")) for p in stopped]
        for cycle in range(1, hold + 1):
            await RisingEdge(self.dut.clk)
            now = self.error_value()
            assert now == want, f"error changed to {self.error_names(now)} {cycle} cycles later (not sticky)"
            for port, ready in readies:
                assert not ready.value, f"{port}.tready high {cycle} cycles after the error {list(names)}"


class Scoreboard:
    """Expected rows (with a tag naming the case), compared in order with the rows received.

    ``expect(row, tag, detail)``: `detail`, if given, is called with the index of the first
    mismatching element and returns text added to the failure message (e.g. that row's parameters).
    """

    def __init__(self):
        self.expected, self.checked = deque(), 0
        self._details = deque()

    def expect(self, row: list[int], tag: str, detail=None):
        self.expected.append((row, tag))
        self._details.append(detail)

    def clear(self):
        """Forget the rows still expected (their stream was abandoned by a reset)."""
        self.expected.clear()
        self._details.clear()

    def compare(self, got: list[int]):
        assert self.expected, f"unexpected output row of {len(got)} elements"
        exp, tag = self.expected.popleft()
        detail = self._details.popleft()
        assert len(got) == len(exp), f"{tag}: got {len(got)} elements, expected {len(exp)}"
        if got != exp:
            bad = [i for i, (g, e) in enumerate(zip(got, exp)) if g != e]
            i = bad[0]
            more = f" ({detail(i)})" if detail is not None else ""
            raise AssertionError(f"{tag}: {len(bad)} of {len(exp)} elements differ; element {i}: got {got[i]}, "
                                 f"expected {exp[i]}{more}")
        self.checked += 1

    async def wait_empty(self, clk, timeout: int, idle=lambda: True):
        """Wait (at most `timeout` cycles) until every expected row has been checked and `idle()` holds."""
        for _ in range(timeout):
            if not self.expected and idle():
                return
            await RisingEdge(clk)
        raise AssertionError(f"timeout: {len(self.expected)} rows still expected")


class CycleMonitor:
    """Records, from :meth:`start`, on each AXI-Stream port named (``<port>__tvalid`` etc.), the
    cycle number of every handshake (:attr:`beats`), of every handshake with ``tlast``
    (:attr:`lasts`) and of the first ``tvalid`` of every frame (:attr:`frame_valid`: the first
    cycle with ``tvalid`` high after the previous frame's ``tlast`` handshake). Cycle 1 is the first
    rising edge after :meth:`start`; values are sampled at rising edges.
    """

    def __init__(self, dut, *ports: str):
        self.clk = dut.clk
        self._sig = {p: tuple(getattr(dut, f"{p}__{s}") for s in ("tvalid", "tready", "tlast")) for p in ports}
        self.beats: dict[str, list[int]] = {}
        self.lasts: dict[str, list[int]] = {}
        self.frame_valid: dict[str, list[int]] = {}
        self.cycle = 0
        self._task = None

    def start(self) -> "CycleMonitor":
        self.stop()
        self.cycle = 0
        for d in (self.beats, self.lasts, self.frame_valid):
            d.clear()
            d.update({p: [] for p in self._sig})
        self._task = cocotb.start_soon(self._run())
        return self

    def stop(self):
        if self._task is not None:
            self._task.cancel()
            self._task = None

    cancel = stop

    def count(self, port: str) -> int:
        """Handshakes seen on `port`."""
        return len(self.beats[port])

    def span(self, port: str) -> int:
        """Cycles from the first handshake on `port` to the last one, both included (0 if none)."""
        b = self.beats[port]
        return b[-1] - b[0] + 1 if b else 0

    def frames(self, port: str) -> list[tuple[int, int]]:
        """(first handshake, tlast handshake) cycles of each complete frame on `port`."""
        out, start = [], None
        lasts = set(self.lasts[port])
        for c in self.beats[port]:
            start = c if start is None else start
            if c in lasts:
                out.append((start, c))
                start = None
        return out

    async def _run(self):
        edge = RisingEdge(self.clk)
        in_frame = {p: False for p in self._sig}
        while True:
            await edge
            self.cycle += 1
            for p, (valid, ready, last) in self._sig.items():
                if not valid.value:
                    continue
                if not in_frame[p]:
                    self.frame_valid[p].append(self.cycle)
                    in_frame[p] = True
                if ready.value:
                    self.beats[p].append(self.cycle)
                    if last.value:
                        self.lasts[p].append(self.cycle)
                        in_frame[p] = False


class _RowEdges(Mapping):
    """Live per-row view of a CycleMonitor on an input port `s` and an output port `m`."""

    def __init__(self, monitor: CycleMonitor, s: str, m: str):
        self._mon, self._s, self._m = monitor, s, m

    def _edges(self) -> dict:
        rows = self._mon.frames(self._s)
        return {"first_in": [a for a, _ in rows], "last_in": [b for _, b in rows],
                "first_out": list(self._mon.frame_valid[self._m]), "last_out": list(self._mon.lasts[self._m])}

    def __getitem__(self, key):
        return self._edges()[key]

    def __iter__(self):
        return iter(("first_in", "last_in", "first_out", "last_out"))

    def __len__(self):
        return 4


def watch_rows(dut, s: str, m: str):
    """Start a :class:`CycleMonitor` on input port `s` and output port `m` and return its per-row view
    and the monitor (``cancel()`` stops it): ``edges["first_in"]``, ``"last_in"`` (cycles of each
    row's first and tlast handshake on `s`), ``"first_out"`` (first ``m.tvalid`` of each row) and
    ``"last_out"`` (tlast handshake on `m`)."""
    monitor = CycleMonitor(dut, s, m).start()
    return _RowEdges(monitor, s, m), monitor
