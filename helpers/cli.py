"""The command line: `python -m helpers.train --model custom_resnet ...` (also `python -m helpers.cli`).

Trains one model with its recipe (helpers.config.RECIPES), prints the epoch table and writes into --out: the
checkpoint after every epoch, history.json/csv, metrics.json and the figures. A user mistake (a flag, a path, a
checkpoint) ends with a one-line `error:` and exit status 2 (1 when training itself fails), never a traceback, and
nothing the user made is replaced without --overwrite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch

from helpers.checkpoints import CheckpointError, checkpoint_path, keep_aside, load_checkpoint
from helpers.config import MODES, RECIPES, ConfigError, TrainConfig, adapt_small_run, recipe_table, too_few_steps
from helpers.utils import amp_dtype, atomic_write_text, precision_name, resolve_device, seed_everything

DEFAULT_OUT = "runs/latest"
# settings a resumed run may change: where the data is and how it executes, never what it computes
RESUME_FREE = {"data_dir", "workers", "mode"}


class UsageError(Exception):
    """A user mistake found after parsing: printed as `error: ...`, exit status 2."""


def _number(text: str, kind=float):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None


def _max_lr(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive number or 'auto' (run the LR range test first), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from helpers.data import RECIPES as AUGMENT

    p = argparse.ArgumentParser(
        prog="python -m helpers.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a CIFAR-10 model. Recipe flags left unset take the chosen recipe's value:\n  "
                    + recipe_table().replace("\n", "\n  "))
    integer, number = (lambda t: _number(t, int)), _number
    p.add_argument("--model", choices=list(RECIPES), default="custom_resnet", help="(default: custom_resnet)")
    p.add_argument("--recipe", help="a recipe of the model (see above; default: the model's default)")
    p.add_argument("--epochs", type=integer)
    p.add_argument("--batch-size", type=integer, help="(default: the recipe's; smaller for a small training set, "
                   "so that an epoch has at least 20 steps)")
    p.add_argument("--data-dir", help="folder holding cifar-10-batches-py, or that folder itself; downloaded if "
                   "missing (default: data; with --resume: the run's own)")
    p.add_argument("--out", help=f"folder for checkpoint, history, metrics and figures (default: {DEFAULT_OUT}; "
                   "with --resume: the checkpoint's folder)")
    p.add_argument("--optimizer", choices=["sgd", "adam"])
    p.add_argument("--lr", type=number, help="one-cycle start LR (default max-lr/10); else the LR")
    p.add_argument("--max-lr", type=_max_lr, help="one-cycle peak LR, or 'auto' to run the LR range test first")
    p.add_argument("--pct-start", type=number, help="share of one-cycle steps spent rising to the peak")
    p.add_argument("--scheduler", choices=["onecycle", "plateau", "none"])
    p.add_argument("--momentum", type=number)
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    p.add_argument("--weight-decay", type=number)
    p.add_argument("--label-smoothing", type=number)
    p.add_argument("--l1", type=number, help="L1 penalty factor")
    p.add_argument("--augment", choices=list(AUGMENT))
    p.add_argument("--amp", action=argparse.BooleanOptionalAction,
                   help="mixed precision (default: on for CUDA, bf16 or fp16 on GPUs without bf16; off on the CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--mode", choices=list(MODES), help="how the step runs: auto (default: eager on the CPU, CUDA "
                   "graphs or compile on a GPU), eager, graphs, compile")
    p.add_argument("--compile", dest="mode", action="store_const", const="compile", help="same as --mode compile")
    p.add_argument("--workers", type=integer, help="DataLoader workers (default: CPU cores - 1, at most 8)")
    p.add_argument("--loader", choices=["auto", "gpu", "torch"],
                   help="gpu: whole dataset on the device, batched augmentation (default auto: gpu with CUDA)")
    p.add_argument("--tta", nargs="?", const="flip", choices=["none", "flip", "flip_translate"],
                   help="also report test-time-augmented accuracy: flip (the default when given alone) or "
                   "flip_translate (airbench's: flips and 1-px shifts)")
    p.add_argument("--ema", type=number, help="per-step decay of a weight average evaluated instead (0: off)")
    p.add_argument("--ema-epochs", type=integer, help="average over the last N epochs only (0: all)")
    p.add_argument("--bias-lr-scale", type=number, help="LR x this, weight decay / this, for batch-norm parameters")
    p.add_argument("--freeze-bn-weight", action=argparse.BooleanOptionalAction,
                   help="keep batch-norm scales at 1")
    p.add_argument("--subset-train", type=integer, help="class-balanced training subset size")
    p.add_argument("--subset-test", type=integer, help="class-balanced test subset size")
    p.add_argument("--seed", type=integer, help="(default: 0)")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint or run folder, with "
                   "its settings, writing into its folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="skip the curves, confusion matrix, misclassified and GradCAM figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    return p


def given_settings(args: argparse.Namespace) -> dict:
    """The TrainConfig settings the user typed (argparse leaves the others None)."""
    names = {f.name for f in fields(TrainConfig)} - {"model"}
    return {k: v for k, v in vars(args).items() if k in names and v is not None and
            not (k == "channels_last" and v is True)}


def config_from_args(args: argparse.Namespace, argv: list[str]) -> tuple[TrainConfig, Path, Path | None]:
    """(config, out folder, checkpoint to resume or None); raises UsageError for a mistake."""
    given = given_settings(args)
    if args.resume:
        ckpt = checkpoint_path(args.resume)
        try:
            saved = TrainConfig.from_dict(load_checkpoint(ckpt)["config"])
        except (CheckpointError, ConfigError) as err:
            raise UsageError(str(err)) from None
        if "--model" in argv and saved.model != args.model:
            raise UsageError(f"{ckpt} is a checkpoint of {saved.model!r}, not {args.model!r}")
        changed = {k: v for k, v in given.items() if k not in RESUME_FREE and getattr(saved, k) != v}
        if changed:
            flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in changed.items())
            extra = (" A one-cycle schedule cannot be extended: its learning rate has already annealed to its "
                     "end, so more epochs would need a new schedule. Start a new run (another --out) instead."
                     if "epochs" in changed else " Start a new run (another --out) to train with other settings.")
            raise UsageError(f"--resume continues {ckpt} with its own settings; {flags} would change them.{extra}")
        config = TrainConfig.from_dict(saved.to_dict() | {k: v for k, v in given.items() if k in RESUME_FREE})
        return config, Path(args.out) if args.out else ckpt.parent, ckpt
    try:
        config = TrainConfig(model=args.model, **given)
    except ConfigError as err:
        raise UsageError(str(err)) from None
    return config, Path(args.out or DEFAULT_OUT), None


def check_out(out: Path, resume: Path | None, overwrite: bool) -> bool:
    """Make sure `out` can take this run's files before any training; returns whether it was created now."""
    existing = out / "checkpoint.pt"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: choose a folder for the run's outputs")
    if existing.exists() and (resume is None or existing.resolve() != resume.resolve()):
        if not overwrite:
            try:
                state = load_checkpoint(existing)
                epochs = f"{state['epoch']}/{state['config']['epochs']} epochs"
                what, hint = ((f"a finished run ({epochs})", "") if state["epoch"] >= state["config"]["epochs"]
                              else (f"an unfinished run ({epochs})", f"continue it with --resume {out}, or "))
            except CheckpointError:
                what, hint = "an unreadable checkpoint", ""
            raise UsageError(f"{out} already holds {what}: {hint}choose another --out, or pass --overwrite to set "
                             "its checkpoint aside (kept as checkpoint-N.pt) and start afresh")
        print(f"--overwrite: {existing} kept as {keep_aside(existing)}; the run's other outputs in {out} "
              "(history, metrics, figures) will be replaced", file=sys.stderr)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write into --out {out} ({err.strerror or err}): choose a folder you can write "
                         "to") from None
    return created


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config, out, resume = config_from_args(args, argv)
        device = resolve_device(args.device)
        created = check_out(out, resume, args.overwrite)
    except (UsageError, RuntimeError) as err:
        parser.error(str(err))
    try:
        return train_and_report(args, config, out, resume, device)
    except UsageError as err:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was written: leave no empty folder behind
        print(f"error: {err}", file=sys.stderr)
        return 2


def train_and_report(args, config: TrainConfig, out: Path, resume: Path | None, device: torch.device) -> int:
    from helpers import data
    from helpers.models import build_model, count_parameters
    from helpers.train import TrainingDiverged, fit

    try:
        arrays = data.load_run_data(config)
    except data.DataError as err:
        raise UsageError(str(err)) from None
    notes = [data.subset_note(config, *arrays)]
    if resume is None:
        notes += [adapt_small_run(config, len(arrays[0]), given_settings(args)), too_few_steps(config, len(arrays[0]))]
    for note in filter(None, notes):
        print(note, file=sys.stderr)
    train_loader, test_loader, train_arrays, test_arrays = data.prepare_data(config, device, arrays=arrays)
    quiet = args.quiet
    seed_everything(config.seed)
    model = build_model(config.model).to(device)
    if not quiet:
        print(f"{config.model} ({config.recipe} recipe): {count_parameters(model):,} parameters | device {device} | "
              f"{len(train_arrays):,} train / {len(test_arrays):,} test images | {type(train_loader).__name__} | "
              f"{precision_name(amp_dtype(device, config.amp))} | batch {config.batch_size}")
    if config.max_lr == "auto" and not resume:
        find_max_lr(model, train_loader, config, device, out, quiet)
    try:
        history = fit(model, train_loader, test_loader, config, device=device, checkpoint=out / "checkpoint.pt",
                      resume=resume, quiet=quiet)
    except (TrainingDiverged, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: could not write {out / 'checkpoint.pt'} ({err}); the previous epoch's checkpoint is kept",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished epoch is saved; continue with --resume {out}", file=sys.stderr)
        return 130
    write_outputs(args, config, out, history, model, test_loader, train_arrays, test_arrays, device)
    return 0


def find_max_lr(model, train_loader, config: TrainConfig, device, out: Path, quiet: bool) -> None:
    from helpers.lr_finder import lr_range_test
    from helpers.plots import plot_lr_finder

    found = lr_range_test(model, train_loader, config=config, device=device, progress=not quiet)
    config.max_lr = found.suggested_lr
    plot_lr_finder(found, save=out / "lr_finder.png")
    print(f"LR range test: max LR {config.max_lr:.3g} ({found.rule}; plot in {out / 'lr_finder.png'})")


def write_outputs(args, config, out: Path, history, model, test_loader, train_arrays, test_arrays, device) -> None:
    from helpers.train import evaluate

    total = sum(history.seconds)  # every epoch's training and evaluation, across resumes; warm-up apart
    history.to_json(out / "history.json")
    history.to_csv(out / "history.csv")
    last = history.records[-1] if history.records else {}
    metrics = {
        "model": config.model, "recipe": config.recipe,
        "test_acc": last.get("test_acc"), "test_acc_tta": last.get("test_acc_tta"),
        "epochs": len(history), "total_seconds": total, "epoch_seconds": history.seconds,
        "train_seconds": sum(history.train_seconds) if None not in history.train_seconds else None,
        "warmup_seconds": history.warmup_seconds, "mode": history.mode,
        "seconds_include": "total_seconds: training and the per-epoch test pass; train_seconds: the training steps "
                           "alone; neither the one-time warm-up (warmup_seconds)",
        "precision": precision_name(amp_dtype(device, config.amp)),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__, "data_dir": str(Path(config.data_dir).resolve()),
        "train_images": len(train_arrays), "test_images": len(test_arrays), "settings": config.to_dict(),
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    if args.figures:
        from helpers.plots import save_run_figures

        result = evaluate(model, test_loader, device=device, amp=config.amp)
        written = save_run_figures(out, model=model, history=history, result=result, test_arrays=test_arrays)
        print("figures: " + ", ".join(str(p) for p in written))
    print(f"final test accuracy {last.get('test_acc', float('nan')):.2f}% | {total:.1f} s in "
          f"{len(history)} epochs (+{history.warmup_seconds:.1f} s warm-up) | outputs in {out}")


if __name__ == "__main__":
    sys.exit(main())
