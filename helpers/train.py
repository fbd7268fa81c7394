"""Training engine and the project's main job: `python -m helpers.train --model custom_resnet ...`.

`fit` trains with one loop for fp32 and mixed precision (bf16 autocast where the hardware has it, fp16 with a
GradScaler otherwise), checkpoints atomically after every epoch, resumes exactly, and stops on a NaN/inf loss
with the epoch, step and learning rate. `evaluate` returns loss, accuracy and per-image predictions.
This module never plots: figures live in helpers.plots.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_FORMAT = 1
EPOCH_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")


# ---------------------------------------------------------------------------------------------------------
# Settings: one dataclass, with each model's seed recipe as its defaults


@dataclass
class TrainConfig:
    """Every setting of a run (saved in checkpoints and metrics.json). Accuracies are in percent."""

    model: str = "custom_resnet"
    epochs: int = 24
    batch_size: int = 512
    optimizer: str = "sgd"  # sgd | adam
    lr: float | None = None  # one-cycle: starting LR (None: max_lr / 10); plateau/none: the LR
    max_lr: float | str | None = 0.45  # one-cycle peak; "auto": found by the LR range test (command line)
    pct_start: float = 7 / 24  # share of one-cycle steps spent warming up (seed 003: peak at epoch 8 of 24)
    momentum: float = 0.9  # SGD momentum; Adam's beta1
    nesterov: bool = False
    weight_decay: float = 5e-4  # coupled L2, on a mean loss (Page's 5e-4 * 512 is for a summed loss)
    label_smoothing: float = 0.1
    l1: float = 0.0  # L1 penalty factor on all parameters (seed 002: 5e-4)
    scheduler: str = "onecycle"  # onecycle (stepped per batch) | plateau (per epoch, on test loss) | none
    augment: str = "davidnet"  # helpers.data.RECIPES
    amp: bool | None = None  # mixed precision; None: on for CUDA, off on the CPU (bf16 is ~17x slower there)
    channels_last: bool = True
    seed: int = 0
    data_dir: str = "data"
    subset_train: int | None = None  # class-balanced subset sizes (None: everything)
    subset_test: int | None = None
    workers: int | None = None  # DataLoader workers (None: CPU cores - 1)
    loader: str = "auto"  # auto | gpu | torch
    compile: bool = False
    tta: bool = False  # also report flip test-time-augmented accuracy

    @classmethod
    def for_model(cls, model: str, **overrides) -> TrainConfig:
        """The seed recipe of `model` (RECIPE_DEFAULTS), with any settings overridden."""
        from helpers.models import MODELS

        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(**{**RECIPE_DEFAULTS[model], "model": model, **overrides})


RECIPE_DEFAULTS: dict[str, dict] = {
    # seed 003 (94.12% in 24 epochs): SGD 0.9, wd 5e-4, batch 512, one-cycle 0.045 -> 0.45 at epoch 8, label
    # smoothing, mixed precision; Page's augmentation
    "custom_resnet": dict(
        epochs=24, batch_size=512, optimizer="sgd", max_lr=0.45, pct_start=7 / 24, momentum=0.9,
        weight_decay=5e-4, label_smoothing=0.1, augment="davidnet",
    ),
    # seed 001 (91.81% in 20 epochs): Adam from 1e-5 with wd 1e-3, one-cycle to the LR finder's max, batch 128
    "resnet18": dict(
        epochs=20, batch_size=128, optimizer="adam", lr=1e-5, max_lr="auto", pct_start=0.25, momentum=0.9,
        weight_decay=1e-3, label_smoothing=0.0, augment="resnet18",
    ),
    # seed 002 (87.17% in 200 epochs): SGD 0.8, one-cycle 0.025 -> 0.2, L1 5e-4
    "depthwise_net": dict(
        epochs=200, batch_size=128, optimizer="sgd", lr=0.025, max_lr=0.2, pct_start=0.25, momentum=0.8,
        weight_decay=0.0, label_smoothing=0.0, l1=5e-4, augment="depthwise",
    ),
}


# ---------------------------------------------------------------------------------------------------------
# History and evaluation results


@dataclass
class History:
    """Per-epoch records: epoch, lr (at the epoch's start), train/test loss, train/test accuracy (%), seconds."""

    records: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __getattr__(self, name: str) -> list:  # history.test_acc -> [per-epoch values]
        if name in EPOCH_COLUMNS:
            return [r[name] for r in self.records]
        raise AttributeError(name)

    def append(self, **record) -> None:
        self.records.append({k: record[k] for k in EPOCH_COLUMNS} | {k: v for k, v in record.items()})

    def to_json(self, path: str | os.PathLike) -> None:
        _atomic_write_text(Path(path), json.dumps(self.records, indent=1))

    def to_csv(self, path: str | os.PathLike) -> None:
        keys = list(dict.fromkeys(k for r in self.records for k in r))
        tmp = Path(path).with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.records)
        os.replace(tmp, path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> History:
        return cls(json.loads(Path(path).read_text()))


@dataclass
class EvalResult:
    """`evaluate`'s output. Arrays are in the loader's order (a test loader keeps the dataset's order)."""

    loss: float  # mean cross-entropy (no label smoothing)
    accuracy: float  # percent
    predictions: np.ndarray  # (N,) int64
    confidences: np.ndarray  # (N,) float32 softmax probability of the predicted class
    targets: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, C) float32
    tta_accuracy: float | None = None  # percent, with horizontal-flip test-time augmentation

    @property
    def misclassified(self) -> np.ndarray:
        """Indices of the wrong predictions, most confident first."""
        wrong = np.flatnonzero(self.predictions != self.targets)
        return wrong[np.argsort(-self.confidences[wrong], kind="stable")]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or belongs to another model."""


# ---------------------------------------------------------------------------------------------------------
# Building blocks


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA) for a repeatable run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but this machine has no CUDA GPU: use --device cpu")
    return device


def amp_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """Autocast dtype, or None for fp32: bf16 on CPUs and on GPUs with bf16 tensor cores, else fp16 (T4)."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    lr = config.lr if config.lr is not None else _numeric_max_lr(config) / 10
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=config.momentum, nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r}: choose sgd or adam")


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """OneCycleLR (linear up to max_lr, linear down, stepped per batch), ReduceLROnPlateau, or None."""
    if config.scheduler == "onecycle":
        max_lr = _numeric_max_lr(config)
        start = optimizer.param_groups[0]["lr"]
        pct_start = config.pct_start
        if math.isclose(pct_start * config.epochs * steps_per_epoch, 1.0):
            # a warm-up of exactly one step is a zero-length phase: OneCycleLR divides by zero (tiny runs only)
            pct_start *= 1 + 1e-6
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
            pct_start=pct_start, anneal_strategy="linear", div_factor=max_lr / start,
            cycle_momentum=False,  # Page and seed 003 keep momentum fixed
        )
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.2, patience=2)
    if config.scheduler == "none":
        return None
    raise ValueError(f"unknown scheduler {config.scheduler!r}: choose onecycle, plateau or none")


def _numeric_max_lr(config: TrainConfig) -> float:
    if isinstance(config.max_lr, (int, float)) and config.max_lr > 0:
        return float(config.max_lr)
    if config.scheduler != "onecycle" and config.lr is not None:
        return config.lr * 10
    raise ValueError(
        f"max_lr must be a positive number here, got {config.max_lr!r}: run helpers.lr_finder.lr_range_test "
        "(or `python -m helpers.train --max-lr auto`) and pass its suggestion"
    )


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    channels_last: bool = True,
    tta: bool = False,
) -> EvalResult:
    """Loss, accuracy (%) and per-image predictions/confidences over `loader`; the model's mode is restored."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    dtype = amp_dtype(device, amp)
    was_training = model.training
    model.eval()
    logits, flipped, targets = [], [], []
    try:
        for x, y in loader:
            x, y = _to_device(x, y, device, channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                logits.append(model(x).float())
                if tta:
                    flipped.append(model(x.flip(-1)).float())
            targets.append(y)
    finally:
        model.train(was_training)
    if not targets:
        raise ValueError("evaluate got an empty loader")
    logits, targets = torch.cat(logits), torch.cat(targets)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    tta_accuracy = None
    if tta:
        tta_pred = (probs + torch.cat(flipped).softmax(1)).argmax(1)
        tta_accuracy = 100.0 * (tta_pred == targets).sum().item() / len(targets)
    return EvalResult(
        loss=F.cross_entropy(logits, targets).item(),
        accuracy=100.0 * (pred == targets).sum().item() / len(targets),  # exact counts, no float32 rounding
        predictions=pred.cpu().numpy(),
        confidences=conf.cpu().numpy(),
        targets=targets.cpu().numpy(),
        probabilities=probs.cpu().numpy(),
        tta_accuracy=tta_accuracy,
    )


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: plain tensors, dicts, lists, numbers and strings, so `torch.load(weights_only=True)` reads them


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    (~0.05-0.1 s for ResNet-9's 52 MB here) overlaps the next epoch instead of adding to it. One write at a time;
    `wait()` finishes the last one and raises its error, if any."""

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


def load_checkpoint(path: str | os.PathLike, *, model_name: str | None = None) -> dict:
    """Read a checkpoint written by `fit`; a damaged file or another model's checkpoint gives a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and EOF errors all mean the same to the user
        raise CheckpointError(f"{path} is not a readable checkpoint (damaged or not from helpers): {err}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "model_state" not in state:
        raise CheckpointError(f"{path} is not a helpers.train checkpoint")
    if model_name is not None and state["config"]["model"] != model_name:
        raise CheckpointError(
            f"{path} is a checkpoint of {state['config']['model']!r}, not {model_name!r}: "
            f"pass --model {state['config']['model']} or another checkpoint"
        )
    return state


def resumable(path: str | os.PathLike, config: TrainConfig) -> Path | None:
    """`path` if it holds a checkpoint of this very run (same settings) to continue, else None.

    A checkpoint of a different run is never overwritten: it is renamed to checkpoint-<n>.pt beside it first.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = load_checkpoint(path)["config"]
    except CheckpointError:
        saved = None
    if saved == asdict(config):
        return path
    n = 1
    while (kept := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, kept)
    print(f"{path} came from other settings: kept as {kept}; starting afresh")
    return None


def load_weights(model: nn.Module, path: str | os.PathLike, *, model_name: str | None = None) -> History:
    """Load a checkpoint's weights into `model`; returns the run's History."""
    state = load_checkpoint(path, model_name=model_name)
    model.load_state_dict(state["model_state"])
    return History(state["history"])


# ---------------------------------------------------------------------------------------------------------
# Training


def fit(
    model: nn.Module,
    train_loader,
    test_loader,
    config: TrainConfig,
    *,
    device: str | torch.device | None = "auto",
    checkpoint: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    quiet: bool = False,
) -> History:
    """Train `model` per `config`; returns the History (one record per epoch).

    checkpoint: path written (atomically) after every epoch. resume: a checkpoint to continue from; the run
    then continues exactly where it stopped (same History on the CPU as an uninterrupted run).
    """
    from tqdm.auto import tqdm

    from helpers.data import sampling_generator

    device = resolve_device(device)
    model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = amp_dtype(device, config.amp)
    steps = len(train_loader)
    if steps == 0:
        raise ValueError("the training loader yields no batches: use a smaller batch size or more data")
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    generator = sampling_generator(train_loader)
    history, start = History(), 0

    if resume is not None:
        state = load_checkpoint(resume, model_name=config.model)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler_state"])
        scaler.load_state_dict(state["scaler_state"])
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["sampler"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        history, start = History(state["history"]), state["epoch"]

    step_model = torch.compile(model) if config.compile else model
    check_every = 1 if device.type == "cpu" else 25  # NaN checks and progress reads cost a host sync on a GPU
    if not quiet:
        print_table_header()
        for record in history.records:
            print_table_row(record)

    writer = CheckpointWriter()
    try:
        for epoch in range(start + 1, config.epochs + 1):
            t0 = time.perf_counter()
            lr_start = optimizer.param_groups[0]["lr"]
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            first_bad = torch.full((), -1, device=device, dtype=torch.long)
            seen, lrs = 0, []
            # a manual bar: tqdm.auto's wrapper calls iter() on an iterable it is given, then iterates it again,
            # which would start every epoch's loader twice (a wasted prefetch and extra random draws)
            bar = tqdm(total=steps, desc=f"epoch {epoch}/{config.epochs}", leave=False, unit="batch",
                       **({"disable": True} if quiet else {}))  # else tqdm's default: TQDM_DISABLE=1 silences it
            for step, (x, y) in enumerate(train_loader):
                x, y = _to_device(x, y, device, config.channels_last)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = step_model(x)
                    loss = criterion(out, y)
                total = loss + config.l1 * sum(p.abs().sum() for p in model.parameters()) if config.l1 else loss
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
                lrs.append(optimizer.param_groups[0]["lr"])
                if config.scheduler == "onecycle":
                    scheduler.step()
                loss_sum += loss.detach() * len(y)
                correct += (out.argmax(1) == y).sum()
                seen += len(y)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(total.detach()), step, first_bad)
                bar.update()
                if step % check_every == 0 or step == steps - 1:
                    _stop_if_diverged(int(first_bad), epoch, lrs, checkpoint)
                    if not quiet and step % max(1, steps // 20) == 0:
                        bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", lr=f"{lrs[-1]:.3g}")
            bar.close()
            result = evaluate(step_model, test_loader, device=device, amp=config.amp,
                              channels_last=config.channels_last, tta=config.tta)
            if config.scheduler == "plateau":
                scheduler.step(result.loss)
            record = dict(
                epoch=epoch, lr=lr_start, train_loss=loss_sum.item() / seen, train_acc=100.0 * correct.item() / seen,
                test_loss=result.loss, test_acc=result.accuracy, seconds=time.perf_counter() - t0,
                lr_end=lrs[-1],  # the LR of the epoch's last step: with `lr`, the schedule's shape in plots
            )
            if result.tta_accuracy is not None:
                record["test_acc_tta"] = result.tta_accuracy
            history.append(**record)
            if not quiet:
                print_table_row(record)
            if checkpoint is not None:
                writer.save(checkpoint, {
                    "format": CHECKPOINT_FORMAT,
                    "epoch": epoch,
                    "config": asdict(config),
                    "model_state": model.state_dict(),
                    "optimizer_state": optimizer.state_dict(),
                    "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
                    "scaler_state": scaler.state_dict(),
                    "rng": {
                        "torch": torch.get_rng_state(),
                        "sampler": generator.get_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    },
                    "history": history.records,  # snapshotted (copied) by the writer
                })
    finally:
        writer.wait()  # also when stopped (NaN, Ctrl-C): the last finished epoch's checkpoint is complete on disk
    if not quiet:
        print_table_rule()
    return history


def _stop_if_diverged(bad_step: int, epoch: int, lrs: list[float], checkpoint) -> None:
    if bad_step < 0:
        return
    kept = f"the last good checkpoint is kept at {checkpoint}" if checkpoint else "no checkpoint was being written"
    raise TrainingDiverged(
        f"loss became NaN/inf at epoch {epoch}, step {bad_step + 1} (learning rate {lrs[bad_step]:.4g}); {kept}. "
        "Lower --max-lr (try the LR range test: --max-lr auto) or turn off --amp."
    )


_WIDTHS = (7, 10, 9, 11, 10, 10, 9)


def print_table_rule() -> None:
    print("-" * (sum(_WIDTHS) + 3 * len(_WIDTHS) + 1), flush=True)


def print_table_header() -> None:
    print_table_rule()
    names = ("Epoch", "LR", "Time", "TrainLoss", "TrainAcc", "TestLoss", "TestAcc")
    print("| " + " | ".join(f"{n:>{w}}" for n, w in zip(names, _WIDTHS)) + " |")
    print_table_rule()


def print_table_row(r: dict) -> None:
    """One line of seed 003's table: | Epoch | LR | Time | TrainLoss | TrainAcc | TestLoss | TestAcc |."""
    m, s = divmod(int(round(r["seconds"])), 60)
    cells = (
        f"{r['epoch']}", f"{r['lr']:.6f}", f"{m:02d}m {s:02d}s", f"{r['train_loss']:.4f}", f"{r['train_acc']:.2f}%",
        f"{r['test_loss']:.4f}", f"{r['test_acc']:.2f}%",
    )
    print("| " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, _WIDTHS)) + " |", flush=True)


# ---------------------------------------------------------------------------------------------------------
# Data for a run


def prepare_data(config: TrainConfig, device: torch.device):
    """(train_loader, test_loader, train_arrays, test_arrays) for `config`, on the chosen loader path."""
    from helpers import data

    train = data.balanced_subset(data.load_cifar10(config.data_dir, train=True), config.subset_train,
                                 seed=config.seed)
    test = data.balanced_subset(data.load_cifar10(config.data_dir, train=False), config.subset_test,
                                seed=config.seed)
    use_gpu = config.loader == "gpu" or (
        config.loader == "auto" and device.type == "cuda" and config.augment in data.GPU_RECIPES
    )
    train_loader, test_loader = data.make_loaders(train, test, kind="gpu" if use_gpu else "torch",
                                                  batch_size=config.batch_size, recipe=config.augment,
                                                  device=device, workers=config.workers, seed=config.seed)
    return train_loader, test_loader, train, test


# ---------------------------------------------------------------------------------------------------------
# Command line


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _max_lr(text: str):
    return "auto" if text == "auto" else _positive(float)(text)


def build_parser() -> argparse.ArgumentParser:
    from helpers.data import RECIPES
    from helpers.models import MODELS

    p = argparse.ArgumentParser(
        prog="python -m helpers.train",
        description="Train a CIFAR-10 model. Unset flags take the model's seed recipe (helpers.train.RECIPE_DEFAULTS).",
    )
    p.add_argument("--model", choices=list(MODELS), default="custom_resnet", help="(default: custom_resnet)")
    p.add_argument("--epochs", type=_positive(int))
    p.add_argument("--batch-size", type=_positive(int))
    p.add_argument("--data-dir", default="data",
                   help="folder holding cifar-10-batches-py, downloaded if missing (default: data)")
    p.add_argument("--out", default="runs/latest",
                   help="folder for checkpoint, history, metrics and figures (default: runs/latest)")
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--lr", type=_positive(float), help="one-cycle start LR (default max-lr/10); else the LR")
    p.add_argument("--max-lr", type=_max_lr, help="one-cycle peak LR, or 'auto' to run the LR range test first")
    p.add_argument("--scheduler", choices=["onecycle", "plateau", "none"])
    p.add_argument("--momentum", type=_non_negative)
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    p.add_argument("--weight-decay", type=_non_negative)
    p.add_argument("--label-smoothing", type=_non_negative)
    p.add_argument("--l1", type=_non_negative, help="L1 penalty factor")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, help="mixed precision (default: on for CUDA)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--augment", choices=list(RECIPES))
    p.add_argument("--workers", type=int, help="DataLoader workers (default: CPU cores - 1)")
    p.add_argument("--loader", choices=["auto", "gpu", "torch"], default="auto",
                   help="gpu: whole dataset on the device, batched augmentation (default auto: gpu when CUDA is there)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--tta", action="store_true", help="also report flip test-time-augmented accuracy")
    p.add_argument("--subset-train", type=_positive(int), help="class-balanced training subset size")
    p.add_argument("--subset-test", type=_positive(int), help="class-balanced test subset size")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint (its settings)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="skip the curves, confusion matrix, misclassified and GradCAM figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)} - {"model"}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.resume:
        try:
            saved = load_checkpoint(args.resume)["config"]
        except CheckpointError as err:
            parser.error(str(err))
        if saved["model"] != args.model and "--model" in argv:
            parser.error(f"{args.resume} is a checkpoint of {saved['model']!r}, not {args.model!r}")
        return TrainConfig(**saved)
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0")
    for flag in ("subset_train", "subset_test"):
        if given.get(flag) is not None and given[flag] < 10:
            parser.error(f"--{flag.replace('_', '-')} must be at least 10 (one image per class)")
    return TrainConfig.for_model(args.model, **given)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser, argv)
    out = Path(args.out)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not args.resume and not args.overwrite:
        parser.error(f"{ckpt} exists: pass --resume {ckpt} to continue that run, --overwrite to replace it, "
                     "or another --out")
    try:
        device = resolve_device(args.device)
    except RuntimeError as err:
        parser.error(str(err))
    out.mkdir(parents=True, exist_ok=True)

    from helpers import data
    from helpers.models import build_model, count_parameters

    try:
        train_loader, test_loader, train_arrays, test_arrays = prepare_data(config, device)
    except (data.DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seed_everything(config.seed)
    model = build_model(config.model).to(device)
    quiet = args.quiet  # fit and the range test take it directly (TQDM_DISABLE is read only at tqdm's import)
    if not quiet:
        print(f"{config.model}: {count_parameters(model):,} parameters | device {device} | "
              f"{len(train_arrays):,} train / {len(test_arrays):,} test images | "
              f"{type(train_loader).__name__} | amp {amp_dtype(device, config.amp)}")
    if config.max_lr == "auto" and not args.resume:
        from helpers.lr_finder import lr_range_test
        from helpers.plots import plot_lr_finder

        found = lr_range_test(model, train_loader, config=config, device=device, progress=not quiet)
        config.max_lr = found.suggested_lr
        plot_lr_finder(found, save=out / "lr_finder.png")
        print(f"LR range test: max LR {config.max_lr:.3g} (steepest descent; plot in {out / 'lr_finder.png'})")

    try:
        history = fit(model, train_loader, test_loader, config, device=device, checkpoint=ckpt,
                      resume=args.resume, quiet=quiet)
    except (TrainingDiverged, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished epoch is saved; continue with --resume {ckpt}", file=sys.stderr)
        return 130
    total = sum(history.seconds)  # every epoch's training and evaluation, across resumes

    history.to_json(out / "history.json")
    history.to_csv(out / "history.csv")
    last = history.records[-1] if history.records else {}
    metrics = {
        "model": config.model,
        "test_acc": last.get("test_acc"),
        "test_acc_tta": last.get("test_acc_tta"),
        "epochs": len(history),
        "total_seconds": total,
        "epoch_seconds": history.seconds,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "data_dir": str(Path(config.data_dir).resolve()),
        "train_images": len(train_arrays),
        "test_images": len(test_arrays),
        "settings": asdict(config),
    }
    _atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    if args.figures:
        from helpers.plots import save_run_figures

        result = evaluate(model, test_loader, device=device, amp=config.amp)
        written = save_run_figures(out, model=model, history=history, result=result, test_arrays=test_arrays,
                                   device=device)
        print("figures: " + ", ".join(str(p) for p in written))
    print(f"final test accuracy {last.get('test_acc', float('nan')):.2f}% | {total:.0f} s | outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
