"""Training and evaluation: `fit`, `evaluate`, `History`. A whole run (data, the LR range test, outputs) is
helpers.run; the command line is helpers.cli (`python -m helpers.train ...` runs it).

`fit` runs helpers.engine.TrainStep over the loader: one loop for fp32 and mixed precision, eager, CUDA graphs or
compiled. Per step it adds only device work to the bare step (an argmax kept for the epoch's accuracy): the loss
and accuracy are summed, and checked for NaN/inf, once per epoch on a GPU (every step on the CPU, where a read
costs nothing). The one-time warm-up (cuDNN autotuning, capture or compilation) runs before epoch 1's clock and is
reported on its own (`History.warmup_seconds`). Checkpoints are written after every epoch on a background thread;
a resumed run continues exactly. This module never plots.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from helpers import distributed
from helpers.checkpoints import (
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    RunInfo,
    capture,
    read_checkpoint,
    restore,
)
from helpers.config import TrainConfig, tta_name
from helpers.engine import TrainStep, mark, seconds_between
from helpers.utils import (
    amp_dtype,
    atomic_write,
    atomic_write_text,
    preserved_modes,
    read_json,
    resolve_device,
    seed_everything,
    to_host,
    unwrap,
)

__all__ = ["TrainConfig", "History", "EvalResult", "TrainingDiverged", "CheckpointError", "fit", "evaluate",
           "read_checkpoint", "load_weights", "resolve_device", "seed_everything", "amp_dtype"]

# what a History record holds: every epoch's columns, then those some epochs or some runs add
EPOCH_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")
EXTRA_COLUMNS = (
    "lr_end", "steps", "lr_max", "lr_max_step",  # the LR at the epoch's last step, its steps, its peak and where
    "train_seconds",  # the training steps alone (seconds adds the test pass)
    "test_acc_tta",  # with test-time augmentation (config.tta; the last epoch)
    "test_acc_trained",  # the trained weights' accuracy when a weight average is evaluated (the last epoch)
    # a run with a validation split (TrainConfig.val_split) evaluates every epoch on it: val_loss and val_acc in
    # place of test_loss and test_acc (and val_acc_trained in place of test_acc_trained)
    "val_loss", "val_acc", "val_acc_trained",
)
# what a run with a validation split does not record per epoch: its test set is evaluated once, after the last
OPTIONAL_COLUMNS = ("test_loss", "test_acc")


@dataclass
class History:
    """Per-epoch records (epoch, lr at the epoch's start, lr_end at its last step, train/test loss, train/test
    accuracy in %, seconds of training and evaluation, train_seconds of training alone), plus the run's one-time
    warm-up and execution mode. A run with a validation split has val_loss and val_acc in place of test_loss and
    test_acc (`eval_split`): its test set is evaluated once, after the last epoch, outside the history."""

    records: list[dict] = field(default_factory=list)
    warmup_seconds: float = 0.0  # capture/compile/autotuning before epoch 1 (of the last process, when resumed)
    mode: str = "eager"
    # the last epoch's evaluation by this process (not saved): a run's final evaluation, kept rather than redone
    evaluation: EvalResult | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.records)

    def __getattr__(self, name: str) -> list:  # history.test_acc -> [per-epoch values]
        if name in EPOCH_COLUMNS or name in EXTRA_COLUMNS:
            return [r.get(name) for r in self.records]
        raise AttributeError(name)

    @property
    def eval_split(self) -> str:
        """'val' when every epoch was evaluated on a validation split, else 'test'."""
        return "val" if self.records and "val_acc" in self.records[0] else "test"

    def append(self, **record) -> None:
        unknown = set(record) - set(EPOCH_COLUMNS) - set(EXTRA_COLUMNS)
        if unknown:
            raise ValueError(f"History records have no column {', '.join(sorted(unknown))}: add it to EXTRA_COLUMNS")
        missing = set(EPOCH_COLUMNS) - set(record) - set(OPTIONAL_COLUMNS)
        if missing or not {"test_acc", "val_acc"} & set(record):
            raise ValueError(f"a History record lacks {', '.join(sorted(missing)) or 'test_acc or val_acc'}")
        self.records.append({k: record[k] for k in EPOCH_COLUMNS if k in record} | record)

    @classmethod
    def of(cls, ckpt: Checkpoint) -> History:
        """The history saved in a checkpoint."""
        return cls(list(ckpt.history), ckpt.warmup_seconds, ckpt.mode)

    def to_json(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps({"epochs": self.records, "warmup_seconds": self.warmup_seconds,
                                            "mode": self.mode}, indent=1))

    def to_csv(self, path: str | os.PathLike) -> None:
        keys = list(dict.fromkeys(k for r in self.records for k in r))

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.records)

        atomic_write(path, write)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> History:
        saved = read_json(path)
        if isinstance(saved, list):  # written before warm-up was recorded
            return cls(saved)
        return cls(saved["epochs"], saved.get("warmup_seconds", 0.0), saved.get("mode", "eager"))


@dataclass
class EvalResult:
    """`evaluate`'s output. Arrays are in the loader's order (a test loader keeps the dataset's order)."""

    loss: float  # mean cross-entropy (no label smoothing)
    accuracy: float  # percent
    predictions: np.ndarray  # (N,) int64
    confidences: np.ndarray  # (N,) float32 softmax probability of the predicted class
    targets: np.ndarray  # (N,) int64
    probabilities: np.ndarray  # (N, C) float32
    tta_accuracy: float | None = None  # percent, with test-time augmentation (evaluate's tta)

    @property
    def misclassified(self) -> np.ndarray:
        """Indices of the wrong predictions, most confident first."""
        wrong = np.flatnonzero(self.predictions != self.targets)
        return wrong[np.argsort(-self.confidences[wrong], kind="stable")]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------------------
# Evaluation


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str | bool = "flip") -> torch.Tensor:
    """Logits (B, C) averaged over test-time views: 'flip' (the image and its mirror), 'flip_translate' (airbench's
    level 2: half the flip average, half the flip average of the image shifted 1 px up-left and down-right with
    reflect padding), or 'none'/False."""
    tta = tta_name(tta)
    logits = _logits(model, x)
    if tta == "none":
        return logits
    logits = 0.5 * logits + 0.5 * _logits(model, x.flip(-1))
    if tta == "flip_translate":
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [tta_logits(model, view, "flip") for view in (padded[..., :-2, :-2], padded[..., 2:, 2:])]
        logits = 0.5 * logits + 0.5 * torch.stack(shifted).mean(0)
    return logits


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """model(x) in float32, in memory of its own: a compiled model (mode reduce-overhead) returns CUDA-graph
    buffers that its next call overwrites."""
    out = model(x)
    return out.float() if out.dtype != torch.float32 else out.clone()


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: str | torch.device | None = None, amp: bool | None = None,
             channels_last: bool = True, tta: str | bool = "none") -> EvalResult:
    """Loss, accuracy (%) and per-image predictions/confidences over `loader`; every module's mode is restored.
    tta 'flip' or 'flip_translate' (see `tta_logits`) also reports that accuracy as `tta_accuracy`.

    A compiled model sees only full batches: a ragged last batch runs through the original module (no recompile).
    One host sync: everything is read back in one copy at the end.
    """
    return eval_result(to_host(evaluate_on_device(model, loader, device=device, amp=amp,
                                                  channels_last=channels_last, tta=tta)))


@torch.no_grad()
def evaluate_on_device(model: nn.Module, loader, *, device: str | torch.device | None = None,
                       amp: bool | None = None, channels_last: bool = True,
                       tta: str | bool = "none") -> dict[str, torch.Tensor]:
    """`evaluate`'s numbers as device tensors, nothing read back: probabilities (N, C), confidences (N,),
    predictions (N,), targets (N,), loss (), correct () and, with tta, tta_correct (). `eval_result` turns them,
    once on the host (utils.to_host), into an EvalResult."""
    device = resolve_device(device) if device is not None else next(model.parameters()).device
    dtype = amp_dtype(device, amp)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    tta = tta_name(tta)
    logits, augmented, targets = [], [], []
    with preserved_modes(model), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                enabled=dtype is not None):
        model.eval()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)
            net = model if not targets or len(y) == len(targets[0]) else unwrap(model)
            logits.append(_logits(net, x))
            if tta != "none":
                augmented.append(tta_logits(net, x, tta))
            targets.append(y)
    if not targets:
        raise ValueError("evaluate got an empty loader")
    logits, targets = torch.cat(logits), torch.cat(targets)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    out = {"probabilities": probs, "confidences": conf, "predictions": pred, "targets": targets,
           "loss": F.cross_entropy(logits, targets), "correct": (pred == targets).sum()}  # exact counts
    if augmented:
        out["tta_correct"] = (torch.cat(augmented).argmax(1) == targets).sum()
    return out


def eval_result(host: dict[str, np.ndarray]) -> EvalResult:
    """An EvalResult from `evaluate_on_device`'s numbers, read back (utils.to_host)."""
    n = len(host["targets"])
    return EvalResult(
        loss=float(host["loss"]), accuracy=100.0 * int(host["correct"]) / n, predictions=host["predictions"],
        confidences=host["confidences"], targets=host["targets"], probabilities=host["probabilities"],
        tta_accuracy=100.0 * int(host["tta_correct"]) / n if "tta_correct" in host else None,
    )


def load_weights(model: nn.Module, path: str | os.PathLike, *, model_name: str | None = None) -> History:
    """Load a checkpoint's evaluated weights (the weight average, for recipes with `ema`) into `model`; returns
    the run's History."""
    ckpt = read_checkpoint(path, model_name=model_name)
    ckpt.apply_to(model)
    return History.of(ckpt)


# ---------------------------------------------------------------------------------------------------------
# Training


def fit(model: nn.Module, train_loader, test_loader, config: TrainConfig, *,
        device: str | torch.device | None = "auto", checkpoint: str | os.PathLike | None = None,
        resume: str | os.PathLike | Checkpoint | None = None, quiet: bool = False, run_info: RunInfo | None = None,
        on_epoch: Callable[[dict], None] | None = None, eval_split: str = "test") -> History:
    """Train `model` per `config`; returns the History (one record per epoch; `history.evaluation` is the last
    epoch's evaluation). With weight averaging the model ends as evaluated: the average; the last epoch's record
    also holds the trained weights' accuracy (`test_acc_trained`). config.tta's accuracy (`test_acc_tta`) is the
    last epoch's alone: it scores the final model (on every epoch its views cost about as much as the training:
    BENCHMARKS.md, "Test-time augmentation").

    checkpoint: path written (atomically, in the background) after every epoch, with `run_info` (helpers.run
    adds the settings asked for, class names, normalisation and data fingerprints). resume: a checkpoint (a path,
    or a Checkpoint already read) to continue from; the run then continues exactly where it stopped (same History
    on the CPU as an uninterrupted run).
    on_epoch(record): called after each epoch's record (a sweep reports it to Ray Tune), on rank 0.
    eval_split: what `test_loader` holds, 'test' or 'val' (a validation split: the records' columns are then
    val_loss and val_acc, the plateau scheduler steps on the validation loss, and no TTA is scored: helpers.run
    tests the final model once on the test set).

    Under torchrun (helpers.distributed) every process runs this on its shard of the loader: the records hold the
    global batch's numbers, rank 0 alone prints and writes the checkpoint (with every process's RNG state).
    """
    device = resolve_device(device)
    main = distributed.world().is_main
    quiet = quiet or not main
    steps = len(train_loader)
    if steps == 0:
        raise ValueError("the training loader yields no batches: use a smaller batch size or more data")
    step = TrainStep(model, config, device=device, steps_per_epoch=steps)
    generator = train_loader.rng  # order and augmentation (helpers.data.Loader)
    warmup = step.prepare(train_loader, test_loader)
    history = History(warmup_seconds=warmup, mode=step.mode)
    if resume is not None:
        ckpt = resume if isinstance(resume, Checkpoint) else read_checkpoint(resume, model_name=config.model)
        history.records = restore(step, generator, ckpt)
    if not quiet:
        print(f"mode: {step.mode_reason} | one-time warm-up {warmup:.1f} s (before epoch 1, not in the epoch times)")
        print_table_header(eval_split)
        for record in history.records:
            print_table_row(record)
    writer = CheckpointWriter()
    try:
        for epoch in range(len(history) + 1, config.epochs + 1):
            t0, start = time.perf_counter(), mark(device)
            step.start_epoch(epoch)
            record, totals = _train_epoch(step, train_loader, epoch, quiet=quiet, checkpoint=checkpoint)
            step.sync_buffers()
            trained = mark(device)
            last = epoch == config.epochs  # TTA scores the final model only: every epoch, it cost as much as training
            tta = config.tta if last and eval_split == "test" else "none"
            tensors = evaluate_on_device(step.evaluated_model, test_loader, device=device, amp=config.amp,
                                         channels_last=config.channels_last, tta=tta)
            host = to_host(totals | tensors)  # the epoch's one host sync: every number its table row prints
            lrs = record.pop("lrs")
            if host["first_bad"] >= 0:
                raise _diverged(epoch, int(host["first_bad"]), lrs, checkpoint)
            result = eval_result(host)
            step.end_epoch(result.loss)
            loss_sum, correct, images = host["sums"].tolist()
            record.update({"train_loss": loss_sum / images, "train_acc": 100.0 * correct / images,
                           "train_seconds": seconds_between(start, trained),  # the training steps alone
                           f"{eval_split}_loss": result.loss, f"{eval_split}_acc": result.accuracy,
                           "seconds": time.perf_counter() - t0})
            if result.tta_accuracy is not None:
                record["test_acc_tta"] = result.tta_accuracy
            if step.averaging and last:  # what averaging gained (or lost) over training
                record[f"{eval_split}_acc_trained"] = evaluate(step.trained_forward, test_loader, device=device,
                                                               amp=config.amp,
                                                               channels_last=config.channels_last).accuracy
            history.append(**record)
            history.evaluation = result
            if not quiet:
                print_table_row(record)
            if checkpoint is not None:
                state = capture(step, generator, config, history.records, warmup_seconds=history.warmup_seconds,
                                mode=history.mode, info=run_info)  # every process: it gathers RNG states
                if main:
                    writer.save(checkpoint, state)
            if on_epoch is not None and main:
                on_epoch(record)
    finally:
        writer.wait()  # also when stopped (NaN, Ctrl-C): the last finished epoch's checkpoint is complete on disk
    step.end_training()  # the model leaves as it was evaluated (the weight average, if any)
    if not quiet:
        print_table_rule()
    return history


def host_reads_are_free(device: torch.device) -> bool:
    """On the CPU a read of a tensor costs nothing; on a GPU it waits for the queue (a host sync). fit checks the
    loss every step and shows it in the bar only where it is free (benchmarks.proxies turns this off to count the
    GPU path's syncs on the CPU)."""
    return device.type == "cpu"


def _train_epoch(step: TrainStep, loader, epoch: int, *, quiet: bool,
                 checkpoint=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """One pass of `step` over `loader`: the epoch's record without its numbers (and with `lrs`, the LR of each
    step), and those numbers as device tensors, nothing read back: sums (loss sum, correct, images; over every
    process under torchrun, float64: exact counts) and first_bad (the first non-finite loss's step, or -1)."""
    step.model.train()
    free = host_reads_are_free(step.device)
    lr_start, lrs, losses, preds, labels = step.lr, [], [], [], []
    # a manual bar: tqdm.auto's wrapper calls iter() on an iterable it is given, then iterates it again, which would
    # start every epoch's loader twice; TQDM_DISABLE=1 silences it too
    bar = tqdm(total=len(loader), desc=f"epoch {epoch}/{step.config.epochs}", leave=False, unit="batch",
               **({"disable": True} if quiet else {}))
    for x, y in loader:
        x, y = step.to_device(x, y)
        lrs.append(step.lr)
        loss, out = step(x, y)
        losses.append(loss)
        preds.append(out.argmax(1))  # read now: in graphs/compile modes `out` is overwritten by the next step
        labels.append(y)
        bar.update()
        if free:
            if not torch.isfinite(loss):
                raise _diverged(epoch, len(losses) - 1, lrs, checkpoint)
            if not quiet and len(losses) % max(1, len(loader) // 20) == 0:
                bar.set_postfix(loss=f"{torch.stack(losses).mean().item():.4f}", lr=f"{lrs[-1]:.3g}")
    bar.close()
    losses = torch.stack(losses).float()
    bad = ~torch.isfinite(losses)
    sizes = torch.tensor([len(t) for t in labels], device=losses.device)  # the last batch may be smaller
    preds, labels = torch.cat(preds), torch.cat(labels)
    peak = max(range(len(lrs)), key=lrs.__getitem__)  # a one-cycle peak inside the epoch, for the LR plot
    sums = torch.stack([(losses * sizes).sum().double(), (preds == labels).sum().double(),
                        torch.tensor(len(preds), dtype=torch.float64, device=losses.device)])
    totals = {"sums": distributed.all_reduce_sum(sums),
              "first_bad": torch.where(bad.any(), bad.int().argmax(), -1)}
    return dict(epoch=epoch, lr=lr_start, lr_end=lrs[-1], steps=len(lrs), lr_max=lrs[peak], lr_max_step=peak,
                lrs=lrs), totals


def _diverged(epoch: int, index: int, lrs: list[float], checkpoint) -> TrainingDiverged:
    kept = (f"the last good checkpoint is kept at {checkpoint}" if checkpoint and Path(checkpoint).is_file() else
            "no epoch finished, so no checkpoint was written" if checkpoint else "no checkpoint was being written")
    return TrainingDiverged(
        f"loss became NaN/inf at epoch {epoch}, step {index + 1} (learning rate {lrs[index]:.4g}); {kept}. "
        "Lower --max-lr (try the LR range test: --max-lr auto) or turn off --amp."
    )


# ---------------------------------------------------------------------------------------------------------
# The console table (the custom-ResNet write-up's)

_WIDTHS = (7, 19, 8, 11, 10, 10, 9)


def print_table_rule() -> None:
    print("-" * (sum(_WIDTHS) + 3 * len(_WIDTHS) + 1), flush=True)


def print_table_header(eval_split: str = "test") -> None:
    print_table_rule()
    evaluated = ("TestLoss", "TestAcc") if eval_split == "test" else ("ValLoss", "ValAcc")
    names = ("Epoch", "LR start -> end", "Time", "TrainLoss", "TrainAcc", *evaluated)
    print("| " + " | ".join(f"{n:>{w}}" for n, w in zip(names, _WIDTHS)) + " |")
    print_table_rule()


def print_table_row(r: dict) -> None:
    """| Epoch | LR start -> end | Time | TrainLoss | TrainAcc | TestLoss | TestAcc |: the LR at the epoch's first
    and last step (one-cycle's peak ends the last rising epoch); Time in seconds, one format. A record of a run
    with a validation split shows its val_loss and val_acc in the last two columns (ValLoss, ValAcc)."""
    split = "val" if "val_acc" in r else "test"
    cells = (
        f"{r['epoch']}", f"{r['lr']:.3g} -> {r.get('lr_end', r['lr']):.3g}", f"{r['seconds']:.1f}s",
        f"{r['train_loss']:.4f}", f"{r['train_acc']:.2f}%", f"{r[split + '_loss']:.4f}", f"{r[split + '_acc']:.2f}%",
    )
    print("| " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, _WIDTHS)) + " |", flush=True)


if __name__ == "__main__":  # python -m helpers.train: the command line lives in helpers.cli (no import of it here)
    import runpy

    runpy.run_module("helpers.cli", run_name="__main__", alter_sys=True)
