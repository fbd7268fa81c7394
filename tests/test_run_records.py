"""What a run folder records and how it is made again: provenance in metrics.json, the config file that
`--config` replays (and `--print-config` prints), --deterministic, TensorBoard's event files, file permissions."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import torch

from helpers import cli
from helpers.checkpoints import read_checkpoint
from helpers.config import ConfigError, TrainConfig, config_file_name, config_text, read_config_file
from helpers.run import RunError, train_run
from helpers.utils import deterministic_algorithms

from .conftest import REPO, without_time

BASE = ["--device", "cpu", "--quiet"]
TINY = ["--model", "depthwise_net", "--epochs", "2", "--batch-size", "20", "--max-lr", "0.05", "--workers", "0"]


@pytest.fixture(scope="module")
def board_run(tiny_data, tmp_path_factory) -> Path:
    """A finished deterministic run with figures, and TensorBoard logging where the package is installed (Colab has
    it; requirements-dev.txt installs it; elsewhere only the TensorBoard test is skipped)."""
    out = tmp_path_factory.mktemp("board") / "run"
    board = ["--tensorboard"] if importlib.util.find_spec("tensorboard") else []
    assert cli.main([*TINY, *BASE, "--data-dir", str(tiny_data), "--out", str(out), *board, "--deterministic"]) == 0
    return out


def printed_config(argv, capsys, tmp_path) -> dict:
    """What --print-config prints, read back as a config file."""
    assert cli.main([*argv, "--print-config"]) == 0
    path = tmp_path / config_file_name()
    path.write_text(capsys.readouterr().out)
    return read_config_file(path)


# --- provenance


def test_metrics_record_where_the_numbers_came_from(trained_run):
    import helpers

    record = json.loads((trained_run / "metrics.json").read_text())["provenance"]
    assert record["version"] == helpers.__version__
    assert record["torch"] == torch.__version__ and record["python"].count(".") == 2
    assert all(record[name] for name in ("torchvision", "numpy", "albumentations"))
    assert record["gpu"] is None  # a CPU run
    assert isinstance(record["command"], str)  # this process's: pytest's here (test_the_command_is_as_typed)
    started, finished = (datetime.fromisoformat(record[k].replace("Z", "+00:00")) for k in ("started_utc",
                                                                                          "finished_utc"))
    assert started <= finished and started.utcoffset().total_seconds() == 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert record["git_commit"] == head.stdout.strip() and isinstance(record["git_dirty"], bool)


def test_the_command_is_as_typed(monkeypatch):
    from helpers import provenance

    package = Path(provenance.__file__).parent
    monkeypatch.setattr("sys.argv", [str(package / "__main__.py"), "train", "--out", "my runs/x"])
    assert provenance.command_line() == "python -m helpers train --out 'my runs/x'"
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/cifar10", "train", "--epochs", "2"])
    assert provenance.command_line() == "cifar10 train --epochs 2"


def test_outside_a_git_checkout_the_commit_is_none(tmp_path):
    from helpers.provenance import git_commit

    (tmp_path / "helpers").mkdir()
    assert git_commit(tmp_path / "helpers") == {"commit": None}


# --- the config file: printed, kept, replayed


def test_a_run_folder_keeps_a_config_that_replays_it(trained_run, tmp_path):
    kept = trained_run / config_file_name()
    assert kept.is_file()
    again = tmp_path / "again"
    assert cli.main(["--config", str(kept), "--out", str(again), "--no-figures", *BASE]) == 0
    first, second = (json.loads((run / "metrics.json").read_text()) for run in (trained_run, again))
    assert second["settings"] == first["settings"]
    assert without_time(_history(again)) == without_time(_history(trained_run))


def _history(run: Path):
    from types import SimpleNamespace

    return SimpleNamespace(records=list(read_checkpoint(run).history))


def test_print_config_gives_the_resolved_settings_and_flags_after_config_win(tiny_data, trained_run, capsys,
                                                                             tmp_path):
    # the small-run rule applied: custom_resnet's batch 512 on 100 images becomes 16, its peak LR scaled with it
    settings = printed_config(["--model", "custom_resnet", "--epochs", "1", "--data-dir", str(tiny_data)], capsys,
                              tmp_path)
    assert settings["batch_size"] == 16 and settings["max_lr"] == pytest.approx(0.45 * 16 / 512)
    assert TrainConfig(**settings).batch_size == 16  # what it prints, TrainConfig reads
    kept = str(trained_run / config_file_name())
    assert printed_config(["--config", kept, "--epochs", "3"], capsys, tmp_path)["epochs"] == 3  # after: the flag
    assert printed_config(["--epochs", "3", "--config", kept], capsys, tmp_path)["epochs"] == 2  # before: the file


def test_a_config_file_runs_no_code_and_bad_ones_are_one_line(tmp_path, capsys):
    pytest.importorskip("yaml")
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"epochs: !!python/object/apply:os.system ['touch {tmp_path / 'ran'}']\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("epochs: 2\ncolour: red\n")
    for path, says in ((evil, "not valid YAML"), (unknown, "unknown settings: colour"),
                       (tmp_path / "missing.yaml", "cannot read config file")):
        with pytest.raises(SystemExit) as stop:
            cli.main(["--config", str(path), "--print-config"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and err.startswith("error:")
    assert not (tmp_path / "ran").exists()


def test_config_text_round_trips_in_both_formats(tmp_path):
    config = TrainConfig(model="resnet18", max_lr=1e-3, lr=1e-5, tta="flip", subset_train=None)
    for fmt in ("json", "yaml"):
        if fmt == "yaml":
            pytest.importorskip("yaml")
        path = tmp_path / f"config.{fmt}"
        path.write_text(config_text(config, fmt=fmt))
        assert TrainConfig(**read_config_file(path)) == config
    hand = tmp_path / "hand.yaml"
    hand.write_text("model: resnet18\nmax_lr: 1e-3\n")  # YAML 1.1 reads 1e-3 as text; a number was meant
    assert read_config_file(hand)["max_lr"] == 1e-3
    with pytest.raises(ConfigError, match="must hold settings"):
        (tmp_path / "list.json").write_text("[1, 2]")
        read_config_file(tmp_path / "list.json")


# --- deterministic


def test_deterministic_runs_repeat_bit_for_bit_and_leave_torch_as_it_was(board_run, tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()  # the run put the global switch back
    again = tmp_path / "again"
    assert cli.main(["--config", str(board_run / config_file_name()), "--no-tensorboard", "--no-figures",
                     "--out", str(again), *BASE]) == 0
    first, second = read_checkpoint(board_run), read_checkpoint(again)
    assert second.config.deterministic is True
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in first.weights)
    assert without_time(_history(board_run)) == without_time(_history(again))


def test_deterministic_algorithms_restores_every_switch():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    with deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.deterministic and os.environ["CUBLAS_WORKSPACE_CONFIG"]
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before


# --- TensorBoard


def test_tensorboard_gets_each_epochs_scalars_and_the_figures(board_run):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    log = event_accumulator.EventAccumulator(str(board_run / "tensorboard"), size_guidance={"images": 0})
    log.Reload()
    tags = log.Tags()
    for tag in ("loss/train", "loss/test", "accuracy/train", "accuracy/test", "lr/epoch_start", "seconds/epoch"):
        assert [e.step for e in log.Scalars(tag)] == [1, 2], tag
    history = json.loads((board_run / "history.json").read_text())["epochs"]
    assert [e.value for e in log.Scalars("accuracy/test")] == pytest.approx([r["test_acc"] for r in history])
    assert {"figures/curves", "figures/confusion_matrix", "figures/gradcam"} <= set(tags["images"])
    assert log.Images("figures/curves")[0].width > 100


def test_tensorboard_without_the_package_is_a_clear_error(tiny_data, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("no tensorboard")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    config = TrainConfig(model="depthwise_net", epochs=1, data_dir=str(tiny_data), workers=0, tensorboard=True)
    with pytest.raises(RunError, match="pip install tensorboard"):
        train_run(config, tmp_path / "run", device="cpu", quiet=True, figures=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --- permissions


def test_files_a_run_writes_follow_the_umask(board_run):
    umask = os.umask(0)
    os.umask(umask)
    wanted = 0o666 & ~umask
    for name in ("checkpoint.pt", "metrics.json", "history.json", "history.csv", config_file_name(), "curves.png"):
        assert (board_run / name).stat().st_mode & 0o777 == wanted, name


def test_an_atomic_write_takes_the_umask_or_the_replaced_files_mode(tmp_path):
    from helpers.utils import atomic_write_text

    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "a.json", "{}")
        assert path.stat().st_mode & 0o777 == 0o640
        path.chmod(0o600)  # a file the user made private stays private
        atomic_write_text(path, "[]")
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
