"""pyproject.toml's `board` extra keeps the pynq a PYNQ-Z2 image ships (docs/board.md).

`pip install '.[board]'` leaves an installed pynq alone when it satisfies the extra's specifier, so the
images' own versions (3.0.1 on v3.0.1, 3.1.x on v3.1) must satisfy it, and so must 4.0.0, the one
.ci/board-python.sh installs (the newest on PyPI). Pins of the other extras are not this file's concern.
"""

from __future__ import annotations

import tomllib

import pytest
from packaging.requirements import Requirement

from conftest import REPO


def board_requirements() -> dict[str, Requirement]:
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["board"]
    return {r.name: r for r in map(Requirement, extra)}


@pytest.mark.parametrize("version", ["3.0.1", "3.1", "3.1.2", "4.0.0"])
def test_the_images_pynq_satisfies_the_board_extra(version):
    assert board_requirements()["pynq"].specifier.contains(version), version


@pytest.mark.parametrize("version", ["2.7.0", "3.0.0", "5.0.0"])
def test_untried_pynq_versions_do_not(version):
    """Older than the v3.0.1 image's, or a major release nobody here has run."""
    assert not board_requirements()["pynq"].specifier.contains(version), version


def test_board_extra_keeps_numpy_below_2():
    numpy = board_requirements()["numpy"].specifier
    assert numpy.contains("1.26.4") and not numpy.contains("2.0.0")
