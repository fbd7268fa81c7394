"""Small pieces every other module needs: seeding, the device, the autocast dtype, restoring a model's modes,
writing a file atomically, showing text from files safely and ending a command line with one `error:` line.
Imports nothing else from helpers (the bottom layer)."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import random
import re
import shutil
import stat
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Messages name a setting as the reader typed it: a flag (--max-lr) under the command line, else a Python keyword
_AS_FLAGS = contextvars.ContextVar("as_flags", default=False)


@contextlib.contextmanager
def messages_in_flags() -> Iterator[None]:
    """Within the block, `setting_name` and `ask` word messages in command-line flags (the command line's main)."""
    token = _AS_FLAGS.set(True)
    try:
        yield
    finally:
        _AS_FLAGS.reset(token)


def setting_name(name: str) -> str:
    """A TrainConfig setting as a message names it: 'max_lr', or '--max-lr' under `messages_in_flags`."""
    return "--" + name.replace("_", "-") if _AS_FLAGS.get() else name


def ask(flag: str, python: str) -> str:
    """What a message tells the reader to do: `flag` on the command line, else 'python (flag)'."""
    return flag if _AS_FLAGS.get() else f"{python} ({flag})"


def add_version_flag(parser) -> None:
    """`--version` on an argparse parser: the package's version (every command has it)."""
    from helpers import __version__  # deferred: the package's version, for --version

    parser.add_argument("--version", action="version", version=f"cifar10-helpers {__version__}")


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) for a repeatable run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto'/None: CUDA when there is a GPU, else the CPU. Asking for CUDA without one is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but this machine has no CUDA GPU: use --device cpu")
    return device


def describe_device(device: str | torch.device | None = "auto") -> str:
    """The device a run asked for `device` uses, in words: 'cuda (NVIDIA L4)', or 'cpu (2 cores; no CUDA GPU)'."""
    device = resolve_device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    gpu = "" if torch.cuda.is_available() else "; no CUDA GPU"
    return f"{device.type} ({os.cpu_count()} cores{gpu})" if device.type == "cpu" else str(device)


class UserError(Exception):
    """A mistake in what was asked for or given (a flag, a path, a file's contents): one line that says what to do.
    Every command line ends with it as `error: ...` and exit status 2 (run_command)."""


class DeviceError(UserError, RuntimeError):
    """The device asked for is not on this machine."""


def amp_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """Autocast dtype, or None for fp32: bf16 on CPUs and on GPUs with bf16 tensor cores, else fp16 (T4).
    amp=None means on for CUDA and off on the CPU (bf16 autocast is ~17x slower than fp32 on AVX2 CPUs)."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The tensors as numpy arrays (same shapes and dtypes) through one device-to-host copy: one host sync where a
    read per tensor costs one each. Packed as float64, exact for float32 values and integers below 2**53."""
    if not tensors:
        return {}
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors.values()]).cpu().numpy()
    parts = np.split(flat, np.cumsum([t.numel() for t in tensors.values()])[:-1])
    return {name: part.reshape(tuple(t.shape)).astype(_NUMPY_DTYPES.get(t.dtype, np.float64))
            for (name, t), part in zip(tensors.items(), parts)}


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64,
                 torch.int32: np.int32, torch.bool: np.bool_, torch.float16: np.float32, torch.bfloat16: np.float32}


def precision_name(dtype: torch.dtype | None) -> str:
    """'fp32', 'bf16' or 'fp16' for an autocast dtype from `amp_dtype`."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


@contextlib.contextmanager
def preserved_modes(model: nn.Module, *, grads: bool = False) -> Iterator[nn.Module]:
    """Put every module's train/eval mode and every parameter's requires_grad (and, with grads=True, its .grad)
    back as they were on exit. Libraries (GradCAM, the LR finder, ONNX export) switch modes and never switch them
    back."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.train(training)
        for param, (requires_grad, grad) in flags.items():
            param.requires_grad_(requires_grad)
            if grads:
                param.grad = grad


@contextlib.contextmanager
def deterministic_algorithms(on: bool = True) -> Iterator[None]:
    """While the block runs (on=True): torch's deterministic algorithms only (an operation that has none raises,
    naming itself), cuDNN's deterministic kernels and no autotuning, and cuBLAS's fixed workspace; everything is
    put back afterwards. Bit-for-bit repeatable runs on one machine, at a cost in speed (README)."""
    if not on:
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for repeatable results
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


# every batch-norm type torch has, by its public names (the lazy ones subclass these)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def unwrap(model: nn.Module) -> nn.Module:
    """The module that owns the weights: torch.compile wraps a model in an OptimizedModule whose original is
    `_orig_mod` (torch has no public accessor; this is the one place that reads it)."""
    return getattr(model, "_orig_mod", model)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then move it over `path` in one step: a crash or a
    full disk mid-write leaves the previous file intact (and never a half-written one). The temporary name is
    unique to this writer, so two writers never share one (TEMPORARY names them)."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise WriteError(f"could not write {path} ({err.strerror or err})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _mode_for(path))  # mkstemp's file is private (0600); the file we leave is not
        os.replace(tmp, path)
    except BaseException as err:
        full = _disk_full(err, path.parent)  # before the unlink frees what the write took
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, WriteError):  # disk full, permissions, torch.save's
            cause = "the disk is full: free some space" if full else f"{type(err).__name__}: {_first_line(err)}"
            raise WriteError(f"could not write {path} ({cause}); any earlier version of it is kept") from err
        raise
    return path


def _mode_for(path: Path) -> int:
    """The permissions a plain open() would give a new `path` (0666 less the umask), or those of the file it
    replaces (a file the user made private stays so)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc (reading it is thread-safe, and checkpoints are written on a
    thread); elsewhere os.umask, which can only be read by setting it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# atomic_write's temporary files: .<name>.<8 random characters, tempfile's>.tmp beside <name>
TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: str | os.PathLike, ours: Callable[[str], bool]) -> list[Path]:
    """Remove atomic_write's temporary files in `folder` for the files `ours(name)` says we write (left by a
    process killed mid-write) and return them. Call it only while no writer of ours is at work there (helpers.run
    does, holding the folder)."""
    stale = [p for p in Path(folder).iterdir()
             if (m := TEMPORARY.fullmatch(p.name)) and ours(m["name"]) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class RunError(UserError):
    """A mistake in how a run was asked for or pointed to (its folder, its checkpoint, its data): one line that
    says what to do."""



def _disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC, or (torch.save reports 'file write failed' without an
    errno) less than FULL_BELOW bytes left where it wrote."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


FULL_BELOW = 1 << 20  # bytes: a write that failed with less than this left free failed for want of space


class WriteError(UserError, OSError):
    """A file could not be written (disk full, permissions, ...): the message names the path and the cause."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else "no detail"


def check_can_write(path: str | os.PathLike, what: str) -> Path:
    """`path` if a file can be made there, else a UserError naming `what` (e.g. "--out x.png"): checked before any
    work, not after it. Its nearest existing ancestor must be a writable folder on a disk with space left; nothing
    is created."""
    path = Path(path).expanduser()
    ancestor = next(p for p in [path.parent, *path.parent.parents] if p.exists() or p == p.parent)
    if not ancestor.is_dir():
        raise UserError(f"{what}: {ancestor} is a file, not a folder: choose a path under a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{what}: cannot write into {ancestor} (permission denied): choose a folder you can write to")
    try:
        full = shutil.disk_usage(ancestor).free < FULL_BELOW
    except OSError:
        full = False
    if full:
        raise UserError(f"{what}: the disk holding {ancestor} is full: free some space or choose another disk")
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


MAX_TEXT_BYTES = 32 * 2**20  # the largest JSON or YAML file read (ours are kilobytes): a larger one is refused unread


def read_text_file(path: str | os.PathLike) -> str:
    """The one reader of the small text files a run, a sweep or a user gives us (metrics, history, trial and sweep
    records, a settings file). A ValueError, as for damaged contents, when the path is not a regular file (a pipe
    would never end the read), holds more than MAX_TEXT_BYTES or is not UTF-8; OSError as open() raises it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens at once instead of waiting
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{safe_text(path)} is not a regular file")
        data = f.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"{safe_text(path)} holds more than {MAX_TEXT_BYTES:,} bytes")
    return data.decode("utf-8")


def read_json(path: str | os.PathLike):
    """A JSON file through read_text_file: ValueError (json's errors among them) for anything but a small JSON file."""
    return json.loads(read_text_file(path))


# ---------------------------------------------------------------------------------------------------------
# Run folders: a new numbered one per run, and `latest` pointing at the last

LATEST = "latest"


def next_run_folder(root: str | os.PathLike, stem: str) -> Path:
    """root/stem-N with N one more than any stem-N in root (runs/custom_resnet-writeup-3): a new folder per run,
    so a second run never meets the first one's outputs."""
    root = Path(root).expanduser()
    taken = [int(p.name[len(stem) + 1:]) for p in (root.iterdir() if root.is_dir() else ())
             if p.name.startswith(stem + "-") and p.name[len(stem) + 1:].isdigit()]
    return root / f"{stem}-{max(taken, default=0) + 1}"


def point_latest(folder: str | os.PathLike) -> Path | None:
    """Make folder.parent/latest lead to `folder`, atomically: a relative symlink, or, where the filesystem has no
    symlinks (some Windows set-ups, some network drives), a small text file holding the folder's name, which
    `follow_latest` reads. A real folder called latest (a run of an older version) is left alone: None."""
    folder = Path(folder)
    latest = folder.parent / LATEST
    if latest.is_dir() and not latest.is_symlink():
        return None
    tmp = folder.parent / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(folder.name, tmp, target_is_directory=True)
        os.replace(tmp, latest)
    except (OSError, NotImplementedError):
        tmp.unlink(missing_ok=True)
        atomic_write_text(latest, folder.name + "\n")
    return latest


def follow_latest(path: str | os.PathLike) -> Path:
    """`path`, or, for a `latest` text file left by `point_latest`, the run folder it names (a bare name beside it;
    anything else is not followed)."""
    path = Path(path).expanduser()
    if path.name == LATEST and path.is_file() and path.stat().st_size < 256:
        name = path.read_text(errors="replace").strip()
        if name and name == Path(name).name and name not in (".", "..") and (path.parent / name).is_dir():
            return path.parent / name
    return path
def check_parameters(namespace: dict, **kinds) -> None:
    """A notebook's parameters (as its parameters cell, papermill's -p or a user set them) checked against the
    kinds they take before anything uses them: a UserError naming the first wrong one, its value and its kind.
    kinds: a type or a tuple of types, None standing for None; an int is a float, a bool is not an int."""
    for name, kind in kinds.items():
        allowed = tuple(type(None) if k is None else k for k in (kind if isinstance(kind, tuple) else (kind,)))
        value = namespace.get(name)
        ok = isinstance(value, allowed + ((int,) if float in allowed else ()))
        if not ok or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("None" if k is type(None) else k.__name__ for k in allowed)
            raise UserError(f"notebook parameter {name} = {value!r}: it takes {names}; set it so in the parameters "
                            "cell (or papermill's -p)")


# ---------------------------------------------------------------------------------------------------------
# Text from files and paths, and how a command line ends

# Unicode categories shown escaped: control (C0/C1: escape sequences, newlines), format (bidi overrides,
# zero-width), surrogates (undecodable bytes of a file name), private use, unassigned, line/paragraph separators
UNSAFE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def safe_text(value) -> str:
    """`value` as text that cannot act on a terminal or break a line: every control or invisible formatting
    character shown escaped (ESC as \\x1b, a newline as \\n, U+202E as \\u202e). Everything printed that came from
    a file or a path (class names, metrics, folder and file names, error messages naming them) goes through it."""
    text = str(value)
    if text.isprintable():  # the common case, fast (no control, format or separator characters but space)
        return text
    return "".join(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   if unicodedata.category(ch) in UNSAFE else ch for ch in text)


def run_command(body: Callable[[], int | None], *, interrupted: Callable[[KeyboardInterrupt], str] | None = None,
                failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command line's `body` and return its exit status: 0 (or what it returns); a UserError (every
    `...Error` of ours that means "what you asked for or gave is wrong") or an OSError (a file or folder that
    cannot be read or written) is one `error: ...` line on stderr, made safe, and status 2; `failures` (the work
    itself failed, e.g. training diverged): one line and status 1; Ctrl-C or SIGTERM: interrupted() (what was
    kept; default: the interruption's own message) and status 130. Every command line (train, predict, compare,
    demo, sweep) ends through here."""
    try:
        return body() or 0
    except failures as err:
        print(f"error: {safe_text(err)}", file=sys.stderr)
        return 1
    except UserError as err:
        print(f"error: {safe_text(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file we were told to read or write: name it and the cause, no traceback
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {safe_text(where)}{safe_text(err.strerror or err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        message = interrupted(err) if interrupted is not None else str(err) or "interrupted"
        print(f"\n{safe_text(message)}", file=sys.stderr)
        return 130
