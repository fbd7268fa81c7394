"""What `pip install` and `python -m build` give: pyproject.toml's ranges hold requirements.txt's pins (torch and
torchvision come first, separately), the `cifar10` command, a licence, and a source distribution that is whole."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import helpers

from .conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def _pins(path: Path) -> dict[str, Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    reqs = [Requirement(line) for line in lines if line and not line.startswith("-")]
    return {r.name.lower(): r for r in reqs}


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pinned_version(req: Requirement) -> str | None:
    exact = [s.version for s in req.specifier if s.operator == "=="]
    return exact[0] if exact else None


def test_pyproject_ranges_hold_requirements_txt_pins():
    ranges = {Requirement(r).name.lower(): Requirement(r) for r in _project()["dependencies"]}
    pins = _pins(REPO / "requirements.txt")
    assert set(ranges) == set(pins)  # the same packages, neither list ahead of the other
    dev = _pins(REPO / "requirements-dev.txt")
    for name, wanted in ranges.items():
        assert str(wanted.specifier), f"{name}: give a compatible range, not an open requirement"
        tested = _pinned_version(pins[name]) or _pinned_version(dev[name])  # what Colab and CI install
        assert tested is not None, f"{name}: pin it in requirements.txt or requirements-dev.txt"
        assert wanted.specifier.contains(tested), f"{name}=={tested} is outside pyproject's {wanted.specifier}"


def test_every_extra_holds_the_version_we_test():
    dev = _pins(REPO / "requirements-dev.txt")
    for extra, reqs in _project()["optional-dependencies"].items():
        for text in reqs:
            req = Requirement(text)
            tested = _pinned_version(dev[req.name.lower()])
            assert tested and req.specifier.contains(tested), f"[{extra}] {text} does not hold {tested}"


def test_version_and_licence():
    project = _project()
    assert "version" in project["dynamic"] and helpers.__version__.count(".") == 2
    assert project["license"] == "MIT" and (REPO / "LICENSE").read_text().startswith("MIT License")
    assert project["scripts"]["cifar10"] == "helpers.cli:run_command"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """`python -m build` of a copy of the working tree (its tracked and untracked, not-ignored files)."""
    pytest.importorskip("build")
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True)
    if files.returncode:
        pytest.skip("not a git checkout")
    for name in files.stdout.splitlines():
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(src)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return dist


@pytest.mark.slow  # python -m build: half a minute, more with a cold pip cache
def test_the_sdist_ships_the_package_and_licence_and_no_half_test_suite(built):
    (sdist,) = built.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames()}
    assert {"LICENSE", "pyproject.toml", "README.md", "helpers/__init__.py", "helpers/cli.py"} <= names
    assert not [n for n in names if n.startswith("tests/")]  # the tests need the whole clone: none, not a part


@pytest.mark.slow  # python -m build: half a minute, more with a cold pip cache
def test_the_wheel_installs_a_working_cifar10_command(built, tmp_path):
    (wheel,) = built.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(f"cifar10_helpers-{helpers.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in meta and "Project-URL: Source" in meta
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    env = os.environ | {"PYTHONPATH": str(target)}
    for argv in (["--version"], ["train", "--version"], ["export", "--version"]):
        done = subprocess.run([str(target / "bin" / "cifar10"), *argv], capture_output=True, text=True, env=env,
                              cwd=tmp_path)  # not the clone: the installed package answers
        assert done.returncode == 0 and helpers.__version__ in done.stdout, done.stderr
