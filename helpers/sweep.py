"""Many runs of the run layer: grid sweeps and seeds (on Ray Tune, or one after another here), and the LR peak sweep.

    python -m helpers.sweep --model custom_resnet --grid max_lr=0.2,0.4,0.8 --seeds 3 --epochs 10 --out sweeps/peak

runs one trial per grid point and seed (`run_sweep`), each a normal `helpers.run.train_run` into a folder of its
own (DIR/trials/<setting=value,...>: checkpoint, history, metrics, figures), then writes DIR/results.csv (one row
per trial) and DIR/sweep.png (accuracy against each varied setting, mean and spread over seeds). `trial` is that
one run, the only way many runs are made here: the Ray engine (the default) runs it as a Tune trial reporting every
epoch; --engine local runs the trials one after another in this process (no Ray, one device, timings undisturbed).
Ray starts locally by itself; --address (or RAY_ADDRESS) runs the same sweep on a running Ray cluster;
--gpus-per-trial 0.25 puts four trials on one GPU. Run the same command again to continue an interrupted sweep
(finished trials are not rerun; an unfinished trial resumes from its last checkpoint).

What a sweep guarantees: a local Ray listens on the loopback address only (127.0.0.1: nothing on the network can
reach it) and none of its processes outlives the sweep, also when the sweep is killed (helpers.reaper); a cluster
given by --address is the user's and is used as it is configured. Nothing in a sweep folder is unpickled: a sweep
continues from its own JSON records (trial.json of each finished trial), never from Tune's saved state. A sweep
folder has one owner at a time (a second sweep into it is refused), and at most MAX_TRIALS trials are asked for.
Multi-node: --storage (Tune's experiment state, default DIR) and DIR itself must be on storage every node reaches:
a shared filesystem path, or for --storage a URI such as s3://bucket/sweeps (pyarrow's filesystems); the trial
folders are written where --out points, so a multi-node --out must be shared.

`peak_sweep` (notebook 02, the benchmark) is a sweep of one recipe over one-cycle peaks and the LR range test's
picks.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path
from urllib.parse import quote

import torch

from helpers import reaper
from helpers.cli import Parser, add_setting, given_settings, sigterm_as_interrupt
from helpers.config import TrainConfig, evolve
from helpers.data import DataError, load_dataset
from helpers.run import RunInterrupted, hold_run_folder, train_run
from helpers.utils import (
    RunError,
    UserError,
    add_version_flag,
    atomic_write,
    atomic_write_text,
    read_json,
    run_command,
    safe_text,
)

SWEEP_PEAKS = {"sgd": (0.05, 0.1, 0.2, 0.4, 0.8), "adam": (2e-4, 5e-4, 1e-3, 2e-3, 5e-3)}  # one-cycle peaks swept
ENGINES = ("ray", "local")
RAY_PIN = "ray[tune]==2.60.0"
INSTALL_HINT = (f'the sweep runs on Ray Tune, which is not installed: pip install -e ".[sweep]" (or pip install '
                f'"{RAY_PIN}"), or run the trials one after another here without Ray (--engine local, '
                'engine="local")')
# threads: torch's CPU threads in the trial (Ray gives a trial cpus_per_trial; the local engine, the process's):
# the one thing that may still tell two engines' trials of one point apart, so the results say it
RESULT_COLUMNS = ("seed", "test_acc", "test_acc_tta", "val_acc", "train_seconds", "epochs", "status", "threads",
                  "trial_dir")
MAX_TRIALS = 10_000  # trials one sweep may ask for (each is a training run; their settings are made up front)
LOOPBACK = "127.0.0.1"


def selection_metric(config: TrainConfig) -> str:
    """What a sweep selects on: 'val_acc' (the last epoch's validation accuracy) for runs with a validation split
    (config.val_split), else 'test_acc' (today's: the test set selects, and is then no longer a fair test)."""
    return "val_acc" if config.val_split else "test_acc"


class SweepError(UserError):
    """A mistake in how a sweep was asked for: one line that says what to do."""


def at_peak(config: TrainConfig, peak: float) -> TrainConfig:
    """`config` with one-cycle peak `peak`. Its start follows as the recipe has it: a recipe with a numeric peak
    keeps its start/peak ratio; one whose peak is found ('auto') keeps its start LR, as `--max-lr auto` does."""
    return evolve(config, **peak_point(config, peak))


def peak_point(config: TrainConfig, peak: float) -> dict:
    """The settings at_peak changes: {'max_lr': peak} and, for a recipe with a numeric peak, its start 'lr'."""
    if config.max_lr == "auto" or config.lr is None:  # lr None: the start is peak / 10 anyway
        return {"max_lr": peak}
    return {"max_lr": peak, "lr": peak * config.lr / config.peak_lr}


def peak_sweep(config: TrainConfig, out: str | os.PathLike | None = None, *, peaks=None, found=None,
               engine: str = "local", **options) -> dict:
    """Train `config` to the end at each one-cycle peak (default SWEEP_PEAKS[config.optimizer]) and at each rule's
    pick of `found` (an lr_range_test result): a `run_sweep` of at_peak's points, every run from config's seed
    (a pick equal to a swept peak is the same trial). Returns the row helpers.plots.plot_lr_sweep draws: final
    accuracy per run, the best swept peak's, and each rule's gap to it (how far `--max-lr auto` lands from the
    best peak). out, engine and **options as run_sweep's (out None: local, nothing written)."""
    peaks = SWEEP_PEAKS[config.optimizer] if peaks is None else peaks
    picks = found.suggestions if found is not None else {}
    labels = {**{f"{p:g}": p for p in peaks}, **picks}
    points = list({peak: peak_point(config, peak) for peak in labels.values()}.values())
    rows = run_sweep(config, points, out, engine=engine, **options)
    metric = selection_metric(config)
    by_peak = {row["max_lr"]: {"max_lr": row["max_lr"], "final_acc": row.get(metric), "test_acc": row["test_acc"],
                               "train_s": row["train_seconds"]} for row in rows}
    runs = {label: dict(by_peak[peak]) for label, peak in labels.items()}
    finished = [r["final_acc"] for label, r in runs.items() if label not in picks and r["final_acc"] is not None]
    if not finished:
        where = f": {Path(out) / 'results.csv'} and the trial folders say why" if out is not None else ""
        raise SweepError(f"no swept peak's run finished{where}")
    best = max(finished)
    return {"model": config.model, "recipe": config.recipe, "optimizer": config.optimizer,
            "batch_size": config.batch_size, "epochs": config.epochs, "runs": runs, "best_swept_acc": best,
            "selected_on": "validation split" if metric == "val_acc" else "test set",
            "rules": {rule: {"max_lr": lr, "gap_to_best": best - runs[rule]["final_acc"]
                             if runs[rule]["final_acc"] is not None else None}  # None: its trial failed
                      for rule, lr in picks.items()}}


def describe_picks(row: dict) -> list[str]:
    """One line per rule of a peak_sweep row: its pick and how far below the best swept peak it lands."""
    def gap(points: float | None) -> str:
        if points is None:
            return "its run did not finish (see the sweep's results.csv)"
        where = "below" if points >= 0 else "above"
        on = " on the validation split" if row.get("selected_on") == "validation split" else ""
        return f"{abs(points):.2f} points {where} the best swept peak ({row['best_swept_acc']:.2f}%{on})"

    return [f"{rule}: {pick['max_lr']:.3g}, {gap(pick['gap_to_best'])}" for rule, pick in row["rules"].items()]


# ---------------------------------------------------------------------------------------------------------
# One trial, and the points of a sweep


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


def sweep_points(grid: dict[str, list] | list[dict], seeds: list[int]) -> list[dict]:
    """Every trial's settings: each point of `grid` ({setting: values}: every combination; or a list of points,
    {setting: value} each) with each seed, in that order. More than MAX_TRIALS: a SweepError, before any is made."""
    check_trial_count(grid, len(seeds))
    if isinstance(grid, dict):
        grid = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    return [point | {"seed": seed} for point in grid for seed in seeds]


def check_trial_count(grid: dict[str, list] | list[dict], seeds: int) -> int:
    """The number of trials of `grid` with `seeds` seeds, counted without making them; a SweepError naming the
    limit when it is more than MAX_TRIALS."""
    count = (math.prod(len(v) for v in grid.values()) if isinstance(grid, dict) else len(grid)) * seeds
    if count > MAX_TRIALS:
        raise SweepError(f"this sweep asks for {count:,} trials, more than the {MAX_TRIALS:,} a sweep may run: give "
                         "fewer values or seeds, or split it into several sweeps")
    return count


def varied_settings(grid: dict[str, list] | list[dict]) -> list[str]:
    """The settings a sweep varies (results.csv's first columns), in the order given."""
    return list(grid) if isinstance(grid, dict) else list(dict.fromkeys(k for point in grid for k in point))


def trial_name(point: dict) -> str:
    """A trial's folder name: its varied settings and seed, 'max_lr=0.2,seed=1'; a value's '/' (or any character
    a folder name should not hold) is %-quoted, so every trial is one folder inside trials/."""
    def value(v) -> str:
        return quote(f"{v:g}" if isinstance(v, float) else str(v), safe=" +-.:@_~")

    return ",".join(f"{k}={value(v)}" for k, v in point.items())


def trial(base: TrainConfig, point: dict, trials: str | os.PathLike | None = None, *, arrays=None,
          device="auto", figures: bool = True, on_epoch=None):
    """One run of a sweep: `base` with the settings of `point` (its seed too), a helpers.run.train_run into
    trials/<trial_name(point)>, continued if that folder holds its unfinished run, its row (trial_row) kept there
    in trial.json; trials None: in memory, nothing written. Returns the RunResult."""
    out = Path(trials) / trial_name(point) if trials is not None else None
    result = train_run(evolve(base, **point), out, resume=out is not None, quiet=True, figures=figures,
                       device=device, arrays=arrays, on_epoch=on_epoch)
    if out is not None:
        atomic_write_text(out / "trial.json", json.dumps(trial_row(point, result), indent=1))
    return result


def trial_row(point: dict, result) -> dict:
    """A trial's row of results.csv: its settings and seed, then RESULT_COLUMNS."""
    return {**point, "test_acc": result.accuracy, "test_acc_tta": result.tta_accuracy,
            "val_acc": result.val_accuracy,
            "train_seconds": sum(s for s in result.history.train_seconds if s is not None),
            "epochs": len(result.history), "status": result.status, "threads": torch.get_num_threads(),
            "trial_dir": str(result.out) if result.out is not None else ""}


def _ray_trial(config: dict, *, base: dict, trials: str, figures: bool = True) -> None:
    """Ray Tune's trainable: `trial` of the grid point config['point'], reporting every epoch to Tune."""
    from ray import tune  # deferred: Ray, an optional extra

    point, seconds, settings = config["point"], [], TrainConfig.from_dict(base)
    epochs = evolve(settings, **point).epochs

    def report(record: dict) -> None:
        seconds.append(record.get("train_seconds") or record["seconds"])
        if record["epoch"] >= epochs:  # the last epoch is reported below, with the run's final evaluation: a
            return  # report here would let ASHA (at max_t) stop the trial before it and its outputs
        # with a validation split each epoch has val_acc (what ASHA stops on) and no test_acc: the test set is
        # seen once, in the trial's row
        tune.report({k: v for k, v in dict(epoch=record["epoch"], test_acc=record.get("test_acc"),
                                           val_acc=record.get("val_acc"), test_acc_tta=record.get("test_acc_tta"),
                                           train_loss=record["train_loss"], train_seconds=sum(seconds)).items()
                     if v is not None})

    row = trial_row(point, trial(settings, point, trials, figures=figures, on_epoch=report))
    # the trial's last report (its row is in trial.json already): the final numbers, or a finished run's once more
    tune.report({k: v for k, v in row.items() if k in ("test_acc", "test_acc_tta", "val_acc", "train_seconds")
                 and v is not None} | {"epoch": row["epochs"]})


def _quiet_ray(address: str | None) -> None:
    """Ray's environment, set before ray is imported (it reads it once, at import)."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        # a local Ray on the loopback address only: with its 'cluster mode' off, Ray 2.60 takes 127.0.0.1 as the
        # node's address and binds gcs_server, raylet, the object manager and the agents there (read from
        # ray._private.services.get_node_ip_address and checked with ss); on, they bind every interface
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to Anyscale
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # trials keep the working directory (paths are absolute)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # its engine prints an experiment box even at verbose 0
    # Tune's automatic loggers off: its TensorBoard one warns without tensorboardX; _tuner adds the JSON and CSV ones
    # (result.json, progress.csv: what Tune's ExperimentAnalysis(DIR/tune).dataframe() reads) itself
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops the sweep as it stops a run
    token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home().joinpath(
        ".ray", "auth_token").is_file()
    if (address or os.environ.get("RAY_ADDRESS")) and token:  # a cluster from `ray start` (Ray 2.5x) checks a token,
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # which a driver sends in token mode only


@contextlib.contextmanager
def ray_for_sweep(address: str | None):
    """Ray for the block: connected to `address` ($RAY_ADDRESS), used as the cluster is configured; else a local
    Ray on the loopback address only, whose every process is ended when the block ends, however it ends
    (ray.shutdown, then helpers.reaper; if this process is killed, the reaper alone). Ray already running in this
    process (a notebook's own ray.init) is used and left as it was."""
    import ray  # deferred: Ray, an optional extra

    if ray.is_initialized():
        yield
        return
    where = address or os.environ.get("RAY_ADDRESS")
    reaper = None
    try:
        if where is None:
            reaper = _start_local_ray()
        else:
            _connect_ray(address, where)
        yield
    finally:
        ray.shutdown()  # a local Ray's processes and memory go with the sweep (a notebook kernel lives on)
        if reaper is not None:
            reaper.stdin.close()  # the reaper ends what ray.shutdown left (Ray's agents), then exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                reaper.wait(timeout=60)


def _connect_ray(address: str | None, where: str) -> None:
    import ray  # deferred: Ray, an optional extra

    try:
        _check_reachable(where)  # Ray itself retries an address nobody listens at for minutes
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as err:
        raise SweepError(f"cannot reach the Ray cluster at {where} ({str(err).splitlines()[0]}): start it (ray start "
                         "--head), check the address, or leave --address and RAY_ADDRESS out for a local Ray") from None


def _start_local_ray() -> subprocess.Popen:
    """Start a local Ray on the loopback address, its processes marked for helpers.reaper, and the reaper that
    ends them when this process ends; returns the reaper (its stdin is the pipe it waits on)."""
    import ray  # deferred: Ray, an optional extra

    token = secrets.token_hex(8)
    os.environ[reaper.MARK] = token  # inherited by gcs_server, raylet, the agents and every worker
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        watcher = subprocess.Popen([sys.executable, "-m", "helpers.reaper", token], stdin=subprocess.PIPE,
                                   cwd=Path(__file__).resolve().parents[1], start_new_session=True,
                                   env={k: v for k, v in os.environ.items() if k != reaper.MARK})
        # address "local": a Ray of its own, never one that `ray start` left running on this machine
        ray.init(address="local", include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    finally:
        del os.environ[reaper.MARK]  # this process's later children are not Ray's
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            # Ray's core puts a handler of its own on SIGTERM that ends the process at once; keep the sweep's
            # (helpers.cli.sigterm_as_interrupt: a stop that says what was kept)
            signal.signal(signal.SIGTERM, on_sigterm)
    if (node := ray.util.get_node_ip_address()) != LOOPBACK:  # Ray was imported before the sweep set its environment
        ray.shutdown()
        watcher.stdin.close()
        raise SweepError(f"Ray was imported before the sweep with its network mode on (it would listen on {node}, "
                         "not 127.0.0.1 alone): restart Python (the notebook's kernel) and run the sweep before "
                         "importing ray, or start Ray yourself (ray.init) as you want it")
    return watcher


def _check_reachable(address: str | None) -> None:
    """A ConnectionError at once when `address` (host:port, or ray://host:port) does not answer a TCP connect."""
    host, sep, port = (address or "").removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():  # None, 'auto', 'local': Ray's own lookups
        return
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise ConnectionError(f"no answer at {host}:{port}: {err.strerror or err}") from None


def run_sweep(base: TrainConfig, grid: dict[str, list] | list[dict], out: str | os.PathLike | None, *,
              seeds: int = 1, engine: str = "ray", arrays=None, device="auto", progress: bool = True,
              gpus_per_trial: float | None = None, cpus_per_trial: float = 1, address: str | None = None,
              storage: str | None = None, asha: bool = False, figures: bool = True) -> list[dict]:
    """Every point of `grid` ({setting: values}: every combination; or a list of {setting: value} points) with
    `seeds` seeds (from base.seed on), each a `trial` of `base`; returns the rows of out/results.csv (and draws
    out/sweep.png). Run again with the same arguments to continue it (finished trials are kept).

    engine 'ray': Ray Tune trials (gpus_per_trial, cpus_per_trial, address, storage, asha; each trial loads its own
    data). 'local': one after another in this process on `device`, from `arrays` ((train, test) already loaded)
    if given; out None: nothing written. progress: a line per finished trial."""
    if engine not in ENGINES:
        raise SweepError(f"engine {engine!r}: choose one of {', '.join(ENGINES)}")
    ray_only = {"gpus_per_trial": gpus_per_trial, "address": address, "storage": storage, "asha": asha or None}
    if engine == "local" and any(v is not None for v in ray_only.values()):
        given = ", ".join(k for k, v in ray_only.items() if v is not None)
        raise SweepError(f"{given}: Ray Tune's options; the local engine runs one trial at a time in this process "
                         "(use engine='ray', --engine ray)")
    if out is None and engine == "ray":
        raise SweepError("a Ray sweep needs a folder (out, --out): its trials and Tune's state are kept there")
    check_trial_count(grid, seeds)
    points = sweep_points(grid, [base.seed + k for k in range(seeds)])
    if base.workers is None:  # one trial's settings whatever engine runs it: DataLoader workers = its CPUs less one
        base = evolve(base, workers=max(0, int(cpus_per_trial) - 1))
    if out is not None:
        out = Path(out).expanduser().resolve()  # Ray runs trials elsewhere: every path absolute
        base = evolve(base, data_dir=str(Path(base.data_dir).expanduser().resolve()))
    for point in points:  # every trial is a valid config before anything starts
        evolve(base, **point)
    run = _run_local if engine == "local" else _run_ray
    with contextlib.ExitStack() as held:
        if out is not None:
            held.enter_context(hold_sweep_folder(out))
            _same_sweep(out, base, grid, seeds)
        rows = run(base, points, out, arrays=arrays, device=device, progress=progress, figures=figures,
                   gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, address=address, storage=storage,
                   asha=asha)
        if out is not None:
            write_results(rows, varied_settings(grid), out)
    return rows


def hold_sweep_folder(out: Path):
    """Hold the sweep folder `out` while the sweep runs, as a run holds its folder (helpers.run.hold_run_folder:
    an OS lock, released if the process dies): a second sweep into it is refused, naming the first."""
    return hold_run_folder(out, what="sweep")


def finished_trials(points: list[dict], trials: Path | None) -> dict[str, dict]:
    """{trial name: its row} of the trials of `points` that finished (their trial.json), read as JSON only."""
    if trials is None:
        return {}
    found = {trial_name(p): trials / trial_name(p) / "trial.json" for p in points}
    return {name: read_trial(path, point) for (name, path), point in zip(found.items(), points) if path.is_file()}


def read_trial(path: Path, point: dict) -> dict:
    """A finished trial's row from its trial.json; a SweepError that says what to do when it is damaged."""
    try:
        row = read_json(path)
        if not isinstance(row, dict):
            raise TypeError("not a JSON object")
        missing = [k for k in RESULT_COLUMNS if k not in row]
        if missing:
            raise KeyError(f"no {missing[0]}")
        numbers = ("test_acc", "test_acc_tta", "train_seconds", "epochs")
        if any(row[k] is not None and (isinstance(row[k], bool) or not isinstance(row[k], (int, float)))
               for k in numbers) or any(row.get(k) != v for k, v in point.items()):
            raise TypeError("wrong types or another trial's settings")
    except (OSError, ValueError, KeyError, TypeError) as err:  # ValueError: JSON and UTF-8 errors
        raise SweepError(f"{path} is damaged ({type(err).__name__}: {str(err)[:80]}): delete it and run the same "
                         "sweep again (that trial is then finished from its checkpoint or run again)") from None
    return row


def _run_local(base, points, out, *, arrays, device, progress, figures, **ray_options) -> list[dict]:
    """The trials one after another in this process; a finished trial (its trial.json) is not run again."""
    rows, trials = [], out / "trials" if out is not None else None
    done = finished_trials(points, trials)
    for k, point in enumerate(points, 1):
        if trial_name(point) in done:
            rows.append(done[trial_name(point)])
        else:
            try:
                rows.append(trial_row(point, trial(base, point, trials, arrays=arrays, device=device,
                                                   figures=figures)))
            except RunError as err:  # as a failed Ray trial: a row saying why, and the other trials still run
                rows.append(_unfinished_row(point, f"error: {err}", trials))
            except RunInterrupted:
                kept = (f"the trials before it are kept in {trials}; run the same sweep again to continue it (this "
                        "one resumes from its last finished epoch)" if trials is not None else
                        "nothing was kept (no sweep folder)")
                raise RunInterrupted(f"interrupted at trial {k} of {len(points)}: {kept}") from None
        if progress:
            _say_done(k, len(points), point, rows[-1])
    return rows


def _say_done(done: int, total: int, point: dict, row: dict) -> None:
    acc, val = row.get("test_acc"), row.get("val_acc")
    score = f"{acc:.2f}%" if acc is not None else row.get("status", "no result")
    score = f"validation {val:.2f}%, test {score}" if val is not None else score
    seconds = f" ({row['train_seconds']:.0f} s)" if row.get("train_seconds") is not None else ""
    print(f"[{done}/{total}] {safe_text(trial_name(point))}: {safe_text(score)}{seconds}", flush=True)


def _run_ray(base, points, out, *, progress, figures, gpus_per_trial, cpus_per_trial, address, storage, asha,
             **local_options) -> list[dict]:
    """The trials on Ray Tune; a sweep already in `storage` is restored (finished trials are kept)."""
    _quiet_ray(address)
    try:
        from ray import tune  # deferred: Ray, an optional extra
    except ImportError:
        raise SweepError(INSTALL_HINT) from None
    try:  # one download (or decoding of an image folder), here, before the trials start (they take a file lock too)
        load_dataset(base.dataset, base.data_dir, train=False)
    except DataError as err:
        raise SweepError(str(err)) from None
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if _has_cuda() else 0.0)
    trainable = tune.with_resources(
        tune.with_parameters(_ray_trial, base=base.to_dict(), trials=str(out / "trials"), figures=figures),
        {"cpu": cpus_per_trial, "gpu": gpus})
    done = finished_trials(points, out / "trials")  # our own JSON records: Tune's pickled state is never read
    todo = [p for p in points if trial_name(p) not in done]
    if done:
        print(f"continuing the sweep in {safe_text(out)}: {len(done)} finished trials kept, {len(todo)} to run",
              file=sys.stderr)
    results = []
    if todo:
        with ray_for_sweep(address):
            results = _tuner(trainable, todo, storage or str(out), base.epochs, asha, progress,
                             selection_metric(base)).fit()
    return _rows(results, points, out / "trials", done)


def _tuner(trainable, points: list[dict], storage: str, epochs: int, asha: bool, progress: bool,
           metric: str = "test_acc"):
    """A new Tuner over `points`, its state under storage/tune/<a new name>: each call is an experiment of its own,
    and nothing an earlier one left there is read; ASHA stops trials on `metric` (selection_metric)."""
    from ray import tune  # deferred: Ray, an optional extra

    scheduler = None
    if asha:
        from ray.tune.schedulers import ASHAScheduler  # deferred: Ray, an optional extra

        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=max(1, epochs // 4),
                                  reduction_factor=2)
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    # CLIReporter at verbose 0 says nothing; Tune's notebook reporter would clear the cell's output first
    loggers = [JsonLoggerCallback(), CSVLoggerCallback()]  # silent; Tune's result API reads them
    return tune.Tuner(trainable, param_space={"point": tune.grid_search(points)}, tune_config=tune.TuneConfig(
        metric=metric, mode="max", scheduler=scheduler, reuse_actors=False),
        run_config=tune.RunConfig(name="tune", storage_path=storage, verbose=0, progress_reporter=tune.CLIReporter(),
                                  callbacks=loggers + ([_Progress(len(points))] if progress else [])))


def _same_sweep(out: Path, base: TrainConfig, grid, seeds: int) -> None:
    """Keep out/sweep.json: a second call into `out` must ask for the same sweep (it continues it)."""
    asked = {"base": base.to_dict(), "grid": grid, "seeds": seeds}
    saved = out / "sweep.json"
    if saved.is_file():
        try:
            kept = read_json(saved)
        except ValueError as err:  # JSON and UTF-8 errors
            raise SweepError(f"{saved} is damaged ({type(err).__name__}): delete it and run the sweep again (its "
                             "finished trials are kept)") from None
        if kept != json.loads(json.dumps(asked)):
            raise SweepError(f"{out} holds another sweep (other settings, grid or seeds; see {saved}): run the same "
                             "sweep to continue it, or choose another folder (--out)")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps(asked, indent=1))


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _rows(results, points: list[dict], trials: Path, done: dict[str, dict]) -> list[dict]:
    """One row per trial, in the order of `points`: `done`'s (finished before), its trial.json when it finished
    now, else what it last reported (stopped early by ASHA, or failed)."""
    by_name = {trial_name(result.config["point"]): result for result in results}
    rows = []
    for point in points:
        if trial_name(point) in done:
            rows.append(done[trial_name(point)])
            continue
        folder, result = trials / trial_name(point), by_name[trial_name(point)]
        if (folder / "trial.json").is_file() and result.error is None:
            rows.append(read_trial(folder / "trial.json", point))
            continue
        status = f"error: {str(result.error).strip().splitlines()[-1][:200]}" if result.error else "stopped (ASHA)"
        rows.append(_unfinished_row(point, status, trials, result.metrics or {}))
    return rows


def _unfinished_row(point: dict, status: str, trials: Path | None, reported: dict | None = None) -> dict:
    """The row of a trial that did not finish (failed, or stopped by ASHA): what it last reported, if anything."""
    reported = reported or {}
    return {**point, "test_acc": reported.get("test_acc"), "test_acc_tta": reported.get("test_acc_tta"),
            "val_acc": reported.get("val_acc"), "train_seconds": reported.get("train_seconds"),
            "epochs": reported.get("epoch", 0), "status": status,
            "trial_dir": str(trials / trial_name(point)) if trials is not None else ""}


def write_results(rows: list[dict], varied: list[str], out: Path) -> None:
    """out/results.csv (the varied settings, then RESULT_COLUMNS) and out/sweep.png."""
    import matplotlib.pyplot as plt  # deferred, with helpers.plots: matplotlib, for the sweep's figure alone

    from helpers.plots import plot_sweep
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*varied, *RESULT_COLUMNS], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out / "results.csv", write)
    plt.close(plot_sweep(rows, varied, save=out / "sweep.png"))


class _Progress:
    """A line per finished trial (Tune's own output is off), as the local engine prints."""

    def __new__(cls, total: int):
        from ray import tune  # deferred: Ray, an optional extra

        class Progress(tune.Callback):
            done = 0

            def on_trial_complete(self, iteration, trials, trial, **info):
                self.done += 1
                _say_done(self.done, total, trial.config["point"], trial.last_result)

            def on_trial_error(self, iteration, trials, trial, **info):
                self.done += 1
                print(f"[{self.done}/{total}] {safe_text(trial_name(trial.config['point']))} failed: see "
                      f"{safe_text(trial.local_path)}", flush=True)

        return Progress()


# ---------------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cifar10 sweep", description="Sweep settings and seeds of a training run on Ray Tune, "
               "or one after another here (one trial per grid point and seed, each a normal run in DIR/trials/).")
    add_version_flag(p)
    sweep = p.add_argument_group("the sweep")
    sweep.add_argument("--engine", choices=ENGINES, default="ray", help="ray: trials on Ray Tune (side by side as "
                       "the resources allow); local: one after another in this process, no Ray (default: ray)")
    sweep.add_argument("--grid", action="append", default=[], metavar="SETTING=V1,V2",
                       help="a setting and its values (repeat for more; the trials are every combination)")
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per grid point, from --seed on (default: 1)")
    sweep.add_argument("--out", required=True, help="folder of the sweep: results.csv, sweep.png, trials/")
    sweep.add_argument("--gpus-per-trial", type=float, default=None,
                       help="Ray: GPUs per trial; 0.25 puts four trials on one GPU (default: 1 with CUDA, else 0)")
    sweep.add_argument("--cpus-per-trial", type=float, default=1, help="Ray: CPU cores per trial (default: 1)")
    sweep.add_argument("--address", default=None, help="a running Ray cluster (default: $RAY_ADDRESS, else a "
                       "local Ray started for this sweep)")
    sweep.add_argument("--storage", default=None, help="where Tune keeps the sweep's state (default: --out); "
                       "multi-node: a shared path or a URI such as s3://bucket/path")
    sweep.add_argument("--no-figures", dest="figures", action="store_false", help="trials skip their figures")
    sweep.add_argument("--asha", action="store_true", help="stop the weaker trials early (ASHA, on the test accuracy, "
                       "or the validation accuracy with --val-split; a one-cycle run's early epochs rank trials only "
                       "roughly)")
    settings = p.add_argument_group("settings of every trial (helpers.config.TrainConfig; see python -m "
                                    "helpers.train --help)")
    for f in fields(TrainConfig):
        add_setting(settings, f)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def sweep() -> None:
        grid = dict(parse_grid(g) for g in args.grid)
        if not grid and args.seeds < 2:
            raise SweepError("nothing to sweep: give --grid SETTING=V1,V2 and/or --seeds K (K >= 2)")
        if args.seeds < 1:
            raise SweepError(f"--seeds must be at least 1, got {args.seeds}")
        given = given_settings(args)
        with sigterm_as_interrupt():
            rows = run_sweep(TrainConfig(**given), grid, args.out, seeds=args.seeds, engine=args.engine,
                             gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
                             address=args.address, storage=args.storage, asha=args.asha,
                             figures=args.figures)
        out = Path(args.out)
        print(f"{len(rows)} trials: {safe_text(out / 'results.csv')}, {safe_text(out / 'sweep.png')}")

    return run_command(sweep, interrupted=lambda err: (
        "interrupted: run the same command again to continue the sweep in "
        f"{args.out} (finished trials are kept; the unfinished one resumes from its last finished epoch)"))


if __name__ == "__main__":
    sys.exit(main())
