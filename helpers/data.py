"""The data sets (CIFAR-10, CIFAR-100, your own image folder): loading, statistics, augmentation recipes and loaders.

The one home of the dataset constants. Images stay uint8 (N, 32, 32, 3) until a loader turns a batch into
normalised float tensors (B, 3, 32, 32); labels are int64. `load_dataset(spec, data_dir, train=...)` reads any of
the three (`DATASETS`); an image folder is decoded, cut to its centre square and resized to 32x32 once, then kept
as arrays in a cache beside the CIFAR files, so every loader serves it as it serves CIFAR.

Two loaders hand out the same (images, labels) batches:
- `make_loader`: albumentations recipes through a torch DataLoader (any recipe, CPU workers).
- `GpuLoader`: the whole uint8 set on the device, the same recipes on whole batches with tensor ops (crop, flip,
  affine, gray, cutout); no workers, no per-image Python.
Both read the recipes from one table, `AUGMENTATIONS`, and share one small protocol (`Loader`): `batch_size`,
`num_images` and `rng`, the generator of their order and augmentation (a checkpoint saves its state).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import socket
import tarfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from filelock import FileLock  # a dependency of torch
from PIL import Image, ImageOps, UnidentifiedImageError  # a dependency of torchvision and matplotlib
from torch.utils.data import DataLoader, Dataset, Sampler

from helpers.utils import UserError, atomic_write, safe_text

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for updates on import

# Per-channel mean and std over all 50,000 official training pixels (computed with `channel_stats`).
# Many tutorials copy std (0.2023, 0.1994, 0.2010): that is a different statistic (mean of per-image stds).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# batches.meta's label_names, in label order (checkpoints carry their own; this is the fallback for older ones)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
# CIFAR-100 (same page, same format): one 'train' and one 'test' file, 'fine_labels' (100 classes) and
# 'coarse_labels' (20 superclasses; we train on the fine ones), class names in 'meta' as 'fine_label_names'
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER100 = "cifar-100-python"
DATASETS = ("cifar10", "cifar100", "folder:PATH")  # what TrainConfig.dataset takes


def default_data_dir() -> str:
    """Where CIFAR-10 lives unless a run says otherwise, as an absolute path (the same folder from any working
    directory): $CIFAR_DIR when set, else data/ in the clone this package runs from, else ~/.cache/cifar10."""
    if os.environ.get("CIFAR_DIR"):
        return str(Path(os.environ["CIFAR_DIR"]).expanduser().resolve())
    clone = Path(__file__).resolve().parent.parent
    if (clone / "pyproject.toml").is_file() and (clone / "helpers").is_dir():
        return str(clone / "data")
    return str(Path("~/.cache/cifar10").expanduser())


class DataError(UserError, RuntimeError):
    """The data set's files are missing or unreadable; the message says what to do."""


@dataclass
class CifarArrays:
    """One split in memory: images uint8 (N, 32, 32, 3), labels int64 (N,), class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def take(self, index: np.ndarray) -> CifarArrays:
        """The images at `index` (an int array), in that order."""
        return CifarArrays(self.images[index], self.labels[index], self.classes)

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------------------------
# Reading the official pickled batches, safely


class _BatchUnpickler(pickle.Unpickler):
    """Admits only what the official batch files contain: dicts, lists, strings and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden object {module}.{name}")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(
            f"{path} is not a readable CIFAR-10 batch file ({err}). It is truncated, damaged or something else: "
            f"delete {path.parent} and let helpers download it again, or re-copy it."
        ) from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch file (holds a {type(entry).__name__}, not a dict).")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = _read_pickle(path)
    data, labels = entry.get("data"), entry.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path} is not a CIFAR-10 batch file: 'data' must be uint8 rows of 3072 values.")
    if not _integers(labels):
        raise DataError(f"{path} is not a CIFAR-10 batch file: 'labels' must be a list of integer classes 0..9.")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{path} is not a CIFAR-10 batch file: 'labels' must be {len(data)} classes in 0..9.")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> (N, 32, 32, 3)
    return np.ascontiguousarray(images), labels


def _integers(values) -> bool:
    """Whether `values` is a flat list or array of integers (not strings, floats, booleans or None)."""
    if isinstance(values, np.ndarray):
        return values.ndim == 1 and values.dtype.kind in "iu"
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values)


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - handed back to the caller's thread
        return err


def _download(data_dir: Path, timeout: float, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5) -> None:
    """Fetch and unpack the official archive; fail within `timeout` seconds when there is no network."""
    from torchvision.datasets.utils import check_integrity, download_url  # deferred: torchvision, for a download

    # Probe first, with a deadline on the name lookup too (getaddrinfo ignores socket timeouts): no network
    # must mean a quick, clear error, not a hang.
    lookup: list = []
    probe = threading.Thread(target=lambda: lookup.append(_try(socket.getaddrinfo, "www.cs.toronto.edu", 443)),
                             daemon=True)
    probe.start()
    probe.join(timeout)
    if not lookup:
        raise TimeoutError(f"no answer from DNS within {timeout:.0f} s")
    if isinstance(lookup[0], Exception):
        raise lookup[0]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # urllib has no timeout of its own
    try:
        socket.create_connection(("www.cs.toronto.edu", 443), timeout=timeout).close()
        download_url(url, str(data_dir), md5=md5)
    finally:
        socket.setdefaulttimeout(old)
    archive = data_dir / url.rsplit("/", 1)[-1]
    if not check_integrity(str(archive), md5):
        raise OSError(f"{archive} failed its md5 check")
    with tarfile.open(archive) as tar:
        tar.extractall(data_dir, filter="data")


def find_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = True, timeout: float = 5.0) -> Path:
    """The `cifar-10-batches-py` folder under `data_dir` (or `data_dir` itself when it is that folder),
    downloading the official archive if it is missing. data_dir None: `default_data_dir()`."""
    return _find_official(data_dir, FOLDER, "batches.meta", CIFAR10_URL, CIFAR10_MD5, "CIFAR-10",
                          download=download, timeout=timeout)


def find_cifar100(data_dir: str | os.PathLike | None = None, *, download: bool = True, timeout: float = 5.0) -> Path:
    """The `cifar-100-python` folder under `data_dir` (or `data_dir` itself), downloaded if missing."""
    return _find_official(data_dir, FOLDER100, "meta", CIFAR100_URL, CIFAR100_MD5, "CIFAR-100",
                          download=download, timeout=timeout)


def _find_official(data_dir, name: str, marker: str, url: str, md5: str, what: str, *, download: bool,
                   timeout: float) -> Path:
    data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file: pass the folder that holds (or will hold) "
                        f"'{name}', or that folder itself")
    if data_dir.name == name or (data_dir / marker).is_file():
        return data_dir  # the batches folder itself
    folder = data_dir / name
    if not folder.is_dir() and download:
        created = not data_dir.exists()
        lock = data_dir / ".download.lock"
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(lock)):  # one download for the processes of a run or the trials of a sweep
                if not folder.is_dir():
                    _download(data_dir, timeout, url, md5)
        except Exception as err:  # noqa: BLE001 - any failure means the same advice
            if created and data_dir.is_dir() and {p.name for p in data_dir.iterdir()} <= {lock.name}:
                lock.unlink(missing_ok=True)
                data_dir.rmdir()  # leave nothing behind
            raise DataError(
                f"No {what} in {folder} and the download failed ({type(err).__name__}: {err}). "
                f"Put the official '{name}' folder (from {url}) in {data_dir.resolve()}, "
                f"or pass --data-dir pointing at the folder that contains it."
            ) from None
    if not folder.is_dir():
        raise DataError(
            f"No {what} in {folder}. Put the official '{name}' folder there "
            f"(from {url}) or pass --data-dir pointing at the folder that contains it."
        )
    return folder


def load_cifar10(
    data_dir: str | os.PathLike | None = None, *, train: bool = True, download: bool = True
) -> CifarArrays:
    """Read one split from `data_dir/cifar-10-batches-py` (downloading it if missing) into memory."""
    folder = find_cifar10(data_dir, download=download)
    names = TRAIN_FILES if train else TEST_FILES
    missing = [n for n in names + ("batches.meta",) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}. Re-copy the whole folder.")
    parts = [_read_batch(folder / n) for n in names]
    meta = _read_pickle(folder / "batches.meta")
    names = meta.get("label_names")
    names = names if isinstance(names, (list, tuple)) else []
    classes = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c) for c in names]
    if len(classes) != 10:
        raise DataError(f"{folder / 'batches.meta'} does not list the 10 CIFAR-10 class names.")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return CifarArrays(images, labels, classes)


def load_cifar100(
    data_dir: str | os.PathLike | None = None, *, train: bool = True, download: bool = True
) -> CifarArrays:
    """Read one split of CIFAR-100 from `data_dir/cifar-100-python` (downloading it if missing): its 100 fine
    labels and their names, with the same restricted unpickler as CIFAR-10's batches."""
    folder = find_cifar100(data_dir, download=download)
    name = "train" if train else "test"
    missing = [n for n in (name, "meta") if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}. Re-copy the whole folder.")
    entry = _read_pickle(folder / name)
    data, labels = entry.get("data"), entry.get("fine_labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{folder / name} is not a CIFAR-100 file: 'data' must be uint8 rows of 3072 values.")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),) or (len(labels) and (labels.min() < 0 or labels.max() > 99)):
        raise DataError(f"{folder / name} is not a CIFAR-100 file: 'fine_labels' must be {len(data)} classes "
                        "in 0..99.")
    meta = _read_pickle(folder / "meta")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("fine_label_names", [])]
    if len(classes) != 100:
        raise DataError(f"{folder / 'meta'} does not list the 100 CIFAR-100 class names (fine_label_names).")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> (N, 32, 32, 3)
    return CifarArrays(np.ascontiguousarray(images), labels, classes)


# ---------------------------------------------------------------------------------------------------------
# Your own images: a folder in torchvision's ImageFolder layout
#
# PATH/train/<class>/*.png|jpg|... and PATH/test/<class>/..., or PATH/<class>/... alone, when a share of each
# class (TEST_SHARE, a fixed seeded choice) is held out as the test set. Each image is read as helpers.predict
# reads yours (upright by EXIF, RGB, transparency on white), cut to its centre square and resized to 32x32 with
# Lanczos, once: the arrays are cached in DATA_DIR/folder-cache/ (an .npz, read without pickle), keyed on the
# folder's file list, sizes and modification times, so a changed folder is read again and an unchanged one is not.

SIZE = 32  # the models' input side, px
MAX_PIXELS = 64 * 2**20  # pixels an image may declare before it is decoded (8192 x 8192): a decompression bomb stops
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
TEST_SHARE = 0.2  # share of each class held out as the test set when a folder has no train/ and test/
TEST_SPLIT_SEED = 0  # that choice's seed: the same test images for every run, whatever its --seed
FOLDER_CACHE_VERSION = 1  # bump when the way images become arrays changes
BACKGROUND = (255, 255, 255)  # what transparent pixels become


def to_rgb(img):
    """A PIL image as RGB: gray repeated, 16-bit gray scaled to 8 bits, transparency composited on BACKGROUND."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit gray: PNG 16-bit reads as I or I;16
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        img = Image.fromarray(np.rint(np.clip(a, 0, top) * (255 / top)).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest square in the middle of a width x height image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def square_input(rgb) -> np.ndarray:
    """An RGB PIL image -> uint8 (32, 32, 3): its centre square resized with Lanczos (which spans the whole
    footprint when it shrinks, so a large photo does not alias). Square, because CIFAR photos are square with
    the object in the middle, and squashing a 4:3 photo would distort every shape."""
    return np.asarray(rgb.resize((SIZE, SIZE), Image.Resampling.LANCZOS, box=centre_square(*rgb.size)))


def check_pixels(size: tuple[int, int], name: str, error: type[UserError] = DataError,
                 remedy: str = "shrink it first") -> None:
    """`error` when an image of `size` (width, height) is larger than MAX_PIXELS."""
    if size[0] * size[1] > MAX_PIXELS:
        raise error(f"{name} is {size[0]}x{size[1]} pixels, more than the {MAX_PIXELS / 1e6:.0f} megapixels read "
                    f"safely (the model sees 32x32 anyway): {remedy}")


def open_image(path: str | os.PathLike, error: type[UserError] = DataError,
               remedy: str = "replace it or take it out of the folder") -> Image.Image:
    """Decode an image file fully (a truncated file fails here, not later), upright by its EXIF orientation. The one
    reader of image files (predict's inputs, a folder data set's images): `error` names the
    file when it is a folder, missing, not a regular file, not an image, too large to decode safely, or damaged,
    and ends with `remedy`, what the caller's user should do."""
    path = Path(path).expanduser()
    name = safe_text(path)
    if path.is_dir():
        raise error(f"{name} is a folder, not an image: {remedy}")
    if not path.exists():
        raise error(f"no such file: {name}")
    if not path.is_file():  # a FIFO or a device would block the read or never end it
        raise error(f"{name} is not a regular file (a pipe or a device?): {remedy}")
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: our budget below is smaller, and says what to do
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            check_pixels(img.size, name, error, f"shrink it, or {remedy}")  # from the header, before decoding
            img.load()
            return ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise error(f"{name} is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, TIFF): {remedy}") from None
    except Image.DecompressionBombError:
        raise error(f"{name} has too many pixels to read safely: shrink it, or {remedy}") from None
    except PermissionError:
        raise error(f"cannot read {name}: permission denied") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise error(f"{name} could not be decoded ({safe_text(err)}): the file is damaged or cut short; "
                    f"{remedy}") from None


def read_image_file(path: Path) -> np.ndarray:
    """One image file of a folder data set -> uint8 (32, 32, 3), read as predict reads yours (open_image)."""
    return square_input(to_rgb(open_image(path)))


def _list_classes(folder: Path) -> list[tuple[str, list[Path]]]:
    """[(class name, its image files sorted)] of an ImageFolder split, classes sorted by name; a DataError that
    names the folder or file for an empty class, a file that is not an image, or fewer than two classes."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        found = f"only one class folder ({safe_text(classes[0].name)})" if classes else "no class folders"
        raise DataError(f"{safe_text(folder)} has {found}: a classifier needs at least 2, one folder of images per "
                        f"class ({safe_text(folder)}/<class>/*.png|jpg)")
    listed = []
    for c in classes:
        if not c.name.isprintable():
            raise DataError(f"class folder {safe_text(c)} has control characters in its name: rename it")
        files = sorted(f for f in c.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(c).parts))
        strange = [f for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
        if strange:
            raise DataError(f"{safe_text(strange[0])} is not an image file (expected {', '.join(IMAGE_SUFFIXES)}): "
                            "move it out of the class folder")
        if not files:
            raise DataError(f"class folder {safe_text(c)} has no images: add some or remove the folder")
        listed.append((c.name, files))
    return listed


def _folder_layout(root: Path) -> dict[str, list[tuple[str, list[Path]]]]:
    """{'train': ..., 'test': ...} (PATH/train and PATH/test) or {'all': ...} (class folders in PATH)."""
    if not root.is_dir():
        raise DataError(f"--dataset folder:{safe_text(root)}: no such folder. Pass a folder of class folders "
                        "(PATH/<class>/*.png) or of train/ and test/ class folders")
    train, test = root / "train", root / "test"
    if train.is_dir() or test.is_dir():
        if not (train.is_dir() and test.is_dir()):
            have, lack = ("train", "test") if train.is_dir() else ("test", "train")
            raise DataError(f"{safe_text(root)} has {have}/ but no {lack}/: give both, or put the class folders in "
                            f"{safe_text(root)} itself (a share of each class is then held out for testing)")
        splits = {"train": _list_classes(train), "test": _list_classes(test)}
        names = [[c for c, _ in splits[k]] for k in ("train", "test")]
        if names[0] != names[1]:
            odd = sorted(set(names[0]) ^ set(names[1]))
            raise DataError(f"{safe_text(root)}: train/ and test/ must hold the same class folders; "
                            f"{safe_text(odd[0])} is in one only")
        return splits
    return {"all": _list_classes(root)}


def _folder_key(root: Path, layout) -> str:
    entries = [FOLDER_CACHE_VERSION, SIZE]
    for split, classes in layout.items():
        for name, files in classes:
            for f in files:
                st = f.stat()
                entries.append([split, name, str(f.relative_to(root)), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def _decode_folder(layout) -> dict[str, np.ndarray]:
    images, labels, splits = [], [], []
    for k, classes in enumerate(layout.values()):
        for label, (_, files) in enumerate(classes):
            for f in files:
                images.append(read_image_file(f))
                labels.append(label)
                splits.append(k)
    classes = [name for name, _ in next(iter(layout.values()))]
    return {"images": np.stack(images), "labels": np.asarray(labels, dtype=np.int64),
            "split": np.asarray(splits, dtype=np.int8), "classes": np.asarray(classes, dtype=str),
            "layout": np.asarray(list(layout), dtype=str)}


def folder_arrays(root: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Every image of an ImageFolder-layout folder as arrays (images uint8 (N, 32, 32, 3), labels, split,
    classes, layout), from the cache in data_dir/folder-cache when the folder is unchanged."""
    root = Path(root).expanduser().resolve()
    layout = _folder_layout(root)
    cache_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser() / "folder-cache"
    cache = cache_dir / f"{root.name or 'root'}-{_folder_key(root, layout)}.npz"
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot write the folder's cache into {cache_dir} ({err.strerror or err}): pass a "
                        "--data-dir you can write to") from None
    with FileLock(str(cache) + ".lock"):  # one decoding for the processes of a run or the trials of a sweep
        if cache.is_file():
            try:
                with np.load(cache, allow_pickle=False) as saved:
                    return {k: saved[k] for k in saved.files}
            except (OSError, ValueError, KeyError):
                pass  # damaged: decoded again below
        count = sum(len(files) for classes in layout.values() for _, files in classes)
        print(f"reading {count:,} images of {safe_text(root)} once (resized to {SIZE}x{SIZE}, cached in "
              f"{safe_text(cache_dir)})", flush=True)  # a note, not an error: stdout (Jupyter shows stderr red)
        arrays = _decode_folder(layout)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a temporary name
                np.savez(f, **arrays)

        atomic_write(cache, write)
    return arrays


def held_out_test(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """A bool mask of the images a class-folder-only data set tests on: TEST_SHARE of each class (at least one),
    a fixed seeded choice."""
    rng = np.random.default_rng(TEST_SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        test[rng.permutation(members)[:max(1, round(TEST_SHARE * len(members)))]] = True
    return test


def load_image_folder(root: str | os.PathLike, *, train: bool = True,
                      data_dir: str | os.PathLike | None = None) -> CifarArrays:
    """One split of your own images (ImageFolder layout, any sizes) as 32x32 arrays; class names are the
    folders' names, sorted."""
    saved = folder_arrays(root, data_dir)
    classes = [str(c) for c in saved["classes"]]
    if list(saved["layout"]) == ["all"]:
        counts = np.bincount(saved["labels"], minlength=len(classes))
        if counts.min() < 2:
            raise DataError(f"class folder {safe_text(Path(root) / classes[int(counts.argmin())])} has 1 image: "
                            "holding a share out for testing needs at least 2 of each class (or give train/ and "
                            "test/ folders)")
        keep = held_out_test(saved["labels"], len(classes)) != train
    else:
        keep = saved["split"] == (0 if train else 1)
    return CifarArrays(np.ascontiguousarray(saved["images"][keep]), saved["labels"][keep], classes)


def parse_dataset(spec: str) -> tuple[str, str | None]:
    """('cifar10' | 'cifar100' | 'folder', the folder's path or None) of a TrainConfig.dataset value."""
    if spec in ("cifar10", "cifar100"):
        return spec, None
    kind, sep, path = spec.partition(":")
    if kind == "folder" and sep and path:
        return "folder", path
    raise ValueError(f"unknown data set {spec!r}: choose cifar10, cifar100 or folder:PATH")


def dataset_name(spec: str) -> str:
    """How a data set is named to the user: CIFAR-10, CIFAR-100, or 'the image folder PATH'."""
    kind, path = parse_dataset(spec)
    return {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(kind) or f"the image folder {safe_text(path)}"


def load_dataset(spec: str = "cifar10", data_dir: str | os.PathLike | None = None, *, train: bool = True,
                 download: bool = True) -> CifarArrays:
    """One split of a data set (`DATASETS`): CIFAR-10 or CIFAR-100 from data_dir (downloaded if missing), or an
    image folder (decoded once, cached in data_dir/folder-cache)."""
    kind, path = parse_dataset(spec)
    if kind == "cifar10":
        return load_cifar10(data_dir, train=train, download=download)
    if kind == "cifar100":
        return load_cifar100(data_dir, train=train, download=download)
    return load_image_folder(path, train=train, data_dir=data_dir)


def channel_stats(images: np.ndarray, *, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, H, W, 3) images, in [0, 1] units, rounded to 4 decimals. Summed in
    float64 over chunks of `chunk` images (50,000 at once would take 1.2 GB)."""
    total, squares = np.zeros(images.shape[-1]), np.zeros(images.shape[-1])
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        total += x.sum(0)
        squares += (x * x).sum(0)
    n = max(1, images[..., 0].size)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0))
    return tuple(mean.round(4).tolist()), tuple(std.round(4).tolist())


def normalization(dataset: str, train: CifarArrays) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel, in [0, 1] units, that a run on `dataset` normalises with: CIFAR-10's published
    constants, else the statistics of the training images `train` (after any subset and validation split)."""
    if dataset == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    return channel_stats(train.images)


def balanced_choice(labels: np.ndarray, n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of n // num_classes random images of each class (all of a class that has fewer), in shuffled
    order."""
    per_class = n // num_classes
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)])
    return rng.permutation(keep)


def balanced_subset(arrays: CifarArrays, n: int | None, *, seed: int = 0) -> CifarArrays:
    """A class-balanced random subset of about `n` images (n // classes per class), in shuffled order."""
    if n is None or n >= len(arrays):
        return arrays
    classes = len(arrays.classes)
    if n < classes:
        raise ValueError(f"a class-balanced subset of {classes} classes needs at least {classes} images, got {n}")
    return arrays.take(balanced_choice(arrays.labels, n, classes, np.random.default_rng(seed)))


def validation_indices(train: CifarArrays, n: int, *, seed: int = 0) -> np.ndarray:
    """Which `n` training images (n // classes of each class, seeded) a run holds out for validation, sorted."""
    classes = len(train.classes)
    if n < classes:
        raise DataError(f"--val-split {n}: a class-balanced validation split of {classes} classes needs at least "
                        f"{classes} images (one per class)")
    smallest = int(np.bincount(train.labels, minlength=classes).min())
    if n // classes >= smallest:
        raise DataError(f"--val-split {n} takes {n // classes} images of each class, but a class has only "
                        f"{smallest} training image(s): choose a split below {classes * smallest}")
    # a stream of its own (seed + a constant): the same seed's subset draws must not decide the split too
    rng = np.random.default_rng([seed, 0x5A11D])
    return np.sort(balanced_choice(train.labels, n, classes, rng))


def split_validation(train: CifarArrays, indices) -> tuple[CifarArrays, CifarArrays]:
    """(the training images that stay, the validation images at `indices`), both in the original order."""
    held = np.zeros(len(train), dtype=bool)
    held[np.asarray(indices, dtype=np.int64)] = True
    return train.take(np.flatnonzero(~held)), train.take(np.flatnonzero(held))


def normalize(images, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> torch.Tensor:
    """uint8 images (B, 32, 32, 3), an array or a tensor, -> the normalised float (B, 3, 32, 32) a test loader
    gives (albumentations' Normalize: (pixel - 255 mean) / (255 std), per channel)."""
    x = torch.from_numpy(np.asarray(images, dtype=np.uint8).astype(np.float32))  # a copy: a PIL image's is read-only
    x = (x - torch.tensor(mean) * 255) / (torch.tensor(std) * 255)
    return x.permute(0, 3, 1, 2).contiguous()


def denormalize(x: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> np.ndarray:
    """Normalised (B, 3, H, W) or (3, H, W) tensors back to float images (B, H, W, 3) in [0, 1] for display."""
    x = x.detach().float().cpu()
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = (x * s + m).clamp(0, 1)
    return x.movedim(-3, -1).numpy()


# ---------------------------------------------------------------------------------------------------------
# Augmentation recipes (albumentations 2.0.8)
#
# AUGMENTATIONS is the one description of the recipes: `build_transform` turns an entry into albumentations steps,
# `draw_augmentation` + `augment_batch` (GpuLoader) into batched tensor ops. Every key is optional; the steps run
# in this order, on 32x32 uint8 images:
#   pad     px of reflect padding (cv2 BORDER_REFLECT_101) before a random 32x32 crop: a shift of -pad..pad px
#   flip    probability of a horizontal flip
#   affine  albumentations' Affine about the image centre, with probability p: rotate uniform in +-rotate degrees
#           (positive turns the picture counter-clockwise on screen); scale uniform in (low, high), x and y drawn
#           independently (keep_ratio=False); translate uniform in +-translate x the image side per axis, which
#           albumentations truncates to whole px (0.0625 x 32 = 2: -1, 0, 1 px with probabilities 1/4, 1/2, 1/4);
#           bilinear, reflect-101 border
#   gray    probability of ToGray (its default: OpenCV's RGB -> gray luma 0.299 R + 0.587 G + 0.114 B, 3 channels)
#   hole    (side px, probability): one side x side hole wholly inside the image, filled with the uint8 mean pixel
AUGMENTATIONS: dict[str, dict] = {
    # D. Page's ResNet-9 ("DavidNet") recipe: crop, flip, 8x8 cutout on every image
    "davidnet": dict(pad=4, flip=0.5, hole=(8, 1.0)),
    # the ResNet-18 write-up's: pad to 40, crop 32, flip, a 16x16 hole half the time
    "resnet18": dict(pad=4, flip=0.5, hole=(16, 0.5)),
    # the depthwise-net write-up's: flip, shift-scale-rotate (as Affine), to-gray, a 16x16 hole
    "depthwise": dict(flip=0.5, affine=dict(rotate=15.0, scale=(0.9, 1.1), translate=0.0625, p=0.5), gray=0.5,
                      hole=(16, 0.5)),
    "none": {},  # evaluation: normalise only
}


def build_transform(recipe: str = "none", *, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """An albumentations Compose for a recipe of `AUGMENTATIONS`, ending in Normalize and ToTensorV2 -> float
    (3, 32, 32).

    davidnet: reflect-pad 4, random 32x32 crop, flip, one 8x8 hole (D. Page's ResNet-9 recipe).
    resnet18: pad to 40 (reflect), random crop 32, flip, one 16x16 mean-filled hole half the time (the ResNet-18
    write-up).
    depthwise: flip, shift-scale-rotate (as Affine), to-gray, one 16x16 mean-filled hole (the depthwise-net write-up).
    none: normalise only (evaluation).
    """
    import albumentations as A  # deferred: albumentations and OpenCV (~1 s), for the DataLoader path alone
    import cv2
    from albumentations.pytorch import ToTensorV2

    if recipe not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation recipe {recipe!r}: choose one of {', '.join(AUGMENTATIONS)}")
    spec = AUGMENTATIONS[recipe]
    reflect = cv2.BORDER_REFLECT_101  # numpy/torch 'reflect': the edge pixel is not repeated
    steps = []
    if spec.get("pad"):
        side = 32 + 2 * spec["pad"]
        steps += [A.PadIfNeeded(side, side, border_mode=reflect), A.RandomCrop(32, 32)]
    if spec.get("flip"):
        steps.append(A.HorizontalFlip(p=spec["flip"]))
    if spec.get("affine"):
        a = spec["affine"]
        steps.append(A.Affine(translate_percent=(-a["translate"], a["translate"]), scale=a["scale"],
                              rotate=(-a["rotate"], a["rotate"]), border_mode=reflect, p=a["p"]))
    if spec.get("gray"):
        steps.append(A.ToGray(p=spec["gray"]))
    if spec.get("hole"):
        size, p = spec["hole"]
        fill = tuple(int(round(255 * m)) for m in mean)  # uint8 mean pixel: holes are filled before Normalize
        steps.append(A.CoarseDropout(num_holes_range=(1, 1), hole_height_range=(size, size),
                                     hole_width_range=(size, size), fill=fill, p=p))
    return A.Compose([*steps, A.Normalize(mean=mean, std=std), ToTensorV2()], strict=True)


class AugmentedCifar(Dataset):
    """Arrays + an albumentations recipe. Items are indexed by (index, epoch_seed) pairs from `SeededSampler`.

    albumentations keeps its randomness inside the Compose, and a DataLoader copies that state into every
    worker (afresh each epoch): every worker and every epoch would repeat one sequence. Reseeding the Compose
    per sample from (epoch_seed, index) makes each augmentation a pure function of the run's seed, the epoch
    and the image: different across workers and epochs, identical for any number of workers, and exactly
    reproducible after a resume.
    """

    def __init__(self, arrays: CifarArrays, recipe: str = "none", *, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        self.arrays = arrays
        self.recipe = recipe
        self.mean, self.std = mean, std
        self.transform = build_transform(recipe, mean=mean, std=std)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        index, epoch_seed = item if isinstance(item, tuple) else (item, 0)
        if self.recipe != "none":
            # one shared stream for all steps: Compose.set_random_seed gives every step its own generator with
            # the same seed, so steps of equal probability would decide alike (flip <=> hole, all-or-nothing)
            seed = (epoch_seed * 1_000_003 + index) % 2**32
            self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        image = self.transform(image=self.arrays.images[index])["image"]
        return image, int(self.arrays.labels[index])


class SeededSampler(Sampler):
    """Yields (index, epoch_seed): a fresh permutation and augmentation seed per pass, from one generator.

    Sharded (world_size > 1, `batch` images per process): every process draws the same order from the same
    generator and keeps its slice of each global batch of batch x world_size, whole global batches only, so the N
    slices of a step are one process's batch at the global size. DistributedSampler needs set_epoch to reshuffle;
    this one advances its generator every pass (the same on every process), and a checkpoint saves its state."""

    def __init__(self, n: int, *, shuffle: bool, generator: torch.Generator, rank: int = 0, world_size: int = 1,
                 batch: int = 1):
        self.n, self.shuffle, self.generator = n, shuffle, generator
        self.rank, self.world_size, self.batch = rank, world_size, batch

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n
        return self.n // (self.batch * self.world_size) * self.batch

    def __iter__(self):
        epoch_seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator)) if self.shuffle else 0
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        if self.world_size > 1:  # (steps, world, batch): this process's column of every global batch
            order = order[:len(self) * self.world_size].view(-1, self.world_size, self.batch)[:, self.rank].flatten()
        return ((int(i), epoch_seed) for i in order)


class Loader(Protocol):
    """What fit, the engine and the LR range test know of a loader (both loaders of this module have it)."""

    batch_size: int
    num_images: int  # images per pass
    rng: torch.Generator  # order and augmentation: restoring its state replays the next pass exactly

    def __len__(self) -> int: ...

    def __iter__(self): ...


def steps_per_epoch(images: int, batch: int, *, train: bool = True) -> int:
    """Batches in one pass over `images` at (global) batch `batch`, as both loaders make them: training passes keep
    full batches only (one smaller batch when the set is smaller than a batch), test passes every image."""
    return images // batch if train and images >= batch else -(-images // batch)


class TorchLoader(DataLoader):
    """A DataLoader over `AugmentedCifar` with `SeededSampler`, speaking the `Loader` protocol."""

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    @property
    def rng(self) -> torch.Generator:
        return self.sampler.generator


def _check_shard(images: int, batch: int, world_size: int, train: bool) -> None:
    if world_size > 1 and not train:
        raise ValueError("a test loader is not sharded: every process evaluates the whole test set")
    if world_size > 1 and images < batch * world_size:
        raise ValueError(f"{images:,} training images are fewer than one global batch of {batch * world_size} "
                         f"({world_size} processes x {batch}): use a smaller --batch-size or more data")


def default_workers() -> int:
    """DataLoader workers: one per CPU core, leaving one for the training loop (0 on a single core)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(
    arrays: CifarArrays,
    *,
    batch_size: int = 512,
    train: bool = True,
    recipe: str | None = None,
    workers: int | None = None,
    seed: int = 0,
    pin_memory: bool | None = None,
    rank: int = 0,
    world_size: int = 1,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
) -> TorchLoader:
    """A DataLoader of normalised (B, 3, 32, 32) float batches and (B,) int64 labels.

    Training loaders shuffle, augment with `recipe` and drop the last partial batch; test loaders keep the
    dataset order (so predictions line up with `arrays`) and never augment. The shuffling and augmentation
    stream comes from `loader.rng`, seeded with `seed`. rank/world_size: one process's shard of a training set
    (batch_size per process; see `SeededSampler`). mean, std: the normalisation (`normalization`), [0, 1] units.
    """
    recipe = recipe if train else "none"
    recipe = recipe or "none"
    workers = default_workers() if workers is None else workers
    _check_shard(len(arrays), batch_size, world_size, train)
    generator = torch.Generator().manual_seed(seed)  # the sampler's: order and augmentation, saved by checkpoints
    loader = TorchLoader(
        AugmentedCifar(arrays, recipe, mean=mean, std=std),
        batch_size=batch_size,
        sampler=SeededSampler(len(arrays), shuffle=train, generator=generator, rank=rank, world_size=world_size,
                              batch=batch_size),
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        drop_last=train and len(arrays) >= batch_size,
        # the DataLoader draws worker seeds from its own generator, on some epochs only (persistent workers):
        # a separate one keeps the sampler's stream identical whether or not a run was resumed
        generator=torch.Generator().manual_seed(seed + 1),
    )
    return loader


def augmented_copies(image: np.ndarray, recipe: str, *, n: int, seed: int = 0) -> torch.Tensor:
    """`n` draws of augmentation `recipe` on one uint8 image (32, 32, 3) -> normalised float (n, 3, 32, 32), drawn
    exactly as training draws them: one epoch of a training loader (`make_loader`) over n copies of the image, so
    the steps decide independently, as they do in a run (what notebook 01's preview shows)."""
    copies = CifarArrays(np.repeat(image[None], n, 0), np.zeros(n, np.int64), list(CIFAR10_CLASSES))
    images, _ = next(iter(make_loader(copies, batch_size=n, recipe=recipe, workers=0, seed=seed, pin_memory=False)))
    return images


# ---------------------------------------------------------------------------------------------------------
# GpuLoader: the whole uint8 set on the device, augmentation on whole batches with tensor ops
#
# The recipes of `AUGMENTATIONS` match `build_transform` in distribution (not sample for sample: albumentations
# draws from its own generator). Pad 4 (reflect, = cv2 BORDER_REFLECT_101) + random 32x32 crop is a shift of -4..4
# px per axis, each of the 9 values equally likely (albumentations maps h_start in [0, 1) onto 0..8 inclusive).
# CoarseDropout places a hole wholly inside the image: top-left uniform over 0..32-size per axis, never clipped.
#
# Affine: albumentations hands cv2.warpAffine the matrix p_out = c + t + R S (p_in - c), with c = (15.5, 15.5) the
# centre in pixel-centre coordinates, R = [[cos, sin], [-sin, cos]] (y down), S = diag(sx, sy), t in whole px;
# bilinear, BORDER_REFLECT_101. grid_sample wants the inverse map, output -> source, in normalised units.
# align_corners=True puts -1 and 1 on the edge pixels' centres and its 'reflection' padding mirrors about them:
# that is BORDER_REFLECT_101 exactly, and the centre 15.5 is 0, so u_in = S^-1 R^-1 (u_out - t / 15.5).
# (align_corners=False would be BORDER_REFLECT; the measured comparison with OpenCV, and why torch's grid_sample
# rather than kornia's warp_affine, are in BENCHMARKS.md, "GPU augmentation against albumentations".)
#
# Gray: ToGray's default is cv2.cvtColor(RGB2GRAY), for uint8 in fixed point: (w . rgb + 2^14) >> 15 with w =
# GRAY_WEIGHTS (0.299, 0.587, 0.114 x 2^15). Equal to OpenCV 5.0's over all 2^24 colours; OpenCV 4.x's
# (4899, 9617, 1868) >> 14 differs from it by 1 level on 0.26% of colours.

GRAY_WEIGHTS = (9798, 19235, 3735)  # R, G, B


def reflect_index(i: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Map pixel indices in -size+1..2*size-2 into 0..size-1 as numpy 'reflect' padding does (edge not repeated)."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def affine_theta(rotate: torch.Tensor, scale: torch.Tensor, translate: torch.Tensor, size: int = 32) -> torch.Tensor:
    """grid_sample matrices (n, 2, 3) float32 (align_corners=True) for albumentations' Affine about the centre of
    size x size images: rotate (n,) degrees, scale (n, 2) and translate (n, 2) px, both as (x, y)."""
    angle = torch.deg2rad(rotate.double())
    cos, sin = angle.cos(), angle.sin()
    sx, sy = scale.double().unbind(-1)
    m = torch.stack([torch.stack([cos / sx, -sin / sx], -1), torch.stack([sin / sy, cos / sy], -1)], -2)  # S^-1 R^-1
    b = -(m @ (translate.double() / ((size - 1) / 2))[..., None])  # (n, 2, 1)
    return torch.cat([m, b], -1).float()


def draw_augmentation(n: int, recipe: str, generator: torch.Generator) -> dict[str, torch.Tensor | int]:
    """Random parameters for `n` images of an `AUGMENTATIONS` recipe (CPU tensors).

    Every recipe: shift (n, 2) in -pad..pad, flip (n,), hole (n, 2) top-left, hole_on (n,), size (the hole side,
    a Python int: the recipe's, and a shape, so never a tensor the loop would have to read back). With an
    affine: affine (n,) on or off, rotate (n,) degrees, scale (n, 2) and translate (n, 2) px as (x, y), and theta
    (n, 2, 3) for `warp_affine` (the identity where off). With gray: gray (n,). Every draw comes from `generator`,
    in a fixed order (affine and gray draws only for recipes that have them), so its state fixes the whole epoch.
    """
    spec = AUGMENTATIONS[recipe]
    pad, (size, p) = spec.get("pad", 0), spec.get("hole", (0, 0.0))
    params = {
        "shift": torch.randint(-pad, pad + 1, (n, 2), generator=generator),
        "flip": torch.rand(n, generator=generator) < spec.get("flip", 0.0),
        "hole": torch.randint(0, 32 - size + 1, (n, 2), generator=generator),
        "hole_on": torch.rand(n, generator=generator) < p,
        "size": size,
    }
    if spec.get("affine"):
        a = spec["affine"]
        on = torch.rand(n, generator=generator) < a["p"]
        rotate = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * a["rotate"]
        low, high = a["scale"]
        scale = low + (high - low) * torch.rand(n, 2, generator=generator, dtype=torch.float64)
        # albumentations: int(uniform(-translate, translate) * side), truncated towards zero
        translate = ((torch.rand(n, 2, generator=generator, dtype=torch.float64) * 2 - 1) * a["translate"] * 32).trunc()
        rotate, scale, translate = rotate * on, torch.where(on[:, None], scale, 1.0), translate * on[:, None]
        params.update(affine=on, rotate=rotate.float(), scale=scale.float(), translate=translate.float(),
                      theta=affine_theta(rotate, scale, translate))  # float32 all: some devices (mps) lack float64
    if spec.get("gray"):
        params["gray"] = torch.rand(n, generator=generator) < spec["gray"]
    return params


def warp_affine(images: torch.Tensor, theta: torch.Tensor, on: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, H, W, 3) warped by grid_sample matrices theta (B, 2, 3) (`affine_theta`):
    bilinear, reflect-101 border, rounded to the nearest level. Where `on` (B,) is False the image comes back as
    it was (the identity matrix gives the same pixels, up to float rounding that the rounding removes)."""
    x = images.permute(0, 3, 1, 2).float()  # (B, 3, H, W) with channels_last strides
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=True)
    y = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    y = y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    if on is not None:
        y = torch.where(on[:, None, None, None], y, images)
    return y.contiguous()


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (..., 3) -> uint8 (..., 3) of three equal channels: OpenCV's luma, as ToGray computes it."""
    r, g, b = images.int().unbind(-1)
    y = (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2] + (1 << 14)) >> 15
    return y.to(torch.uint8)[..., None].expand_as(images)


def augment_batch(images: torch.Tensor, params: dict[str, torch.Tensor | int], fill: torch.Tensor) -> torch.Tensor:
    """Crop (reflect-padded shift), flip, affine, gray and cutout uint8 images (B, 32, 32, 3) -> uint8 (B, 32, 32, 3),
    in `AUGMENTATIONS` order; the affine and gray steps only where `params` has them (`draw_augmentation`).

    One gather does crop and flip: output pixel (i, j) reads row reflect(i + dy) and column reflect(j' + dx),
    with j' = 31 - j when flipped. The affine is one grid_sample over the batch (`warp_affine`), gray a weighted
    sum, each kept only where drawn. Cutout is a compare against the hole's box, filled with `fill` (3,) uint8.
    """
    b, h, w, _ = images.shape
    ar = torch.arange(h, device=images.device)
    dy, dx = params["shift"][:, :1], params["shift"][:, 1:]  # (B, 1) each
    cols = torch.where(params["flip"][:, None], w - 1 - ar, ar)  # (B, W): flip before the shift = after the crop
    rows = reflect_index(ar + dy, h)  # (B, H)
    cols = reflect_index(cols + dx, w)
    out = images[torch.arange(b, device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if "theta" in params:
        out = warp_affine(out, params["theta"], params["affine"])
    if "gray" in params:
        out = torch.where(params["gray"][:, None, None, None], to_gray(out), out)
    size = params["size"]
    if size:
        y0, x0 = params["hole"][:, 0, None], params["hole"][:, 1, None]  # (B, 1)
        in_rows = (ar >= y0) & (ar < y0 + size)  # (B, H)
        in_cols = (ar >= x0) & (ar < x0 + size)
        box = in_rows[:, :, None] & in_cols[:, None, :] & params["hole_on"][:, None, None]  # (B, H, W)
        out = torch.where(box[..., None], fill, out)
    return out


class GpuLoader:
    """Batches of (images float (B, 3, 32, 32) normalised, channels_last; labels int64 (B,)) on `device`.

    The uint8 set (N, 32, 32, 3) is copied to the device once. Training: a new permutation and new augmentation
    parameters per pass (any recipe of `AUGMENTATIONS`, as `build_transform`), drop_last unless the set is
    smaller than one batch. Test: dataset order, no augmentation. All randomness comes from `self.generator`
    (CPU), drawn at the start of each pass: restoring its state replays the next epoch exactly. rank/world_size:
    one process's shard, batch_size images of each global batch of batch_size x world_size (as `SeededSampler`).
    """

    def __init__(self, arrays: CifarArrays, *, batch_size: int = 512, train: bool = True, recipe: str | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 rank: int = 0, world_size: int = 1):
        recipe = (recipe or "none") if train else "none"
        if recipe not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation recipe {recipe!r}: choose one of {', '.join(AUGMENTATIONS)}")
        self.device = torch.device(device)
        self.images = torch.as_tensor(np.ascontiguousarray(arrays.images)).to(self.device)  # (N, 32, 32, 3) uint8
        self.labels = torch.as_tensor(arrays.labels, dtype=torch.int64).to(self.device)
        _check_shard(len(self.labels), batch_size, world_size, train)
        self.batch_size, self.train, self.recipe = batch_size, train, recipe
        self.rank, self.world_size = rank, world_size
        self.drop_last = train and len(self.labels) >= batch_size * world_size
        self.generator = torch.Generator().manual_seed(seed)  # order and augmentation; checkpoints save its state
        self.norm = (tuple(mean), tuple(std))  # [0, 1] units
        fill = [round(255 * m) for m in mean]  # the uint8 mean pixel, as build_transform fills its holes
        self.fill = torch.tensor(fill, dtype=torch.uint8, device=self.device)
        self.mean = torch.tensor(mean, device=self.device) * 255  # uint8 units, like albumentations' Normalize
        self.scale = 1 / (torch.tensor(std, device=self.device) * 255)

    def __len__(self) -> int:
        return steps_per_epoch(len(self.labels), self.batch_size * self.world_size, train=self.train)

    @property
    def num_images(self) -> int:
        return len(self.labels)

    @property
    def rng(self) -> torch.Generator:
        return self.generator

    def __iter__(self):
        n = len(self.labels)
        if self.train:  # one small CPU draw and one copy per epoch: no host sync inside the loop
            order = torch.randperm(n, generator=self.generator).to(self.device, non_blocking=True)
            # the hole size is a Python int: reading a device tensor with int() would sync every batch
            params = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in
                      draw_augmentation(n, self.recipe, self.generator).items()}
        for step in range(len(self)):
            window = slice(step * self.batch_size, (step + 1) * self.batch_size)
            if not self.train:
                yield self.normalize(self.images[window]), self.labels[window]
                continue
            if self.world_size > 1:  # this process's slice of the global batch at this step
                start = step * self.batch_size * self.world_size + self.rank * self.batch_size
                window = slice(start, start + self.batch_size)
            index = order[window]
            batch = {k: v[window] if isinstance(v, torch.Tensor) else v for k, v in params.items()}
            yield self.normalize(augment_batch(self.images[index], batch, self.fill)), self.labels[index]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 32, 32, 3) -> float (B, 3, 32, 32) with channels_last strides (a view: no second copy)."""
        return ((images.float() - self.mean) * self.scale).permute(0, 3, 1, 2)


def make_loaders(train: CifarArrays, test: CifarArrays, *, kind: str, batch_size: int, recipe: str,
                 device: str | torch.device = "cpu", workers: int | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """(train_loader, test_loader) of one kind: 'gpu' (GpuLoader on `device`) or 'torch' (albumentations
    DataLoader). Test batches of 1000 divide the 10,000 test images: no ragged last batch for torch.compile.
    rank/world_size shard the training loader (batch_size per process); the test loader is the whole set.
    mean, std: the normalisation of both (`normalization`)."""
    shard = dict(rank=rank, world_size=world_size)
    norm = dict(mean=mean, std=std)
    if kind == "gpu":
        return (GpuLoader(train, batch_size=batch_size, recipe=recipe, device=device, seed=seed, **shard, **norm),
                GpuLoader(test, batch_size=1000, train=False, device=device, **norm))
    if kind == "torch":
        return (make_loader(train, batch_size=batch_size, recipe=recipe, workers=workers, seed=seed, **shard, **norm),
                make_loader(test, batch_size=1000, train=False, workers=workers, **norm))
    raise ValueError(f"unknown loader kind {kind!r}: choose gpu or torch")


def evaluation_loader(like, arrays: CifarArrays):
    """A loader of `arrays` in their order, unaugmented, of the same kind, device and normalisation as the loader
    `like` (a validation split's, beside a run's test loader)."""
    if isinstance(like, GpuLoader):
        return GpuLoader(arrays, batch_size=1000, train=False, device=like.device, mean=like.norm[0], std=like.norm[1])
    dataset = like.dataset
    return make_loader(arrays, batch_size=1000, train=False, workers=like.num_workers, mean=dataset.mean,
                       std=dataset.std)
