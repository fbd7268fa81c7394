"""helpers.sweep: the grid, the results and their figure, the local engine, and a 2-trial sweep on Ray Tune (slow)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import sweep
from helpers.config import TrainConfig, evolve
from tests.conftest import REPO


def test_grid_values_take_the_settings_types():
    assert sweep.parse_grid("max_lr=0.1,0.2") == ("max_lr", [0.1, 0.2])
    assert sweep.parse_grid("--batch-size=64,128") == ("batch_size", [64, 128])
    assert sweep.parse_grid("nesterov=true,false") == ("nesterov", [True, False])
    assert sweep.parse_grid("max_lr=auto,0.4") == ("max_lr", ["auto", 0.4])
    for bad, says in (("max_lr", "SETTING=V1,V2"), ("colour=red", "not a setting"), ("epochs=two", "int values"),
                      ("seed=1,2", "--seeds")):
        with pytest.raises(sweep.SweepError, match=says):
            sweep.parse_grid(bad)
    assert sweep.trial_name({"max_lr": 0.2, "augment": "none", "seed": 1}) == "max_lr=0.2,augment=none,seed=1"


def test_results_csv_and_figure(tmp_path):
    rows = [{"max_lr": lr, "batch_size": b, "seed": s, "test_acc": 50 + 100 * lr + s + b / 100, "test_acc_tta": None,
             "train_seconds": 1.0, "epochs": 2, "status": "trained", "trial_dir": str(tmp_path / "t")}
            for lr in (0.05, 0.1, 0.4) for b in (64, 128) for s in (0, 1)]
    sweep.write_results(rows, ["max_lr", "batch_size"], tmp_path)
    with open(tmp_path / "results.csv") as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == 12 and list(saved[0])[:3] == ["max_lr", "batch_size", "seed"]
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_points_of_a_grid_or_a_list_with_each_seed():
    assert sweep.sweep_points({"max_lr": [0.1, 0.2], "epochs": [1]}, [0, 1]) == [
        {"max_lr": 0.1, "epochs": 1, "seed": 0}, {"max_lr": 0.1, "epochs": 1, "seed": 1},
        {"max_lr": 0.2, "epochs": 1, "seed": 0}, {"max_lr": 0.2, "epochs": 1, "seed": 1}]
    assert sweep.sweep_points({}, [3, 4]) == [{"seed": 3}, {"seed": 4}]  # seeds alone
    points = [{"max_lr": 0.2, "lr": 0.02}, {"max_lr": 0.4, "lr": 0.04}]
    assert sweep.sweep_points(points, [0]) == [p | {"seed": 0} for p in points]
    assert sweep.varied_settings(points) == ["max_lr", "lr"]


def test_a_setting_that_moves_with_another_gets_no_panel_of_its_own(tmp_path):
    import matplotlib.pyplot as plt

    from helpers.plots import plot_sweep

    rows = [{"max_lr": lr, "lr": lr / 10, "seed": s, "test_acc": 50 + 10 * lr + s} for lr in (0.1, 0.2) for s in (0, 1)]
    fig = plot_sweep(rows, ["max_lr", "lr"])
    assert [ax.get_xlabel() for ax in fig.axes] == ["max_lr"] and len(fig.axes[0].lines) >= 1
    plt.close(fig)
    rows = [r | {"batch_size": b} for r in rows for b in (32, 64)]  # independent settings: a panel each
    fig = plot_sweep(rows, ["max_lr", "batch_size"])
    assert [ax.get_xlabel() for ax in fig.axes] == ["max_lr", "batch_size"]
    plt.close(fig)


def test_ray_options_are_refused_by_the_local_engine(tmp_path):
    base = TrainConfig(model="depthwise_net")
    with pytest.raises(sweep.SweepError, match="gpus_per_trial, asha: Ray Tune's options"):
        sweep.run_sweep(base, {"max_lr": [0.1]}, tmp_path, engine="local", gpus_per_trial=0.5, asha=True)
    with pytest.raises(sweep.SweepError, match="needs a folder"):
        sweep.run_sweep(base, {"max_lr": [0.1]}, None)
    with pytest.raises(sweep.SweepError, match="choose one of ray, local"):
        sweep.run_sweep(base, {"max_lr": [0.1]}, tmp_path, engine="dask")


def test_a_local_sweep_writes_its_trials_and_continues_without_rerunning(tiny_data, tmp_path, capsys):
    """The local engine: each trial a train_run into trials/<name>, results.csv and sweep.png; run again, a
    finished trial is read back, not trained; a trial equals the same run made alone."""
    from helpers.run import train_run

    base = TrainConfig(model="depthwise_net", data_dir=str(tiny_data), epochs=1, batch_size=20, workers=0,
                       loader="gpu", augment="none", amp=False)
    rows = sweep.run_sweep(base, {"max_lr": [0.02, 0.05]}, tmp_path, engine="local", device="cpu", figures=False)
    assert [(r["max_lr"], r["seed"], r["status"]) for r in rows] == [(0.02, 0, "trained"), (0.05, 0, "trained")]
    assert "[2/2] max_lr=0.05,seed=0:" in capsys.readouterr().out
    with open(tmp_path / "results.csv") as f:
        assert [r["max_lr"] for r in csv.DictReader(f)] == ["0.02", "0.05"]
    assert (tmp_path / "sweep.png").is_file()
    checkpoints = {p: p.stat().st_mtime_ns for p in (tmp_path / "trials").glob("*/checkpoint.pt")}
    assert len(checkpoints) == 2
    again = sweep.run_sweep(base, {"max_lr": [0.02, 0.05]}, tmp_path, engine="local", device="cpu", figures=False)
    assert again == rows and {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    alone = train_run(evolve(base, max_lr=0.05), device="cpu", quiet=True)
    assert rows[1]["test_acc"] == alone.accuracy


def test_an_interrupted_local_sweep_says_what_it_kept(monkeypatch, tmp_path):
    from helpers.run import RunInterrupted
    from helpers.train import History

    def trial(base, point, trials, **kwargs):
        if point["max_lr"] == 0.2:
            raise RunInterrupted("interrupted: ...")
        return SimpleNamespace(accuracy=50.0, tta_accuracy=None, val_accuracy=None,
                               history=History([{"train_seconds": 1.0}]), status="trained", out=None)

    monkeypatch.setattr(sweep, "trial", trial)
    with pytest.raises(RunInterrupted, match=r"at trial 2 of 2: the trials before it are kept in .*trials; run the "
                                             r"same sweep again"):
        sweep.run_sweep(TrainConfig(model="depthwise_net"), {"max_lr": [0.1, 0.2]}, tmp_path, engine="local",
                        progress=False)


def test_without_ray_it_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(sweep.SweepError, match=r'pip install -e "\.\[sweep\]".*--engine local'):
        sweep.run_sweep(TrainConfig(model="depthwise_net"), {"max_lr": [0.1, 0.2]}, tmp_path)


def test_another_sweep_into_the_same_folder_is_refused(tmp_path):
    base = TrainConfig(model="depthwise_net")
    sweep._same_sweep(tmp_path, base, {"max_lr": [0.1, 0.2]}, 1)
    sweep._same_sweep(tmp_path, base, {"max_lr": [0.1, 0.2]}, 1)  # the same sweep continues
    with pytest.raises(sweep.SweepError, match="holds another sweep"):
        sweep._same_sweep(tmp_path, base, {"max_lr": [0.1, 0.4]}, 1)


@pytest.mark.slow
def test_a_two_trial_sweep_on_ray_and_its_restore(tiny_data, tmp_path):
    pytest.importorskip("ray.tune")
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "helpers.sweep", "--model", "depthwise_net", "--epochs", "2", "--batch-size",
               "20", "--workers", "0", "--data-dir", str(tiny_data), "--grid",
               "max_lr=0.02,0.05", "--no-figures", "--out", str(out)]
    env = os.environ | {"TQDM_DISABLE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["max_lr"], r["seed"], r["status"], r["epochs"]) for r in rows] == [
        ("0.02", "0", "trained", "2"), ("0.05", "0", "trained", "2")]
    assert all(0 <= float(r["test_acc"]) <= 100 for r in rows)
    assert (out / "sweep.png").is_file()
    from ray.tune import ExperimentAnalysis  # Tune's own result API reads the sweep folder

    frame = ExperimentAnalysis(str(out / "tune")).dataframe()
    assert sorted(frame["config/point/max_lr"]) == [0.02, 0.05] and set(frame["epoch"]) == {2}
    assert sorted(frame["test_acc"]) == sorted(float(r["test_acc"]) for r in rows)
    checkpoints = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/checkpoint.pt")}
    assert len(checkpoints) == 2
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the sweep" in again.stderr
    with open(out / "results.csv") as f:  # a rerun trial would say "finished" (its run had nothing left to train)
        assert [r["status"] for r in csv.DictReader(f)] == ["trained", "trained"]
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints


def test_the_command_line_says_what_is_wrong_in_one_line(tmp_path, capsys):
    assert sweep.main(["--engine", "local", "--gpus-per-trial", "0.5", "--grid", "max_lr=0.1,0.2",
                       "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: gpus_per_trial: Ray Tune's options") and "\n" not in err
    assert sweep.main(["--out", str(tmp_path)]) == 2
    assert "nothing to sweep" in capsys.readouterr().err


@pytest.mark.slow
def test_a_sweep_on_a_running_ray_cluster_with_asha(tiny_data, tmp_path):
    """--address: the sweep runs on a Ray cluster started apart (`ray start --head`), not a Ray of its own; --asha:
    every trial ends trained or stopped early, each with a row."""
    pytest.importorskip("ray.tune")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = Path(sys.executable).with_name("ray")
    env = os.environ | {"TQDM_DISABLE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                        "RAY_USAGE_STATS_ENABLED": "0"}
    bad = subprocess.run([sys.executable, "-m", "helpers.sweep", "--grid", "max_lr=0.1,0.2", "--data-dir",
                          str(tiny_data), "--address", f"127.0.0.1:{port}", "--out", str(tmp_path / "none")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # nothing listens there yet
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Ray cluster")
    started = subprocess.run([str(ray_cli), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                              "--num-cpus", "2",
                              "--include-dashboard", "false", "--disable-usage-stats"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        out = tmp_path / "sweep"
        done = subprocess.run([sys.executable, "-m", "helpers.sweep", "--model", "depthwise_net", "--epochs", "4",
                               "--batch-size", "20", "--workers", "0", "--data-dir", str(tiny_data), "--grid",
                               "max_lr=0.005,0.02,0.05,0.2", "--asha", "--no-figures", "--address",
                               f"127.0.0.1:{port}", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(out / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["max_lr"] for r in rows] == ["0.005", "0.02", "0.05", "0.2"]
        assert all(r["status"] in ("trained", "stopped (ASHA)") and 1 <= int(r["epochs"]) <= 4 for r in rows)
        assert all(r["status"] == "stopped (ASHA)" or r["epochs"] == "4" for r in rows)
        assert all(0 <= float(r["test_acc"]) <= 100 for r in rows)
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_one_grid_point_gives_the_same_numbers_on_both_engines(tiny_data, tmp_path):
    """The same command with --engine local and --engine ray trains one point with the same settings (workers
    included: the trial's CPUs less one, whatever the engine) and, at the same CPU threads, the same accuracy."""
    pytest.importorskip("ray.tune")
    import json

    env = os.environ | {"TQDM_DISABLE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    results = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        command = [sys.executable, "-m", "helpers.sweep", "--engine", engine, "--model", "depthwise_net", "--epochs",
                   "2", "--batch-size", "20", "--data-dir", str(tiny_data), "--grid", "max_lr=0.05", "--no-figures",
                   "--out", str(out)]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(out / "results.csv") as f:
            (row,) = csv.DictReader(f)
        settings = json.loads((Path(row["trial_dir"]) / "metrics.json").read_text())["settings"]
        results[engine] = row, {k: v for k, v in settings.items() if k != "data_dir"}
    (local, local_settings), (ray, ray_settings) = results["local"], results["ray"]
    assert local_settings == ray_settings and local_settings["workers"] == 0
    assert local["threads"] == ray["threads"] == "1"
    assert local["test_acc"] == ray["test_acc"]
