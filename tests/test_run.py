"""The run layer (helpers.run) and the settings schema (helpers.config): one run from Python, a notebook and the
command line; small runs that learn; one owner per run folder; resume that checks its data; checked values."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from helpers import cli
from helpers.checkpoints import CheckpointError, read_checkpoint
from helpers.config import RECIPES, ConfigError, TrainConfig, config_file_name, evolve
from helpers.run import RunError, adapt_to_data, hold_run_folder, train_run

from .conftest import REPO, write_cifar_folder

TINY = dict(model="depthwise_net", epochs=2, batch_size=20, max_lr=0.05, amp=False, workers=0)


def tiny(tiny_data, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "data_dir": str(tiny_data), **overrides})


def records(history) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in history.records]


# --- one run, every path


def test_python_and_the_command_line_make_the_same_run(tiny_data, tmp_path):
    result = train_run(tiny(tiny_data), tmp_path / "py", device="cpu", quiet=True, figures=False)
    argv = ["--model", "depthwise_net", "--epochs", "2", "--batch-size", "20", "--max-lr", "0.05", "--no-amp",
            "--workers", "0", "--data-dir", str(tiny_data), "--out", str(tmp_path / "cli"), "--device", "cpu",
            "--quiet", "--no-figures"]
    assert cli.main(argv) == 0
    from_cli = json.loads((tmp_path / "cli" / "history.json").read_text())["epochs"]
    assert records(result.history) == [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")}
                                       for r in from_cli]
    metrics = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert metrics["test_acc"] == result.accuracy == result.history.test_acc[-1]
    assert metrics["settings"] == result.config.to_dict()
    # the result holds what a notebook needs next, evaluated once
    assert len(result.evaluation.predictions) == len(result.test_arrays) == 50
    assert set(result.paths) >= {"checkpoint", "history", "metrics"}
    ckpt = read_checkpoint(result.paths["checkpoint"])
    assert ckpt.classes[0] == "airplane" and len(ckpt.mean) == 3
    assert ckpt.data["train"]["images"] == 100


def test_the_small_run_rule_applies_in_python_and_says_so(tiny_data, tmp_path, capsys):
    config = TrainConfig(model="custom_resnet", epochs=1, data_dir=str(tiny_data), workers=0)
    result = train_run(config, tmp_path / "run", device="cpu", quiet=True, figures=False)
    assert config.batch_size == 512  # the config given is left alone
    assert result.config.batch_size == 16 and result.config.max_lr == pytest.approx(0.45 * 16 / 512)
    assert any("using batch 16" in note for note in result.notes)
    out = capsys.readouterr().out
    assert "using batch 16" in out  # printed as it happens, on stdout: a note, not an error (Jupyter shows stderr red)
    assert "adapt_small_runs=False (--no-adapt-small-runs)" in out  # Python words in Python, the flag beside them
    off = evolve(config, adapt_small_runs=False)
    assert adapt_to_data(off, 100)[0].batch_size == 512


def test_a_given_batch_is_kept_and_the_recipe_batch_can_be_kept(tiny_data):
    config = tiny(tiny_data, batch_size=64)
    adapted, notes = adapt_to_data(config, 100)
    assert adapted.batch_size == 64 and any("too few to learn" in n for n in notes)


def test_weight_averaging_fits_the_run():
    fast = TrainConfig(model="custom_resnet", recipe="fast")
    assert adapt_to_data(fast, 50_000)[0] == fast  # the full recipe is left as it is (194 steps at 0.99)
    short, notes = adapt_to_data(evolve(fast, epochs=2, ema_epochs=2), 2000)
    assert short.batch_size == 64 and short.ema_epochs == 1  # never from the random initial weights
    steps = 2000 // 64
    assert short.ema ** steps == pytest.approx(math.exp(-4), rel=0.05)  # its start weighs 2% at the end
    assert any("weight average over the last 1 epoch" in n for n in notes)
    one, notes = adapt_to_data(evolve(fast, epochs=1, ema_epochs=1), 2000)
    assert one.ema == 0 and any("averaging off" in n for n in notes)


def test_the_fast_recipe_learns_on_a_small_run_and_reports_its_average(tmp_path):
    """The README's CPU run, shrunk: the fast recipe's averaged weights must not be the initial ones."""
    data_dir = write_cifar_folder(tmp_path / "d", n_train=400, n_test=100)
    config = TrainConfig(model="custom_resnet", recipe="fast", epochs=2, data_dir=str(data_dir), workers=0)
    result = train_run(config, None, device="cpu", quiet=True)
    trained = result.history.records[-1]["test_acc_trained"]
    assert result.accuracy > 30 and trained > 30  # chance is 10%; the colours are easy
    if trained > result.accuracy:
        assert any("below the trained weights" in n for n in result.notes)


def test_max_lr_auto_is_resolved_by_the_run(tiny_data, tmp_path):
    result = train_run(tiny(tiny_data, max_lr="auto", lr_test_steps=20), tmp_path / "run", device="cpu",
                       quiet=True, figures=False)
    assert isinstance(result.config.max_lr, float) and result.config.max_lr == result.lr_test.suggested_lr
    assert (tmp_path / "run" / "lr_finder.png").is_file()
    assert read_checkpoint(tmp_path / "run").requested.max_lr == "auto"


def test_readme_python_example_runs_from_another_folder(tmp_path):
    """The README's "From Python" block, as written, from a folder that is not the clone, data via CIFAR_DIR."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "train_run" in block
    data_dir = write_cifar_folder(tmp_path / "cifar", n_train=200, n_test=50)
    env = {"CIFAR_DIR": str(data_dir), "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1", "MPLBACKEND": "Agg",
           "NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"}
    (tmp_path / "elsewhere").mkdir()
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path / "elsewhere", env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "final test accuracy" in done.stdout


# --- the run folder


def test_a_second_run_into_a_held_folder_is_refused_naming_the_first(tiny_data, tmp_path):
    out = tmp_path / "run"
    held, release = threading.Event(), threading.Event()

    def hold():
        with hold_run_folder(out):
            held.set()
            release.wait(30)

    owner = threading.Thread(target=hold)
    owner.start()
    held.wait(30)
    try:
        code = subprocess.run([sys.executable, "-m", "helpers.train", *cli_args(tiny_data, out)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    finally:
        release.set()
        owner.join()
    assert code.returncode == 2 and "another run is writing into" in code.stderr and "process" in code.stderr
    assert "Traceback" not in code.stderr and not (out / "checkpoint.pt").exists()
    assert train_run(tiny(tiny_data, epochs=1), out, device="cpu", quiet=True, figures=False).status == "trained"


def test_resume_of_a_finished_run_completes_its_missing_outputs_and_clears_stale_temporaries(tiny_data, tmp_path):
    """A process killed after the last checkpoint, before metrics, history and figures; or mid-checkpoint-write."""
    out = tmp_path / "run"
    train_run(tiny(tiny_data, epochs=1), out, device="cpu", quiet=True)
    metrics = json.loads((out / "metrics.json").read_text())
    kept = {name: (out / name).stat().st_mtime_ns for name in ("checkpoint.pt", "gradcam.png", "confusion_matrix.png")}
    for name in ("metrics.json", "history.json", "history.csv", "curves.png"):
        (out / name).unlink()
    stale, mine = out / ".checkpoint.pt.k3x_9abc.tmp", out / ".notes.k3x_9abc.tmp"  # a killed write's; the user's
    stale.write_bytes(b"half a checkpoint")
    mine.write_text("not ours")
    result = train_run(tiny(tiny_data, epochs=1), out, device="cpu", resume=True, quiet=True)
    assert result.status == "finished"
    assert any("missing outputs (history.json, history.csv, metrics.json, curves.png)" in n for n in result.notes)
    assert any("removed 1 temporary file" in n and stale.name in n for n in result.notes)
    assert not stale.exists() and mine.exists()
    assert json.loads((out / "metrics.json").read_text())["test_acc"] == metrics["test_acc"]
    assert len(json.loads((out / "history.json").read_text())["epochs"]) == 1 and (out / "curves.png").is_file()
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # nothing else rewritten
    again = train_run(tiny(tiny_data, epochs=1), out, device="cpu", resume=True, quiet=True)
    assert any("nothing rewritten" in n for n in again.notes)


def test_overwrite_moves_the_old_run_aside_before_the_new_one_writes(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_run(tiny(tiny_data, epochs=1), out, device="cpu", quiet=True, figures=False)
    old = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    interrupted_run(tiny(tiny_data, epochs=3), out, monkeypatch, at_epoch=2, overwrite=True)
    kept = tmp_path / "run-1"
    assert {p.name: p.read_bytes() for p in kept.iterdir() if not p.name.startswith(".")} == old  # all of it
    assert not (kept / ".lock.owner").exists()  # no claim of a live owner travels with it
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {"checkpoint.pt", config_file_name()}
    assert read_checkpoint(out).describe() == "an unfinished run (1/3 epochs)"


def cli_args(tiny_data, out) -> list[str]:
    return ["--model", "depthwise_net", "--epochs", "1", "--batch-size", "20", "--max-lr", "0.05", "--workers", "0",
            "--data-dir", str(tiny_data), "--out", str(out), "--device", "cpu", "--quiet", "--no-figures"]


def interrupted_run(config, out, monkeypatch, at_epoch: int = 2, **run_options) -> None:
    """`config` trained into `out` and stopped by Ctrl-C at the start of epoch `at_epoch`."""
    from helpers import run as run_module
    from helpers import train as train_module

    real = train_module._train_epoch

    def stop(step, loader, epoch, **kw):
        if epoch == at_epoch:
            raise KeyboardInterrupt
        return real(step, loader, epoch, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "_train_epoch", stop)
        with pytest.raises(run_module.RunInterrupted, match=f"--resume {out}"):
            train_run(config, out, device="cpu", quiet=True, figures=False, **run_options)


def test_resume_refuses_other_data_and_accepts_a_copy(tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted_run(tiny(tiny_data), out, monkeypatch)
    grown = write_cifar_folder(tmp_path / "grown", n_train=200, n_test=50)
    with pytest.raises(RunError, match="other data .*100 train images then, 200 now"):
        train_run(tiny(grown), out, device="cpu", resume=True, quiet=True)
    other = write_cifar_folder(tmp_path / "other", n_train=100, n_test=50, seed=1)
    with pytest.raises(RunError, match="other train images"):
        train_run(tiny(other), out, device="cpu", resume=True, quiet=True)
    assert read_checkpoint(out).epoch == 1  # nothing trained on the wrong data
    copy = write_cifar_folder(tmp_path / "copy", n_train=100, n_test=50)  # the same images, elsewhere
    assert train_run(tiny(copy), out, device="cpu", resume=True, quiet=True, figures=False).status == "resumed"


def test_resume_true_refuses_a_run_of_other_settings(tiny_data, tmp_path):
    out = tmp_path / "run"
    train_run(tiny(tiny_data, epochs=1), out, device="cpu", quiet=True, figures=False)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(RunError, match="other settings: epochs 3"):
        train_run(tiny(tiny_data, epochs=3), out, device="cpu", resume=True, quiet=True)
    with pytest.raises(RunError, match="already holds a finished run"):
        train_run(tiny(tiny_data, epochs=1), out, device="cpu", quiet=True)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_init_from_starts_a_new_run_from_trained_weights(tiny_data, tmp_path):
    first = train_run(tiny(tiny_data, epochs=1), tmp_path / "a", device="cpu", quiet=True, figures=False)
    second = train_run(tiny(tiny_data, epochs=1), tmp_path / "b", device="cpu", quiet=True, figures=False,
                       init_from=tmp_path / "a")
    assert second.status == "trained" and any("init_from" in n for n in second.notes)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["init_from"] == str(tmp_path / "a")
    assert read_checkpoint(tmp_path / "b").init_from == str(tmp_path / "a")
    assert second.history.train_loss[0] < first.history.train_loss[0]  # it starts trained
    with pytest.raises(RunError, match="checkpoint of 'depthwise_net', not 'resnet18'"):
        train_run(TrainConfig(model="resnet18", epochs=1, data_dir=str(tiny_data)), tmp_path / "c", device="cpu",
                  init_from=tmp_path / "a", quiet=True)


# --- checkpoints that are not what they claim


@pytest.fixture
def finished_checkpoint(tiny_data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    train_run(tiny(tiny_data, epochs=1), out, device="cpu", quiet=True, figures=False)
    return torch.load(out / "checkpoint.pt", weights_only=True)  # the file as it is, to damage


@pytest.mark.parametrize("damage", [
    lambda s: s.pop("config"), lambda s: s.pop("model_state"), lambda s: s.update(config={"epochs": "many"}),
    lambda s: s.update(epoch=7), lambda s: s.update(history=None),
])
def test_damaged_checkpoints_are_one_line_errors(finished_checkpoint, tmp_path, damage, capsys):
    state = dict(finished_checkpoint)
    damage(state)
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "checkpoint.pt")
    assert cli.main(["--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_weights_of_another_architecture_are_refused(finished_checkpoint, tmp_path, tiny_data):
    from helpers.models import build_model

    state = dict(finished_checkpoint)
    state["model_state"] = state["eval_state"] = build_model("custom_resnet").state_dict()
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(RunError, match="another architecture"):
        train_run(tiny(tiny_data, epochs=2), tmp_path / "new", device="cpu", init_from=tmp_path, quiet=True)


# --- the schema


@pytest.mark.parametrize("setting, value", [
    ("amp", "no"), ("nesterov", "no"), ("freeze_bn_weight", "no"), ("channels_last", "no"), ("momentum", True),
    ("lr", math.inf), ("max_lr", math.nan), ("epochs", 2.5), ("epochs", True), ("seed", -1), ("seed", 2**40),
    ("data_dir", 3), ("batch_size", "64"), ("label_smoothing", 1.0), ("tta", "rotate"), ("ema", 1.0),
    ("weight_decay", -1e-4), ("lr_test_steps", 5), ("mode", "fast"),
])
def test_wrong_values_are_config_errors(setting, value):
    with pytest.raises(ConfigError, match=setting):
        TrainConfig(**{setting: value})


def test_values_are_normalised_and_the_config_is_frozen(tmp_path):
    config = TrainConfig(lr=1, max_lr=2, data_dir=tmp_path)
    assert isinstance(config.lr, float) and isinstance(config.max_lr, float) and config.data_dir == str(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 3
    with pytest.raises(ConfigError, match="epochs must be"):
        evolve(config, epochs=0)
    assert TrainConfig().data_dir == str(REPO / "data") or TrainConfig().data_dir.startswith("/")


def test_every_setting_is_a_flag_with_its_choices():
    parser = cli.build_parser()
    flags = {}
    for action in parser._actions:
        flags.setdefault(action.dest, action)  # --compile shares mode's dest
    for f in dataclasses.fields(TrainConfig):
        assert f.name in flags, f.name
        if f.metadata["choices"]:
            assert list(flags[f.name].choices) == list(f.metadata["choices"])
    args = parser.parse_args(["--no-amp", "--tta", "--max-lr", "auto", "--seed", "3"])
    assert cli.given_settings(args) == {"amp": False, "tta": "flip", "max_lr": "auto", "seed": 3}
    assert set(RECIPES["custom_resnet"]["writeup"]) <= set(flags)


def test_an_interrupted_run_says_how_to_resume(tiny_data, tmp_path, monkeypatch):
    from helpers import run as run_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "fit", interrupt)
    with pytest.raises(run_module.RunInterrupted, match="no checkpoint"):
        train_run(tiny(tiny_data), tmp_path / "run", device="cpu", quiet=True)


def test_sigterm_stops_a_command_line_run_with_a_hint(tiny_data, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "helpers.train", *cli_args(tiny_data, out), "--epochs",
                             "200"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").is_file() and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and f"--resume {out}" in err and "Traceback" not in err
    assert read_checkpoint(out).epoch >= 1


def test_python_m_helpers_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "helpers", "train", "--help"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "--init-from" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "helpers.train", "--epochs", "x"], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and bad.stderr.startswith("error:")
    assert Path(REPO / "helpers" / "__main__.py").is_file()


# --- faults: full disks, shared temporary names, interruptions anywhere


def test_a_torch_save_failure_of_any_type_is_one_line_and_keeps_the_last_checkpoint(tiny_data, tmp_path, monkeypatch,
                                                                                    capsys):
    real, calls = torch.save, []

    def fail_second(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:  # epoch 2's checkpoint: what torch.save raises on a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4308")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_second)
    out = tmp_path / "run"
    assert cli.main(cli_args(tiny_data, out) + ["--epochs", "2"]) == 1
    err = capsys.readouterr().err
    assert "could not write" in err and str(out / "checkpoint.pt") in err and "unexpected pos" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if line.startswith("error")]) == 1
    assert read_checkpoint(out).epoch == 1  # the complete one is kept
    assert not list(out.glob(".*.tmp"))


def test_a_history_write_failure_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    import errno

    real = Path.write_text

    def full(self, *args, **kwargs):
        if "history.json" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert cli.main(cli_args(tiny_data, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert "could not write" in err and "history.json" in err and "the disk is full" in err and "Traceback" not in err


def test_two_writers_to_one_path_never_share_a_temporary_file(tmp_path):
    from helpers.utils import atomic_write_text

    target, errors = tmp_path / "checkpoint.pt", []

    def write(who: str):
        for i in range(40):
            try:
                atomic_write_text(target, f"{who} {i} " + "x" * 10_000)
            except Exception as err:  # noqa: BLE001 - counted below
                errors.append(err)

    writers = [threading.Thread(target=write, args=(w,)) for w in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert not errors and target.read_text().endswith("x" * 10_000)  # complete, from one writer
    assert not list(tmp_path.glob(".*.tmp"))


def test_ctrl_c_in_the_lr_range_test_leaves_no_empty_folder(tiny_data, tmp_path, monkeypatch):
    from helpers import run as run_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "lr_range_test", interrupt)
    out = tmp_path / "run"
    with pytest.raises(run_module.RunInterrupted, match="before the first epoch"):
        train_run(tiny(tiny_data, max_lr="auto"), out, device="cpu", quiet=True)
    assert not out.exists()


def test_rank_by_training_puts_the_most_trained_run_first(trained_run, tmp_path):
    """Notebook 05 explains the most trained checkpoint it finds, not the first (a SMOKE run of 200 images)."""
    from helpers.run import rank_by_training

    state = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    state["data"]["train"]["images"] = 5000  # as if trained on 5,000 images
    torch.save(state, bigger / "checkpoint.pt")
    (tmp_path / "damaged.pt").write_bytes(b"not a checkpoint")
    ranked = rank_by_training([trained_run, tmp_path / "absent", tmp_path / "damaged.pt", bigger, trained_run])
    assert [(p, seen) for p, seen, _ in ranked] == [((bigger / "checkpoint.pt").resolve(), 2 * 5000),
                                                   ((trained_run / "checkpoint.pt").resolve(), 2 * 100)]
    assert ranked[0][2] == "depthwise_net (writeup recipe), 2/2 epochs on 5,000 training images"
