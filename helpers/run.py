"""One run, the same from Python, a notebook and the command line: `train_run(config, out)`.

    from helpers.config import TrainConfig
    from helpers.run import train_run

    result = train_run(TrainConfig(model="custom_resnet", epochs=2, subset_train=2000, subset_test=1000), "runs/x")
    result.accuracy, result.history, result.evaluation, result.paths

A run is: the data (class-balanced subsets), the small-run rule (`adapt_to_data`), the model, the LR range test
when max_lr is "auto" (resolved here and nowhere else), `fit` (a checkpoint after every epoch), one final
evaluation kept as `result.evaluation`, and the outputs in `out` (checkpoint, history, metrics, figures). The command
line (helpers.cli) is argument parsing over this, so the same settings make the same run from anywhere.

A run holds its output folder while it writes there (an OS lock, released if the process dies): a second run into
the same folder is refused. A user mistake is a `RunError`, one line that says what to do; nothing the user made is
replaced without `overwrite=True`. What the run changed on its own (a smaller batch, a fitted weight average) is
printed as it happens and kept in `result.notes`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from helpers import data, distributed
from helpers.checkpoints import CheckpointError, apply_weights, checkpoint_path, keep_aside, load_checkpoint
from helpers.config import RECIPES, TrainConfig, evolve
from helpers.data import CifarArrays
from helpers.train import EvalResult, History, evaluate, fit
from helpers.utils import WriteError, amp_dtype, atomic_write_text, precision_name, resolve_device, seed_everything

# settings a resumed run may change: where the data is and how it executes, never what it computes
RESUME_FREE = frozenset({"data_dir", "workers", "mode"})
MIN_STEPS = 20  # training steps per epoch below which a recipe's batch is halved (adapt_to_data)
# a weight average whose window spans fewer than FIT_BELOW of its time constants 1/(1-ema) is refitted to span
# REFIT of them (its first weights then weigh e^-4 = 2% at the end); the full fast recipe spans 1.9 and is kept
FIT_BELOW, REFIT = 1.5, 4.0


class RunError(Exception):
    """A mistake in how a run was asked for (its folder, its checkpoint, its data): one line that says what to do."""


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

    @property
    def accuracy(self) -> float:
        return self.evaluation.accuracy

    @property
    def tta_accuracy(self) -> float | None:
        return self.evaluation.tta_accuracy

    def summary(self) -> str:
        tta = f" (TTA {self.tta_accuracy:.2f}%)" if self.tta_accuracy is not None else ""
        seconds = sum(self.history.seconds)
        where = f" | outputs in {self.out}" if self.out is not None else ""
        return (f"final test accuracy {self.accuracy:.2f}%{tta} on {len(self.test_arrays):,} images | {seconds:.1f} s "
                f"in {len(self.history)} epochs (+{self.history.warmup_seconds:.1f} s warm-up){where}")


# ---------------------------------------------------------------------------------------------------------
# The small-run rule


def steps_per_epoch(images: int, batch: int) -> int:
    """Training steps per epoch, as both loaders count them: full batches only, or one when the set is smaller."""
    return images // batch if images >= batch else 1


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
        notes.append(f"warning: only {steps} training step(s) in all ({images:,} images, batch {config.batch_size}, "
                     f"{config.epochs} epoch(s)): too few to learn much; use a smaller batch size or more data")
    return config, [n for n in notes if n]


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
    return evolve(config, **changes), note + ". Set the batch size, or adapt_small_runs=False, to choose yourself."


def _fit_average(config: TrainConfig, images: int) -> tuple[TrainConfig, str | None]:
    """A weight average never starts from the random initial weights while they would still weigh in its result
    (more than 1%), and its decay fits its window: a window shorter than FIT_BELOW time constants (its first
    weights would weigh over e^-1.5 = 22% at the end, and the average would lag the annealed weights) gets a decay
    for REFIT time constants. A full-size run of the fast recipe (194 steps in its window, decay 0.99) is left as
    it is; the README's CPU run (31 steps) averages at 0.879. Measured there (2,000 / 1,000 images, CIFAR-10 JPEG
    copy): the trained weights 43.60%, the average at 0.8 43.80%, at 0.9528 41.70% (BENCHMARKS.md)."""
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


@contextmanager
def hold_run_folder(out: Path):
    """Hold `out` for this process while the block runs (an flock, which the OS releases when a process dies, so a
    folder left by `kill -9` stays usable); a second holder gets a RunError naming the first. A folder this call
    created and nothing was written into is removed again."""
    from filelock import FileLock, Timeout  # a dependency of torch

    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file, not a folder: choose a folder for the run's outputs")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(out / ".lock"))
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(f"another run is writing into {out} ({_owner(out)}): wait for it to finish, or choose "
                       "another output folder") from None
    except OSError as err:
        raise RunError(f"cannot write into {out} ({err.strerror or err}): choose a folder you can write to") from None
    owner = out / ".lock.owner"
    try:
        try:
            atomic_write_text(owner, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                 "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                 "command": " ".join(sys.argv)[:300]}))
        except WriteError as err:
            raise RunError(f"cannot write into {out}: {err}: choose a folder you can write to") from None
        yield out
    finally:
        owner.unlink(missing_ok=True)
        lock.release()
        if created and {p.name for p in out.iterdir()} <= {".lock"}:
            (out / ".lock").unlink(missing_ok=True)
            out.rmdir()  # nothing was written: leave no empty folder behind


def _owner(out: Path) -> str:
    try:
        o = json.loads((out / ".lock.owner").read_text())
        return f"process {o['pid']} on {o['host']}, started {o['started']}: {o['command']}"
    except (OSError, ValueError, KeyError):
        return "a process that has just started"


def _describe(state: dict) -> str:
    done, total = state["epoch"], state["config"]["epochs"]
    return f"a {'finished' if done >= total else 'unfinished'} run ({done}/{total} epochs)"


def _existing_checkpoint(out: Path, config: TrainConfig, resume, overwrite: bool) -> tuple[Path | None, dict | None]:
    """(checkpoint to continue, its state), or (None, None) for a fresh start; a RunError when `out` holds a run
    that this call must not touch."""
    ckpt = checkpoint_path(resume) if resume not in (None, False, True) else out / "checkpoint.pt"
    if resume not in (None, False, True) and not ckpt.is_file():
        raise RunError(f"no checkpoint at {ckpt} to resume: pass a checkpoint.pt written by helpers.train, or its "
                       "run folder")
    here = out / "checkpoint.pt"
    if here.exists() and (not resume or here.resolve() != ckpt.resolve()):
        if overwrite:
            print(f"overwrite: {here} kept as {keep_aside(here)}; the run's other outputs in {out} will be replaced",
                  file=sys.stderr)
        else:
            try:
                what = _describe(load_checkpoint(here))
            except CheckpointError:
                what = "an unreadable checkpoint"
            hint = "continue it with resume=True (--resume), " if "unfinished" in what else ""
            raise RunError(f"{out} already holds {what}: {hint}choose another output folder, or overwrite=True "
                           "(--overwrite) to set its checkpoint aside (kept as checkpoint-N.pt) and start afresh")
    if not resume or not ckpt.is_file():
        return None, None
    try:
        state = load_checkpoint(ckpt)
        distributed.check_world(state, ckpt)
    except CheckpointError as err:
        raise RunError(str(err)) from None
    asked = TrainConfig.from_dict(state.get("requested") or state["config"])
    trained = TrainConfig.from_dict(state["config"])
    changed = [f.name for f in fields(TrainConfig) if f.name not in RESUME_FREE
               and getattr(config, f.name) not in (getattr(asked, f.name), getattr(trained, f.name))]
    if changed:
        settings = ", ".join(f"{k} {getattr(config, k)!r} (the run's: {getattr(asked, k)!r})" for k in changed)
        extra = (" A one-cycle schedule cannot be extended: its learning rate has already annealed. To train on, "
                 "start a new run from its weights (init_from, --init-from) with a schedule of its own."
                 if "epochs" in changed else " Start a new run (another output folder) to train with other settings.")
        raise RunError(f"{ckpt} is a run with other settings: {settings}.{extra}")
    return ckpt, state


# ---------------------------------------------------------------------------------------------------------
# The run


def train_run(config: TrainConfig, out: str | os.PathLike | None = None, *, device: str | torch.device = "auto",
              resume: bool | str | os.PathLike = False, init_from: str | os.PathLike | None = None,
              overwrite: bool = False, figures: bool = True, quiet: bool = False,
              arrays: tuple[CifarArrays, CifarArrays] | None = None, on_epoch=None) -> RunResult:
    """Train `config` into the folder `out` (None: nothing written) and evaluate it once; returns a RunResult.

    resume: True continues the run in `out` if it holds one of these settings (and starts afresh if it holds
    none), a path continues that checkpoint (a file or run folder); a finished run is evaluated and left as it
    is. init_from: start this new run from another run's evaluated weights (a file or run folder). overwrite:
    set a checkpoint already in `out` aside (checkpoint-N.pt) instead of refusing. arrays: (train, test) already
    loaded with helpers.data.load_run_data(config), to skip loading. quiet: no progress bars or table.
    on_epoch(record): called with each epoch's History record as it ends (helpers.sweep reports it to Ray Tune).

    Under torchrun every process calls this (helpers.distributed): rank 0 holds the folder, decides what to do with
    it and alone prints and writes; config.batch_size is the global batch.
    """
    device = distributed.setup(resolve_device(device))
    quiet = quiet or not distributed.world().is_main
    if out is None:
        return _train(config, None, device, None, None, init_from, figures, quiet, arrays, on_epoch)
    out = Path(out).expanduser()
    with ExitStack() as held:
        decided = {}  # rank 0's checkpoint state, read once while deciding

        def decide() -> Path | None:  # rank 0 only: the folder and what it holds are its to judge
            held.enter_context(hold_run_folder(out))
            ckpt, decided["state"] = _existing_checkpoint(out, config, resume, overwrite)
            return ckpt

        ckpt = distributed.agree(decide)  # the other processes read the checkpoint rank 0 chose
        state = decided["state"] if decided else load_checkpoint(ckpt) if ckpt is not None else None
        return _train(config, out, device, ckpt, state, init_from, figures, quiet, arrays, on_epoch)


def _train(config, out, device, ckpt, state, init_from, figures, quiet, arrays, on_epoch) -> RunResult:
    requested = config
    notes: list[str] = []
    main = distributed.world().is_main
    say = lambda note: (notes.append(note), main and print(note, file=sys.stderr, flush=True))  # noqa: E731
    if state is not None:
        config = TrainConfig.from_dict(state["config"] | {k: getattr(requested, k) for k in RESUME_FREE})
    try:
        train_arrays, test_arrays = arrays if arrays is not None else data.load_run_data(config)
    except data.DataError as err:
        raise RunError(str(err)) from None
    for note in filter(None, [data.subset_note(config, train_arrays, test_arrays)]):
        say(note)
    if state is not None:
        _check_same_data(ckpt, state, train_arrays, test_arrays)
    else:
        config, changed = adapt_to_data(config, len(train_arrays))
        for note in changed:
            say(note)
    try:
        if config.sync_bn and distributed.world().distributed:
            distributed.convert_sync_bn(nn.BatchNorm2d(1), device)  # the CPU's refusal, before anything runs
        train_loader, test_loader, _, _ = data.prepare_data(config, device, arrays=(train_arrays, test_arrays))
    except ValueError as err:  # a global batch N does not divide, shards too small, sync_bn on the CPU
        raise RunError(str(err)) from None
    seed_everything(config.seed)
    model = _build_model(config, init_from if state is None else None, say)
    if not quiet:
        print(_header(model, config, device, train_arrays, test_arrays, train_loader))
    result = RunResult(config, model, History(), None, train_arrays, test_arrays, device, out,
                       "resumed" if state is not None else "trained", notes, requested=requested)
    if state is not None and state["epoch"] >= config.epochs:
        return _finished(result, state, ckpt, test_loader, say)
    try:
        if config.max_lr == "auto":
            result.config = config = _find_max_lr(result, model, train_loader, quiet, say)
        extra = {"requested": requested.to_dict(), "classes": list(train_arrays.classes),
                 "normalization": {"mean": list(data.CIFAR10_MEAN), "std": list(data.CIFAR10_STD)},
                 "data": {"train": data.fingerprint(train_arrays), "test": data.fingerprint(test_arrays)},
                 "init_from": str(init_from) if init_from and state is None else (state or {}).get("init_from")}
        result.history = fit(model, train_loader, test_loader, config, device=device, resume=ckpt, quiet=quiet,
                             checkpoint=out / "checkpoint.pt" if out else None, checkpoint_extra=extra,
                             on_epoch=on_epoch)
    except KeyboardInterrupt:
        raise RunInterrupted(interrupted_message(out)) from None
    if out is not None:
        result.paths["checkpoint"] = out / "checkpoint.pt"
    result.evaluation = result.history.evaluation
    _compare_average(result, say)
    if out is not None and main:
        write_outputs(result, figures=figures, init_from=extra["init_from"])
    return result


def _build_model(config: TrainConfig, init_from, say) -> nn.Module:
    from helpers.models import build_model

    model = build_model(config.model)
    if init_from is not None:
        try:
            state = load_checkpoint(init_from, model_name=config.model)
            apply_weights(model, state, checkpoint_path(init_from))
        except CheckpointError as err:
            raise RunError(str(err)) from None
        say(f"init_from: starting from the weights of {checkpoint_path(init_from)} ({_describe(state)}, "
            f"{state['config']['recipe']} recipe) with a new schedule")
    return model


def _header(model, config, device, train_arrays, test_arrays, train_loader) -> str:
    from helpers.models import count_parameters

    return (f"{config.model} ({config.recipe} recipe): {count_parameters(model):,} parameters | device {device} | "
            f"{len(train_arrays):,} train / {len(test_arrays):,} test images | {type(train_loader).__name__} | "
            f"{precision_name(amp_dtype(device, config.amp))} | batch {config.batch_size}{_processes(config)}")


def _processes(config: TrainConfig) -> str:
    w = distributed.world()
    return f" ({w.world_size} processes x {config.batch_size // w.world_size})" if w.distributed else ""


def _check_same_data(ckpt: Path, state: dict, train: CifarArrays, test: CifarArrays) -> None:
    """A RunError when a resumed run would train or test on other images than it started on."""
    saved = state.get("data")
    if saved is None:  # written before checkpoints recorded their data
        return
    for split, arrays in (("train", train), ("test", test)):
        now = data.fingerprint(arrays)
        if now != saved[split]:
            what = (f"{saved[split]['images']:,} {split} images then, {now['images']:,} now"
                    if now["images"] != saved[split]["images"] else f"other {split} images (same count)")
            raise RunError(f"{ckpt} was trained on other data ({what}): resume with the data it started on "
                           "(its data folder and subset settings), or start a new run")


def _find_max_lr(result: RunResult, model, train_loader, quiet: bool, say) -> TrainConfig:
    from helpers.lr_finder import lr_range_test
    from helpers.plots import plot_lr_finder

    config = result.config
    found = lr_range_test(model, train_loader, config=config, device=result.device, num_iter=config.lr_test_steps,
                          rule=config.lr_rule, progress=not quiet)
    result.lr_test = found
    where = ""
    # each process's range test saw its own shard: all take rank 0's pick
    picked = distributed.broadcast_object(found.suggested_lr)
    if result.out is not None and distributed.world().is_main:
        import matplotlib.pyplot as plt

        plt.close(plot_lr_finder(found, save=result.out / "lr_finder.png"))
        result.paths["lr_finder"] = result.out / "lr_finder.png"
        where = f"; plot in {result.paths['lr_finder']}"
    say(f"LR range test: max LR {picked:.3g} ({found.rule}{where})")
    return evolve(config, max_lr=picked)


def _compare_average(result: RunResult, say) -> None:
    last = result.history.records[-1] if result.history.records else {}
    trained = last.get("test_acc_trained")
    if trained is not None and trained > result.accuracy:
        say(f"note: the weight average scored {result.accuracy:.2f}%, below the trained weights' {trained:.2f}%: "
            f"averaging did not pay on this run (ema {result.config.ema:g} over {result.config.ema_epochs or 'all'} "
            "epoch(s)); the average is what the checkpoint's eval_state and these results hold. Try ema=0 (--ema 0)")


def _evaluate_saved(result: RunResult, state: dict, ckpt: Path, test_loader) -> RunResult:
    """`result` with the evaluated weights and history of the checkpoint read from `ckpt` (`state`), and one
    evaluation over `test_loader`."""
    from helpers.train import restore_weights

    result.status = "finished"
    result.history = restore_weights(result.model, state, ckpt)
    result.model.to(result.device)
    result.evaluation = evaluate(result.model, test_loader, device=result.device, amp=result.config.amp,
                                 channels_last=result.config.channels_last, tta=result.config.tta)
    return result


def load_run(path: str | os.PathLike, *, device: str | torch.device = "auto", **changes) -> RunResult:
    """A trained run (a checkpoint or run folder), its evaluated weights evaluated once on its test set; nothing is
    written. changes: settings to evaluate it under instead (data_dir, subset_test, tta, ...)."""
    from helpers.models import build_model

    state = load_checkpoint(path)
    config = evolve(TrainConfig.from_dict(state["config"]), **changes)
    device = resolve_device(device)
    try:
        arrays = data.load_run_data(config)
    except data.DataError as err:
        raise RunError(str(err)) from None
    _, test_loader, _, _ = data.prepare_data(config, device, arrays=arrays)
    result = RunResult(config, build_model(config.model), History(), None, *arrays, device, None, "finished")
    return _evaluate_saved(result, state, checkpoint_path(path), test_loader)


def _finished(result: RunResult, state: dict, ckpt: Path, test_loader, say) -> RunResult:
    """A run with nothing left to train: its evaluated weights, evaluated once; nothing is written."""
    _evaluate_saved(result, state, ckpt, test_loader)
    say(f"{ckpt} is a finished run ({len(result.history)}/{result.config.epochs} epochs): nothing left to train, "
        "nothing rewritten. To train on, start a new run from its weights (init_from, --init-from RUN --out NEW); "
        "to redo it, overwrite=True (--overwrite)")
    return result


def interrupted_message(out: Path | None) -> str:
    """What an interrupted run kept, and how to continue it."""
    if out is None:
        return "interrupted: nothing was saved (no output folder)"
    if (out / "checkpoint.pt").is_file():
        return (f"interrupted: the last finished epoch is saved in {out / 'checkpoint.pt'}; continue with "
                f"--resume {out} (Python: resume=True)")
    return f"interrupted before the first epoch finished: no checkpoint in {out}; start the run again"


# ---------------------------------------------------------------------------------------------------------
# Outputs


def run_metrics(result: RunResult, init_from=None) -> dict:
    """metrics.json: the run's final numbers, timings, where it ran and every setting."""
    history, config, device = result.history, result.config, result.device
    last = history.records[-1] if history.records else {}
    return {
        "model": config.model, "recipe": config.recipe,
        "test_acc": result.accuracy, "test_acc_tta": result.tta_accuracy,
        "test_acc_trained": last.get("test_acc_trained"),
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
    }


def write_outputs(result: RunResult, *, figures: bool = True, init_from=None) -> dict[str, Path]:
    """history.json/csv, metrics.json and (figures) the run's figures into result.out; returns result.paths."""
    out = result.out
    try:
        result.history.to_json(out / "history.json")
        result.history.to_csv(out / "history.csv")
        atomic_write_text(out / "metrics.json", json.dumps(run_metrics(result, init_from), indent=1))
        result.paths |= {"history": out / "history.json", "metrics": out / "metrics.json"}
        if figures:
            from helpers.plots import save_run_figures

            for path in save_run_figures(out, model=result.model, history=result.history, result=result.evaluation,
                                         test_arrays=result.test_arrays):
                result.paths[path.stem] = path
    except OSError as err:  # a figure's savefig (our own writes raise WriteError, an OSError, already)
        raise err if isinstance(err, WriteError) else WriteError(f"could not write into {out} ({err})") from err
    return result.paths
