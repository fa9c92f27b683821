"""The board notebook (notebooks/gpt_fpga_pynq.ipynb) stays valid: JSON of nbformat 4, every code
cell compiles, and the names it uses from the package exist (it cannot run off the board)."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

from gpt_fpga.host import backends, driver

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "gpt_fpga_pynq.ipynb"


def test_notebook_cells_compile_and_use_real_names():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 5
    for src in code:
        ast.parse(src)
    text = "\n".join(code)
    assert 'open_backend("pynq", IMAGE, overlay=OVERLAY)' in text
    assert "pynq" in backends.BACKENDS
    assert "overlay" in backends.open_backend.__code__.co_varnames
    src = inspect.getsource(driver.Driver)
    for attr in ("last_stats", "hw", "position", "close"):
        assert f"driver.{attr}" in text or f"model.{attr}" in text, attr
        assert f"self.{attr} " in src or f"self.{attr}:" in src or f"def {attr}(" in src, attr
