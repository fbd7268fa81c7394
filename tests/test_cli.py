"""The command line as a user meets it: nothing lost, no traceback, clear messages, small runs that learn."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from helpers import cli
from helpers.checkpoints import read_checkpoint
from helpers.config import read_config_file

BASE = ["--model", "depthwise_net", "--device", "cpu", "--workers", "0", "--no-figures", "--quiet"]


def train(tiny_data, out, *extra) -> int:
    return cli.main([*BASE, "--data-dir", str(tiny_data), "--out", str(out), *extra])


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def usage_error(argv, capsys) -> str:
    """Run the CLI expecting exit status 2 (a parse error exits, a later one returns); returns its one error line."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = error_of(capsys)
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert "usage:" not in err  # one line, not the usage text
    return line.split("error: ", 1)[1]


@pytest.fixture
def interrupted(tiny_data, tmp_path, monkeypatch, capsys):
    """A 3-epoch run in tmp/elsewhere stopped by Ctrl-C after epoch 1 (exit 130); returns its folder."""
    from helpers import train as train_module

    real = train_module._train_epoch

    def stop_at_2(step, loader, epoch, **kw):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(step, loader, epoch, **kw)

    out = tmp_path / "elsewhere"
    monkeypatch.setattr(train_module, "_train_epoch", stop_at_2)
    assert train(tiny_data, out, "--epochs", "3", "--batch-size", "20", "--max-lr", "0.05") == 130
    monkeypatch.setattr(train_module, "_train_epoch", real)
    assert f"--resume {out}" in capsys.readouterr().err  # the message says how to continue
    return out


def test_resume_writes_into_the_checkpoints_folder_and_nowhere_else(interrupted, tiny_data, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # an older version's default --out (runs/latest) would land here
    (tmp_path / "runs" / "latest").mkdir(parents=True)
    other = tmp_path / "runs" / "latest" / "checkpoint.pt"
    other.write_bytes(b"another run's checkpoint")
    assert cli.main(["--resume", str(interrupted), "--device", "cpu", "--no-figures", "--quiet",
                     "--data-dir", str(tiny_data)]) == 0
    assert f"resuming {interrupted / 'checkpoint.pt'} at epoch 2 of 3" in capsys.readouterr().out
    assert other.read_bytes() == b"another run's checkpoint"  # untouched
    assert read_checkpoint(interrupted).epoch == 3
    assert len(json.loads((interrupted / "history.json").read_text())["epochs"]) == 3


def test_resume_refuses_flags_that_would_change_the_run(interrupted, capsys):
    err = usage_error(["--resume", str(interrupted / "checkpoint.pt"), "--epochs", "5", "--device", "cpu"], capsys)
    assert "epochs 5" in err and "one-cycle" in err and "new run" in err and "--init-from" in err
    err = usage_error(["--resume", str(interrupted), "--max-lr", "0.3"], capsys)
    assert "--max-lr 0.3" in err and "max_lr" not in err  # in flags, not Python keywords
    assert read_checkpoint(interrupted).epoch == 1  # nothing trained


def test_a_finished_run_is_not_offered_to_continue(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_data, out, "--epochs", "1", "--batch-size", "20", "--max-lr", "0.05") == 0
    capsys.readouterr()
    err = usage_error([*BASE, "--data-dir", str(tiny_data), "--out", str(out)], capsys)
    assert "finished run (1/1 epochs)" in err and "--resume" not in err and "--overwrite" in err
    # --overwrite moves the whole old run aside (a sibling folder) instead of deleting any of it
    old = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    assert train(tiny_data, out, "--epochs", "1", "--batch-size", "20", "--max-lr", "0.05", "--overwrite") == 0
    kept = tmp_path / "run-1"
    assert {p.name: p.read_bytes() for p in kept.iterdir() if not p.name.startswith(".")} == old
    assert not (kept / ".lock.owner").exists() and "moved, whole, to" in capsys.readouterr().out  # a note
    assert read_checkpoint(out).epoch == 1 and (out / "metrics.json").is_file()


@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 not really a zip"])
def test_resume_of_a_damaged_checkpoint(tmp_path, capsys, damage):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(damage)
    err = usage_error(["--resume", str(bad)], capsys)
    assert "damaged" in err and str(bad) in err and not err.rstrip().endswith(": 101")


def test_paths_that_cannot_work_are_usage_errors(tiny_data, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert train(a_file, tmp_path / "r1") == 2
    err = error_of(capsys)
    assert f"--data-dir {a_file} is a file" in err
    assert not (tmp_path / "r1").exists()  # no empty run folder left behind
    err = usage_error([*BASE, "--data-dir", str(tiny_data), "--out", str(a_file / "run")], capsys)
    assert "cannot write into" in err
    err = usage_error([*BASE, "--data-dir", str(tiny_data), "--out", str(a_file)], capsys)
    assert "is a file" in err

    def read_only(self, *args, **kwargs):  # root ignores chmod: simulate a read-only folder
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "write_text", read_only)
    err = usage_error([*BASE, "--data-dir", str(tiny_data), "--out", str(tmp_path / "ro")], capsys)
    assert "cannot write into" in err and "Permission denied" in err


def test_data_dir_may_be_the_batches_folder_itself(tiny_data, tmp_path):
    assert train(tiny_data / "cifar-10-batches-py", tmp_path / "run", "--epochs", "1", "--batch-size", "50") == 0


def test_messages_for_flags(tiny_data, tmp_path, capsys):
    err = usage_error(["--max-lr", "fast"], capsys)
    assert "'auto'" in err
    assert train(tiny_data, tmp_path / "run", "--epochs", "1", "--subset-train", "5000", "--batch-size", "50") == 0
    assert "--subset-train 5,000 is more than the 100 train images" in capsys.readouterr().out  # a note
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    assert "custom_resnet writeup (default): 24 epochs, batch 512" in help_text
    assert "resnet18 fast (default): 20 epochs, batch 512" in help_text
    options = re.split(r"\s(?=--?[a-z])", " ".join(help_text.split()))
    assert "(default: None)" not in help_text and all(o.count("(default:") <= 1 for o in options)  # said once


def test_a_small_run_gets_a_batch_that_learns_and_says_so(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--model", "custom_resnet", "--epochs", "1", "--data-dir", str(tiny_data), "--out", str(out),
                     "--device", "cpu", "--workers", "0", "--no-figures"]) == 0
    captured = capsys.readouterr()
    assert "recipe's batch 512 would be 1 step(s) per epoch; using batch 16 (6 steps)" in captured.out
    assert "scaled with the batch" in captured.out and "too few to learn" in captured.out  # 6 steps: still few
    assert "smaller batch" not in captured.out  # the run chose the smallest itself: more data or epochs
    assert "--no-adapt-small-runs" in captured.out and "adapt_small_runs=False" not in captured.out
    assert captured.err == ""  # notes are not errors
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["batch_size"] == 16 and settings["max_lr"] == pytest.approx(0.45 * 16 / 512)
    assert "fp32" in captured.out and "amp None" not in captured.out  # the header names the precision


def test_given_batch_size_is_kept_with_a_warning(tiny_data, tmp_path, capsys):
    assert train(tiny_data, tmp_path / "run", "--epochs", "1", "--batch-size", "64", "--max-lr", "0.05") == 0
    out = capsys.readouterr().out
    assert "using batch" not in out and "only 1 training step(s) in all" in out and "a smaller batch size" in out


def test_checkpoint_write_failure_is_reported_with_the_path(tiny_data, tmp_path, capsys, monkeypatch):
    def fail(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", fail)
    out = tmp_path / "run"
    assert train(tiny_data, out, "--epochs", "1", "--batch-size", "50", "--max-lr", "0.05") == 1
    err = error_of(capsys)
    assert str(out / "checkpoint.pt") in err and "the disk is full" in err


def test_init_from_keeps_the_source_runs_data_unless_told(tiny_data, tmp_path, capsys):
    """A run started from a subset run trains on that subset, not on every image (the README's 'train some more')."""
    source = tmp_path / "source"
    assert train(tiny_data, source, "--epochs", "1", "--subset-train", "50", "--subset-test", "20", "--seed", "3",
                 "--max-lr", "0.05") == 0
    capsys.readouterr()
    more = tmp_path / "more"
    assert cli.main(["--init-from", str(source), "--epochs", "1", "--out", str(more), "--device", "cpu",
                     "--workers", "0", "--no-figures", "--quiet", "--max-lr", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "--init-from: as the source run: --model depthwise_net" in out and "--subset-train 50" in out
    first, second = (json.loads((run / "metrics.json").read_text()) for run in (source, more))
    for key in ("model", "subset_train", "subset_test", "seed", "data_dir", "recipe"):
        assert second["settings"][key] == first["settings"][key], key
    assert (second["train_images"], second["test_images"]) == (50, 20)
    assert read_checkpoint(more).data == read_checkpoint(source).data  # the very same images
    told = tmp_path / "told"
    assert cli.main(["--init-from", str(source), "--epochs", "1", "--out", str(told), "--device", "cpu", "--workers",
                     "0", "--no-figures", "--quiet", "--max-lr", "0.05", "--subset-train", "100"]) == 0
    assert json.loads((told / "metrics.json").read_text())["train_images"] == 100
    capsys.readouterr()
    assert cli.main(["--init-from", str(source), "--print-config"]) == 0  # stdout is the config file alone
    printed = capsys.readouterr()
    assert "--init-from: as the source run" in printed.err and "--init-from" not in printed.out
    (tmp_path / "printed.yaml").write_text(printed.out)
    assert read_config_file(tmp_path / "printed.yaml")["subset_train"] == 50


def test_each_run_gets_a_new_numbered_folder_and_latest_leads_to_the_last(tiny_data, tmp_path, monkeypatch, capsys):
    """Running the quick start's command twice makes two runs, never an 'already holds a run' error."""
    monkeypatch.chdir(tmp_path)
    args = [*BASE, "--data-dir", str(tiny_data), "--epochs", "1", "--max-lr", "0.05"]
    assert cli.main([*args, "--out", "runs/mine"]) == 0  # a named folder in runs/ counts as a run too
    assert cli.main(args) == 0 and cli.main(args) == 0
    out = capsys.readouterr().out
    runs = tmp_path / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["depthwise_net-writeup-1", "depthwise_net-writeup-2", "latest",
                                                      "mine"]
    assert (runs / "latest").resolve() == (runs / "depthwise_net-writeup-2").resolve()
    assert "runs/latest leads to depthwise_net-writeup-2" in out
    assert read_checkpoint("runs/latest").epoch == 1
    assert cli.main(["--init-from", "runs/latest", "--epochs", "1", "--device", "cpu", "--no-figures", "--quiet",
                     "--max-lr", "0.05"]) == 0  # a run started from the last: its data, the next number
    assert (runs / "latest").resolve().name == "depthwise_net-writeup-3"


def test_latest_without_symlinks_is_a_file_naming_the_run(tmp_path, monkeypatch):
    """Where the filesystem refuses symlinks (Windows without developer mode, some network drives), runs/latest is a
    small text file that every command follows; a real folder called latest (an older version's run) is left."""
    from helpers.checkpoints import checkpoint_path
    from helpers.utils import follow_latest, next_run_folder, point_latest

    runs = tmp_path / "runs"
    assert next_run_folder(runs, "resnet18-fast") == runs / "resnet18-fast-1"  # runs/ not there yet
    for name in ("resnet18-fast-1", "resnet18-fast-9", "resnet18-fast-x", "resnet18-fastest-12"):
        (runs / name).mkdir(parents=True)
    assert next_run_folder(runs, "resnet18-fast") == runs / "resnet18-fast-10"

    def no_symlinks(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr("os.symlink", no_symlinks)
    assert point_latest(runs / "resnet18-fast-9") == runs / "latest"
    assert (runs / "latest").read_text() == "resnet18-fast-9\n"
    assert checkpoint_path(runs / "latest") == runs / "resnet18-fast-9" / "checkpoint.pt"
    (runs / "latest").write_text("../../etc\n")  # a pointer leads to a folder beside it, nowhere else
    assert follow_latest(runs / "latest") == runs / "latest"
    (runs / "latest").unlink()
    (runs / "latest").mkdir()
    assert point_latest(runs / "resnet18-fast-9") is None and (runs / "latest").is_dir()


# --- one command line: cifar10 COMMAND (= python -m helpers COMMAND)


def test_every_command_is_reached_and_has_version(capsys):
    import helpers

    assert cli.command_line(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name}" in listed for name in cli.COMMANDS)
    assert cli.command_line([]) == 2  # no command: the list, and a failing status
    capsys.readouterr()
    assert cli.command_line(["trian", "--epochs", "2"]) == 2
    assert error_of(capsys).strip() == ("error: no command 'trian': choose one of train, predict, compare, demo, "
                                        "sweep, export (see cifar10 --help)")
    for argv in (["--version"], *([name, "--version"] for name in cli.COMMANDS)):
        try:
            code = cli.command_line(argv)
        except SystemExit as stop:  # argparse's version action exits
            code = stop.code
        assert code in (0, None) and capsys.readouterr().out.strip() == f"cifar10-helpers {helpers.__version__}"


def test_flags_alone_train_as_before_there_were_commands(tiny_data, tmp_path):
    assert cli.command_line([*BASE, "--epochs", "1", "--data-dir", str(tiny_data), "--out", str(tmp_path / "r"),
                             "--print-config"]) == 0
