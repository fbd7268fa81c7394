"""Checkpoints: the one place that writes and reads them.

A checkpoint is plain tensors, dicts, lists, numbers and strings, so `torch.load(weights_only=True)` reads it.
Writes are atomic (a crash mid-write keeps the previous file) and, during training, run on a background thread
from a host copy, so the disk write overlaps the next epoch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from helpers.config import ConfigError, TrainConfig
from helpers.utils import atomic_write

CHECKPOINT_FORMAT = 2  # 2: config has `recipe` and `mode` (format 1, with `compile`, is still read)
READABLE_FORMATS = (1, 2)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another model; the message says what to do."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` atomically: a crash mid-write leaves the previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _snapshot(value):
    """A host copy of a state tree: training goes on changing the live tensors while a checkpoint is written."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value  # numbers, strings, None: immutable


class CheckpointWriter:
    """Writes checkpoints on a background thread: the copy to host memory is taken at once, the disk write
    (~0.05-0.1 s for ResNet-9's 52 MB on our CPU machines) overlaps the next epoch instead of adding to it. One
    write at a time; `wait()` finishes the last one and raises its error, if any."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, path: str | os.PathLike, state: dict) -> None:
        self.wait()
        state = _snapshot(state)

        def write() -> None:
            try:
                save_checkpoint(path, state)
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


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the checkpoint.pt inside a run folder."""
    path = Path(path).expanduser()
    return path / "checkpoint.pt" if path.is_dir() else path


def load_checkpoint(path: str | os.PathLike, *, model_name: str | None = None) -> dict:
    """Read a checkpoint written by `fit` (a file, or a run folder holding checkpoint.pt); a missing or damaged
    file, or another model's checkpoint, gives a CheckpointError that says what to do."""
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
    _check_contents(path, state)
    if model_name is not None and state["config"]["model"] != model_name:
        raise CheckpointError(
            f"{path} is a checkpoint of {state['config']['model']!r}, not {model_name!r}: "
            f"pass --model {state['config']['model']} or another checkpoint"
        )
    return state


# what every readable checkpoint holds, and of which type (checked before anything uses them)
REQUIRED = {"epoch": int, "config": dict, "model_state": dict, "history": list, "rng": dict}


def _check_contents(path: Path, state) -> None:
    """A CheckpointError unless `state` is a checkpoint of ours whose config and counters make sense."""
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} is not a helpers.train checkpoint: pass a checkpoint.pt written by "
                              "helpers.train, or its run folder")
    wrong = [k for k, kind in REQUIRED.items() if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool)]
    if wrong:
        raise CheckpointError(f"{path} is damaged: {', '.join(wrong)} missing or of the wrong type; use another "
                              "checkpoint")
    try:
        config = TrainConfig.from_dict(state["config"])
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path} holds settings that are not valid ({err}): it was edited or damaged; use "
                              "another checkpoint") from None
    if not 0 <= state["epoch"] <= config.epochs or len(state["history"]) != state["epoch"]:
        raise CheckpointError(f"{path} is damaged: it claims {state['epoch']} of {config.epochs} epochs with "
                              f"{len(state['history'])} in its history. Use another checkpoint.")


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


def apply_weights(model: torch.nn.Module, state: dict, path) -> None:
    """Load a checkpoint's evaluated weights (the weight average, for recipes with `ema`: the weights its history
    evaluated) into `model`, after check_weights."""
    weights = state.get("eval_state") or state["model_state"]
    check_weights(model, weights, path)
    model.load_state_dict(weights)


def keep_aside(path: Path) -> Path:
    """Rename `path` to <stem>-<n><suffix> (the first free n) and return the new name: nothing is deleted."""
    n = 1
    while (kept := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, kept)
    return kept
