"""The README's measured tables, written from the committed bench records, so they cannot drift.

``make bench`` (``python -m gpt_fpga.bench --readme``) copies each section's JSON from ``build/bench/``
to ``bench/records/<section>.json`` (the committed record) and rewrites the README's blocks::

    <!-- bench:NAME -->

    ...markdown, generated...

    <!-- /bench:NAME -->

A section takes part when its module (:data:`SECTIONS`) has ``readme_tables(record) -> {NAME: markdown}``;
one without it is skipped. ``python -m gpt_fpga.bench.readme`` rewrites the README from the committed
records alone; ``--check`` only reports where they disagree (tests/test_readme_bench.py runs it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RECORDS = REPO / "bench" / "records"
# section -> the module that may render it (by name: importing every section here would form a cycle)
SECTIONS = {"engine": "gpt_fpga.bench.engine", "accuracy": "gpt_fpga.bench.accuracy"}
BLOCK = re.compile(r"<!-- bench:(?P<name>[\w-]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->", re.S)


def machine() -> dict:
    """What a timing was measured on: the README names it next to every wall-clock figure."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "processor": model or platform.processor() or platform.machine(),
            "python": platform.python_version()}


def renderers(sections: dict[str, str] = SECTIONS) -> dict:
    """{section: readme_tables} of the sections whose module has one."""
    out = {}
    for name, module in sections.items():
        render = getattr(importlib.import_module(module), "readme_tables", None)
        if render is not None:
            out[name] = render
    return out


def tables(records: Path = RECORDS, sections: dict[str, str] = SECTIONS) -> dict[str, str]:
    """{marker name: markdown} from the committed records; a rendering section needs its record."""
    out = {}
    for name, render in renderers(sections).items():
        path = records / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: missing; "
                                    f"run `python -m gpt_fpga.bench --only {name} --readme` (or make bench)")
        out.update(render(json.loads(path.read_text())))
    return out


def block(name: str, markdown: str) -> str:
    """The marked block; blank lines keep the markers out of the table or paragraph they hold."""
    return f"<!-- bench:{name} -->\n\n{markdown.strip()}\n\n<!-- /bench:{name} -->"


def problems(text: str, want: dict[str, str]) -> list[str]:
    """Where README text and the rendered tables disagree (empty: they agree)."""
    found = {}
    for m in BLOCK.finditer(text):
        found.setdefault(m["name"], []).append(m[0])
    out = [f"<!-- bench:{name} --> appears {len(found[name])} times" for name in found if len(found[name]) > 1]
    out += [f"README.md has no <!-- bench:{name} --> ... <!-- /bench:{name} --> block" for name in want
            if name not in found]
    out += [f"README.md block bench:{name} has no record that renders it" for name in found if name not in want]
    out += [f"README.md block bench:{name} differs from its record" for name in want
            if name in found and found[name][0] != block(name, want[name])]
    return out


def rewrite(text: str, want: dict[str, str]) -> str:
    """`text` with every block replaced by its table; a block the README lacks is an error."""
    missing = [name for name in want if not re.search(f"<!-- bench:{re.escape(name)} -->", text)]
    if missing:
        raise ValueError("README.md lacks the blocks " + ", ".join(f"<!-- bench:{n} -->" for n in missing))
    return BLOCK.sub(lambda m: block(m["name"], want[m["name"]]) if m["name"] in want else m[0], text)


def record(name: str, out: Path, records: Path = RECORDS) -> Path | None:
    """Copy the section's build/bench JSON to the committed records, if the section renders README tables."""
    if name not in renderers():
        return None
    records.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(out / f"{name}.json", records / f"{name}.json"))


def update(readme: Path = README, records: Path = RECORDS) -> list[str]:
    """Rewrite the README's blocks from the records; the names of the blocks that changed."""
    text, want = readme.read_text(), tables(records)
    changed = [name for name in want if block(name, want[name]) not in text]
    new = rewrite(text, want)
    if new != text:
        readme.write_text(new)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpt_fpga.bench.readme", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report where README.md and the records disagree")
    args = ap.parse_args(argv)
    if args.check:
        bad = problems(README.read_text(), tables())
        for p in bad:
            print(p, file=sys.stderr)
        return 1 if bad else 0
    changed = update()
    print(f"README.md: {', '.join(changed) if changed else 'no'} block(s) rewritten from {RECORDS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
