"""The README's measured tables against the committed bench records (bench/records/*.json), and the
mechanism that writes them (bench/readme.py)."""

from __future__ import annotations

import json
import re

import pytest

from gpt_fpga.bench import readme


def test_readme_agrees_with_the_committed_records():
    """Fails when someone edits a figure by hand, or commits a record without the README (or the
    reverse): `make bench` (or `python -m gpt_fpga.bench.readme`) rewrites the tables."""
    assert readme.problems(readme.README.read_text(), readme.tables()) == []


@pytest.fixture(scope="module")
def engine_record() -> dict:
    return json.loads((readme.RECORDS / "engine.json").read_text())


def test_a_hand_edited_figure_is_caught(engine_record):
    text, want = readme.README.read_text(), readme.tables()
    cycles = f"{engine_record['runs'][0]['cycles']:,}"
    assert cycles in text
    edited = text.replace(cycles, f"{engine_record['runs'][0]['cycles'] - 52:,}", 1)
    assert readme.problems(edited, want) == ["README.md block bench:engine differs from its record"]
    assert readme.rewrite(edited, want) == text  # and make bench puts it back


def test_a_new_record_is_caught(engine_record):
    from gpt_fpga.bench.engine import readme_tables

    changed = json.loads(json.dumps(engine_record))
    changed["runs"][-1]["cycles"] += 148
    problems = readme.problems(readme.README.read_text(), {**readme.tables(), **readme_tables(changed)})
    assert problems == ["README.md block bench:engine differs from its record"]


def test_missing_duplicated_and_orphan_blocks_are_caught():
    want = {"a": "| x |\n|---|\n| 1 |"}
    good = "intro\n" + readme.block("a", want["a"]) + "\nend\n"
    assert readme.problems(good, want) == []
    assert readme.problems("intro\n", want) == ["README.md has no <!-- bench:a --> ... <!-- /bench:a --> block"]
    assert readme.problems(good + good, want) == ["<!-- bench:a --> appears 2 times"]
    assert readme.problems(good + readme.block("b", "y"), want) == ["README.md block bench:b has no record that "
                                                                    "renders it"]
    with pytest.raises(ValueError, match="bench:a"):
        readme.rewrite("intro\n", want)


def test_a_section_without_readme_tables_is_skipped(tmp_path):
    """Only sections whose module has readme_tables take part; a taking-part one needs its record."""
    sections = {"engine": "gpt_fpga.bench.engine", "shapes": "gpt_fpga.bench.shapes"}
    assert set(readme.renderers(sections)) == {"engine"}
    with pytest.raises(FileNotFoundError, match=re.escape("engine.json: missing")):
        readme.tables(tmp_path, sections)



def test_the_int4_default_group_is_the_one_the_accuracy_record_picks():
    """The quantizer's and the overlay's default group follows the measured rule (fewest bytes per
    token within +0.6 % on both bundled models); a new accuracy record that picks another group
    must change DEFAULT_GROUP (and the docs) with it."""
    from gpt_fpga.contract.layout import DEFAULT_GROUP

    record = json.loads((readme.RECORDS / "accuracy.json").read_text())
    assert record["int4_default_group"]["picked"] == DEFAULT_GROUP
