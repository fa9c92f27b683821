"""The package's one-way layering (.importlinter), checked by import-linter in `make test`.

Also: no import cycles between modules, and sim/ (golden models and testbenches) never imports the
host or the benchmarks. Proves the check can fail: a copy of the package with one wrong-way import (the contract
importing the CLI) must break the layers contract and name the import.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("bench", "contract", "host", "hw", "quantize", "sim")
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache"]


def _layers() -> list[str]:
    text = (REPO / ".importlinter").read_text()
    block = text.split("layers =", 1)[1].split("\n\n", 1)[0]
    return [m.strip() for line in block.splitlines() for m in line.split("|") if m.strip()]


def test_import_layers_hold():
    r = subprocess.run(LINT, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_every_module_has_a_layer():
    """A new module outside every layer would escape the contract: each must sit under one."""
    layers = _layers()
    graph = grimp.build_graph("gpt_fpga")
    free = sorted(m for m in graph.modules if m.startswith("gpt_fpga.")
                  and m not in ("gpt_fpga.sim",)
                  and not any(m == layer or m.startswith(layer + ".") for layer in layers))
    assert not free, f"modules in no layer of .importlinter: {free}"


def test_wrong_way_import_breaks_the_contract(tmp_path):
    pkg = tmp_path / "gpt_fpga"
    for d in PACKAGE_DIRS:
        shutil.copytree(REPO / d, pkg / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "__init__.py", pkg / "__init__.py")
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    layout = pkg / "contract" / "layout.py"
    layout.write_text(layout.read_text() + "\nfrom gpt_fpga.host import cli  # wrong way\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    check = subprocess.run([sys.executable, "-c", "import gpt_fpga; print(gpt_fpga.__path__[0])"], env=env,
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.stdout.strip() == str(pkg), check.stdout + check.stderr  # the copy, not the checkout
    r = subprocess.run(LINT, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "gpt_fpga.contract.layout -> gpt_fpga.host.cli" in r.stdout, r.stdout[-3000:]


def _graph():
    return grimp.build_graph("gpt_fpga")


def _cycles(graph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    mods = sorted(m for m in graph.modules if m.startswith("gpt_fpga"))
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.find_modules_directly_imported_by(v)):
            if not w.startswith("gpt_fpga"):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in mods:
        if m not in index:
            visit(m)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("gpt_fpga.a", "gpt_fpga.b"), ("gpt_fpga.b", "gpt_fpga.c"), ("gpt_fpga.c", "gpt_fpga.a"),
                 ("gpt_fpga.c", "gpt_fpga.d")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["gpt_fpga.a", "gpt_fpga.b", "gpt_fpga.c"]]


def test_sim_never_imports_host_or_bench():
    graph = _graph()
    sim = [m for m in graph.modules if m.startswith("gpt_fpga.sim")]
    up = sorted((m, i) for m in sim for i in graph.find_modules_directly_imported_by(m)
                if i.startswith(("gpt_fpga.host", "gpt_fpga.bench")))
    assert not up, f"sim/ imports above itself: {up}"


def test_folders_show_the_layers():
    """contract/ and bench/ sit at the top level; sim/ holds golden models and testbenches only."""
    assert (REPO / "contract" / "numerics.py").is_file() and (REPO / "bench" / "suite.py").is_file()
    assert not (REPO / "sim" / "contract").exists() and not (REPO / "sim" / "bench").exists()
