"""helpers.sweep: the grid, the results and their figure, and a 2-trial sweep on Ray Tune (slow)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from helpers import sweep
from helpers.config import TrainConfig
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


def test_without_ray_it_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(sweep.SweepError, match=r'pip install -e "\.\[sweep\]"'):
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
    checkpoints = {p: p.stat().st_mtime_ns for p in (out / "trials").glob("*/checkpoint.pt")}
    assert len(checkpoints) == 2
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the sweep" in again.stderr
    with open(out / "results.csv") as f:  # a rerun trial would say "finished" (its run had nothing left to train)
        assert [r["status"] for r in csv.DictReader(f)] == ["trained", "trained"]
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
