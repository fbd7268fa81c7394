"""Training engine and command line: overfitting, AMP, exact resume, NaN stop, determinism, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from helpers import cli, data, train
from helpers.checkpoints import CheckpointWriter
from helpers.data import make_loader
from helpers.models import build_model
from helpers.train import CheckpointError, TrainConfig, TrainingDiverged, evaluate, fit, read_checkpoint

from .conftest import without_time


def small_config(**overrides) -> TrainConfig:
    settings = dict(epochs=3, batch_size=32, max_lr=0.05, amp=False, workers=0)
    return TrainConfig.for_model("depthwise_net", **{**settings, **overrides})


def loaders(arrays, config, seed=0):
    train_arrays, test_arrays = arrays
    return (
        make_loader(train_arrays, batch_size=config.batch_size, train=True, recipe=config.augment, workers=0,
                    seed=seed),
        make_loader(test_arrays, batch_size=64, train=False, workers=0),
    )


def run(arrays, config, *, checkpoint=None, resume=None, model=None):
    torch.manual_seed(config.seed)
    model = model or build_model(config.model)
    return fit(model, *loaders(arrays, config), config, device="cpu", checkpoint=checkpoint, resume=resume,
               quiet=True), model


def test_one_batch_overfits(tiny_arrays):
    """20 images, 60 full-batch Adam steps: memorised, in train mode and in eval mode (BN running statistics).

    Margins, not exact values: after 40 steps one machine reached 95% and another 100%; here train accuracy is
    100% from about step 30 and the eval loss falls from 2.3 to about 0.13."""
    one_batch = data.CifarArrays(tiny_arrays[0].images[:20], tiny_arrays[0].labels[:20], tiny_arrays[0].classes)
    config = TrainConfig.for_model("depthwise_net", epochs=60, batch_size=20, optimizer="adam", lr=3e-3, l1=0.0,
                                   scheduler="none", weight_decay=0.0, augment="none", amp=False)
    history, model = run((one_batch, one_batch), config)
    assert history.train_loss[-1] < 0.1 * history.train_loss[0]
    assert history.train_acc[0] <= 50.0 and history.train_acc[-1] >= 90.0
    assert history.test_loss[-1] < 0.3 * history.test_loss[0] and history.test_acc[-1] >= 90.0


def test_history_records_every_epoch(tiny_arrays):
    history, _ = run(tiny_arrays, small_config(epochs=2))
    assert [r["epoch"] for r in history.records] == [1, 2]
    for r in history.records:
        assert set(train.EPOCH_COLUMNS) <= set(r) and 0 < r["train_seconds"] <= r["seconds"]
    assert history.lr[0] == pytest.approx(0.025)  # the depthwise-net write-up: one-cycle from 0.025
    assert history.records[0]["lr_end"] > history.lr[0] > history.records[-1]["lr_end"]  # up, then down


def test_same_seed_gives_identical_history(tiny_arrays):
    a, _ = run(tiny_arrays, small_config(epochs=2))
    b, _ = run(tiny_arrays, small_config(epochs=2))
    assert without_time(a) == without_time(b)


def test_bf16_autocast_path_on_cpu(tiny_arrays):
    few = data.CifarArrays(tiny_arrays[0].images[:16], tiny_arrays[0].labels[:16], tiny_arrays[0].classes)
    config = small_config(epochs=1, batch_size=8, amp=True)
    model = build_model(config.model)
    seen = []
    model.block1[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    history, _ = run((few, few), config, model=model)
    assert torch.bfloat16 in seen
    assert np.isfinite(history.train_loss[0])
    assert train.amp_dtype(torch.device("cpu"), True) is torch.bfloat16
    assert train.amp_dtype(torch.device("cpu"), None) is None  # off by default on the CPU


class StopAtEpoch:
    """A loader that raises KeyboardInterrupt when epoch `stop` begins: an interrupted run."""

    def __init__(self, loader, stop):
        self.loader, self.stop, self.epoch = loader, stop, 0
        self.rng, self.batch_size, self.num_images = loader.rng, loader.batch_size, loader.num_images  # data.Loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.epoch += 1
        if self.epoch == self.stop:
            raise KeyboardInterrupt
        return iter(self.loader)


def test_resume_equals_an_uninterrupted_run(tiny_arrays, tmp_path):
    config = small_config(epochs=4, augment="davidnet")
    full, full_model = run(tiny_arrays, config, checkpoint=tmp_path / "full.pt")

    ckpt = tmp_path / "stopped.pt"
    torch.manual_seed(config.seed)
    train_loader, test_loader = loaders(tiny_arrays, config)
    with pytest.raises(KeyboardInterrupt):
        fit(build_model(config.model), StopAtEpoch(train_loader, 3), test_loader, config, device="cpu",
            checkpoint=ckpt, quiet=True)
    assert read_checkpoint(ckpt).epoch == 2

    resumed, resumed_model = run(tiny_arrays, config, checkpoint=ckpt, resume=ckpt)
    assert without_time(resumed) == without_time(full)
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


class NanAfter(nn.Module):
    """Wraps a model; from the `after`-th training forward on, its output is NaN."""

    def __init__(self, model, after):
        super().__init__()
        self.model, self.after, self.calls = model, after, 0

    def forward(self, x):
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                out = out * float("nan")
        return out


def test_nan_loss_stops_with_epoch_step_and_lr_and_keeps_last_checkpoint(tiny_arrays, tmp_path):
    config = small_config(epochs=3)
    ckpt = tmp_path / "ckpt.pt"
    model = NanAfter(build_model(config.model), after=5)  # 3 steps per epoch: step 2 of epoch 2
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 2 \(learning rate [0-9.e-]+\).*last good checkpoint"):
        fit(model, *loaders(tiny_arrays, config), config, device="cpu", checkpoint=ckpt, quiet=True)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model_state"].values() if t.is_floating_point())


def test_checkpoint_of_another_model(tiny_arrays, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    run(tiny_arrays, small_config(epochs=1), checkpoint=ckpt)
    other = TrainConfig.for_model("custom_resnet", epochs=2, batch_size=32, max_lr=0.05, amp=False)
    with pytest.raises(CheckpointError, match="checkpoint of 'depthwise_net', not 'custom_resnet'"):
        fit(build_model("custom_resnet"), *loaders(tiny_arrays, other), other, device="cpu", resume=ckpt, quiet=True)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint(tiny_arrays, tmp_path, damage):
    ckpt = tmp_path / "ckpt.pt"
    run(tiny_arrays, small_config(epochs=1), checkpoint=ckpt)
    blob = ckpt.read_bytes()
    ckpt.write_bytes(blob[: len(blob) // 3] if damage == "truncate" else b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(ckpt)


def test_evaluate_returns_per_image_predictions_and_restores_mode(tiny_arrays):
    config = small_config()
    model = build_model(config.model).train()
    _, test_loader = loaders(tiny_arrays, config)
    result = evaluate(model, test_loader, device="cpu", tta=True)
    n = len(tiny_arrays[1])
    assert result.predictions.shape == result.confidences.shape == result.targets.shape == (n,)
    assert result.probabilities.shape == (n, 10)
    np.testing.assert_array_equal(result.targets, tiny_arrays[1].labels)
    np.testing.assert_allclose(result.confidences, result.probabilities.max(1), rtol=1e-6)
    assert result.accuracy == pytest.approx(100 * np.mean(result.predictions == result.targets))
    assert result.tta_accuracy is not None
    wrong = result.misclassified
    assert np.all(np.diff(result.confidences[wrong]) <= 0)
    assert model.training


# --- command line


def exit_code(argv) -> int:
    """The CLI's exit status: a parse error exits (SystemExit), a later mistake returns."""
    try:
        return cli.main(argv)
    except SystemExit as exit_info:
        return exit_info.code


def test_cli_trains_and_writes_outputs(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["--model", "depthwise_net", "--epochs", "2", "--batch-size", "32", "--max-lr", "0.05",
                       "--data-dir", str(tiny_data), "--out", str(out), "--device", "cpu", "--workers", "0",
                       "--no-figures"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| Epoch |" in printed.replace("  ", "") or "Epoch" in printed
    assert "TestAcc" in printed
    for name in ("history.json", "history.csv", "checkpoint.pt", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and len(metrics["epoch_seconds"]) == 2
    assert 0 < metrics["train_seconds"] <= metrics["total_seconds"]
    assert metrics["settings"]["max_lr"] == 0.05 and metrics["settings"]["model"] == "depthwise_net"
    assert {"test_acc", "total_seconds", "device", "torch", "data_dir"} <= set(metrics)

    # the run is not overwritten by accident, and it can be continued
    assert exit_code(["--model", "depthwise_net", "--data-dir", str(tiny_data), "--out", str(out)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err

    # resuming a finished run trains nothing more, rewrites nothing and says what to do instead
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert cli.main(["--resume", str(out / "checkpoint.pt"), "--out", str(out), "--device", "cpu",
                       "--no-figures", "--quiet"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    captured = capsys.readouterr()
    assert "nothing left to train" in captured.out and "--init-from" in captured.out
    assert f"{metrics['test_acc']:.2f}%" in captured.out  # its accuracy, evaluated again


def test_recipe_defaults_follow_the_seeds():
    config = TrainConfig.for_model("custom_resnet")
    assert (config.epochs, config.batch_size, config.optimizer, config.momentum, config.weight_decay) == (
        24, 512, "sgd", 0.9, 5e-4)
    assert config.scheduler == "onecycle" and config.label_smoothing == 0.1 and config.amp is None
    assert config.recipe == "writeup" and config.start_lr == pytest.approx(0.045)
    assert TrainConfig.for_model("depthwise_net").l1 == 5e-4
    writeup = TrainConfig(model="resnet18", recipe="writeup")
    assert (writeup.optimizer, writeup.batch_size, writeup.max_lr, writeup.lr) == ("adam", 128, "auto", 1e-5)
    assert TrainConfig(model="resnet18").recipe == "fast"  # measured better: the default


@pytest.mark.parametrize("argv", [
    ["--epochs", "0"], ["--model", "vgg"], ["--max-lr", "-1"], ["--max-lr", "fast"], ["--batch-size", "x"],
    ["--optimizer", "rmsprop"], ["--weight-decay", "-0.1"], ["--augment", "mixup"], ["--device", "tpu"],
    ["--subset-train", "5"], ["--workers", "-1"],
])
def test_invalid_flags_exit_2(argv, capsys):
    assert exit_code(argv + ["--out", "/nonexistent/never/written"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1  # one line, no usage text


def test_cli_missing_data_without_network(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "_download", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    code = cli.main(["--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "empty").exists()  # nothing left behind


# --- real data (../shared's CIFAR-10, JPEG copy): skipped when absent


@pytest.mark.slow
def test_the_readmes_cpu_advice_learns_on_real_data(shared_cifar, tmp_path, capsys):
    """`--epochs 2 --subset-train 2000 --subset-test 1000` with nothing else: the small-run batch makes it learn."""
    out = tmp_path / "real"
    code = cli.main(["--model", "custom_resnet", "--epochs", "2", "--subset-train", "2000", "--subset-test", "1000",
                     "--data-dir", str(shared_cifar), "--out", str(out), "--device", "cpu", "--no-figures",
                     "--quiet"])
    assert code == 0
    assert "using batch 64" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_images"] == 2000 and metrics["test_images"] == 1000
    assert metrics["settings"]["batch_size"] == 64
    assert metrics["test_acc"] > 25.0  # chance is 10%; batch 512 (3 steps an epoch) stays near it


def test_one_cycle_with_a_one_step_warm_up(tiny_arrays):
    """4 steps at pct_start 0.25: a zero-length phase on which torch's OneCycleLR divides by zero."""
    config = small_config(epochs=1, batch_size=25, pct_start=0.25)  # 100 images: 4 steps
    history, _ = run(tiny_arrays, config)
    assert len(history) == 1 and np.isfinite(history.train_loss[0])


def test_checkpoint_writer_snapshots_the_state_and_reports_errors(tmp_path):
    writer = CheckpointWriter()
    weights, records = torch.zeros(3), [{"epoch": 1}]
    writer.save(tmp_path / "a.pt", {"w": weights, "history": records})
    weights += 1  # training goes on while the file is written
    records.append({"epoch": 2})
    writer.wait()
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(saved["w"], torch.zeros(3)) and saved["history"] == [{"epoch": 1}]
    writer.save(tmp_path / "no_such_folder" / "b.pt", {"w": weights})
    with pytest.raises(OSError, match="could not write .*no_such_folder"):  # the writer's error, raised here
        writer.wait()
    writer.wait()  # reported once
    assert not list(tmp_path.glob("**/*.tmp"))  # no half-written file left


def test_checkpoint_snapshot_is_one_packed_copy_per_dtype_with_every_value():
    from helpers.checkpoints import _snapshot

    conv = torch.randn(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    state = {"model": {"w": conv, "n": torch.tensor(7)}, "opt": [torch.ones(2), (torch.arange(3), 1.5)],
             "name": "x", "none": None}
    before = conv.clone()
    copy, event = _snapshot(state)
    assert event is None  # nothing came from a GPU
    conv += 1
    assert torch.equal(copy["model"]["w"], before) and int(copy["model"]["n"]) == 7
    assert torch.equal(copy["opt"][0], torch.ones(2)) and torch.equal(copy["opt"][1][0], torch.arange(3))
    assert copy["opt"][1][1] == 1.5 and copy["name"] == "x" and copy["none"] is None
    # one buffer per dtype: the float32 tensors are views of one storage
    assert copy["model"]["w"].untyped_storage().data_ptr() == copy["opt"][0].untyped_storage().data_ptr()


def test_a_checkpoint_of_the_previous_format_resumes(tiny_arrays, tmp_path):
    """Format 1 (before recipes and modes): optimizer/scheduler/scaler at the top level, config with `compile`."""
    config = small_config(epochs=3)
    full, _ = run(tiny_arrays, config, checkpoint=tmp_path / "new.pt")
    stopped = tmp_path / "old.pt"  # stopped after epoch 2, then rewritten in the old format
    torch.manual_seed(config.seed)
    train_loader, test_loader = loaders(tiny_arrays, config)
    with pytest.raises(KeyboardInterrupt):
        fit(build_model(config.model), StopAtEpoch(train_loader, 3), test_loader, config, device="cpu",
            checkpoint=stopped, quiet=True)
    state = torch.load(stopped, weights_only=True)
    step_state = state.pop("step_state")
    state.update(format=1, optimizer_state=step_state["optimizer"], scheduler_state=step_state["scheduler"],
                 scaler_state=step_state["scaler"])
    old_config = {k: v for k, v in state["config"].items()
                  if k not in ("recipe", "mode", "ema", "ema_epochs", "bias_lr_scale", "freeze_bn_weight", "tta")}
    state["config"] = old_config | {"compile": False, "tta": False}
    for key in ("eval_state", "warmup_seconds", "mode"):
        state.pop(key)
    torch.save(state, stopped)
    saved = read_checkpoint(stopped).config
    assert saved.mode == "auto" and saved.tta == "none" and saved.recipe == "writeup"
    resumed, _ = run(tiny_arrays, saved, checkpoint=stopped, resume=stopped)
    assert without_time(resumed) == without_time(full)
