"""Helpers shared by the cocotb testbenches of the cores (sim/tb/*.py).

* :data:`PARAMS` - the testbench parameters, JSON in TB_PARAMS (set by sim/tb/runner.run_cocotb);
  :func:`linear` evaluates a cycle-count formula passed there as (constant, per-element);
* :class:`StreamTB` - base of the testbench classes: clock on ``clk``, synchronous reset on
  ``rst``, and cocotbext-axi sources / sinks on the core's AXI-Stream ports;
* :func:`stalls` - a random pause generator for those sources and sinks;
* :class:`Scoreboard` - expected rows in order, each received row compared by equality;
* :func:`watch_rows` - cycle numbers of each row's first / last beat in and out (timing tests).
"""

from __future__ import annotations

import json
import os
import random
from collections import deque

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiStreamBus, AxiStreamSink, AxiStreamSource

PARAMS = json.loads(os.environ.get("TB_PARAMS", "{}"))


def linear(key: str, n: int) -> int:
    """PARAMS[key] = (c0, c1), a formula linear in the row length n: c0 + c1 * n."""
    c0, c1 = PARAMS[key]
    return c0 + c1 * n


def stalls(rng: random.Random, p: float):
    """Endless pause pattern: True (stall) with probability p per cycle."""
    while True:
        yield rng.random() < p


def int8_values(tdata) -> list[int]:
    """The bytes of an AXI-Stream frame as signed int8 values."""
    return [int(v) - 256 if v >= 128 else int(v) for v in tdata]


class StreamTB:
    """Clock, reset and AXI-Stream ends of a core with ``clk``, ``rst`` and ``<port>__<signal>`` ports."""

    def __init__(self, dut, period_ns: int = 10):
        self.dut = dut
        Clock(dut.clk, period_ns, unit="ns").start()

    def _bus(self, prefix: str) -> AxiStreamBus:
        return AxiStreamBus.from_prefix(self.dut, prefix, bus_separator="__")

    def axis_source(self, prefix: str, **kw) -> AxiStreamSource:
        """A cocotbext-axi source driving port `prefix`, without per-frame logging."""
        source = AxiStreamSource(self._bus(prefix), self.dut.clk, self.dut.rst, **kw)
        source.log.setLevel("WARNING")
        return source

    def axis_sink(self, prefix: str, **kw) -> AxiStreamSink:
        """A cocotbext-axi sink draining port `prefix`, without per-frame logging."""
        sink = AxiStreamSink(self._bus(prefix), self.dut.clk, self.dut.rst, **kw)
        sink.log.setLevel("WARNING")
        return sink

    async def reset(self, cycles: int = 3):
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, cycles)
        self.dut.rst.value = 0
        await RisingEdge(self.dut.clk)


class Scoreboard:
    """Expected rows (with a tag naming the case), compared in order with the rows received."""

    def __init__(self):
        self.expected, self.checked = deque(), 0

    def expect(self, row: list[int], tag: str):
        self.expected.append((row, tag))

    def compare(self, got: list[int]):
        assert self.expected, f"unexpected output row of {len(got)} elements"
        exp, tag = self.expected.popleft()
        assert len(got) == len(exp), f"{tag}: got {len(got)} elements, expected {len(exp)}"
        if got != exp:
            bad = next(i for i, (g, e) in enumerate(zip(got, exp)) if g != e)
            raise AssertionError(f"{tag}: element {bad}: got {got[bad]}, expected {exp[bad]}")
        self.checked += 1

    async def wait_empty(self, clk, timeout: int, idle=lambda: True):
        """Wait (at most `timeout` cycles) until every expected row has been checked and `idle()` holds."""
        for _ in range(timeout):
            if not self.expected and idle():
                return
            await RisingEdge(clk)
        raise AssertionError(f"timeout: {len(self.expected)} rows still expected")


def watch_rows(dut, s: str, m: str):
    """Start recording, per row, the cycle of the first and last handshake on input port `s`, of the
    first m.tvalid and of the last handshake (tlast) on output port `m`.

    Returns the lists (``edges["first_in"]``, ``"last_in"``, ``"first_out"``, ``"last_out"``) and the
    task, to cancel once the rows are through.
    """
    s_valid, s_ready, s_last = (getattr(dut, f"{s}__{x}") for x in ("tvalid", "tready", "tlast"))
    m_valid, m_ready, m_last = (getattr(dut, f"{m}__{x}") for x in ("tvalid", "tready", "tlast"))
    edges = {"first_in": [], "last_in": [], "first_out": [], "last_out": []}

    async def watch():
        cycle, in_row, out_row = 0, False, False
        while True:
            await RisingEdge(dut.clk)
            cycle += 1
            if s_valid.value and s_ready.value:
                if not in_row:
                    edges["first_in"].append(cycle)
                in_row = not s_last.value
                if not in_row:
                    edges["last_in"].append(cycle)
            if m_valid.value and not out_row:
                edges["first_out"].append(cycle)
                out_row = True
            if m_valid.value and m_ready.value and m_last.value:
                edges["last_out"].append(cycle)
                out_row = False

    return edges, cocotb.start_soon(watch())
