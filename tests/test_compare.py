"""helpers.compare: the table of runs, their curves on shared axes, unfinished runs, and clear errors."""

from __future__ import annotations

import json
import shutil

import matplotlib.pyplot as plt
import pytest

from helpers import compare
from helpers.train import History


@pytest.fixture(scope="module")
def two_runs(trained_run, tmp_path_factory):
    """The trained run, and a copy of it stopped early: only its checkpoint, as after Ctrl-C."""
    stopped = tmp_path_factory.mktemp("stopped") / "run"
    stopped.mkdir()
    shutil.copy(trained_run / "checkpoint.pt", stopped / "checkpoint.pt")
    return trained_run, stopped


def test_rows_hold_what_metrics_json_says(two_runs):
    done, stopped = two_runs
    metrics = json.loads((done / "metrics.json").read_text())
    rows, fig = compare.compare_runs([done, stopped])
    assert rows[0]["model"] == "depthwise_net" and rows[0]["recipe"] == metrics["recipe"]
    assert rows[0]["test_acc"] == metrics["test_acc"] and rows[0]["epochs"] == 2
    assert rows[0]["train_seconds"] == metrics["train_seconds"] and rows[0]["device"].startswith("cpu")
    assert rows[1]["epochs"] == "2/2 (unfinished)" and rows[1]["test_acc"] == metrics["test_acc"]
    plt.close(fig)


def test_curves_share_their_axes(two_runs):
    done, _ = two_runs
    history = History.from_json(done / "history.json")
    rows, fig = compare.compare_runs(list(two_runs))
    acc, loss = fig.axes[:2]
    assert acc.get_shared_x_axes().joined(acc, loss)
    assert len(acc.lines) == len(loss.lines) == 2
    assert list(acc.lines[0].get_ydata()) == history.test_acc
    assert list(loss.lines[0].get_ydata()) == history.test_loss
    assert "depthwise_net" in acc.get_legend().get_texts()[0].get_text()
    plt.close(fig)


def test_command_prints_the_table_and_draws_into_a_new_file(two_runs, tmp_path, capsys):
    out = tmp_path / "compare.png"
    assert compare.main([str(r) for r in two_runs] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0]
    for name in ("model", "recipe", "epochs", "test acc %", "TTA acc %", "train s", "device"):
        assert name in header
    acc = json.loads((two_runs[0] / "metrics.json").read_text())["test_acc"]
    assert f"{acc:.2f}" in printed and "(unfinished)" in printed
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert compare.main([str(two_runs[0])]) == 0  # without --out: the table and a hint, no file
    assert "--out compare.png" in capsys.readouterr().out


def test_bad_runs_and_existing_files_are_one_line(two_runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"mine")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    (broken / "history.json").write_text("[]")
    cases = {
        (str(tmp_path / "absent"),): "no run at",
        (str(tmp_path / "empty"),): "holds no metrics.json",
        (str(broken),): "damaged",
        (str(two_runs[0]), "--out", str(mine)): "exists",
        (str(two_runs[0]), "--out", str(tmp_path / "x.txt")): "end the name in .png",
    }
    for argv, expected in cases.items():
        assert compare.main(list(argv)) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], argv
        assert captured.out == ""
    assert mine.read_bytes() == b"mine"


def test_table_marks_what_a_run_did_not_record():
    row = dict.fromkeys(compare.COLUMNS) | {"run": "a", "model": "m", "test_acc": 91.234}
    table = compare.format_table([row])
    assert "91.23" in table and table.splitlines()[2].count(" - ") >= 3


def test_the_table_shows_where_a_run_started_and_what_train_s_counts(trained_run, tmp_path, capsys):
    more = tmp_path / "more"
    shutil.copytree(trained_run, more)
    metrics = json.loads((more / "metrics.json").read_text())
    (more / "metrics.json").write_text(json.dumps(metrics | {"init_from": "runs/custom_resnet-writeup-1"}))
    assert compare.main([str(trained_run), str(more)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "started from" in lines[0]
    assert lines[3].rstrip().endswith("runs/custom_resnet-writeup-1") and lines[2].rstrip().endswith("-")
    assert any(line.startswith("train s: the training steps alone") and "test pass" in line for line in lines)
