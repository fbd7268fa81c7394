"""Compare training runs side by side.

    python -m helpers.compare RUN [RUN ...] [--out FILE.png]

prints one row per run (model, recipe, epochs, final and test-time-augmented test accuracy, training seconds,
test images, device, the run it was started from with --init-from) and, with --out, draws their test accuracy
and test loss per epoch on shared axes. A RUN is a folder written by `python -m helpers.train` (metrics.json and
history.json; for a run stopped before its end, its checkpoint.pt), or any file inside it. From Python:
`rows, fig = compare_runs(["runs/a", "runs/b"])`.

Accuracies are comparable only on the same test images: the table shows how many each run was tested on.
"""

from __future__ import annotations

import argparse
import os
import sys

from helpers.checkpoints import CheckpointError, read_checkpoint
from helpers.cli import Parser
from helpers.predict import new_figure_path
from helpers.train import History
from helpers.utils import RunError, add_version_flag, follow_latest, read_json, run_command, safe_text

COLUMNS = {  # row key: (header, format)
    "run": ("run", "{}"), "model": ("model", "{}"), "recipe": ("recipe", "{}"), "epochs": ("epochs", "{}"),
    "test_acc": ("test acc %", "{:.2f}"), "test_acc_tta": ("TTA acc %", "{:.2f}"),
    "train_seconds": ("train s", "{:.1f}"), "test_images": ("test images", "{:,}"), "device": ("device", "{}"),
    "init_from": ("started from", "{}"),  # --init-from: the run whose weights it started from
}
# why `train s` is less than the total a run prints at its end
TRAIN_SECONDS = ("train s: the training steps alone; the total a run prints at its end adds each epoch's test pass "
                 "(and its warm-up apart)")


def read_run(path: str | os.PathLike):
    """(row, History) of one run folder: the row has COLUMNS' keys (None where the run did not record it)."""
    folder = follow_latest(path)  # runs/latest, also where it is a file naming the run
    folder = folder.parent if folder.is_file() else folder
    label = str(path).rstrip("/\\") or str(folder)
    if not folder.is_dir():
        raise RunError(f"no run at {path}: pass run folders written by python -m helpers.train (their --out)")
    metrics, history = folder / "metrics.json", folder / "history.json"
    if metrics.is_file() and history.is_file():
        try:
            m = read_json(metrics)
            hist = History.from_json(history)
            if not isinstance(m, dict):
                raise TypeError("metrics.json is not an object")
            row = {k: m.get(k) for k in COLUMNS} | {"run": label, "epochs": m.get("epochs", len(hist))}
            return _checked(row, hist)
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSON, UTF-8, shape and type errors
            raise RunError(f"{folder}'s metrics.json or history.json is damaged ({type(err).__name__}: "
                           f"{str(err)[:80]}): re-run it or leave it out") from None
    try:  # stopped before the end: the checkpoint holds its history so far
        ckpt = read_checkpoint(folder)
    except CheckpointError:
        raise RunError(f"{folder} holds no metrics.json and history.json, nor a readable checkpoint.pt: pass run "
                       "folders written by python -m helpers.train") from None
    hist = History.of(ckpt)
    last = hist.records[-1] if hist.records else {}
    seconds = hist.train_seconds
    return _checked({"run": label, "model": ckpt.config.model, "recipe": ckpt.config.recipe,
            "epochs": f"{ckpt.epoch}/{ckpt.config.epochs} (unfinished)",
            "test_acc": last.get("test_acc"), "test_acc_tta": last.get("test_acc_tta"),
            "train_seconds": sum(seconds) if seconds and None not in seconds else None,
            "test_images": None, "device": None, "init_from": ckpt.init_from}, hist)


NUMBERS = ("test_acc", "test_acc_tta", "train_seconds", "test_images")  # row keys that must be numbers
CURVES = ("epoch", "test_acc", "test_loss")  # History fields plot_runs draws


def _checked(row: dict, hist) -> tuple[dict, object]:
    """(row, hist) when every number in them is a number (or None); a TypeError naming the first that is not."""
    def number(v) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    if not isinstance(hist.records, list) or not all(isinstance(r, dict) for r in hist.records):
        raise TypeError("history's epochs are not a list of records")
    wrong = [k for k in NUMBERS if not number(row.get(k))]
    wrong += [k for k in CURVES if not all(map(number, getattr(hist, k)))]
    if wrong:
        raise TypeError(f"{wrong[0]} is not a number")
    return row, hist


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table ('-' where a run did not record a value)."""
    cells = [[h for h, _ in COLUMNS.values()]]
    cells += [["-" if row.get(k) is None else safe_text(fmt.format(row[k])) for k, (_, fmt) in COLUMNS.items()]
              for row in rows]
    widths = [max(len(r[c]) for r in cells) for c in range(len(COLUMNS))]
    numeric = {"test_acc", "test_acc_tta", "train_seconds", "test_images"}
    lines = ["  ".join(cell.rjust(w) if key in numeric else cell.ljust(w)
                       for cell, w, key in zip(r, widths, COLUMNS)).rstrip() for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def plot_runs(rows: list[dict], histories: list, *, save=None):
    """Test accuracy (%) and test loss per epoch of each run, on two panels that share the epoch axis (a run with
    a validation split: its validation curves, dashed)."""
    import matplotlib.pyplot as plt  # deferred, with helpers.plots: matplotlib, for --out alone
    from matplotlib.ticker import MaxNLocator

    from helpers.plots import finish_figure, plain

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True)
    for row, hist in zip(rows, histories):
        label = plain(f"{row['run']} ({row['model']}, {row['recipe']})")
        # a run with a validation split was evaluated on it every epoch (its test set once, in the table)
        split = hist.eval_split
        style, label = ("o-", label) if split == "test" else ("s--", f"{label} (validation split)")
        ax_acc.plot(hist.epoch, getattr(hist, f"{split}_acc"), style, ms=3, label=label)
        ax_loss.plot(hist.epoch, getattr(hist, f"{split}_loss"), style, ms=3, label=label)
    ax_acc.set(title="Test accuracy", ylabel="%")
    ax_loss.set(title="Test loss", ylabel="cross-entropy")
    for ax in (ax_acc, ax_loss):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    return finish_figure(fig, save)


def compare_runs(runs: list[str | os.PathLike], *, save=None):
    """(rows, figure) for these run folders: the table's rows (dicts with COLUMNS' keys) and plot_runs' figure."""
    rows, histories = zip(*(read_run(r) for r in runs)) if runs else ((), ())
    return list(rows), plot_runs(list(rows), list(histories), save=save)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cifar10 compare", description=__doc__.split("\n\n")[0])
    add_version_flag(p)
    p.add_argument("runs", metavar="RUN", nargs="+", help="run folders written by python -m helpers.train")
    p.add_argument("--out", metavar="FILE.png", help="draw test accuracy and loss per epoch into this new file")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        out = new_figure_path(args.out, overwrite=args.overwrite, flag="--out") if args.out else None
        read = [read_run(r) for r in args.runs]
        rows, histories = [r for r, _ in read], [h for _, h in read]
        print(format_table(rows))
        print(TRAIN_SECONDS)
        if len({r["test_images"] for r in rows} - {None}) > 1:
            print("note: these runs were tested on different numbers of images: their accuracies are not comparable")
        if out is None:
            print("add --out compare.png for their test accuracy and loss curves")
            return
        from helpers.plots import save_figure  # deferred: matplotlib, for --out alone

        save_figure(plot_runs(rows, histories), out)
        print(f"curves: {safe_text(out)}")

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
