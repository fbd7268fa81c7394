"""One run, the same from Python, a notebook and the command line: `train_run(config, out)`.

    from helpers.config import TrainConfig
    from helpers.run import train_run

    result = train_run(TrainConfig(model="custom_resnet", epochs=2, subset_train=2000, subset_test=1000), "runs/x")
    result.accuracy, result.history, result.evaluation, result.paths

A run is: the data (its data set, class-balanced subsets, a validation split when asked for), the small-run rule
(`adapt_to_data`), the model, the LR range test when max_lr is "auto" (resolved here and nowhere else), `fit` (a
checkpoint after every epoch), one final evaluation on the test set kept as `result.evaluation` (with a validation
split, the only time the test set is seen: every epoch, and so the plateau scheduler and any selection, used the
validation images), and the outputs in `out` (checkpoint, history, metrics, figures). The command
line (helpers.cli) is argument parsing over this, so the same settings make the same run from anywhere.

A run holds its output folder while it writes there (an OS lock, released if the process dies): a second run into
the same folder is refused. A user mistake is a `RunError`, one line that says what to do; nothing the user made is
replaced without `overwrite=True`. What the run changed on its own (a smaller batch, a fitted weight average) is
printed as it happens and kept in `result.notes`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout  # a dependency of torch
from torch import nn

from helpers import data, distributed
from helpers.checkpoints import NAME as CHECKPOINT
from helpers.checkpoints import Checkpoint, CheckpointError, RunInfo, checkpoint_path, read_checkpoint
from helpers.config import RECIPES, RESUME_FREE, TrainConfig, config_file_name, config_text, evolve
from helpers.data import CifarArrays, steps_per_epoch
from helpers.lr_finder import lr_range_test
from helpers.models import build_model, count_parameters
from helpers.provenance import provenance, utc_now
from helpers.train import EvalResult, History, evaluate, fit
from helpers.utils import (
    RunError,
    WriteError,
    amp_dtype,
    ask,
    atomic_write_text,
    deterministic_algorithms,
    precision_name,
    read_json,
    remove_stale_temporaries,
    resolve_device,
    safe_text,
    seed_everything,
    setting_name,
)

MIN_STEPS = 20  # training steps per epoch below which a recipe's batch is halved (adapt_to_data)
# a weight average whose window spans fewer than FIT_BELOW of its time constants 1/(1-ema) is refitted to span
# REFIT of them (its first weights then weigh e^-4 = 2% at the end); the full fast recipe spans 1.9 and is kept
FIT_BELOW, REFIT = 1.5, 4.0


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; the message says what was kept and how to continue."""


@dataclass
class RunResult:
    """What `train_run` gives back. `config` is the config as trained (small-run rule applied, max_lr a number)."""

    config: TrainConfig
    model: nn.Module  # the evaluated weights (the weight average, for recipes that average)
    history: History
    evaluation: EvalResult  # the final evaluation, on the run's test set (tta_accuracy with config.tta)
    train_arrays: CifarArrays
    test_arrays: CifarArrays
    device: torch.device
    out: Path | None
    status: str  # "trained" (from scratch or from init_from), "resumed", or "finished" (nothing left to train)
    notes: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)  # what was written: checkpoint, history, metrics, figures
    lr_test: object | None = None  # the LRFinderResult, when max_lr was "auto"
    requested: TrainConfig | None = None  # the config as asked for
    started: str | None = None  # UTC, ISO 8601 (helpers.provenance.utc_now)
    val_arrays: CifarArrays | None = None  # the validation split (config.val_split), held out of train_arrays
    normalization: tuple = (data.CIFAR10_MEAN, data.CIFAR10_STD)  # (mean, std) the loaders normalised with

    @property
    def val_accuracy(self) -> float | None:
        """The last epoch's validation accuracy (%), for a run with a validation split."""
        return self.history.records[-1].get("val_acc") if self.history.records else None

    @property
    def accuracy(self) -> float:
        return self.evaluation.accuracy

    @property
    def tta_accuracy(self) -> float | None:
        return self.evaluation.tta_accuracy

    def summary(self) -> str:
        tta = f" (TTA {self.tta_accuracy:.2f}%)" if self.tta_accuracy is not None else ""
        val = (f" | validation {self.val_accuracy:.2f}% on {len(self.val_arrays):,} images (each epoch's)"
               if self.val_accuracy is not None and self.val_arrays is not None else "")
        seconds = sum(self.history.seconds)
        where = f" | outputs in {self.out}" if self.out is not None else ""
        return (f"final test accuracy {self.accuracy:.2f}%{tta} on {len(self.test_arrays):,} images{val} | "
                f"{seconds:.1f} s in {len(self.history)} epochs (+{self.history.warmup_seconds:.1f} s warm-up){where}")


# ---------------------------------------------------------------------------------------------------------
# The data a config asks for


def load_run_data(config: TrainConfig) -> tuple[CifarArrays, CifarArrays]:
    """The (train, test) arrays `config` asks for: its data set (config.dataset, from its data folder),
    class-balanced subsets. The validation split comes after, in the run (`split_validation`)."""
    train = data.load_dataset(config.dataset, config.data_dir, train=True)
    test = data.load_dataset(config.dataset, config.data_dir, train=False)
    try:
        return (data.balanced_subset(train, config.subset_train, seed=config.seed),
                data.balanced_subset(test, config.subset_test, seed=config.seed))
    except ValueError as err:
        raise data.DataError(f"{err}: --subset-train and --subset-test need at least one image per class") from None


def prepare_data(config: TrainConfig, device: str | torch.device = "cpu", *, arrays=None, norm=None):
    """(train_loader, test_loader, train_arrays, test_arrays) for `config`, on the loader it asks for (auto:
    GpuLoader on CUDA, the albumentations DataLoader on the CPU). arrays: (train, test) already loaded with
    `load_run_data`. norm: (mean, std), default data.normalization(config.dataset, train). Under torchrun the
    training loader is this process's shard of the global batch config.batch_size (helpers.distributed)."""
    device = torch.device(device)
    w = distributed.world()
    train, test = arrays if arrays is not None else load_run_data(config)
    mean, std = norm if norm is not None else data.normalization(config.dataset, train)
    gpu = config.loader == "gpu" or (config.loader == "auto" and device.type == "cuda"
                                     and config.augment in data.AUGMENTATIONS)
    train_loader, test_loader = data.make_loaders(
        train, test, kind="gpu" if gpu else "torch", batch_size=distributed.local_batch(config.batch_size, w),
        recipe=config.augment, device=device, workers=config.workers, seed=config.seed, rank=w.rank,
        world_size=w.world_size, mean=mean, std=std)
    return train_loader, test_loader, train, test


def fingerprint(arrays: CifarArrays) -> dict:
    """What a checkpoint records of the images its run trained on, cheap to compute (~10 ms for 50,000):
    the count, a digest of the labels in order and a digest of every 97th image's pixels. Equal data in
    another folder gives the same fingerprint; another subset, split or file gives another."""

    def digest(a: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]

    return {"images": len(arrays), "labels": digest(arrays.labels.astype(np.int64)),
            "pixels": digest(arrays.images[::97])}


def subset_note(config: TrainConfig, train: CifarArrays, test: CifarArrays) -> str | None:
    """A note when a subset asked for is larger than the data there (the whole split is used)."""
    asked = [(name, n, len(arrays)) for name, n, arrays in (("train", config.subset_train, train),
                                                              ("test", config.subset_test, test))
             if n is not None and n > len(arrays)]
    where = config.data_dir if config.dataset in ("cifar10", "cifar100") else data.dataset_name(config.dataset)
    return "; ".join(f"--subset-{name} {n:,} is more than the {have:,} {name} images in {where}: using "
                     f"all {have:,}" for name, n, have in asked) or None


def split_validation(config: TrainConfig, train: CifarArrays, ckpt: Checkpoint | None = None):
    """(training images, validation images or None, their indices into `train` or None): config.val_split
    class-balanced images held out (data.validation_indices), the checkpoint's own choice when resuming (the split
    never moves)."""
    if not config.val_split:
        return train, None, None
    saved = ckpt.val_indices if ckpt is not None else None
    indices = (np.asarray(saved, dtype=np.int64) if saved is not None
               else data.validation_indices(train, config.val_split, seed=config.seed))
    if len(indices) and indices.max() >= len(train):
        raise data.DataError(f"the run's validation split picks training image {int(indices.max())}, but there are "
                             f"{len(train):,}: resume with the data it started on, or start a new run")
    kept, val = data.split_validation(train, indices)
    return kept, val, tuple(indices.tolist())


def recipe_note(config: TrainConfig) -> str | None:
    """Once per run on a data set other than CIFAR-10: the recipes were tuned on CIFAR-10."""
    if config.dataset == "cifar10":
        return None
    advice = ("max_lr 'auto': the LR range test picks the peak" if config.max_lr == "auto" else
              "start with the LR range test: --max-lr auto (max_lr='auto')")
    return (f"note: the {config.model} {config.recipe} recipe was tuned on CIFAR-10, not "
            f"{data.dataset_name(config.dataset)}; {advice}")


# ---------------------------------------------------------------------------------------------------------
# The small-run rule


def adapt_to_data(config: TrainConfig, images: int) -> tuple[TrainConfig, list[str]]:
    """The config fitted to a training set of `images` images, and what was changed, in words.

    A recipe's batch on a small set gives a handful of steps: one-cycle then barely leaves its start LR and the
    run learns nothing. So, with config.adapt_small_runs, a batch equal to the recipe's is halved (to 16 at least)
    until an epoch has MIN_STEPS steps, SGD's learning rates scaled with it (the linear scaling rule) unless they
    were changed from the recipe's; and a weight average is fitted to the run (`_fit_average`). A warning is added
    when the run has too few steps to learn anything."""
    notes = []
    if config.adapt_small_runs:
        for rule in (_smaller_batch, _fit_average):
            config, note = rule(config, images)
            notes.append(note)
    steps = steps_per_epoch(images, config.batch_size) * config.epochs
    if steps < 2 * MIN_STEPS:
        # after the small-run rule chose the smallest batch itself, a smaller one is no longer the advice
        advice = "more data or more epochs" if notes and notes[0] else "a smaller batch size, more data or more epochs"
        notes.append(f"warning: only {steps} training step(s) in all ({images:,} images, batch {config.batch_size}, "
                     f"{config.epochs} epoch(s)): too few to learn much; use {advice}")
    return config, [n for n in notes if n]


def resolve_config(config: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The settings a run of `config` trains with, and what the small-run rule changed: the recipe's values fitted
    to its training set (`adapt_to_data`; the data is read to count it). max_lr 'auto' stays: the run's LR range test
    picks it. What --print-config prints and a run folder keeps (its config file): `--config` makes the run again."""
    try:
        train_arrays, _ = load_run_data(config)
    except data.DataError as err:
        raise RunError(str(err)) from None
    return adapt_to_data(config, len(train_arrays))


def _smaller_batch(config: TrainConfig, images: int) -> tuple[TrainConfig, str | None]:
    recipe = RECIPES[config.model][config.recipe]
    old = config.batch_size
    if old != recipe["batch_size"] or steps_per_epoch(images, old) >= MIN_STEPS:
        return config, None
    batch = old
    while batch > 16 and steps_per_epoch(images, batch) < MIN_STEPS:
        batch //= 2
    changes = {"batch_size": batch}
    note = (f"small run: {images:,} training images at the recipe's batch {old} would be "
            f"{steps_per_epoch(images, old)} step(s) per epoch; using batch {batch} "
            f"({steps_per_epoch(images, batch)} steps)")
    if (config.optimizer == "sgd" and isinstance(config.max_lr, float) and config.max_lr == recipe["max_lr"]
            and config.lr == recipe.get("lr")):
        scale = batch / old
        changes |= {"max_lr": config.max_lr * scale, "lr": config.lr * scale if config.lr is not None else None}
        note += f" and peak LR {changes['max_lr']:.3g} (scaled with the batch)"
    return evolve(config, **changes), (note + f". Set {ask('--batch-size', 'batch_size')}, or "
                                       f"{ask('--no-adapt-small-runs', 'adapt_small_runs=False')}, to choose yourself.")


def _fit_average(config: TrainConfig, images: int) -> tuple[TrainConfig, str | None]:
    """A weight average never starts from the random initial weights while they would still weigh in its result
    (more than 1%), and its decay fits its window: a window shorter than FIT_BELOW time constants (its first
    weights would weigh over e^-1.5 = 22% at the end, and the average would lag the annealed weights) gets a decay
    for REFIT time constants. A full-size run of the fast recipe (194 steps in its window, decay 0.99) is left as
    it is; the README's CPU run (31 steps) averages at 0.879 (what that measured: BENCHMARKS.md, "Fitting the
    weight average to a small run")."""
    if not config.ema:
        return config, None
    steps = steps_per_epoch(images, config.batch_size)
    window = config.ema_epochs or config.epochs
    changes = {}
    if window >= config.epochs and config.ema ** (window * steps) > 0.01:
        if config.epochs == 1:
            return evolve(config, ema=0.0, ema_epochs=0), (
                "small run: weight averaging off: a 1-epoch run has no trained weights to start an average from")
        window = changes["ema_epochs"] = config.epochs - 1
    if config.ema ** (window * steps) > math.exp(-FIT_BELOW):
        changes["ema"] = round(math.exp(-REFIT / (window * steps)), 4)
    if not changes:
        return config, None
    fitted = evolve(config, **changes)
    return fitted, (f"small run: weight average over the last {fitted.ema_epochs} epoch(s) ({window * steps} steps) "
                    f"at decay {fitted.ema:g} (the recipe's {config.ema_epochs or 'all'} epoch(s) at {config.ema:g} "
                    "would keep too much of the weights it starts from)")


# ---------------------------------------------------------------------------------------------------------
# The run folder: one owner at a time, nothing replaced unasked


class RunFolder:
    """A run's output folder, held by this process (an flock, which the OS releases when a process dies, so a
    folder left by `kill -9` stays usable); a second holder gets a RunError naming the first. `release()` lets it
    go, and removes it again when this process created it and wrote nothing into it."""

    def __init__(self, out: Path, *, what: str = "run"):
        if out.exists() and not out.is_dir():
            raise RunError(f"{out} is a file, not a folder: choose a folder for the {what}'s outputs")
        self.out, self.created, self.what = out, not out.exists(), what
        self._hold()

    def _hold(self) -> None:
        out = self.out
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.lock = FileLock(str(out / ".lock"))
            self.lock.acquire(timeout=0)
        except Timeout:
            raise RunError(f"another {self.what} is writing into {out} ({_owner(out)}): wait for it to finish, or "
                           "choose another output folder") from None
        except OSError as err:
            raise RunError(f"cannot write into {out} ({err.strerror or err}): choose a folder you can write "
                           "to") from None
        try:
            atomic_write_text(out / ".lock.owner", json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:300]}))
        except WriteError as err:
            self.lock.release()
            raise RunError(f"cannot write into {out}: {err}: choose a folder you can write to") from None

    def _let_go(self, folder: Path) -> None:
        (folder / ".lock.owner").unlink(missing_ok=True)
        self.lock.release()

    def release(self) -> None:
        self._let_go(self.out)
        unused = {".lock", "config.yaml", "config.json"}  # the lock, and the settings of a run that never trained
        if self.created and {p.name for p in self.out.iterdir()} <= unused:
            for name in unused:
                (self.out / name).unlink(missing_ok=True)
            self.out.rmdir()  # nothing was written: leave no empty folder behind

    def holds_run(self) -> bool:
        """Whether the folder holds anything besides the lock: a run, or what is left of one."""
        return any(p.name not in (".lock", ".lock.owner") for p in self.out.iterdir())

    def set_aside(self) -> Path:
        """Move the whole folder, every file of the run it holds, aside to <out>-<n> in one rename, and hold a
        new, empty `out`; returns where the old run went. Nothing is deleted, and at no moment does `out` hold a
        mix of the old run and the new one."""
        kept = keep_aside(self.out)
        self._let_go(kept)
        (kept / ".lock").unlink(missing_ok=True)
        self.created = True
        self._hold()
        return kept

    def remove_stale_temporaries(self) -> list[Path]:
        """Temporary files of ours a killed write left behind (kill -9 mid-checkpoint): nobody else writes while
        we hold the folder, so every one is stale. Returns those removed."""
        return remove_stale_temporaries(self.out, lambda name: name in (CHECKPOINT, ".lock.owner", "config.yaml",
                                                                        "config.json", *OUTPUTS)
                                        or name.endswith(".png"))


@contextmanager
def hold_run_folder(out: Path, *, what: str = "run"):
    """Hold `out` (a RunFolder; `what` holds it: a run, or a sweep) while the block runs."""
    folder = RunFolder(out, what=what)
    try:
        yield folder
    finally:
        folder.release()


def keep_aside(path: Path) -> Path:
    """Rename `path` (a file or a folder) to <stem>-<n><suffix> (the first free n) and return the new name:
    nothing is deleted."""
    n = 1
    while (kept := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, kept)
    return kept


def _owner(out: Path) -> str:
    try:
        o = read_json(out / ".lock.owner")
        return f"process {o['pid']} on {o['host']}, started {o['started']}: {o['command']}"
    except (OSError, ValueError, KeyError):
        return "a process that has just started"


def _open_folder(folder: RunFolder, config: TrainConfig, resume, overwrite: bool, say) -> Checkpoint | None:
    """The checkpoint to continue, or None for a fresh start; a RunError when the folder holds a run that this
    call must not touch. With `overwrite` a run already there is moved aside whole (RunFolder.set_aside)."""
    out = folder.out
    ckpt_path = checkpoint_path(resume) if resume not in (None, False, True) else out / CHECKPOINT
    if resume not in (None, False, True) and not ckpt_path.is_file():
        raise RunError(f"no checkpoint at {ckpt_path} to resume: pass a checkpoint.pt written by helpers.train, or "
                       "its run folder")
    here = out / CHECKPOINT
    continuing = bool(resume) and here.is_file() and ckpt_path.is_file() and ckpt_path.resolve() == here.resolve()
    if overwrite and not continuing and folder.holds_run():
        say(f"overwrite: the run in {out} was moved, whole, to {folder.set_aside()}; the new run starts in an empty "
            f"{out}")
    elif here.exists() and not continuing:
        try:
            what = read_checkpoint(here).describe()
        except CheckpointError:
            what = "an unreadable checkpoint"
        hint = f"continue it with {ask(f'--resume {out}', 'resume=True')}, " if "unfinished" in what else ""
        raise RunError(f"{out} already holds {what}: {hint}choose another output folder, or "
                       f"{ask('--overwrite', 'overwrite=True')} to move that run aside (kept as a sibling folder) and "
                       "start afresh")
    removed = folder.remove_stale_temporaries()
    if removed:
        say(f"removed {len(removed)} temporary file(s) left in {out} by a write that was cut short: "
            + ", ".join(p.name for p in removed))
    if not resume or not ckpt_path.is_file():
        return None
    try:
        ckpt = read_checkpoint(ckpt_path)
        ckpt.check_world()
    except CheckpointError as err:
        raise RunError(str(err)) from None
    changed = [f.name for f in fields(TrainConfig) if f.name not in RESUME_FREE
               and getattr(config, f.name) not in (getattr(ckpt.requested, f.name), getattr(ckpt.config, f.name))]
    if changed:
        settings = ", ".join(f"{setting_name(k)} {getattr(config, k)!r} (the run's: {getattr(ckpt.requested, k)!r})"
                             for k in changed)
        extra = (" A one-cycle schedule cannot be extended: its learning rate has already annealed. To train on, "
                 f"start a new run from its weights ({ask('--init-from', 'init_from')}) with a schedule of its own."
                 if "epochs" in changed else " Start a new run (another output folder) to train with other settings.")
        raise RunError(f"{ckpt.path} is a run with other settings: {settings}.{extra}")
    return ckpt


# ---------------------------------------------------------------------------------------------------------
# The run


def train_run(config: TrainConfig, out: str | os.PathLike | None = None, *, device: str | torch.device = "auto",
              resume: bool | str | os.PathLike = False, init_from: str | os.PathLike | None = None,
              overwrite: bool = False, figures: bool = True, quiet: bool = False,
              arrays: tuple[CifarArrays, CifarArrays] | None = None, on_epoch=None) -> RunResult:
    """Train `config` into the folder `out` (None: nothing written) and evaluate it once; returns a RunResult.

    resume: True continues the run in `out` if it holds one of these settings (and starts afresh if it holds
    none), a path continues that checkpoint (a file or run folder); a finished run is evaluated, and any of its
    outputs that are missing (a process stopped before writing them) are written. init_from: start this new run
    from another run's evaluated weights (a file or run folder). overwrite: move a run already in `out` aside,
    whole (to <out>-N), instead of refusing. arrays: (train, test) already loaded with load_run_data(config), to
    skip loading. quiet: no progress bars or table. on_epoch(record): called with each epoch's History record as
    it ends (helpers.sweep reports it to Ray Tune).

    Under torchrun every process calls this (helpers.distributed): rank 0 holds the folder, decides what to do with
    it and alone prints and writes; config.batch_size is the global batch.
    """
    device = distributed.setup(resolve_device(device))
    quiet = quiet or not distributed.world().is_main
    run = _Run(config, device, quiet=quiet, figures=figures, on_epoch=on_epoch)
    if out is None:
        return run.start(arrays, None, None, init_from)
    out = Path(out).expanduser()
    with ExitStack() as held:
        decided = {}  # rank 0's checkpoint, read once while deciding

        def decide() -> Path | None:  # rank 0 only: the folder and what it holds are its to judge
            folder = held.enter_context(hold_run_folder(out))
            decided["ckpt"] = _open_folder(folder, config, resume, overwrite, run.say)
            return decided["ckpt"].path if decided["ckpt"] is not None else None

        path = distributed.agree(decide)  # the other processes read the checkpoint rank 0 chose
        ckpt = decided["ckpt"] if decided else read_checkpoint(path) if path is not None else None
        return run.start(arrays, out, ckpt, init_from)


class _Run:
    """One call of train_run: what it was asked for, and the notes it prints and keeps."""

    def __init__(self, config: TrainConfig, device: torch.device, *, quiet: bool, figures: bool, on_epoch):
        self.requested, self.device, self.quiet, self.figures, self.on_epoch = config, device, quiet, figures, on_epoch
        self.notes: list[str] = []
        self.started = utc_now()

    def say(self, note: str) -> None:
        """Print `note` (rank 0) and keep it in the result's notes."""
        self.notes.append(note)
        if distributed.world().is_main:
            print(safe_text(note), flush=True)  # a note, not an error: stdout (Jupyter shows stderr red)

    def start(self, arrays, out: Path | None, ckpt: Checkpoint | None, init_from) -> RunResult:
        """Set the run up (data, the small-run rule, loaders, model), then train it, or complete a finished one."""
        config = self.requested
        if ckpt is not None:  # the run's own settings, with the changes a resume may make
            config = evolve(ckpt.config, **{k: getattr(self.requested, k) for k in RESUME_FREE})
        try:
            train_arrays, test_arrays = arrays if arrays is not None else load_run_data(config)
            train_arrays, val_arrays, self.val_indices = split_validation(config, train_arrays, ckpt)
        except data.DataError as err:
            raise RunError(str(err)) from None
        for note in filter(None, [subset_note(config, train_arrays, test_arrays), recipe_note(config)]):
            self.say(note)
        if ckpt is not None:
            _check_same_data(ckpt, train_arrays, test_arrays)
        else:
            config, changed = adapt_to_data(config, len(train_arrays))
            for note in changed:
                self.say(note)
            if out is not None and distributed.world().is_main:  # what --config replays: before the range test
                atomic_write_text(out / config_file_name(), config_text(config))
        norm = data.normalization(config.dataset, train_arrays)
        try:
            if config.sync_bn and distributed.world().distributed:
                distributed.convert_sync_bn(nn.BatchNorm2d(1), self.device)  # the CPU's refusal, before anything runs
            train_loader, test_loader, _, _ = prepare_data(config, self.device, arrays=(train_arrays, test_arrays),
                                                           norm=norm)
        except ValueError as err:  # a global batch N does not divide, shards too small, sync_bn on the CPU
            raise RunError(str(err)) from None
        # every epoch is evaluated on the validation split when there is one; the test set once, at the end
        self.eval_loader = data.evaluation_loader(test_loader, val_arrays) if val_arrays is not None else test_loader
        seed_everything(config.seed)
        model = _build_model(config, len(train_arrays.classes), init_from if ckpt is None else None, self.say)
        if not self.quiet:
            print(safe_text(_header(model, config, self.device, train_arrays, test_arrays, train_loader, val_arrays)))
        result = RunResult(config, model, History(), None, train_arrays, test_arrays, self.device, out,
                           "resumed" if ckpt is not None else "trained", self.notes, requested=self.requested,
                           started=self.started, val_arrays=val_arrays, normalization=norm)
        if ckpt is not None and ckpt.finished:
            return self.complete_finished(result, ckpt, test_loader)
        if ckpt is not None:
            self.say(f"resuming {ckpt.path} at epoch {ckpt.epoch + 1} of {config.epochs}")
        return self.train(result, ckpt, init_from, train_loader, test_loader)

    def train(self, result: RunResult, ckpt: Checkpoint | None, init_from, train_loader, test_loader) -> RunResult:
        """The LR range test when max_lr is 'auto', `fit` (from `ckpt` when resuming), the outputs."""
        out, config = result.out, result.config
        board = _open_board(config, out) if distributed.world().is_main else None

        def each_epoch(record: dict) -> None:  # fit calls it on rank 0 as each epoch ends
            for log in filter(None, (board and board.epoch, self.on_epoch)):
                log(record)

        try:
            with deterministic_algorithms(config.deterministic):
                if config.max_lr == "auto":
                    result.config = config = _find_max_lr(result, result.model, train_loader, self.quiet, self.say)
                val = result.val_arrays
                fingerprints = {"train": fingerprint(result.train_arrays), "test": fingerprint(result.test_arrays)}
                info = RunInfo(requested=self.requested, classes=tuple(result.train_arrays.classes),
                               mean=tuple(result.normalization[0]), std=tuple(result.normalization[1]),
                               data=fingerprints | ({"val": fingerprint(val)} if val is not None else {}),
                               val_indices=self.val_indices,
                               init_from=str(init_from) if init_from and ckpt is None else ckpt and ckpt.init_from)
                result.history = fit(result.model, train_loader, self.eval_loader, config, device=self.device,
                                     resume=ckpt, quiet=self.quiet, checkpoint=out / CHECKPOINT if out else None,
                                     run_info=info, on_epoch=each_epoch,
                                     eval_split="val" if val is not None else "test")
                if out is not None:
                    result.paths["checkpoint"] = out / CHECKPOINT
                result.evaluation = (result.history.evaluation if result.val_arrays is None else
                                     _test_once(result, test_loader))
            _compare_average(result, self.say)
            if out is not None and distributed.world().is_main:
                write_outputs(result, figures=self.figures, init_from=info.init_from)
            if board is not None:
                board.figures([p for p in result.paths.values() if p.suffix == ".png"], step=len(result.history))
        except KeyboardInterrupt:
            raise RunInterrupted(interrupted_message(out)) from None
        finally:
            if board is not None:
                board.close()
        return result

    def complete_finished(self, result: RunResult, ckpt: Checkpoint, test_loader) -> RunResult:
        """A run with nothing left to train: its evaluated weights, evaluated once. Outputs a stopped process did
        not write (metrics, history, figures) are written now; nothing there is rewritten."""
        _evaluate_saved(result, ckpt, test_loader)
        result.requested = ckpt.requested
        missing = missing_outputs(result.out, figures=self.figures) if result.out is not None else []
        done = (f"{ckpt.path} is a finished run ({len(result.history)}/{result.config.epochs} epochs): nothing left "
                "to train")
        if missing and distributed.world().is_main:
            write_outputs(result, figures=self.figures, init_from=ckpt.init_from, only=missing)
            self.say(f"{done}; wrote its missing outputs ({', '.join(missing)}), nothing else rewritten")
        elif not missing:
            self.say(f"{done}, nothing rewritten. To train on, start a new run from its weights "
                     f"({ask(f'--init-from {ckpt.path.parent} --epochs N', 'init_from')}); to redo it, "
                     f"{ask('--overwrite', 'overwrite=True')}")
        if result.out is not None:
            result.paths["checkpoint"] = ckpt.path
        return result


def _open_board(config: TrainConfig, out):
    """A TensorBoard log in `out` when the config asks for one (helpers.board), else None."""
    if not config.tensorboard or out is None:
        return None
    from helpers.board import BoardError, BoardLog  # deferred: TensorBoard, for runs that ask for it

    try:
        return BoardLog(out)
    except BoardError as err:
        raise RunError(str(err)) from None


def _test_once(result: RunResult, test_loader) -> EvalResult:
    """The run's result on the test set: its final (evaluated) weights, once, with config.tta."""
    c = result.config
    return evaluate(result.model, test_loader, device=result.device, amp=c.amp, channels_last=c.channels_last,
                    tta=c.tta)


def _build_model(config: TrainConfig, num_classes: int, init_from, say) -> nn.Module:
    model = build_model(config.model, num_classes=num_classes)
    if init_from is not None:
        try:
            start = read_checkpoint(init_from, model_name=config.model)
            start.apply_to(model)
        except CheckpointError as err:
            raise RunError(str(err)) from None
        say(f"init_from: starting from the weights of {start.path} ({start.describe()}, {start.config.recipe} "
            "recipe) with a new schedule")
    return model


def _header(model, config, device, train_arrays, test_arrays, train_loader, val_arrays=None) -> str:
    val = f" / {len(val_arrays):,} validation" if val_arrays is not None else ""
    where = ("" if config.dataset == "cifar10" else
             f"{data.dataset_name(config.dataset)}, {len(train_arrays.classes)} classes: ")
    return (f"{config.model} ({config.recipe} recipe): {count_parameters(model):,} parameters | device {device} | "
            f"{where}{len(train_arrays):,} train{val} / {len(test_arrays):,} test images | "
            f"{type(train_loader).__name__} | "
            f"{precision_name(amp_dtype(device, config.amp))} | batch {config.batch_size}{_processes(config)}")


def _processes(config: TrainConfig) -> str:
    w = distributed.world()
    return f" ({w.world_size} processes x {config.batch_size // w.world_size})" if w.distributed else ""


def _check_same_data(ckpt: Checkpoint, train: CifarArrays, test: CifarArrays) -> None:
    """A RunError when a resumed run would train or test on other images than it started on."""
    saved = ckpt.data
    if saved is None:  # written before checkpoints recorded their data
        return
    for split, arrays in (("train", train), ("test", test)):
        now = fingerprint(arrays)
        if now != saved[split]:
            what = (f"{saved[split]['images']:,} {split} images then, {now['images']:,} now"
                    if now["images"] != saved[split]["images"] else f"other {split} images (same count)")
            raise RunError(f"{ckpt.path} was trained on other data ({what}): resume with the data it started on "
                           "(its data folder and subset settings), or start a new run")


def _find_max_lr(result: RunResult, model, train_loader, quiet: bool, say) -> TrainConfig:
    config = result.config
    found = lr_range_test(model, train_loader, config=config, device=result.device, num_iter=config.lr_test_steps,
                          rule=config.lr_rule, progress=not quiet)
    result.lr_test = found
    where = ""
    # each process's range test saw its own shard: all take rank 0's pick
    picked = distributed.broadcast_object(found.suggested_lr)
    if result.out is not None and distributed.world().is_main:
        import matplotlib.pyplot as plt  # deferred, with helpers.plots: matplotlib, for runs that draw

        from helpers.plots import plot_lr_finder

        plt.close(plot_lr_finder(found, save=result.out / "lr_finder.png"))
        result.paths["lr_finder"] = result.out / "lr_finder.png"
        where = f"; plot in {result.paths['lr_finder']}"
    say(f"LR range test: max LR {picked:.3g} ({found.rule}{where})")
    return evolve(config, max_lr=picked)


def _compare_average(result: RunResult, say) -> None:
    last = result.history.records[-1] if result.history.records else {}
    split = result.history.eval_split
    trained, average = last.get(f"{split}_acc_trained"), last.get(f"{split}_acc")
    if trained is not None and trained > average:
        where = "" if split == "test" else " on the validation split"
        say(f"note: the weight average scored {average:.2f}%{where}, below the trained weights' {trained:.2f}%: "
            f"averaging did not pay on this run (ema {result.config.ema:g} over {result.config.ema_epochs or 'all'} "
            "epoch(s)); the average is what the checkpoint's evaluated weights and these results hold. Try "
            f"{ask('--ema 0', 'ema=0')}")


def _evaluate_saved(result: RunResult, ckpt: Checkpoint, test_loader) -> RunResult:
    """`result` with the evaluated weights and history of `ckpt`, and one evaluation over `test_loader`."""
    result.status = "finished"
    result.history = History.of(ckpt)
    ckpt.apply_to(result.model).to(result.device)
    result.evaluation = evaluate(result.model, test_loader, device=result.device, amp=result.config.amp,
                                 channels_last=result.config.channels_last, tta=result.config.tta)
    return result


def load_run(path: str | os.PathLike, *, device: str | torch.device = "auto", **changes) -> RunResult:
    """A trained run (a checkpoint or run folder), its evaluated weights evaluated once on its test set; nothing is
    written. changes: settings to evaluate it under instead (data_dir, subset_test, tta, ...)."""
    ckpt = read_checkpoint(path)
    config = evolve(ckpt.config, **changes)
    device = resolve_device(device)
    try:
        train, test = load_run_data(config)
        train, val, _ = split_validation(config, train, ckpt)
    except data.DataError as err:
        raise RunError(str(err)) from None
    norm = (ckpt.mean, ckpt.std)
    _, test_loader, _, _ = prepare_data(config, device, arrays=(train, test), norm=norm)
    result = RunResult(config, build_model(config.model, num_classes=len(ckpt.classes)), History(), None, train, test,
                       device, None, "finished", val_arrays=val, normalization=norm)
    return _evaluate_saved(result, ckpt, test_loader)


def interrupted_message(out: Path | None) -> str:
    """What an interrupted run kept, and how to continue it."""
    if out is None:
        return "interrupted: nothing was saved (no output folder)"
    if (out / CHECKPOINT).is_file():
        return (f"interrupted: the last finished epoch is saved in {out / CHECKPOINT}; continue with "
                f"{ask(f'--resume {out}', 'resume=True')}")
    return f"interrupted before the first epoch finished: no checkpoint in {out}; start the run again"


# ---------------------------------------------------------------------------------------------------------
# Outputs


def run_metrics(result: RunResult, init_from=None) -> dict:
    """metrics.json: the run's final numbers, timings, where it ran and every setting."""
    history, config, device = result.history, result.config, result.device
    last = history.records[-1] if history.records else {}
    return {
        "model": config.model, "recipe": config.recipe, "dataset": config.dataset,
        "num_classes": len(result.test_arrays.classes),
        "test_acc": result.accuracy, "test_acc_tta": result.tta_accuracy,
        "test_acc_trained": last.get("test_acc_trained"),
        # with a validation split: each epoch's evaluation and any selection used it; test_acc is the one test
        "selected_on": "validation split" if result.val_arrays is not None else "test set",
        "val_acc": last.get("val_acc"), "val_images": len(result.val_arrays) if result.val_arrays is not None else None,
        "evaluated": "weight average" if config.ema else "trained weights",
        "epochs": len(history), "total_seconds": sum(history.seconds), "epoch_seconds": history.seconds,
        "train_seconds": sum(history.train_seconds) if None not in history.train_seconds else None,
        "warmup_seconds": history.warmup_seconds, "mode": history.mode,
        "seconds_include": "total_seconds: training and the per-epoch test pass; train_seconds: the training steps "
                           "alone; neither the one-time warm-up (warmup_seconds)",
        "precision": precision_name(amp_dtype(device, config.amp)),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "world_size": distributed.world().world_size,  # processes (torchrun); batch_size is the global batch
        "torch": torch.__version__, "data_dir": str(Path(config.data_dir).resolve()),
        "train_images": len(result.train_arrays), "test_images": len(result.test_arrays),
        "init_from": init_from, "notes": result.notes, "settings": config.to_dict(),
        "requested": result.requested.to_dict() if result.requested is not None else None,
        # the code, libraries, machine, command and times that made these numbers
        "provenance": provenance(device, started=result.started, finished=utc_now()),
    }


OUTPUTS = ("history.json", "history.csv", "metrics.json")  # what write_outputs writes besides the figures


def missing_outputs(out: Path, *, figures: bool = True) -> list[str]:
    """The names of the outputs a finished run in `out` should have and has not (figures: its figures too)."""
    names = list(OUTPUTS)
    if figures:
        from helpers.plots import RUN_FIGURES  # deferred: matplotlib, for runs that draw

        names += RUN_FIGURES
    return [name for name in names if not (out / name).is_file()]


def write_outputs(result: RunResult, *, figures: bool = True, init_from=None,
                  only: list[str] | None = None) -> dict[str, Path]:
    """history.json/csv, metrics.json and (figures) the run's figures into result.out (only: just these names);
    returns result.paths."""
    out = result.out
    wanted = set(only) if only is not None else None
    writers = {"history.json": result.history.to_json, "history.csv": result.history.to_csv,
               "metrics.json": lambda path: atomic_write_text(path, json.dumps(run_metrics(result, init_from),
                                                                                indent=1))}
    try:
        for name, write in writers.items():
            if wanted is None or name in wanted:
                write(out / name)
        result.paths |= {"history": out / "history.json", "metrics": out / "metrics.json"}
        if figures and (wanted is None or wanted - set(writers)):
            from helpers.plots import save_run_figures  # deferred: matplotlib, for runs that draw

            for path in save_run_figures(out, model=result.model, history=result.history, result=result.evaluation,
                                         test_arrays=result.test_arrays, normalization=result.normalization,
                                         names=None if wanted is None else wanted - set(writers)):
                result.paths[path.stem] = path
    except OSError as err:  # our own writes raise WriteError, an OSError, already
        raise err if isinstance(err, WriteError) else WriteError(f"could not write into {out} ({err})") from err
    return result.paths


def rank_by_training(paths) -> list[tuple[Path, int, str]]:
    """The readable checkpoints among `paths` (files or run folders), most trained first: (checkpoint, training
    images seen = finished epochs x training images, a description). Unreadable ones are left out."""
    ranked = {}
    for path in paths:
        try:
            ckpt = read_checkpoint(checkpoint_path(path).resolve())
        except (CheckpointError, OSError):
            continue
        config = ckpt.config
        images = (ckpt.data or {}).get("train", {}).get("images") or config.subset_train or 50_000
        ranked[ckpt.path] = (ckpt.epoch * images, f"{config.model} ({config.recipe} recipe), {ckpt.epoch}/"
                                                  f"{config.epochs} epochs on {images:,} training images")
    return sorted(((p, seen, what) for p, (seen, what) in ranked.items()), key=lambda r: -r[1])
