"""N training runs sharing one GPU against the same N one after another: `python -m benchmarks.share`.

What `python -m helpers.sweep --gpus-per-trial 1/N` does with a sweep's trials (a process each, all on one GPU),
measured with plain processes of `python -m helpers.train` (seeds 0..N-1), so that it times the GPU's sharing
alone: Ray's own cost is measured apart (BENCHMARKS.md, "Ray Tune's overhead"), and Ray's wheel is too large to
travel to the lent GPU machine. One untimed 1-epoch run first fills the compile caches both groups then reuse;
then the N runs at once, then the same N one after another. Writes a JSON report (--out): the wall seconds of
each group, their ratio (the issue's target: at most 0.6), and every run's accuracy and training seconds (from its
metrics.json).

    python -m benchmarks.share --data-dir data --runs 4 --model custom_resnet --recipe fast --out share.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_command(args, seed: int, out: Path, epochs: int | None = None) -> list[str]:
    epochs = epochs or args.epochs
    return [sys.executable, "-m", "helpers.train", "--model", args.model, "--recipe", args.recipe, "--seed",
            str(seed), "--data-dir", args.data_dir, "--device", args.device, "--out", str(out), "--no-figures",
            "--quiet", *(["--epochs", str(epochs)] if epochs else []), *args.extra]


def run_group(commands: list[list[str]], logs: list[Path], together: bool) -> float:
    """Wall seconds of the commands, all started at once (together) or each after the last ended."""
    t0, procs = time.perf_counter(), []
    for argv, log in zip(commands, logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT))
        if not together:
            procs[-1].wait()
    codes = [p.wait() for p in procs]
    if any(codes):
        failed = [str(log) for log, code in zip(logs, codes) if code]
        raise SystemExit(f"error: a run failed (exit {max(codes)}): see {', '.join(failed)}")
    return time.perf_counter() - t0


def metrics(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    return {k: m.get(k) for k in ("test_acc", "test_acc_tta", "train_seconds", "total_seconds", "warmup_seconds",
                                  "mode", "precision", "device", "epochs")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.share", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--data-name", default="CIFAR-10", help="what the data is, for the report")
    p.add_argument("--runs", type=int, default=4, help="runs in each group (default: 4)")
    p.add_argument("--model", default="custom_resnet")
    p.add_argument("--recipe", default="fast")
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", help="folder for the runs (default: a temporary one, removed)")
    p.add_argument("--out", default="share.json", help="JSON report")
    p.add_argument("extra", nargs="*", help="more helpers.train flags for every run, after --")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.runs < 2:
        raise SystemExit(f"error: --runs must be at least 2, got {args.runs}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        run_group([train_command(args, 0, work / "warmup", epochs=1)], [work / "warmup.log"], together=False)
        seconds, runs = {}, {}
        for group in ("together", "sequential"):
            folders = [work / f"{group}-{k}" for k in range(args.runs)]
            commands = [train_command(args, k, folder) for k, folder in enumerate(folders)]
            seconds[group] = run_group(commands, [f.with_suffix(".log") for f in folders], group == "together")
            runs[group] = [metrics(f) for f in folders]
            print(f"{args.runs} runs {group}: {seconds[group]:.1f} s; accuracy "
                  + ", ".join(f"{r['test_acc']:.2f}%" for r in runs[group]), flush=True)
    import torch

    from helpers.utils import atomic_write_text

    report = {
        "what": f"{args.runs} x {args.model} {args.recipe} at once on one device against one after another "
                "(plain processes of helpers.train; wall seconds include each process's start, data load and warm-up)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("GIT_COMMIT", ""), "command": shlex.join([sys.executable, "-m", "benchmarks.share",
                                                                           *(argv or sys.argv[1:])]),
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "data": args.data_name, "runs": args.runs, "together_s": seconds["together"],
        "sequential_s": seconds["sequential"], "ratio": seconds["together"] / seconds["sequential"],
        "target_ratio": 0.6, "per_run": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(report, indent=1))  # as benchmark.py writes its reports
    print(f"together / sequential: {report['ratio']:.2f} (target <= 0.6); report: {args.out}")
    return report


if __name__ == "__main__":
    main()
