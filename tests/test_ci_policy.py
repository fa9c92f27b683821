"""The missing-tool rule (tests/conftest.py::tool_missing): a test whose simulator or Python package is
not installed is skipped locally, and fails naming what to install when the environment says CI=true.

The lookups (shutil.which for iverilog, importlib's find_spec for packages) are monkeypatched to report
a tool missing; the last test runs a real pytest session to show the mark reaches the hook.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

import conftest
from conftest import REPO, requires_modules, tool_missing
from gpt_fpga.sim.tb import runner

ICARUS_MISSING = "iverilog is not installed (CI=true forbids skipping): apt-get install iverilog / make iverilog"


class Item:
    """The part of a pytest item the setup hook reads: its marks."""

    def __init__(self, marks):
        self.marks = [getattr(m, "mark", m) for m in marks]

    def iter_markers(self, name):
        return (m for m in self.marks if m.name == name)


def setup(marks):
    conftest.pytest_runtest_setup(Item(marks))


def outcome(fn, *args) -> tuple[str, str]:
    """("failed" | "skipped" | "ran", message) of fn(*args). pytest.raises is not used: a Skipped
    escaping it would skip this test instead of failing it."""
    try:
        fn(*args)
    except pytest.fail.Exception as e:
        return "failed", str(e)
    except pytest.skip.Exception as e:
        return "skipped", str(e)
    return "ran", ""


@pytest.fixture
def no_iverilog(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(runner.shutil, "which", lambda name, *a, **k: None if name == "iverilog" else real_which(name))


@pytest.fixture
def no_torch(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(conftest.importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "torch" else real_find_spec(name, *a, **k))


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_ci_fails_instead_of_skipping(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert outcome(tool_missing, "iverilog", "apt-get install iverilog / make iverilog") == ("failed", ICARUS_MISSING)


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_outside_ci_a_missing_tool_skips(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert outcome(tool_missing, "iverilog", "apt-get install iverilog / make iverilog") == (
        "skipped", "iverilog is not installed: apt-get install iverilog / make iverilog")


def test_missing_simulator_case_fails_under_ci(monkeypatch, no_iverilog):
    monkeypatch.setenv("CI", "true")
    assert not runner.have_simulator("icarus")
    icarus, verilator = runner.simulator_cases([("icarus", 17), ("verilator", 17)])
    assert icarus.values == ("icarus", 17) and verilator.values == ("verilator", 17)
    assert outcome(setup, icarus.marks) == ("failed", ICARUS_MISSING)
    assert outcome(setup, verilator.marks) == ("ran", "")  # installed here: no mark, the test runs


def test_missing_simulator_case_skips_outside_ci(monkeypatch, no_iverilog):
    monkeypatch.delenv("CI", raising=False)
    (icarus,) = runner.simulator_cases(["icarus"], ids=["x"])
    assert icarus.id == "x"
    assert outcome(setup, icarus.marks) == (
        "skipped", "iverilog is not installed: apt-get install iverilog / make iverilog")


def test_installed_simulator_case_has_no_mark(monkeypatch):
    monkeypatch.setenv("CI", "true")
    monkeypatch.setattr(runner.shutil, "which", lambda name, *a, **k: "/usr/bin/" + name)
    (icarus,) = runner.simulator_cases(["icarus"])
    assert not icarus.marks and outcome(setup, icarus.marks) == ("ran", "")


def test_missing_module_fails_under_ci(monkeypatch, no_torch):
    monkeypatch.setenv("CI", "true")
    marks = requires_modules("torch", "numpy")
    assert len(marks) == 1  # numpy is installed
    assert outcome(setup, marks) == ("failed", "torch (Python package) is not installed (CI=true forbids "
                                                "skipping): pip install -e '.[test]' / make install-dev")
    assert conftest.optional_import("torch") is None


def test_mark_reaches_the_hook_in_a_real_session(tmp_path):
    """A pytest session with this conftest and a missing simulator and package: skipped without CI,
    failed at setup (an error, exit code 1, naming what is missing) under CI=true."""
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n"
        "from conftest import requires_modules\n"
        "from gpt_fpga.sim.tb.runner import simulator_cases\n\n"
        "@pytest.mark.parametrize('sim', simulator_cases(['no-such-sim']))\n"
        "def test_sim(sim):\n    pass\n\n"
        "@requires_modules('gpt_fpga_no_such_package')[0]\n"
        "def test_module():\n    pass\n")

    def session(ci: str):
        env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
        env["CI"] = ci
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_inner.py"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        return r.returncode, r.stdout + r.stderr

    rc, out = session("false")
    assert rc == 0 and "2 skipped" in out, out
    rc, out = session("true")  # the rule runs at setup (before fixtures that need the tool): errors, exit 1
    assert rc == 1 and "2 errors" in out and "skipped" not in out, out
    assert "simulator 'no-such-sim' is not installed (CI=true forbids skipping)" in out, out
    assert "gpt_fpga_no_such_package (Python package) is not installed (CI=true forbids skipping)" in out, out
