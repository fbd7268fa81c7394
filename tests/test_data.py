"""Data: reading the official layout safely, statistics, recipes, loaders and reseeded augmentation."""

from __future__ import annotations

import hashlib
import pickle
import shutil

import numpy as np
import pytest
import torch

from helpers import data
from helpers.data import DataError, load_cifar10, make_loader

from .conftest import CLASSES, write_cifar_folder
from .test_gpu_loader import collect, measure_depthwise, ramp_image, to_uint8


def test_loads_official_layout(tiny_data):
    train = load_cifar10(tiny_data, train=True, download=False)
    test = load_cifar10(tiny_data, train=False, download=False)
    assert train.images.shape == (100, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and set(train.labels) == set(range(10))
    assert test.images.shape == (50, 32, 32, 3)
    assert train.classes == CLASSES


def test_pixels_are_channel_major_rows_like_the_official_files(tmp_path):
    folder = write_cifar_folder(tmp_path, n_train=10, n_test=10) / "cifar-10-batches-py"
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)
    arrays = load_cifar10(tmp_path, train=False, download=False)
    row = raw["data"][3]
    np.testing.assert_array_equal(arrays.images[3][..., 0].ravel(), row[:1024])  # red plane first
    np.testing.assert_array_equal(arrays.images[3][..., 2].ravel(), row[2048:])


def test_official_constants_and_channel_stats(tiny_arrays):
    assert data.CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert data.CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    mean, std = data.channel_stats(tiny_arrays[0].images)
    expected = tiny_arrays[0].images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, expected, atol=1e-4)
    np.testing.assert_allclose(std, tiny_arrays[0].images.reshape(-1, 3).std(0) / 255, atol=1e-4)


def _copy(tiny_data, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_data, dst)
    return dst, dst / "cifar-10-batches-py"


class Boom:
    """Unpickling this would run code: the restricted unpickler must refuse it."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_malicious_pickle_is_refused(tiny_data, tmp_path, capsys):
    root, folder = _copy(tiny_data, tmp_path)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"data": Boom(), "labels": []}, f)
    with pytest.raises(DataError, match="not a readable CIFAR-10 batch"):
        load_cifar10(root, download=False)
    assert "code ran" not in capsys.readouterr().out


def test_truncated_batch_gives_clear_error(tiny_data, tmp_path):
    root, folder = _copy(tiny_data, tmp_path)
    blob = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="data_batch_2.*truncated, damaged"):
        load_cifar10(root, download=False)


@pytest.mark.parametrize("content", [[1, 2, 3], {"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}])
def test_foreign_batch_gives_clear_error(tiny_data, tmp_path, content):
    root, folder = _copy(tiny_data, tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump(content, f)
    with pytest.raises(DataError, match="not a CIFAR-10 batch file"):
        load_cifar10(root, download=False)


def test_missing_file_gives_clear_error(tiny_data, tmp_path):
    root, folder = _copy(tiny_data, tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match="incomplete: missing data_batch_5"):
        load_cifar10(root, download=False)


def test_missing_folder_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(data, "_download", no_network)
    with pytest.raises(DataError, match=r"download failed.*Put the official 'cifar-10-batches-py' folder"):
        load_cifar10(tmp_path / "nothing_here")


def test_missing_folder_without_download(tmp_path):
    with pytest.raises(DataError, match="No CIFAR-10 in"):
        load_cifar10(tmp_path, download=False)


def test_balanced_subset(tiny_arrays):
    sub = data.balanced_subset(tiny_arrays[0], 50, seed=1)
    assert len(sub) == 50 and np.bincount(sub.labels, minlength=10).tolist() == [5] * 10
    again = data.balanced_subset(tiny_arrays[0], 50, seed=1)
    np.testing.assert_array_equal(sub.images, again.images)
    assert data.balanced_subset(tiny_arrays[0], None) is tiny_arrays[0]


@pytest.mark.parametrize("recipe", tuple(data.AUGMENTATIONS))
def test_recipes_give_normalised_tensors(recipe, tiny_arrays):
    out = data.build_transform(recipe)(image=tiny_arrays[0].images[0])["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_unknown_recipe():
    with pytest.raises(ValueError, match="unknown augmentation recipe 'cutmix'"):
        data.build_transform("cutmix")


def test_none_recipe_is_plain_normalisation(tiny_arrays):
    image = tiny_arrays[0].images[0]
    out = data.build_transform("none")(image=image)["image"]
    expected = (torch.tensor(image).permute(2, 0, 1) / 255 - torch.tensor(data.CIFAR10_MEAN).view(3, 1, 1)) / (
        torch.tensor(data.CIFAR10_STD).view(3, 1, 1)
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_denormalize_inverts_normalisation(tiny_arrays):
    image = tiny_arrays[0].images[:4]
    x = torch.stack([data.build_transform("none")(image=im)["image"] for im in image])
    np.testing.assert_allclose(data.denormalize(x), image / 255, atol=1e-5)


def test_loaders_shapes_order_and_drop_last(tiny_arrays):
    train, test = tiny_arrays
    train_loader = make_loader(train, batch_size=32, train=True, recipe="davidnet", workers=0)
    assert len(train_loader) == 3  # 100 // 32: the partial batch is dropped
    x, y = next(iter(train_loader))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    test_loader = make_loader(test, batch_size=16, train=False, workers=0)
    labels = torch.cat([y for _, y in test_loader])
    np.testing.assert_array_equal(labels.numpy(), test.labels)  # test order = dataset order


# --- augmentation randomness: albumentations 2.0.8 repeats one stream in every worker and epoch unless reseeded


def _fingerprints(loader, epochs=2):
    """Per epoch, a hash of every augmented sample (in the order the loader hands them out)."""
    out = []
    for _ in range(epochs):
        out.append([hashlib.md5(x.numpy().tobytes()).hexdigest() for xb, _ in loader for x in xb])
    return out


@pytest.fixture(scope="module")
def same_image(tiny_arrays):
    """64 copies of one image: any difference between samples comes from augmentation alone."""
    train = tiny_arrays[0]
    return data.CifarArrays(np.repeat(train.images[:1], 64, 0), np.zeros(64, np.int64), train.classes)


def test_augmentations_differ_across_workers_and_epochs(same_image):
    loader = make_loader(same_image, batch_size=8, train=True, recipe="davidnet", workers=2, seed=3)
    epoch1, epoch2 = _fingerprints(loader)
    # two workers each build batches of 8: with a shared random stream their batches would repeat each other
    assert len(set(epoch1)) > 60, "augmentations repeat across samples/workers"
    assert len(set(epoch1) & set(epoch2)) < 4, "augmentations repeat across epochs"


def test_augmentations_repeat_under_one_seed_whatever_the_workers(same_image):
    a = _fingerprints(make_loader(same_image, batch_size=8, train=True, recipe="resnet18", workers=2, seed=5))
    b = _fingerprints(make_loader(same_image, batch_size=8, train=True, recipe="resnet18", workers=0, seed=5))
    c = _fingerprints(make_loader(same_image, batch_size=8, train=True, recipe="resnet18", workers=0, seed=6))
    assert a == b
    assert a != c


def test_albumentations_steps_decide_independently():
    """Each step of a reseeded Compose draws its own decision. Compose.set_random_seed would give every step a
    generator with the same seed: steps of equal probability then decide alike (depthwise: all four or none)."""
    n = 2000  # joint rates good to about +-0.01 (1 sigma)
    arrays = data.CifarArrays(np.repeat(ramp_image()[None], n, 0), np.zeros(n, np.int64), CLASSES)
    x, _ = collect(make_loader(arrays, batch_size=500, recipe="depthwise", workers=0, seed=7))
    m = measure_depthwise(to_uint8(x).numpy())  # the ramp says per image: flipped, warped, gray, hole
    spec = data.AUGMENTATIONS["depthwise"]
    steps = {"flip": (m["flip"], spec["flip"]), "warped": (m["warped"], spec["affine"]["p"]),
             "gray": (m["gray"], spec["gray"]), "hole": (m["area"] > 0, spec["hole"][1])}

    def near(hits: np.ndarray, p: float) -> bool:  # within 4 sigma of a rate p
        return abs(hits.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)

    names = list(steps)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (hit_a, p_a), (hit_b, p_b) = steps[a], steps[b]
            assert near(hit_a & hit_b, p_a * p_b), f"{a} and {b} decide together: {(hit_a & hit_b).mean():.3f}"
    hits, ps = np.stack([h for h, _ in steps.values()]), np.array([p for _, p in steps.values()])
    all_or_none = hits.all(0) | ~hits.any(0)
    assert near(all_or_none, ps.prod() + (1 - ps).prod()), f"all or none: {all_or_none.mean():.3f}"


@pytest.mark.parametrize("kind, cls", [("torch", torch.utils.data.DataLoader), ("gpu", data.GpuLoader)])
def test_make_loaders_builds_one_kind_with_whole_test_batches(tiny_arrays, kind, cls):
    train_loader, test_loader = data.make_loaders(*tiny_arrays, kind=kind, batch_size=32, recipe="davidnet",
                                                  workers=0)
    assert isinstance(train_loader, cls) and isinstance(test_loader, cls)
    assert test_loader.batch_size == 1000 and len(train_loader) == 3


def test_make_loaders_unknown_kind(tiny_arrays):
    with pytest.raises(ValueError, match="unknown loader kind 'tpu'"):
        data.make_loaders(*tiny_arrays, kind="tpu", batch_size=32, recipe="none")


def test_augmentation_preview_draws_as_training_draws():
    """Notebook 01's preview (data.augmented_copies, which plots.plot_augmentations shows) draws each step's
    decision as a training epoch does: the joint frequencies of (flip, warped, gray, hole) agree with a training
    loader's over other images' seeds. Reseeding per draw with Compose.set_random_seed(seed + k) made equal-
    probability steps decide alike (every gray draw also had a hole), which this test catches."""
    n = 2000  # per combination of four steps (p = 1/16 each): +-0.0054 (1 sigma)

    def combos(x: torch.Tensor) -> np.ndarray:  # (16,) frequency of each flip/warped/gray/hole combination
        m = measure_depthwise(to_uint8(x).numpy())
        code = m["flip"] * 8 + m["warped"] * 4 + m["gray"] * 2 + (m["area"] > 0)
        return np.bincount(code.astype(np.int64), minlength=16) / len(code)

    preview = combos(data.augmented_copies(ramp_image(), "depthwise", n=n, seed=0))
    arrays = data.CifarArrays(np.repeat(ramp_image()[None], n, 0), np.zeros(n, np.int64), CLASSES)
    training = combos(collect(make_loader(arrays, batch_size=500, recipe="depthwise", workers=0, seed=11))[0])
    sigma = np.sqrt(2 * training.clip(1 / 16 / 4) * (1 - training) / n)  # of a difference of two rates
    assert (preview > 0).all(), f"combinations the preview never shows: {np.flatnonzero(preview == 0)}"
    assert (abs(preview - training) < 5 * sigma).all(), f"preview {preview.round(3)} vs training {training.round(3)}"
