"""Progress bars for long work: tqdm on standard error, and only when that is a terminal.

In a log file or a pipe a bar is a run of '\\r'-joined lines that nobody reads, so it is left out there;
status lines (``tqdm.write`` or ``print(..., file=sys.stderr)``) still appear. Every bar in the package
comes from :func:`progress`.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, *, enabled: bool = True, **kw) -> tqdm:
    """tqdm(iterable, **kw) on stderr; disabled when `enabled` is false or stderr is not a terminal."""
    return tqdm(iterable, disable=not (enabled and sys.stderr.isatty()), file=sys.stderr, **kw)
