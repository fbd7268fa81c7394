"""Where a run came from: the code (package version, git commit), the libraries, the machine, the command and when.
run.py writes it into metrics.json ("provenance") so a number can be traced back to what produced it."""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("torch", "torchvision", "numpy", "albumentations")  # distributions whose version decides the numbers


def utc_now() -> str:
    """The time now in UTC, ISO 8601 to the second ('2026-12-03T06:41:07Z')."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_commit(folder: Path | None = None) -> dict:
    """{'commit': sha, 'dirty': bool} of the git checkout that holds the helpers package, or {'commit': None} when
    it is not in one (installed from a wheel, a copy without .git, no git on the machine). dirty: tracked files
    differ from the commit."""
    folder = folder or Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
            if done.returncode:
                raise OSError(done.stderr.strip())
            return done.stdout.strip()

        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top != folder.parent:  # a package installed inside some other repository (a venv in a clone)
            return {"commit": None}
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def command_line() -> str:
    """The command that started this process, as typed: `python -m helpers train ...`, `cifar10 train ...`."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if program.resolve().parent == Path(__file__).resolve().parent:  # python -m helpers[.module]
        program = Path("python -m helpers" + ("" if program.stem == "__main__" else f".{program.stem}"))
        return " ".join([str(program), shlex.join(sys.argv[1:])]).strip()
    return shlex.join([program.name, *sys.argv[1:]])


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def provenance(device: torch.device, *, started: str | None, finished: str | None) -> dict:
    """The package and library versions, the git commit, Python, the GPU, the command line and the UTC start and
    end times of a run on `device`."""
    from helpers import __version__  # deferred: the package's version, read when a run ends

    return {
        "version": __version__, **{f"git_{k}": v for k, v in git_commit().items()},
        "python": platform.python_version(),
        **{name: _version(name) for name in LIBRARIES}, "torch": torch.__version__,  # with its build tag (+cu128)
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "command": command_line(),
        "started_utc": started, "finished_utc": finished,
    }
