"""Data sets beyond CIFAR-10 and the validation split: CIFAR-100 in its official pickled layout, a folder of your
own images (ImageFolder layout, any sizes, cached as arrays), bad folders as one-line errors naming the file, and
--val-split (a seeded class-balanced choice kept by resume; the test set evaluated once, at the end). Every data
set is made on the fly."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from helpers import cli, data
from helpers.checkpoints import read_checkpoint
from helpers.config import ConfigError, TrainConfig
from helpers.run import RunError, train_run

from .conftest import FOLDER_CLASSES, write_cifar100_folder, write_image_folder

TINY = dict(model="depthwise_net", epochs=1, batch_size=8, max_lr=0.05, amp=False, workers=0)


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory) -> Path:
    return write_cifar100_folder(tmp_path_factory.mktemp("c100"), n_train=100, n_test=100)  # one image per class


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("imgs") / "photos")


def folder_config(images: Path, cache: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "dataset": f"folder:{images}", "data_dir": str(cache), **overrides})


# --- CIFAR-100


def test_cifar100_reads_the_official_layout_with_fine_labels(cifar100):
    train = data.load_dataset("cifar100", cifar100, train=True, download=False)
    test = data.load_dataset("cifar100", cifar100 / "cifar-100-python", train=False, download=False)
    assert train.images.shape == (100, 32, 32, 3) and train.images.dtype == np.uint8
    assert len(test) == 100 and len(train.classes) == 100 and train.classes[7] == "class_07"
    assert train.labels.max() == 99 and set(np.unique(train.labels)) == set(range(100))  # fine, not coarse (20)
    with open(cifar100 / "cifar-100-python" / "train", "rb") as f:  # the pixels are the file's, channel-major rows
        entry = pickle.load(f, encoding="bytes")
    assert np.array_equal(train.images[3].transpose(2, 0, 1).reshape(-1), entry[b"data"][3])


def test_cifar100_pickle_is_read_by_the_restricted_unpickler(cifar100, tmp_path):
    import shutil

    shutil.copytree(cifar100 / "cifar-100-python", tmp_path / "cifar-100-python")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({"data": Evil()}, f)
    with pytest.raises(data.DataError, match="forbidden object"):
        data.load_cifar100(tmp_path, download=False)


def test_cifar100_missing_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(data.DataError, match="No CIFAR-100 .*cifar-100-python"):
        data.load_cifar100(tmp_path, download=False)


# --- an image folder


def test_a_folder_of_mixed_images_becomes_cached_arrays(images, tmp_path, monkeypatch):
    train = data.load_dataset(f"folder:{images}", tmp_path, train=True)
    test = data.load_dataset(f"folder:{images}", tmp_path, train=False)
    assert train.classes == sorted(FOLDER_CLASSES) and train.images.shape[1:] == (32, 32, 3)
    # a class-balanced held-out test split: the same share of each class, disjoint from training
    assert np.bincount(test.labels).tolist() == [2, 2, 2] and len(train) + len(test) == 36
    assert not {a.tobytes() for a in train.images} & {a.tobytes() for a in test.images}
    # the colour of each class survives the resize (PNG, JPEG, RGBA on white, any size)
    for c, name in enumerate(train.classes):
        mean = train.images[train.labels == c].reshape(-1, 3).mean(0)
        assert np.abs(mean - FOLDER_CLASSES[name]).max() < 40, (name, mean)
    cached = list((tmp_path / "folder-cache").glob("*.npz"))
    assert len(cached) == 1
    with np.load(cached[0], allow_pickle=False) as saved:  # a safe format: arrays only
        assert saved["images"].shape == (36, 32, 32, 3)

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(data, "read_image_file", no_decoding)
    again = data.load_dataset(f"folder:{images}", tmp_path, train=True)
    assert np.array_equal(again.images, train.images) and again.classes == train.classes


def test_a_changed_folder_is_read_again(tmp_path):
    root = write_image_folder(tmp_path / "photos", per_class=4)
    first = data.load_image_folder(root, data_dir=tmp_path / "cache")
    extra = root / "sky" / "sky_0.png"
    os.utime(extra, ns=(extra.stat().st_atime_ns, extra.stat().st_mtime_ns + 10**9))
    (root / "sky" / "sky_1.jpg").unlink()
    second = data.load_image_folder(root, data_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "folder-cache").glob("*.npz"))) == 2
    assert len(second) < len(first)


def test_train_and_test_subfolders_are_used_as_given(tmp_path):
    root = write_image_folder(tmp_path / "split", split=True)
    train = data.load_image_folder(root, train=True, data_dir=tmp_path)
    test = data.load_image_folder(root, train=False, data_dir=tmp_path)
    assert (len(train), len(test)) == (24, 12) and test.classes == sorted(FOLDER_CLASSES)


def _bad(root: Path, kind: str) -> tuple[Path, str]:
    write_image_folder(root, per_class=3)
    if kind == "empty class":
        (root / "stone").mkdir()
        return root, "class folder .*stone has no images"
    if kind == "non-image file":
        (root / "leaf" / "notes.txt").write_text("not a picture")
        return root, "leaf/notes.txt is not an image file"
    if kind == "one class only":
        import shutil

        for name in ("leaf", "sky"):
            shutil.rmtree(root / name)
        return root, "only one class folder \\(berry\\)"
    if kind == "unreadable file":
        (root / "sky" / "sky_0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        return root, "sky/sky_0.png (is not an image|could not be decoded)"
    if kind == "decompression bomb":
        from PIL import Image

        Image.new("1", (9000, 9000)).save(root / "berry" / "huge.png")  # 81 million pixels in a few kB
        return root, "berry/huge.png is 9000x9000 pixels"
    if kind == "test without train":
        (root / "test").mkdir()
        return root, "has test/ but no train/"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["empty class", "non-image file", "one class only", "unreadable file",
                                  "decompression bomb", "test without train"])
def test_a_bad_folder_is_a_one_line_error_naming_the_file(tmp_path, kind, capsys):
    root, message = _bad(tmp_path / "photos", kind)
    with pytest.raises(data.DataError, match=message):
        data.load_image_folder(root, data_dir=tmp_path / "cache")
    argv = ["--dataset", f"folder:{root}", "--data-dir", str(tmp_path / "cache"), "--epochs", "1", "--out",
            str(tmp_path / "run"), "--device", "cpu", "--quiet"]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.splitlines()  # the error alone (the note that the folder is being read: stdout)
    assert err[-1].startswith("error: ") and re.search(message, err[-1]) and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_a_class_name_with_control_characters_is_refused_escaped(tmp_path):
    root = write_image_folder(tmp_path / "photos", per_class=3)
    (root / "sky").rename(root / "sky\x1b[31m")
    with pytest.raises(data.DataError) as err:
        data.load_image_folder(root, data_dir=tmp_path)
    assert "\x1b" not in str(err.value) and "\\x1b[31m" in str(err.value)


def test_dataset_values_are_checked_and_folders_kept_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrainConfig(dataset="folder:photos").dataset == f"folder:{tmp_path / 'photos'}"
    for bad in ("cifar1000", "folder:", "imagenet"):
        with pytest.raises(ConfigError, match="dataset must be cifar10, cifar100 or folder:PATH"):
            TrainConfig(dataset=bad)


# --- normalisation and class names follow the data set


def test_normalisation_is_the_training_images_and_cifar10_keeps_its_constants(tiny_arrays, images, tmp_path):
    assert data.normalization("cifar10", tiny_arrays[0]) == (data.CIFAR10_MEAN, data.CIFAR10_STD)
    train = data.load_image_folder(images, data_dir=tmp_path)
    mean, std = data.normalization(f"folder:{images}", train)
    pixels = train.images.reshape(-1, 3) / 255.0
    assert np.allclose(mean, pixels.mean(0), atol=1e-4) and np.allclose(std, pixels.std(0), atol=1e-4)


# --- the validation split


def test_validation_indices_are_class_balanced_seeded_and_disjoint(tiny_arrays):
    train = tiny_arrays[0]
    picked = data.validation_indices(train, 20, seed=3)
    assert np.array_equal(picked, data.validation_indices(train, 20, seed=3))
    assert not np.array_equal(picked, data.validation_indices(train, 20, seed=4))
    assert np.bincount(train.labels[picked], minlength=10).tolist() == [2] * 10
    kept, val = data.split_validation(train, picked)
    assert len(kept) == 80 and len(val) == 20
    with pytest.raises(data.DataError, match="at least 10"):
        data.validation_indices(train, 5)
    with pytest.raises(data.DataError, match="a class has only 10"):
        data.validation_indices(train, 100)


def test_a_run_with_a_validation_split_selects_on_it_and_tests_once(tiny_data, tmp_path, monkeypatch):
    from helpers import train as train_module

    config = TrainConfig(**{**TINY, "epochs": 2, "data_dir": str(tiny_data), "val_split": 20,
                            "scheduler": "plateau", "lr": 0.01, "loader": "gpu"})  # GpuLoader runs on the CPU too
    seen = []  # the arrays every evaluation ran on
    real = train_module.evaluate_on_device  # every evaluation's (fit's per epoch, and evaluate's) one way in

    def spy(model, loader, **kw):
        seen.append(loader.num_images)
        return real(model, loader, **kw)

    monkeypatch.setattr(train_module, "evaluate_on_device", spy)
    result = train_run(config, tmp_path / "run", device="cpu", quiet=True, figures=False)
    assert seen == [20, 20, 50]  # each epoch on the 20 validation images, the 50 test images once, at the end
    assert "val_acc" in result.history.records[0] and "test_acc" not in result.history.records[0]
    assert len(result.train_arrays) == 80 and len(result.val_arrays) == 20
    assert result.accuracy == result.evaluation.accuracy and len(result.evaluation.targets) == 50
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["selected_on"] == "validation split" and metrics["val_acc"] == result.history.val_acc[-1]
    assert metrics["test_acc"] == result.accuracy and metrics["val_images"] == 20
    ckpt = read_checkpoint(tmp_path / "run")
    assert list(ckpt.val_indices) == data.validation_indices(
        data.load_cifar10(tiny_data, download=False), 20, seed=0).tolist()


def test_resume_keeps_the_validation_split_of_the_checkpoint(tiny_data, tmp_path, monkeypatch):
    from helpers import data as data_module

    from .test_run import interrupted_run

    config = TrainConfig(**{**TINY, "epochs": 2, "data_dir": str(tiny_data), "val_split": 20})
    interrupted_run(config, tmp_path / "run", monkeypatch)
    saved = read_checkpoint(tmp_path / "run").val_indices

    def moved(train, n, *, seed=0):  # a later version choosing differently must not move a run's split
        return np.arange(n)

    monkeypatch.setattr(data_module, "validation_indices", moved)
    resumed = train_run(config, tmp_path / "run", device="cpu", resume=True, quiet=True, figures=False)
    assert resumed.status == "resumed" and read_checkpoint(tmp_path / "run").val_indices == saved
    monkeypatch.undo()
    uninterrupted = train_run(config, tmp_path / "whole", device="cpu", quiet=True, figures=False)
    assert resumed.history.val_loss == uninterrupted.history.val_loss  # resume is exact, on the same split


# --- a 1-epoch run on each kind, from the command line, Python and a sweep


@pytest.mark.parametrize("kind", ["cifar100", "folder"])
def test_a_one_epoch_run_on_each_data_set_from_the_command_line_and_python(kind, cifar100, images, tmp_path,
                                                                             capsys):
    dataset, data_dir = ("cifar100", cifar100) if kind == "cifar100" else (f"folder:{images}", tmp_path / "cache")
    argv = ["--model", "depthwise_net", "--epochs", "1", "--batch-size", "8", "--max-lr", "0.05", "--no-amp",
            "--workers", "0", "--dataset", dataset, "--data-dir", str(data_dir), "--out", str(tmp_path / "cli"),
            "--device", "cpu", "--quiet"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out  # a note, not an error: stdout
    assert out.count("recipe was tuned on CIFAR-10") == 1 and "--max-lr auto" in out
    classes = 100 if kind == "cifar100" else 3
    ckpt = read_checkpoint(tmp_path / "cli")
    assert len(ckpt.classes) == classes and ckpt.weights["head.1.weight"].shape[0] == classes
    assert ckpt.mean != data.CIFAR10_MEAN
    assert (tmp_path / "cli" / "confusion_matrix.png").is_file() and (tmp_path / "cli" / "gradcam.png").is_file()
    result = train_run(TrainConfig(**{**TINY, "dataset": dataset, "data_dir": str(data_dir)}), tmp_path / "py",
                       device="cpu", quiet=True, figures=False)
    assert result.evaluation.probabilities.shape[1] == classes
    # the same settings make the same run from either
    assert result.accuracy == json.loads((tmp_path / "cli" / "metrics.json").read_text())["test_acc"]
    assert result.history.train_loss == [r["train_loss"] for r in json.loads(
        (tmp_path / "cli" / "history.json").read_text())["epochs"]]


def test_a_sweep_on_cifar100_runs(cifar100, tmp_path):
    from helpers.sweep import run_sweep

    base = TrainConfig(**{**TINY, "dataset": "cifar100", "data_dir": str(cifar100)})
    rows = run_sweep(base, {"max_lr": [0.05]}, tmp_path / "sweep", engine="local", progress=False, device="cpu",
                     figures=False)
    assert rows[0]["status"] == "trained" and rows[0]["val_acc"] is None and 0 <= rows[0]["test_acc"] <= 100
    assert len(read_checkpoint(rows[0]["trial_dir"]).classes) == 100


def test_a_sweep_over_a_folder_selects_on_the_validation_split(images, tmp_path):
    from helpers.sweep import peak_sweep, run_sweep

    base = folder_config(images, tmp_path / "cache", val_split=6)
    rows = run_sweep(base, {"max_lr": [0.01, 0.05]}, tmp_path / "sweep", engine="local", progress=False,
                     device="cpu", figures=False)
    assert [r["status"] for r in rows] == ["trained", "trained"]
    assert all(r["val_acc"] is not None and r["test_acc"] is not None for r in rows)
    assert "val_acc" in (tmp_path / "sweep" / "results.csv").read_text().splitlines()[0]
    row = peak_sweep(base, tmp_path / "peaks", peaks=(0.01, 0.05), device="cpu", figures=False, progress=False)
    assert row["selected_on"] == "validation split"
    trials = [json.loads(p.read_text()) for p in sorted((tmp_path / "peaks" / "trials").glob("*/trial.json"))]
    assert sorted(r["final_acc"] for r in row["runs"].values()) == sorted(t["val_acc"] for t in trials)
    assert row["best_swept_acc"] == max(t["val_acc"] for t in trials)


def test_predict_on_a_folder_trained_run_names_one_of_its_classes(images, tmp_path, capsys):
    from helpers import predict

    train_run(folder_config(images, tmp_path / "cache"), tmp_path / "run", device="cpu", quiet=True, figures=False)
    capsys.readouterr()  # the run's notes (stdout) before predict's lines
    photo = next((images / "leaf").glob("*.jpg"))
    assert predict.main([str(tmp_path / "run"), str(photo), "--top", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    named = [line.split()[0] for line in out[2:5]]
    assert sorted(named) == sorted(FOLDER_CLASSES)  # all three classes, and no CIFAR-10 name
    assert predict.predict(tmp_path / "run", photo, top=1)[0][0] in FOLDER_CLASSES
    # the demo page names the folder's classes and offers one of its test images per class
    from helpers import demo

    predictor = predict.load_predictor(tmp_path / "run", device="cpu")
    assert "It knows 3 classes (berry, leaf, sky)" in demo.headline(predictor)
    (tmp_path / "examples").mkdir()
    paths, labels = demo.example_images(predictor, tmp_path / "examples")
    assert labels == sorted(FOLDER_CLASSES) and len(paths) == 3


def test_figures_stay_readable_at_100_classes():
    from helpers.plots import MAX_LABELLED_CLASSES, plot_confusion_matrix, plot_per_class_accuracy
    from helpers.train import EvalResult

    rng = np.random.default_rng(0)
    targets = np.repeat(np.arange(100), 5)
    predictions = np.where(rng.random(500) < 0.6, targets, rng.integers(0, 100, 500))
    result = EvalResult(1.0, 100.0 * (predictions == targets).mean(), predictions, np.ones(500, np.float32), targets,
                        np.zeros((500, 100), np.float32))
    classes = [f"c{i}" for i in range(100)]
    fig = plot_confusion_matrix(result, classes)
    assert len(fig.axes[0].texts) == 0  # no 10,000 numbers
    fig = plot_per_class_accuracy(result, classes)
    assert len(fig.axes[0].patches) == MAX_LABELLED_CLASSES and "worst" in fig.axes[0].get_title()


def test_a_resumed_folder_run_refuses_a_changed_folder(tmp_path, monkeypatch):
    from .test_run import interrupted_run

    root = write_image_folder(tmp_path / "photos", per_class=6)
    config = folder_config(root, tmp_path / "cache", epochs=2)
    interrupted_run(config, tmp_path / "run", monkeypatch)
    write_image_folder(root, per_class=6, seed=1)  # the same names, other pixels
    with pytest.raises(RunError, match="other data"):
        train_run(config, tmp_path / "run", device="cpu", resume=True, quiet=True)


def test_data_figures_take_any_class_count(cifar100):
    from helpers.plots import MAX_LABELLED_CLASSES, plot_class_grid, plot_dataset_stats

    train = data.load_cifar100(cifar100, download=False)
    assert len(plot_class_grid(train, per_class=2).axes) == MAX_LABELLED_CLASSES * 2
    assert len(plot_dataset_stats(train).axes[0].patches) == 100


@pytest.mark.slow
def test_notebook_01_takes_a_dataset_parameter(images, tmp_path):
    papermill = pytest.importorskip("papermill")
    from .conftest import REPO

    out = tmp_path / "out"
    os.environ["SMOKE"] = "1"
    try:
        papermill.execute_notebook(str(REPO / "notebooks" / "01_data_exploration.ipynb"), str(tmp_path / "01.ipynb"),
                                   parameters={"DATA_DIR": str(tmp_path / "cache"), "DATASET": f"folder:{images}",
                                               "OUT_DIR": str(out)},
                                   cwd=str(REPO), kernel_name="python3", progress_bar=False, execution_timeout=600)
    finally:
        os.environ.pop("SMOKE", None)
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == f"folder:{images}" and results["classes"] == sorted(FOLDER_CLASSES)
    assert results["train_images"] + results["test_images"] == 36
    assert (out / "class_grid.png").stat().st_size > 1000
