"""CIFAR-10: loading, statistics, augmentation recipes and loaders.

The one home of the dataset constants. Images stay uint8 (N, 32, 32, 3) until a loader turns a batch into
normalised float tensors (B, 3, 32, 32); labels are int64.

Two loaders hand out the same (images, labels) batches:
- `make_loader`: albumentations recipes through a torch DataLoader (any recipe, CPU workers).
- `GpuLoader`: the whole uint8 set on the device, crop/flip/cutout on whole batches with tensor ops
  (recipes `davidnet`, `resnet18` and `none`); no workers, no per-image Python.
"""

from __future__ import annotations

import os
import pickle
import socket
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for updates on import

# Per-channel mean and std over all 50,000 official training pixels (computed with `channel_stats`).
# Many tutorials copy std (0.2023, 0.1994, 0.2010): that is a different statistic (mean of per-image stds).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
RECIPES = ("davidnet", "resnet18", "depthwise", "none")
GPU_RECIPES = ("davidnet", "resnet18", "none")  # recipes GpuLoader reproduces with batched tensor ops


class DataError(RuntimeError):
    """The CIFAR-10 files are missing or unreadable; the message says what to do."""


@dataclass
class CifarArrays:
    """One split in memory: images uint8 (N, 32, 32, 3), labels int64 (N,), class names."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

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
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(data),) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{path} is not a CIFAR-10 batch file: 'labels' must be {len(data)} classes in 0..9.")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-major rows -> (N, 32, 32, 3)
    return np.ascontiguousarray(images), labels


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - handed back to the caller's thread
        return err


def _download(data_dir: Path, timeout: float) -> None:
    """Fetch and unpack the official archive; fail within `timeout` seconds when there is no network."""
    from torchvision.datasets.utils import check_integrity, download_url

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
        download_url(CIFAR10_URL, str(data_dir), md5=CIFAR10_MD5)
    finally:
        socket.setdefaulttimeout(old)
    archive = data_dir / "cifar-10-python.tar.gz"
    if not check_integrity(str(archive), CIFAR10_MD5):
        raise OSError(f"{archive} failed its md5 check")
    with tarfile.open(archive) as tar:
        tar.extractall(data_dir, filter="data")


def find_cifar10(data_dir: str | os.PathLike = "data", *, download: bool = True, timeout: float = 5.0) -> Path:
    """The `cifar-10-batches-py` folder under `data_dir`, downloading the official archive if it is missing."""
    data_dir = Path(data_dir).expanduser()
    folder = data_dir / FOLDER
    if not folder.is_dir() and download:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            _download(data_dir, timeout)
        except Exception as err:  # noqa: BLE001 - any failure means the same advice
            raise DataError(
                f"No CIFAR-10 in {folder} and the download failed ({type(err).__name__}: {err}). "
                f"Put the official 'cifar-10-batches-py' folder (from {CIFAR10_URL}) in {data_dir.resolve()}, "
                f"or pass --data-dir pointing at the folder that contains it."
            ) from None
    if not folder.is_dir():
        raise DataError(
            f"No CIFAR-10 in {folder}. Put the official 'cifar-10-batches-py' folder there "
            f"(from {CIFAR10_URL}) or pass --data-dir pointing at the folder that contains it."
        )
    return folder


def load_cifar10(
    data_dir: str | os.PathLike = "data", *, train: bool = True, download: bool = True
) -> CifarArrays:
    """Read one split from `data_dir/cifar-10-batches-py` (downloading it if missing) into memory."""
    folder = find_cifar10(data_dir, download=download)
    names = TRAIN_FILES if train else TEST_FILES
    missing = [n for n in names + ("batches.meta",) if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} is incomplete: missing {', '.join(missing)}. Re-copy the whole folder.")
    parts = [_read_batch(folder / n) for n in names]
    meta = _read_pickle(folder / "batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get("label_names", [])]
    if len(classes) != 10:
        raise DataError(f"{folder / 'batches.meta'} does not list the 10 CIFAR-10 class names.")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return CifarArrays(images, labels, classes)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, H, W, 3) images, in [0, 1] units."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(x.mean(0).round(4).tolist()), tuple(x.std(0).round(4).tolist())


def balanced_subset(arrays: CifarArrays, n: int | None, *, seed: int = 0) -> CifarArrays:
    """A class-balanced random subset of about `n` images (n // 10 per class), in shuffled order."""
    if n is None or n >= len(arrays):
        return arrays
    if n < 10:
        raise ValueError(f"a class-balanced subset needs at least 10 images, got {n}")
    rng = np.random.default_rng(seed)
    per_class = n // 10
    keep = np.concatenate([rng.permutation(np.flatnonzero(arrays.labels == c))[:per_class] for c in range(10)])
    keep = rng.permutation(keep)
    return CifarArrays(arrays.images[keep], arrays.labels[keep], arrays.classes)


def denormalize(x: torch.Tensor, mean=CIFAR10_MEAN, std=CIFAR10_STD) -> np.ndarray:
    """Normalised (B, 3, H, W) or (3, H, W) tensors back to float images (B, H, W, 3) in [0, 1] for display."""
    x = x.detach().float().cpu()
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = (x * s + m).clamp(0, 1)
    return x.movedim(-3, -1).numpy()


# ---------------------------------------------------------------------------------------------------------
# Augmentation recipes (albumentations 2.0.8)


def build_transform(recipe: str = "none", *, mean=CIFAR10_MEAN, std=CIFAR10_STD):
    """An albumentations Compose for a named recipe, ending in Normalize and ToTensorV2 -> float (3, 32, 32).

    davidnet: reflect-pad 4, random 32x32 crop, flip, one 8x8 hole (D. Page's ResNet-9 recipe).
    resnet18: pad to 40 (reflect), random crop 32, flip, one 16x16 mean-filled hole half the time (seed 001).
    depthwise: flip, shift-scale-rotate (as Affine), to-gray, one 16x16 mean-filled hole (seed 002).
    none: normalise only (evaluation).
    """
    import albumentations as A
    import cv2
    from albumentations.pytorch import ToTensorV2

    fill = tuple(int(round(255 * m)) for m in mean)  # uint8 mean pixel: holes are filled before Normalize

    def hole(size: int, p: float):
        return A.CoarseDropout(
            num_holes_range=(1, 1), hole_height_range=(size, size), hole_width_range=(size, size), fill=fill, p=p
        )

    reflect = cv2.BORDER_REFLECT_101  # numpy/torch 'reflect': the edge pixel is not repeated
    steps = {
        "davidnet": [
            A.PadIfNeeded(40, 40, border_mode=reflect),
            A.RandomCrop(32, 32),
            A.HorizontalFlip(p=0.5),
            hole(8, 1.0),
        ],
        "resnet18": [
            A.PadIfNeeded(40, 40, border_mode=reflect),
            A.RandomCrop(32, 32),
            A.HorizontalFlip(p=0.5),
            hole(16, 0.5),
        ],
        "depthwise": [
            A.HorizontalFlip(p=0.5),
            A.Affine(
                translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15), border_mode=reflect, p=0.5
            ),
            A.ToGray(p=0.5),
            hole(16, 0.5),
        ],
        "none": [],
    }
    if recipe not in steps:
        raise ValueError(f"unknown augmentation recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    return A.Compose([*steps[recipe], A.Normalize(mean=mean, std=std), ToTensorV2()], strict=True)


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
        self.transform = build_transform(recipe, mean=mean, std=std)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, item) -> tuple[torch.Tensor, int]:
        index, epoch_seed = item if isinstance(item, tuple) else (item, 0)
        if self.recipe != "none":
            self.transform.set_random_seed((epoch_seed * 1_000_003 + index) % 2**32)
        image = self.transform(image=self.arrays.images[index])["image"]
        return image, int(self.arrays.labels[index])


class SeededSampler(Sampler):
    """Yields (index, epoch_seed): a fresh permutation and augmentation seed per pass, from one generator."""

    def __init__(self, n: int, *, shuffle: bool, generator: torch.Generator):
        self.n, self.shuffle, self.generator = n, shuffle, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch_seed = int(torch.randint(0, 2**31 - 1, (), generator=self.generator)) if self.shuffle else 0
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        return ((int(i), epoch_seed) for i in order)


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
) -> DataLoader:
    """A DataLoader of normalised (B, 3, 32, 32) float batches and (B,) int64 labels.

    Training loaders shuffle, augment with `recipe` and drop the last partial batch; test loaders keep the
    dataset order (so predictions line up with `arrays`) and never augment. The shuffling and augmentation
    stream comes from `loader.generator`, seeded with `seed`.
    """
    recipe = recipe if train else "none"
    recipe = recipe or "none"
    workers = default_workers() if workers is None else workers
    generator = torch.Generator().manual_seed(seed)  # the sampler's: order and augmentation, saved by checkpoints
    loader = DataLoader(
        AugmentedCifar(arrays, recipe),
        batch_size=batch_size,
        sampler=SeededSampler(len(arrays), shuffle=train, generator=generator),
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
        drop_last=train and len(arrays) >= batch_size,
        # the DataLoader draws worker seeds from its own generator, on some epochs only (persistent workers):
        # a separate one keeps the sampler's stream identical whether or not a run was resumed
        generator=torch.Generator().manual_seed(seed + 1),
    )
    return loader


def sampling_generator(loader) -> torch.Generator:
    """The generator that drives a loader's shuffling and augmentation (checkpoints save its state)."""
    return loader.sampler.generator if isinstance(loader, DataLoader) else loader.generator


# ---------------------------------------------------------------------------------------------------------
# GpuLoader: the whole uint8 set on the device, augmentation on whole batches with tensor ops
#
# The recipes match `build_transform` in distribution (not sample for sample: albumentations draws from its own
# generator). Pad 4 (reflect, = cv2 BORDER_REFLECT_101) + random 32x32 crop is a shift of -4..4 px per axis,
# each of the 9 values equally likely (albumentations maps h_start in [0, 1) onto 0..8 inclusive). CoarseDropout
# places a hole wholly inside the image: top-left uniform over 0..32-size per axis, never clipped at the border.

GPU_CUTOUT = {"davidnet": (8, 1.0), "resnet18": (16, 0.5), "none": (0, 0.0)}  # recipe -> (hole side px, probability)
GPU_PAD = 4  # px of reflect padding before the 32x32 crop: shifts -4..4


def reflect_index(i: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Map pixel indices in -size+1..2*size-2 into 0..size-1 as numpy 'reflect' padding does (edge not repeated)."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def draw_augmentation(n: int, recipe: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random parameters for `n` images (CPU tensors): shift (n, 2) in -4..4, flip (n,), hole (n, 2) top-left
    and hole_on (n,). Every draw comes from `generator`, in a fixed order, so its state fixes the whole epoch."""
    size, p = GPU_CUTOUT[recipe]
    on = recipe != "none"
    shift = torch.randint(-GPU_PAD, GPU_PAD + 1, (n, 2), generator=generator) * on
    flip = (torch.rand(n, generator=generator) < 0.5) & on
    hole = torch.randint(0, 32 - size + 1, (n, 2), generator=generator)
    hole_on = (torch.rand(n, generator=generator) < p) & on
    return {"shift": shift, "flip": flip, "hole": hole, "hole_on": hole_on, "size": torch.tensor(size)}


def augment_batch(images: torch.Tensor, params: dict[str, torch.Tensor], fill: torch.Tensor) -> torch.Tensor:
    """Crop (reflect-padded shift), flip and cutout uint8 images (B, 32, 32, 3) -> uint8 (B, 32, 32, 3).

    One gather does crop and flip: output pixel (i, j) reads row reflect(i + dy) and column reflect(j' + dx),
    with j' = 31 - j when flipped. Cutout is a compare against the hole's box, filled with `fill` (3,) uint8.
    """
    b, h, w, _ = images.shape
    ar = torch.arange(h, device=images.device)
    dy, dx = params["shift"][:, :1], params["shift"][:, 1:]  # (B, 1) each
    cols = torch.where(params["flip"][:, None], w - 1 - ar, ar)  # (B, W): flip before the shift = after the crop
    rows = reflect_index(ar + dy, h)  # (B, H)
    cols = reflect_index(cols + dx, w)
    out = images[torch.arange(b, device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    size = int(params["size"])
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
    parameters per pass (recipe davidnet, resnet18 or none, as `build_transform`), drop_last unless the set is
    smaller than one batch. Test: dataset order, no augmentation. All randomness comes from `self.generator`
    (CPU), drawn at the start of each pass: restoring its state replays the next epoch exactly.
    """

    def __init__(self, arrays: CifarArrays, *, batch_size: int = 512, train: bool = True, recipe: str | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        recipe = (recipe or "none") if train else "none"
        if recipe not in GPU_RECIPES:
            raise ValueError(f"GpuLoader does recipes {', '.join(GPU_RECIPES)}, not {recipe!r}: use make_loader")
        self.device = torch.device(device)
        self.images = torch.as_tensor(np.ascontiguousarray(arrays.images)).to(self.device)  # (N, 32, 32, 3) uint8
        self.labels = torch.as_tensor(arrays.labels, dtype=torch.int64).to(self.device)
        self.batch_size, self.train, self.recipe = batch_size, train, recipe
        self.drop_last = train and len(self.labels) >= batch_size
        self.generator = torch.Generator().manual_seed(seed)  # order and augmentation; checkpoints save its state
        fill = [round(255 * m) for m in mean]  # the uint8 mean pixel, as build_transform fills its holes
        self.fill = torch.tensor(fill, dtype=torch.uint8, device=self.device)
        self.mean = torch.tensor(mean, device=self.device) * 255  # uint8 units, like albumentations' Normalize
        self.scale = 1 / (torch.tensor(std, device=self.device) * 255)

    def __len__(self) -> int:
        n, b = len(self.labels), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        n = len(self.labels)
        if self.train:  # one small CPU draw and one copy per epoch: no host sync inside the loop
            order = torch.randperm(n, generator=self.generator).to(self.device, non_blocking=True)
            # the hole size stays a CPU scalar: reading a device tensor with int() would sync every batch
            params = {k: v.to(self.device, non_blocking=True) if v.ndim else v for k, v in
                      draw_augmentation(n, self.recipe, self.generator).items()}
        for step in range(len(self)):
            window = slice(step * self.batch_size, (step + 1) * self.batch_size)
            if not self.train:
                yield self.normalize(self.images[window]), self.labels[window]
                continue
            index = order[window]
            batch = {k: (v if v.ndim == 0 else v[window]) for k, v in params.items()}
            yield self.normalize(augment_batch(self.images[index], batch, self.fill)), self.labels[index]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 32, 32, 3) -> float (B, 3, 32, 32) with channels_last strides (a view: no second copy)."""
        return ((images.float() - self.mean) * self.scale).permute(0, 3, 1, 2)


def make_loaders(train: CifarArrays, test: CifarArrays, *, kind: str, batch_size: int, recipe: str,
                 device: str | torch.device = "cpu", workers: int | None = None, seed: int = 0):
    """(train_loader, test_loader) of one kind: 'gpu' (GpuLoader on `device`) or 'torch' (albumentations
    DataLoader). Test batches of 1000 divide the 10,000 test images: no ragged last batch for torch.compile."""
    if kind == "gpu":
        return (GpuLoader(train, batch_size=batch_size, recipe=recipe, device=device, seed=seed),
                GpuLoader(test, batch_size=1000, train=False, device=device))
    if kind == "torch":
        return (make_loader(train, batch_size=batch_size, recipe=recipe, workers=workers, seed=seed),
                make_loader(test, batch_size=1000, train=False, workers=workers))
    raise ValueError(f"unknown loader kind {kind!r}: choose gpu or torch")
