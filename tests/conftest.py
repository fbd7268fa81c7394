"""Shared fixtures: a tiny CIFAR-10 folder in the official pickled layout, so the real loading code runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar_folder(root: Path, *, n_train: int = 100, n_test: int = 50, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py with random images whose colour depends on the class (learnable).

    Same layout as the official files: five data_batch_k and test_batch pickles of {'data': uint8 (N, 3072)
    channel-major rows, 'labels': list[int], ...} and batches.meta with 'label_names'.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    palette = rng.integers(30, 225, size=(10, 3))

    def make(n: int):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        noise = rng.integers(-30, 30, size=(n, 32, 32, 3))
        images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        return images, labels

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        entry = {"batch_label": name, "labels": [int(v) for v in labels], "data": rows,
                 "filenames": [f"{name}_{i}.png" for i in range(len(images))]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    train_x, train_y = make(n_train)
    for k, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        dump(f"data_batch_{k}", train_x[part], train_y[part])
    dump("test_batch", *make(n_test))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CLASSES, "num_cases_per_batch": n_train // 5, "num_vis": 3072}, f, protocol=2)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A data directory holding a tiny CIFAR-10 (100 train, 50 test images) in the official layout."""
    return write_cifar_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_arrays(tiny_data):
    from helpers.data import load_cifar10

    return load_cifar10(tiny_data, train=True, download=False), load_cifar10(tiny_data, train=False, download=False)


@pytest.fixture(scope="session")
def shared_cifar(tmp_path_factory) -> Path:
    """A class-balanced 2,000/1,000 subset of ../shared's CIFAR-10 (JPEG copy); skipped when it is absent."""
    script = SHARED_DATA / "make_cifar10.py"
    if not script.is_file():
        pytest.skip("../shared/data is absent")
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("shared_cifar")
    subprocess.run([sys.executable, str(script), str(out), "--train", "2000", "--test", "1000"], check=True)
    return out


def without_time(history) -> list[dict]:
    """A History's records without their timings (seconds, train_seconds): what equal runs must share."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in history.records]


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory) -> Path:
    """A finished 2-epoch depthwise_net run folder on tiny_data (checkpoint.pt, metrics.json, history.json)."""
    from helpers import cli

    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["--model", "depthwise_net", "--epochs", "2", "--batch-size", "20", "--max-lr", "0.05",
                     "--device", "cpu", "--workers", "0", "--no-figures", "--quiet", "--data-dir", str(tiny_data),
                     "--out", str(out)]) == 0
    return out


def write_cifar100_folder(root: Path, *, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """Write root/cifar-100-python as the official CIFAR-100 files: 'train' and 'test' pickles of {'data': uint8
    (N, 3072) channel-major rows, 'fine_labels', 'coarse_labels', 'filenames', ...} and 'meta' with
    'fine_label_names' and 'coarse_label_names' (bytes keys, protocol 2, as Python 2 wrote them)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    palette = rng.integers(30, 225, size=(100, 3))

    def dump(name: str, n: int) -> None:
        labels = np.arange(n) % 100
        rng.shuffle(labels)
        noise = rng.integers(-20, 20, size=(n, 32, 32, 3))
        images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        entry = {b"batch_label": name.encode(), b"fine_labels": [int(v) for v in labels],
                 b"coarse_labels": [int(v) // 5 for v in labels],
                 b"data": images.transpose(0, 3, 1, 2).reshape(n, -1),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    dump("train", n_train)
    dump("test", n_test)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class_{i:02d}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super_{i:02d}".encode() for i in range(20)]}, f, protocol=2)
    return root


FOLDER_CLASSES = {"berry": (200, 40, 60), "leaf": (40, 170, 60), "sky": (70, 120, 230)}


def write_image_folder(root: Path, *, per_class: int = 12, split: bool = False, seed: int = 0) -> Path:
    """A folder of PNG and JPEG files of mixed sizes (and modes) in 3 classes whose colour tells them apart:
    root/<class>/*, or root/train/<class>/* and root/test/<class>/* (a third of each class) when `split`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(40, 30), (64, 64), (17, 50), (120, 90), (33, 33)]
    for name, colour in FOLDER_CLASSES.items():
        for i in range(per_class):
            where = root / ("test" if i % 3 == 0 else "train") / name if split else root / name
            where.mkdir(parents=True, exist_ok=True)
            w, h = sizes[i % len(sizes)]
            pixels = np.clip(np.array(colour) + rng.integers(-25, 25, size=(h, w, 3)), 0, 255).astype(np.uint8)
            img = Image.fromarray(pixels)
            if i % 4 == 1:
                img = img.convert("RGBA")  # transparency composited on white, as predict does
            suffix = ".jpg" if i % 2 else ".png"
            (img.convert("RGB") if suffix == ".jpg" else img).save(where / f"{name}_{i}{suffix}")
    return root
# class names a hostile checkpoint or data set could carry: escape sequences (clear the screen, set the window
# title), a newline, HTML and Markdown that would fetch or link, matplotlib math, a path separator, bidi override
HOSTILE_CLASSES = ["\x1b[2J\x1b]0;pwned\x07cat", "dog\nfrog", "<img src=http://127.0.0.1:{port}/x>",
                   "[link](http://127.0.0.1:{port}/y)", "$\\notasymbol{$", "a/b\\c", "\u202eevil", "**bold**",
                   "ship", "truck"]


def hostile_run(trained_run: Path, out: Path, *, port: int = 9, **changes) -> Path:
    """A copy of trained_run whose checkpoint carries HOSTILE_CLASSES (and `changes` on top), as a crafted
    checkpoint would; weights_only-loadable like any checkpoint."""
    import shutil

    import torch

    out.mkdir(parents=True, exist_ok=True)
    state = torch.load(trained_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    state["classes"] = [c.replace("{port}", str(port)) for c in HOSTILE_CLASSES]
    state.update(changes)
    torch.save(state, out / "checkpoint.pt")
    shutil.copy(trained_run / "metrics.json", out / "metrics.json")
    return out
