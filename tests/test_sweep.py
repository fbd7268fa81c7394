"""helpers.sweep: the grid, the results and their figure, the local engine, and a 2-trial sweep on Ray Tune (slow)."""

from __future__ import annotations

import csv
import json
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
    assert "continuing the sweep" in again.stderr and "2 finished trials kept, 0 to run" in again.stderr
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
    every trial ends trained or stopped early, each with a row; with --val-split, ASHA stops trials on the
    validation accuracy (sweep.selection_metric) and every row has one beside the test accuracy."""
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
                               "max_lr=0.005,0.02,0.05,0.2", "--asha", "--val-split", "20", "--no-figures", "--address",
                               f"127.0.0.1:{port}", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(out / "results.csv") as f:
            rows = list(csv.DictReader(f))
        assert [r["max_lr"] for r in rows] == ["0.005", "0.02", "0.05", "0.2"]
        assert all(r["status"] in ("trained", "stopped (ASHA)") and 1 <= int(r["epochs"]) <= 4 for r in rows)
        # a trial that ran every epoch finished (its final evaluation, outputs and trial.json), whatever ASHA said
        assert all((r["status"], r["epochs"]) == ("trained", "4") or r["status"] == "stopped (ASHA)" and
                   int(r["epochs"]) < 4 for r in rows), rows
        assert all(0 <= float(r["val_acc"]) <= 100 for r in rows)  # what ASHA compared, every epoch of every trial
        # the test set is measured once, at a trial's end: a trial stopped early has no test accuracy, not a guess
        assert all(0 <= float(r["test_acc"]) <= 100 if r["status"] == "trained" else r["test_acc"] == "" for r in rows)
        finished = next(r for r in rows if r["status"] == "trained")  # ASHA lets the best of each rung go on
        trial = json.loads((Path(finished["trial_dir"]) / "metrics.json").read_text())
        assert trial["selected_on"] == "validation split" and trial["settings"]["val_split"] == 20
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_one_grid_point_gives_the_same_numbers_on_both_engines(tiny_data, tmp_path):
    """The same command with --engine local and --engine ray trains one point with the same settings (workers
    included: the trial's CPUs less one, whatever the engine) and, at the same CPU threads, the same accuracy."""
    pytest.importorskip("ray.tune")

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
# ---------------------------------------------------------------------------------------------------------
# Trust at the edges: bounded sweeps, one owner per folder, JSON records only, a local Ray on loopback only


def test_counts_that_would_exhaust_memory_are_refused_with_the_limit(tmp_path, capsys):
    assert sweep.main(["--engine", "local", "--seeds", "100000000", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "100,000,000 trials" in err and f"{sweep.MAX_TRIALS:,}" in err and "\n" not in err
    many = ",".join(str(k) for k in range(1, 400))
    assert sweep.main(["--engine", "local", "--grid", f"epochs={many}", "--grid", f"batch_size={many}",
                       "--out", str(tmp_path / "s")]) == 2
    assert "159,201 trials" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_sweep_folder_has_one_owner_at_a_time(tmp_path, capsys):
    out = tmp_path / "s"
    with sweep.hold_sweep_folder(out):  # a sweep running into it
        assert sweep.main(["--engine", "local", "--grid", "max_lr=0.1,0.2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: another sweep is writing into") and "\n" not in err


def test_an_out_that_is_a_file_is_one_line_and_kept(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert sweep.main(["--engine", "local", "--grid", "max_lr=0.1,0.2", "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "is a file" in err and "\n" not in err
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("text", ['{"base": ', "[1, 2]", "\xff\xfe"])
def test_a_damaged_sweep_json_is_one_line(tmp_path, capsys, text):
    out = tmp_path / "s"
    out.mkdir()
    (out / "sweep.json").write_bytes(text.encode("latin-1"))
    code = sweep.main(["--engine", "local", "--grid", "max_lr=0.1,0.2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err
    assert ("damaged" in err or "holds another sweep" in err) and "Traceback" not in err


@pytest.mark.parametrize("text", ['{"seed": 0', "[]", '{"seed": 0, "max_lr": 0.1, "test_acc": "high", '
                                  '"test_acc_tta": null, "train_seconds": 1, "epochs": 1, "status": "trained", '
                                  '"trial_dir": ""}', '{"seed": 0}'])
def test_a_damaged_trial_json_is_one_line(tiny_data, tmp_path, capsys, text):
    out = tmp_path / "s"
    args = ["--engine", "local", "--model", "depthwise_net", "--epochs", "1", "--batch-size", "50", "--data-dir",
            str(tiny_data), "--grid", "max_lr=0.1,0.2", "--no-figures", "--out", str(out)]
    trial = out / "trials" / "max_lr=0.1,seed=0"
    trial.mkdir(parents=True)
    (trial / "trial.json").write_text(text)
    assert sweep.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {trial / 'trial.json'} is damaged") and "\n" not in err
    assert (trial / "trial.json").read_text() == text  # nothing the user has is replaced


def test_a_value_with_a_slash_stays_one_trial_folder():
    assert "/" not in sweep.trial_name({"data_dir": "../../elsewhere", "seed": 0})
    assert sweep.trial_name({"max_lr": 0.2, "seed": 1}) == "max_lr=0.2,seed=1"


def test_the_reaper_ends_the_marked_processes_and_no_others():
    from helpers import reaper

    token = "test-" + os.urandom(4).hex()
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                              env=os.environ | {reaper.MARK: token})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             env=os.environ | {reaper.MARK: "another"})
    try:
        assert reaper.marked(token) == [marked.pid]
        watcher = subprocess.Popen([sys.executable, "-m", "helpers.reaper", token], stdin=subprocess.PIPE, cwd=REPO)
        watcher.stdin.close()  # what the sweep's end (or death) does
        assert watcher.wait(timeout=120) == 0
        assert marked.wait(timeout=60) is not None and other.poll() is None
    finally:
        for p in (marked, other):
            p.kill()
            p.wait()


def _ray_processes(driver: int) -> list:
    """The processes a sweep's driver started (Ray's gcs_server, raylet, agents and workers: its descendants)."""
    import psutil

    try:
        return psutil.Process(driver).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _listening(processes) -> list[tuple[str, str, int]]:
    import psutil

    found = []
    for p in processes:
        try:
            found += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    return found


def _is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _wait_for_trials(driver: subprocess.Popen) -> list:
    """The Ray processes of a sweep once its trials train (its workers listen too), waiting up to 5 minutes."""
    import time

    for _ in range(600):
        assert driver.poll() is None, driver.communicate()[1][-3000:]
        processes = _ray_processes(driver.pid)
        names = {p.name() for p in processes if p.is_running()}
        if "raylet" in names and any("_ray_trial" in n or "ImplicitFunc" in n for n in names):
            return processes
        time.sleep(0.5)
    raise AssertionError("the sweep's trials did not start")


def _gone(processes, *, within: float = 120) -> list:
    """Those of `processes` still running after `within` seconds (each checked by its start time: no PID reuse)."""
    import time

    import psutil

    deadline = time.monotonic() + within
    while True:
        left = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not left or time.monotonic() > deadline:
            return [(p.pid, p.name()) for p in left]
        time.sleep(0.5)


@pytest.mark.slow
def test_a_local_ray_sweep_listens_on_loopback_only_leaves_no_process_and_unpickles_nothing(tiny_data, tmp_path):
    """A local Ray sweep: every socket its Ray processes listen on is on the loopback address; none of them outlives
    the sweep, killed (SIGKILL) or stopped (SIGTERM); it continues from its JSON records, never from a pickle left
    in its folder (a planted payload does not run)."""
    pytest.importorskip("ray.tune")
    pytest.importorskip("psutil")
    import pickle
    import signal

    out, proof = tmp_path / "sweep", tmp_path / "payload-ran"
    command = [sys.executable, "-m", "helpers.sweep", "--model", "depthwise_net", "--epochs", "6", "--batch-size",
               "20", "--workers", "0", "--data-dir", str(tiny_data), "--grid", "max_lr=0.02,0.05", "--no-figures",
               "--out", str(out)]
    env = os.environ | {"TQDM_DISABLE": "1", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("RAY_ADDRESS", None)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    for stop in (signal.SIGKILL, signal.SIGTERM):
        driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            processes = _wait_for_trials(driver)
            listening = _listening(processes)
            assert listening and all(_is_loopback(ip) for _, ip, _ in listening), listening
            driver.send_signal(stop)
            driver.communicate(timeout=300)
            assert driver.returncode == (-9 if stop == signal.SIGKILL else 130)
            assert _gone(processes) == []
        finally:
            driver.kill()
        for name in ("tuner.pkl", "trainable.pkl", "experiment_state-2026-01-01_00-00-00.json", "search_gen_state.pkl"):
            for folder in (out / "tune", *(out / "tune").glob("*")):
                if folder.is_dir():
                    (folder / name).write_bytes(pickle.dumps(Payload()))
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not proof.exists()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["max_lr"] for r in rows] == ["0.02", "0.05"]
    assert all(r["status"] in ("trained", "resumed") and r["epochs"] == "6" for r in rows)
