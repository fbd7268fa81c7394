"""Checkpoints: the one module that knows their format. It writes them, reads them and checks them once.

A checkpoint is plain tensors, dicts, lists, numbers and strings, so `torch.load(weights_only=True)` reads it.
Everything else reads a checkpoint through `Checkpoint` (`read_checkpoint(path)`): a frozen, checked view of the
run it holds (its settings, history, classes, normalisation, evaluated weights), whose `apply_to(model)` loads the
evaluated weights. Training writes one with `capture` and continues from one with `restore`.

Writes are atomic (a crash mid-write keeps the previous file) and, during training, run on a background thread
from a host copy, so the disk write overlaps the next epoch.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from helpers import distributed
from helpers.config import ConfigError, TrainConfig
from helpers.data import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from helpers.utils import UserError, atomic_write, follow_latest

CHECKPOINT_FORMAT = 2  # 2: config has `recipe` and `mode`, training state under "step_state"
READABLE_FORMATS = (1, 2)  # 1: config had `compile: bool`; optimizer, scheduler and scaler states at the top
NAME = "checkpoint.pt"  # a run folder's checkpoint

# what every readable checkpoint holds, and of which type (checked before anything uses them)
REQUIRED = {"epoch": int, "config": dict, "model_state": dict, "history": list, "rng": dict}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another model; the message says what to do."""


# ---------------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` atomically: a crash mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _map_tensors(fn, value):
    """`value`, a tree of dicts, lists and tuples, with fn(t) in place of each tensor t (in tree order)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(fn, v) for v in value)
    return value  # numbers, strings, None: immutable


def _snapshot(value) -> tuple[object, torch.cuda.Event | None]:
    """A host copy of a state tree (training goes on changing the live tensors while a checkpoint is written),
    without a host sync: device tensors of one device and dtype are packed into one buffer (torch.cat) and copied
    at once, non-blocking, into pinned memory (one launch per dtype, where a copy per tensor blocked 80-188 times).
    Returns (tree, event): the host tensors, views of those buffers, hold their values once `event` (None when
    nothing came from a GPU) has completed; the writer thread waits on it, the training thread never does."""
    tensors: list[torch.Tensor] = []
    _map_tensors(lambda t: tensors.append(t.detach()), value)
    copies, event = _host_copies(tensors)
    found = iter(copies)
    return _map_tensors(lambda t: next(found), value), event


def _host_copies(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """Host copies of `tensors`, in order, as views of one host buffer per (device, dtype): pinned and filled by
    a non-blocking copy for CUDA tensors (the event marks the copies' end on the current stream), the packed
    copy itself for CPU tensors."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    copies: list[torch.Tensor | None] = [None] * len(tensors)
    event = None
    for (device, dtype), indices in groups.items():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])  # one buffer (a copy) on their device
        host = flat
        if device.type != "cpu":
            host = torch.empty(flat.shape, dtype=dtype, pin_memory=device.type == "cuda")
            host.copy_(flat, non_blocking=True)
        for i, part in zip(indices, host.split([tensors[i].numel() for i in indices])):
            copies[i] = part.view(tensors[i].shape)
    if any(device.type == "cuda" for device, _ in groups):
        event = torch.cuda.Event()
        event.record()  # after every copy above, on the current stream
    return copies, event


class CheckpointWriter:
    """Writes checkpoints on a background thread: the copy to host memory is taken at once, the disk write
    overlaps the next epoch instead of adding to it (BENCHMARKS.md, "Checkpoints"). One write at a time; `wait()`
    finishes the last one and raises its error, if any."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, path: str | os.PathLike, state: dict) -> None:
        self.wait()
        state, copied = _snapshot(state)

        def write() -> None:
            try:
                if copied is not None:
                    copied.synchronize()  # the host copies have landed (this thread waits, training does not)
                # each tensor in a storage of its own, as state_dict gives them (torch.set_rng_state refuses a
                # view): a host copy, off the training thread
                save_checkpoint(path, _map_tensors(torch.clone, state))
            except BaseException as err:  # noqa: BLE001 - handed to the training thread by wait()
                self._error = err

        self._thread = threading.Thread(target=write, name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


@dataclass(frozen=True)
class RunInfo:
    """What a run records in its checkpoints beside the training state: the settings as asked for, the class names
    and normalisation of its data, fingerprints of its train and test images (helpers.run.fingerprint) and the run
    it started from."""

    requested: TrainConfig | None = None
    classes: tuple[str, ...] = CIFAR10_CLASSES
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    data: dict | None = None  # {"train": fingerprint, "test": fingerprint} (and "val" with a validation split)
    init_from: str | None = None
    val_indices: tuple[int, ...] | None = None  # the validation split's images, indices into the training set


def capture(step, generator: torch.Generator, config: TrainConfig, records: list[dict], *, warmup_seconds: float,
            mode: str, info: RunInfo | None = None) -> dict:
    """The checkpoint of a training run after len(records) epochs: the trained and evaluated weights of `step`
    (a helpers.engine.TrainStep), its optimizer, scheduler, scaler and weight average, every process's RNG states
    and the loader's generator. Every process calls it (it gathers their RNG states); rank 0 writes it."""
    rng = step.rng_state() | {"sampler": generator.get_state()}
    info = info or RunInfo()
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": len(records),
        "config": config.to_dict(),
        "model_state": step.trained_model.state_dict(),  # the trained weights, to resume from
        "eval_state": step.averaged_weights(),  # the weight average, when there is one: the weights evaluated
        "step_state": step.state_dict(),
        "rng": rng,  # this process's (rank 0's)
        "world_size": distributed.world().world_size,
        "rng_ranks": distributed.all_gather_object(rng),  # every process's, in rank order: each restores its own
        "history": records,  # snapshotted (copied) by the writer
        "warmup_seconds": warmup_seconds,
        "mode": mode,
        "requested": info.requested.to_dict() if info.requested is not None else None,
        "classes": list(info.classes),
        "normalization": {"mean": list(info.mean), "std": list(info.std)},
        "data": info.data,
        "init_from": info.init_from,
        "val_indices": list(info.val_indices) if info.val_indices is not None else None,
    }


# ---------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint read and checked once (`read_checkpoint`). `config` is the run as trained, `requested` as it
    was asked for (the same for checkpoints written before both were kept)."""

    path: Path
    epoch: int  # epochs finished
    config: TrainConfig
    requested: TrainConfig
    history: tuple[dict, ...] = field(repr=False)  # one record per finished epoch (helpers.train.History's)
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # the normalisation its model was trained with (per channel, of [0, 1] pixels)
    std: tuple[float, ...]
    # the evaluated weights: the weight average for recipes with one, else the trained weights
    weights: dict = field(repr=False)
    world_size: int  # processes it was trained on
    data: dict | None  # fingerprints of its train and test images (None: written before they were kept)
    init_from: str | None  # the run its weights started from
    warmup_seconds: float
    mode: str  # the execution mode it ran in
    _state: dict = field(repr=False)  # the whole file, for `restore`
    # the validation split it held out of its training images (TrainConfig.val_split), kept so a resume keeps it
    val_indices: tuple[int, ...] | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.epoch >= self.config.epochs

    def describe(self) -> str:
        """'a finished run (2/2 epochs)' or 'an unfinished run (1/3 epochs)'."""
        done = "a finished" if self.finished else "an unfinished"
        return f"{done} run ({self.epoch}/{self.config.epochs} epochs)"

    def apply_to(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the evaluated weights into `model` (a CheckpointError for another architecture); returns it."""
        check_weights(model, self.weights, self.path)
        model.load_state_dict(self.weights)
        return model

    def check_world(self) -> None:
        """A CheckpointError when it was trained on another number of processes than this run has."""
        now = distributed.world().world_size
        if self.world_size != now:
            how = (f"torchrun --nproc_per_node {self.world_size} -m helpers.train --resume ..."
                   if self.world_size > 1 else "one process")
            raise CheckpointError(f"{self.path} was trained on {self.world_size} process(es) and this run has {now}: "
                                  f"an exact resume needs the same number (run it with {how}), or start a new run "
                                  "from its weights (--init-from)")


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the checkpoint.pt inside a run folder (runs/latest: the last run's)."""
    path = follow_latest(path)
    return path / NAME if path.is_dir() else path


def read_checkpoint(path: str | os.PathLike, *, model_name: str | None = None) -> Checkpoint:
    """Read a checkpoint written by helpers.train (a file, or a run folder holding checkpoint.pt); a missing or
    damaged file, or another model's checkpoint (model_name), gives a CheckpointError that says what to do."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass a checkpoint.pt written by helpers.train, or its "
                              "run folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean the same to the user
        raise CheckpointError(
            f"{path} is not a readable checkpoint: it is damaged (a copy cut short?) or not from helpers.train "
            f"({type(err).__name__}): use another checkpoint"
        ) from None
    ckpt = _checked(path, state)
    if model_name is not None and ckpt.config.model != model_name:
        raise CheckpointError(f"{path} is a checkpoint of {ckpt.config.model!r}, not {model_name!r}: pass --model "
                              f"{ckpt.config.model} or another checkpoint")
    return ckpt


def _checked(path: Path, state) -> Checkpoint:
    """The Checkpoint in `state`, or a CheckpointError unless it is one of ours whose settings and counters make
    sense. Format 1 is brought up to date here."""
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not a helpers.train checkpoint: pass a checkpoint.pt written by "
                              "helpers.train, or its run folder")
    wrong = [k for k, kind in REQUIRED.items() if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool)]
    if wrong:
        raise CheckpointError(f"{path} is damaged: {', '.join(wrong)} missing or of the wrong type; use another "
                              "checkpoint")
    if state["format"] == 1:
        state = _from_format_1(state)
    try:
        config = TrainConfig.from_dict(state["config"])
        requested = TrainConfig.from_dict(state["requested"]) if state.get("requested") else config
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path} holds settings that are not valid ({err}): it was edited or damaged; use "
                              "another checkpoint") from None
    if not 0 <= state["epoch"] <= config.epochs or len(state["history"]) != state["epoch"]:
        raise CheckpointError(f"{path} is damaged: it claims {state['epoch']} of {config.epochs} epochs with "
                              f"{len(state['history'])} in its history. Use another checkpoint.")
    mean, std = _normalization(path, state)
    return Checkpoint(
        path=path, epoch=state["epoch"], config=config, requested=requested, history=tuple(state["history"]),
        classes=_classes(path, state), mean=mean, std=std,
        weights=state.get("eval_state") or state["model_state"], world_size=state.get("world_size", 1),
        data=state.get("data"), init_from=state.get("init_from"), warmup_seconds=state.get("warmup_seconds", 0.0),
        mode=state.get("mode", "eager"), _state=state,
        val_indices=tuple(state["val_indices"]) if state.get("val_indices") is not None else None,
    )


def _classes(path: Path, state: dict) -> tuple[str, ...]:
    """The checkpoint's class names (CIFAR-10's for older ones); a CheckpointError unless they are names."""
    classes = state.get("classes") or CIFAR10_CLASSES
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes) or len(classes) < 2:
        raise CheckpointError(f"{path} is damaged: its class names are not a list of names; use another checkpoint")
    return tuple(classes)


def _normalization(path: Path, state: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std), 3 finite numbers each (std > 0), from the checkpoint (CIFAR-10's for older ones)."""
    norm = state.get("normalization") or {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    try:
        mean, std = (tuple(float(v) for v in norm[k]) for k in ("mean", "std"))
        if len(mean) != 3 or len(std) != 3 or not all(map(math.isfinite, mean + std)) or min(std) <= 0:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is damaged: its normalisation is not 3 means and 3 positive stds; use "
                              "another checkpoint") from None
    return mean, std


def _from_format_1(state: dict) -> dict:
    """A format-1 checkpoint in format 2's layout: `compile: bool` became `mode`, the optimizer, scheduler and
    scaler states moved under step_state."""
    config = dict(state["config"])
    config["mode"] = "compile" if config.pop("compile", False) else config.get("mode", "auto")
    step_state = {"optimizer": state.get("optimizer_state"), "scheduler": state.get("scheduler_state"),
                  "scaler": state.get("scaler_state"), "ema": None}
    return state | {"format": 2, "config": config, "step_state": step_state}


def restore(step, generator: torch.Generator, ckpt: Checkpoint) -> list[dict]:
    """Put `ckpt`'s training state into `step` (a helpers.engine.TrainStep: weights, optimizer, scheduler, scaler,
    weight average, this process's RNG states) and the loader's `generator`; returns the finished epochs'
    records. A CheckpointError for another number of processes or another architecture."""
    state = ckpt._state
    ckpt.check_world()
    check_weights(step.trained_model, state["model_state"], ckpt.path)
    step.load_weights_in_place(state["model_state"])
    step.load_state_dict(state["step_state"])
    rng = state["rng_ranks"][distributed.world().rank] if state.get("rng_ranks") else state["rng"]
    step.set_rng_state(rng)
    generator.set_state(rng["sampler"])
    return list(ckpt.history)


def read_weights_file(path: str | os.PathLike) -> object:
    """The contents of a plain PyTorch file of tensors and values (`cifar10 export --weights FILE.pt` writes one),
    read with weights_only=True: no code in it runs. A CheckpointError that says what to do when it is unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean the same to the user
        raise CheckpointError(f"{path} is not a readable PyTorch file ({type(err).__name__}): pass a file written "
                              "by cifar10 export, or a run folder") from None


def check_weights(model: torch.nn.Module, weights: dict, path) -> None:
    """A CheckpointError unless `weights` (a state dict) fits `model`: the same names and shapes."""
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    shapes = [k for k in own if k in weights and (not isinstance(weights[k], torch.Tensor)
                                                   or weights[k].shape != own[k].shape)]
    if missing or extra or shapes:
        first = (missing or extra or shapes)[0]
        raise CheckpointError(f"{path} holds weights of another architecture than {type(model).__name__} "
                              f"({len(missing)} missing, {len(extra)} unexpected, {len(shapes)} of another shape; "
                              f"first: {first}): pass a checkpoint of this model")
