"""Many runs of the run layer: grid sweeps and seeds on Ray Tune, and the LR peak sweep.

    python -m helpers.sweep --model custom_resnet --grid max_lr=0.2,0.4,0.8 --seeds 3 --epochs 10 --out sweeps/peak

runs one trial per grid point and seed on Ray Tune (`run_sweep`), each a normal `helpers.run.train_run` into a
folder of its own (DIR/trials/<setting=value,...>: checkpoint, history, metrics, figures) that reports every
epoch to Tune, then writes DIR/results.csv (one row per trial) and DIR/sweep.png (accuracy against each varied
setting, mean and spread over seeds). Ray starts locally by itself; --address (or RAY_ADDRESS) runs the same sweep
on a running Ray cluster; --gpus-per-trial 0.25 puts four trials on one GPU. Run the same command again to
continue an interrupted sweep (Tuner.restore: finished trials are not rerun; an unfinished trial resumes from its
last checkpoint). Multi-node: --storage (Tune's experiment state, default DIR) and DIR itself must be on storage
every node reaches: a shared filesystem path, or for --storage a URI such as s3://bucket/sweeps (pyarrow's
filesystems); the trial folders are written where --out points, so a multi-node --out must be shared.

`peak_sweep` (notebook 02, the benchmark) trains a recipe at a range of one-cycle peaks in this process, one
`train_run` after another (no Ray needed): a sweep's run equals the command line's with the same settings.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

from helpers.config import ConfigError, TrainConfig, evolve

SWEEP_PEAKS = {"sgd": (0.05, 0.1, 0.2, 0.4, 0.8), "adam": (2e-4, 5e-4, 1e-3, 2e-3, 5e-3)}  # one-cycle peaks swept


def at_peak(config: TrainConfig, peak: float) -> TrainConfig:
    """`config` with one-cycle peak `peak`. Its start follows as the recipe has it: a recipe with a numeric peak
    keeps its start/peak ratio; one whose peak is found ('auto') keeps its start LR, as `--max-lr auto` does."""
    if config.max_lr == "auto" or config.lr is None:  # lr None: the start is peak / 10 anyway
        return evolve(config, max_lr=peak)
    return evolve(config, max_lr=peak, lr=peak * config.lr / config.peak_lr)


def peak_sweep(config: TrainConfig, *, arrays=None, peaks=None, found=None, device=None,
               progress: bool = True) -> dict:
    """Train `config` to the end at each one-cycle peak (default SWEEP_PEAKS[config.optimizer]) and at each rule's
    pick of `found` (an lr_range_test result), each a `train_run` from the same seed; returns the row
    helpers.plots.plot_lr_sweep draws: final accuracy per run, the best swept peak's, and each rule's gap to it
    (how far `--max-lr auto` lands from the best peak). A pick equal to a peak already trained is not trained
    again. arrays: (train, test) already loaded (helpers.data.load_run_data). progress: a line per run."""
    from helpers.data import load_run_data
    from helpers.run import train_run

    arrays = arrays if arrays is not None else load_run_data(config)
    peaks = SWEEP_PEAKS[config.optimizer] if peaks is None else peaks
    picks = found.suggestions if found is not None else {}
    runs, trained = {}, {}  # a pick equal to a peak already trained reuses its run (same seed: same result)
    for label, peak in {**{f"{p:g}": p for p in peaks}, **picks}.items():
        if peak not in trained:
            run = train_run(at_peak(config, peak), device=device or "auto", quiet=True, arrays=arrays)
            trained[peak] = {"max_lr": peak, "final_acc": run.accuracy, "train_s": sum(run.history.seconds)}
        runs[label] = dict(trained[peak])
        if progress:
            print(f"peak {peak:<9.3g} {label:<17} {runs[label]['final_acc']:6.2f}%  ({runs[label]['train_s']:.0f} s)",
                  flush=True)
    best = max(r["final_acc"] for label, r in runs.items() if label not in picks)
    return {"model": config.model, "recipe": config.recipe, "optimizer": config.optimizer,
            "batch_size": config.batch_size, "epochs": config.epochs, "runs": runs, "best_swept_acc": best,
            "rules": {rule: {"max_lr": lr, "gap_to_best": best - runs[rule]["final_acc"]}
                      for rule, lr in picks.items()}}



# ---------------------------------------------------------------------------------------------------------
# Sweeps on Ray Tune

RAY_PIN = "ray[tune]==2.60.0"
INSTALL_HINT = (f'the sweep runs on Ray Tune, which is not installed: pip install -e ".[sweep]" (or pip install '
                f'"{RAY_PIN}")')
RESULT_COLUMNS = ("seed", "test_acc", "test_acc_tta", "train_seconds", "epochs", "status", "trial_dir")


class SweepError(Exception):
    """A mistake in how a sweep was asked for: one line that says what to do."""


def parse_grid(text: str) -> tuple[str, list]:
    """'max_lr=0.1,0.2' -> ('max_lr', [0.1, 0.2]), each value of the setting's type (TrainConfig's schema)."""
    key, sep, values = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    schema = {f.name: f for f in fields(TrainConfig)}
    if not sep or not values:
        raise SweepError(f"--grid {text!r}: write SETTING=V1,V2,... (e.g. --grid max_lr=0.2,0.4)")
    if key not in schema:
        raise SweepError(f"--grid {text!r}: {key!r} is not a setting of helpers.train (see python -m helpers.train "
                         "--help)")
    if key == "seed":
        raise SweepError("--grid seed=...: use --seeds K (K seeds from --seed on) for seeds")
    kind = schema[key].metadata["kind"]
    convert = {"int": int, "float": float, "bool": lambda v: {"true": True, "false": False}[v.lower()],
               "peak": lambda v: v if v == "auto" else float(v)}.get(kind, str)
    try:
        return key, [convert(v.strip()) for v in values.split(",")]
    except (ValueError, KeyError):
        raise SweepError(f"--grid {text!r}: {key} takes {kind} values") from None


def trial_name(point: dict) -> str:
    """A trial's folder name: its varied settings and seed, 'max_lr=0.2,seed=1'."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def run_trial(point: dict, *, base: dict, trials: str, figures: bool = True) -> None:
    """Ray Tune's trainable: one train_run of `base` with the grid point `point` (varied settings and seed) into
    trials/<trial_name(point)>, reporting every epoch; its row is kept in the folder's trial.json."""
    from ray import tune

    from helpers.run import train_run

    out = Path(trials) / trial_name(point)
    config = TrainConfig.from_dict(base | point)
    seconds = []

    def report(record: dict) -> None:
        seconds.append(record.get("train_seconds") or record["seconds"])
        tune.report({k: v for k, v in dict(epoch=record["epoch"], test_acc=record["test_acc"],
                                           test_acc_tta=record.get("test_acc_tta"), train_loss=record["train_loss"],
                                           train_seconds=sum(seconds)).items() if v is not None})

    result = train_run(config, out, resume=True, quiet=True, figures=figures, on_epoch=report)
    row = {**point, "test_acc": result.accuracy, "test_acc_tta": result.tta_accuracy,
           "train_seconds": sum(s for s in result.history.train_seconds if s is not None),
           "epochs": len(result.history), "status": result.status, "trial_dir": str(out)}
    (out / "trial.json").write_text(json.dumps(row, indent=1))
    if not seconds:  # a run already finished (restored sweep): nothing trained, report its numbers once
        tune.report({"epoch": row["epochs"], "test_acc": row["test_acc"], "train_seconds": row["train_seconds"]})


def _quiet_ray() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to Anyscale
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials keep the working directory (paths are absolute)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no TensorBoard/CSV/JSON loggers of its own


def _start_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    local = address is None and not os.environ.get("RAY_ADDRESS")
    kwargs = {"include_dashboard": False} if local else {}
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False, **kwargs)


def run_sweep(base: TrainConfig, grid: dict[str, list], out: str | os.PathLike, *, seeds: int = 1,
              gpus_per_trial: float | None = None, cpus_per_trial: float = 1, address: str | None = None,
              storage: str | None = None, asha: bool = False, figures: bool = True) -> list[dict]:
    """Every point of `grid` x `seeds` seeds (from base.seed on) as a Ray Tune trial of `base`; returns the rows
    of out/results.csv (and draws out/sweep.png). Run again with the same arguments to continue it."""
    _quiet_ray()
    try:
        from ray import tune
    except ImportError:
        raise SweepError(INSTALL_HINT) from None
    from helpers.data import find_cifar10

    out = Path(out).expanduser().resolve()  # Ray runs trials elsewhere: every path absolute
    base = evolve(base, data_dir=str(Path(base.data_dir).expanduser().resolve()))
    for values in _points(grid, [base.seed]):  # every grid point is a valid config before anything starts
        evolve(base, **values)
    _same_sweep(out, base, grid, seeds)
    find_cifar10(base.data_dir)  # one download, here, before the trials start (they take a file lock too)
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if _has_cuda() else 0.0)
    space = {k: tune.grid_search(v) for k, v in grid.items()} | {
        "seed": tune.grid_search([base.seed + k for k in range(seeds)])}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base.to_dict(), trials=str(out / "trials"),
                                                         figures=figures), {"cpu": cpus_per_trial, "gpu": gpus})
    storage = storage or str(out)
    _start_ray(address)
    path = f"{storage.rstrip('/')}/tune"
    if tune.Tuner.can_restore(path):
        print(f"continuing the sweep in {out} (finished trials are kept)", file=sys.stderr)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        scheduler = None
        if asha:
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=base.epochs,
                                      grace_period=max(1, base.epochs // 4), reduction_factor=2)
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune.TuneConfig(
            metric="test_acc", mode="max", scheduler=scheduler, reuse_actors=False),
            run_config=tune.RunConfig(name="tune", storage_path=storage, verbose=0, callbacks=[_Progress()]))
    rows = _rows(tuner.fit(), grid, out / "trials")
    write_results(rows, list(grid), out)
    return rows


def _points(grid: dict[str, list], seeds: list[int]) -> list[dict]:
    import itertools

    keys = list(grid)
    return [dict(zip(keys, combo)) | {"seed": s} for combo in itertools.product(*grid.values()) for s in seeds]


def _same_sweep(out: Path, base: TrainConfig, grid: dict, seeds: int) -> None:
    """Keep out/sweep.json: a second call into `out` must ask for the same sweep (it continues it)."""
    asked = {"base": base.to_dict(), "grid": grid, "seeds": seeds}
    saved = out / "sweep.json"
    if saved.is_file():
        if json.loads(saved.read_text()) != json.loads(json.dumps(asked)):
            raise SweepError(f"{out} holds another sweep (other settings, grid or seeds; see {saved}): run the same "
                             "command to continue it, or choose another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(asked, indent=1))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _rows(results, grid: dict, trials: Path) -> list[dict]:
    """One row per trial: its trial.json when it finished, else what it last reported (stopped or failed)."""
    rows = []
    for result in results:
        point = {k: result.config[k] for k in (*grid, "seed")}
        folder = trials / trial_name(point)
        if (folder / "trial.json").is_file() and result.error is None:
            rows.append(json.loads((folder / "trial.json").read_text()))
            continue
        metrics = result.metrics or {}
        status = f"error: {str(result.error).strip().splitlines()[-1][:200]}" if result.error else "stopped (ASHA)"
        rows.append({**point, "test_acc": metrics.get("test_acc"), "test_acc_tta": metrics.get("test_acc_tta"),
                     "train_seconds": metrics.get("train_seconds"), "epochs": metrics.get("epoch", 0),
                     "status": status, "trial_dir": str(folder)})
    return sorted(rows, key=lambda r: [r[k] for k in (*grid, "seed")])


def write_results(rows: list[dict], varied: list[str], out: Path) -> None:
    """out/results.csv (the varied settings, then RESULT_COLUMNS) and out/sweep.png."""
    import matplotlib.pyplot as plt

    from helpers.plots import plot_sweep
    from helpers.utils import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*varied, *RESULT_COLUMNS], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "results.csv", write)
    plt.close(plot_sweep(rows, varied, save=out / "sweep.png"))


class _Progress:
    """A line per finished trial (Tune's own output is off)."""

    def __new__(cls):
        from ray import tune

        class Progress(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                acc = trial.last_result.get("test_acc")
                done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
                score = f"{acc:.2f}%" if acc is not None else "no result"
                print(f"[{done}/{len(trials)}] {trial_name(dict(trial.config))}: {score}", flush=True)

            def on_trial_error(self, iteration, trials, trial, **info):
                print(f"trial {trial_name(dict(trial.config))} failed: see {trial.local_path}", flush=True)

        return Progress()


# ---------------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    from helpers.cli import Parser, add_setting

    p = Parser(prog="python -m helpers.sweep", description="Sweep settings and seeds of a training run on Ray Tune "
               "(one trial per grid point and seed, each a normal run in DIR/trials/).")
    sweep = p.add_argument_group("the sweep")
    sweep.add_argument("--grid", action="append", default=[], metavar="SETTING=V1,V2",
                       help="a setting and its values (repeat for more; the trials are every combination)")
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per grid point, from --seed on (default: 1)")
    sweep.add_argument("--out", required=True, help="folder of the sweep: results.csv, sweep.png, trials/")
    sweep.add_argument("--gpus-per-trial", type=float, default=None,
                       help="GPUs per trial; 0.25 puts four trials on one GPU (default: 1 with CUDA, else 0)")
    sweep.add_argument("--cpus-per-trial", type=float, default=1, help="CPU cores per trial (default: 1)")
    sweep.add_argument("--address", default=None, help="a running Ray cluster (default: $RAY_ADDRESS, else a "
                       "local Ray started for this sweep)")
    sweep.add_argument("--storage", default=None, help="where Tune keeps the sweep's state (default: --out); "
                       "multi-node: a shared path or a URI such as s3://bucket/path")
    sweep.add_argument("--no-figures", dest="figures", action="store_false", help="trials skip their figures")
    sweep.add_argument("--asha", action="store_true", help="stop the weaker trials early (ASHA, on test accuracy; "
                       "a one-cycle run's early epochs rank trials only roughly)")
    settings = p.add_argument_group("settings of every trial (helpers.config.TrainConfig; see python -m "
                                    "helpers.train --help)")
    for f in fields(TrainConfig):
        add_setting(settings, f)
    return p


def main(argv: list[str] | None = None) -> int:
    from helpers.cli import given_settings

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        grid = dict(parse_grid(g) for g in args.grid)
        if not grid and args.seeds < 2:
            raise SweepError("nothing to sweep: give --grid SETTING=V1,V2 and/or --seeds K (K >= 2)")
        if args.seeds < 1:
            raise SweepError(f"--seeds must be at least 1, got {args.seeds}")
        given = given_settings(args)
        if "workers" not in given:  # DataLoader workers within a trial's CPUs, not every core per trial
            given["workers"] = max(0, int(args.cpus_per_trial) - 1)
        rows = run_sweep(TrainConfig(**given), grid, args.out, seeds=args.seeds, gpus_per_trial=args.gpus_per_trial,
                         cpus_per_trial=args.cpus_per_trial, address=args.address, storage=args.storage,
                         asha=args.asha, figures=args.figures)
    except (SweepError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: run the same command again to continue the sweep in {args.out}", file=sys.stderr)
        return 130
    out = Path(args.out)
    print(f"{len(rows)} trials: {out / 'results.csv'}, {out / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
