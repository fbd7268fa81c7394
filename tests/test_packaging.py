"""pyproject.toml installs what requirements.txt lists (torch and torchvision come first, separately) and ships
the helpers package."""

from __future__ import annotations

import pytest

from .conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def test_pyproject_dependencies_are_requirements_txt():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    lines = (line.split("#", 1)[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines())
    assert pyproject["project"]["dependencies"] == [line for line in lines if line]
    assert "helpers" in pyproject["tool"]["setuptools"]["packages"]
