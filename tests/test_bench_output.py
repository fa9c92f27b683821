"""`make bench` prints progress and results only: the simulator's output goes to a log file, and the
cocotbext-axi deprecations are fixed where they arise (sim/tb/common.Cocotb2Stream), not filtered."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from gpt_fpga.sim.tb.runner import simulator_cases

TOOL_NOISE = ("cocotb.regression", "Running on Verilator", "cocotbext-axi version", "TESTS=", "Verilator",
              "DeprecationWarning", "\r")


@pytest.mark.sim
@pytest.mark.parametrize("sim", simulator_cases(["verilator"]))
def test_cores_section_prints_no_tool_output(tmp_path, sim):
    """The cores section's own function (one format, the cheaper int4), in a fresh process as make bench
    runs it, with stdout and stderr pipes (no terminal, so no progress bars either)."""
    logs = tmp_path / "logs"
    code = (f"from gpt_fpga.bench.cores import bench_matvec\n"
            f"r = bench_matvec({str(logs)!r}, sim={sim!r}, formats=('int4',))['int4']\n"
            f"print('efficiency', r['efficiency'])")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == f"cores: matvec int4 on {sim} ..." and lines[1].startswith("efficiency ") and len(lines) == 2, \
        run.stdout
    for noise in TOOL_NOISE:
        assert noise not in run.stdout and noise not in run.stderr, (noise, run.stdout, run.stderr)
    test_log = (logs / "matvec-int4" / "test.log").read_text()
    assert "cocotb.regression" in test_log and "test_throughput" in test_log  # where the output went
    assert "Warning" not in test_log, [line for line in test_log.splitlines() if "Warning" in line]
