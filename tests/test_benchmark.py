"""benchmarks/benchmark.py: the CPU smoke run writes every section, and time-to-94% reads the history right."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import benchmark
from helpers.train import History

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_writes_every_section(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # a subprocess: the run sets torch's thread count, which must not leak into the other tests
    done = subprocess.run([sys.executable, "-m", "benchmarks.benchmark", "--quick", "--device", "cpu",
                           "--data-dir", str(tiny_data), "--out", str(out), "--sections", ",".join(benchmark.SECTIONS),
                           "--accuracy-runs", "custom_resnet:writeup,custom_resnet:fast,resnet18:writeup"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["results"]) >= set(benchmark.SECTIONS)
    assert {"torch", "cpu", "device", "gpu"} <= set(report["machine"]) and report["date"] and report["command"]
    assert report["data"]["train"] == 10 and report["data"]["test"] == 10
    res = report["results"]
    assert {r["kind"] for r in res["loaders"]} == {"torch", "gpu"}
    assert all(r["images_per_s"] > 0 for r in res["loaders"])
    assert {(r["model"], r["loader"]) for r in res["epochs"]} == {
        (m, k) for m in ("custom_resnet", "resnet18") for k in ("gpu", "torch")}
    assert all(r["seconds_per_epoch"] > 0 and r["mode"] == "eager" and r["warmup_s"] == 0 for r in res["epochs"])
    accuracy = res["accuracy"][0]  # no airbench here: the fixed target, for the TTA time too
    assert (accuracy["model"], accuracy["recipe"], len(accuracy["runs"])) == ("custom_resnet", "writeup", 1)
    assert accuracy["target"] == accuracy["target_tta"] == benchmark.TARGET and accuracy["vs_airbench"] is None
    assert 0 < accuracy["train_only_s_mean"] <= accuracy["train_s_mean"]
    assert accuracy["final_acc_tta_mean"] is None and res["accuracy"][1]["final_acc_tta_mean"] is not None  # fast: TTA
    found = res["accuracy"][2]["runs"][0]  # the write-up's peak is the range test's pick, as --max-lr auto
    assert found["max_lr_from"] == "the LR range test" and isinstance(found["max_lr"], float)
    assert res["accuracy"][0]["runs"][0]["max_lr"] == 0.45  # a recipe's own peak
    assert "skipped" in res["airbench"]  # no CUDA here
    assert res["overhead"]["fit_s"] > 0 and res["overhead"]["bare_s"] > 0 and res["overhead"]["mode"] == "eager"
    sweep = res["sweep"][0]
    assert set(sweep["rules"]) == {"steepest", "decade_below_min", "min_loss"} and "0.05" in sweep["runs"]
    lrtest = res["lrtest"][0]  # the range test alone: the same picks as the sweep's (same seed, same step)
    assert lrtest["picks"] == {rule: v["max_lr"] for rule, v in sweep["rules"].items()}
    assert "fit vs bare loop" in done.stdout and "rule steepest" in done.stdout and "LR range test" in done.stdout


def test_time_to_target_is_the_first_epoch_at_target():
    history = History([{"seconds": s, "test_acc": a} for s, a in [(2.0, 90.0), (2.5, 94.1), (2.0, 93.9)]])
    assert benchmark.time_to(history) == pytest.approx(4.5)
    assert benchmark.time_to(history, 95.0) is None


def test_time_to_target_with_tta_and_training_seconds_alone():
    history = History([{"seconds": 2.0, "train_seconds": 1.5, "test_acc": 90.0, "test_acc_tta": 91.0},
                       {"seconds": 2.0, "train_seconds": 1.5, "test_acc": 90.5, "test_acc_tta": 91.5}])
    assert benchmark.time_to(history, 91.0, key="test_acc_tta") == pytest.approx(2.0)
    assert benchmark.time_to(history, 91.5, key="test_acc_tta", seconds="train_seconds") == pytest.approx(3.0)
    assert benchmark.time_to(history, 91.0) is None and benchmark.time_to(history, None) is None


def test_airbench_ratios_are_training_time_over_airbench_time():
    row = {"train_time_to_target_mean_s": 5.0, "train_time_to_target_tta_mean_s": 4.0, "train_only_s_mean": 6.0}
    results = {"airbench": {"seconds_mean": 2.0}, "accuracy": [row, {**row, "train_time_to_target_mean_s": None}]}
    benchmark.add_airbench_ratios(results)
    assert (row["vs_airbench"], row["vs_airbench_tta"], row["full_run_vs_airbench"]) == (2.5, 2.0, 3.0)
    assert results["accuracy"][1]["vs_airbench"] is None  # never reached: no ratio


def test_unknown_section_is_an_error():
    with pytest.raises(SystemExit, match="unknown sections"):
        benchmark.parse_args(["--sections", "loaders,speed"])


def test_share_starts_a_group_at_once_or_in_turn_and_names_a_failed_run(tmp_path):
    """benchmarks.share: 'together' starts every run before any ends (each waits here for the other's mark, which
    would never come in turn); a failed run stops the measurement with its log named."""
    from benchmarks import share

    wait_for_both = ("import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).touch(); "
                     "t = time.time(); ok = lambda: (d / 'a').exists() and (d / 'b').exists()\n"
                     "while not ok() and time.time() - t < 60: time.sleep(0.05)\nsys.exit(0 if ok() else 1)")
    commands = [[sys.executable, "-c", wait_for_both, str(tmp_path), name] for name in ("a", "b")]
    assert share.run_group(commands, [tmp_path / "a.log", tmp_path / "b.log"], together=True) > 0
    failing = [[sys.executable, "-c", "import sys; sys.exit(3)"]]
    with pytest.raises(SystemExit, match=r"a run failed \(exit 3\): see .*bad.log"):
        share.run_group(failing, [tmp_path / "bad.log"], together=False)
