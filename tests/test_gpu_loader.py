"""GpuLoader: same batches as make_loader's contract, exact resume, and the albumentations recipes in distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from helpers import data
from helpers.data import CIFAR10_MEAN, CIFAR10_STD, CifarArrays, GpuLoader, make_loader

P_FLOOR = 1e-3  # chi-square tests: a correct loader fails one at this rate per test (seeds are fixed: it is repeatable)


def collect(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Normalised float (B, 3, H, W) back to the uint8 pixels (B, H, W, 3) they came from."""
    mean, std = torch.tensor(CIFAR10_MEAN) * 255, torch.tensor(CIFAR10_STD) * 255
    return (x.permute(0, 2, 3, 1) * std + mean).round().to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------
# The loader contract: shapes, order, drop_last, seeding, resume


def test_test_batches_equal_make_loader(tiny_arrays):
    _, test = tiny_arrays
    ours = list(GpuLoader(test, batch_size=16, train=False))
    theirs = list(make_loader(test, batch_size=16, train=False, workers=0))
    assert len(ours) == len(theirs) == 4  # 50 images: 3 full batches and a last one of 2
    for (x, y), (x_ref, y_ref) in zip(ours, theirs):
        assert x.shape == x_ref.shape and x.dtype == x_ref.dtype == torch.float32
        assert y.dtype == y_ref.dtype == torch.int64
        torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=0)  # same normalisation, dataset order
        assert torch.equal(y, y_ref)


@pytest.mark.parametrize("recipe", data.GPU_RECIPES)
def test_train_batches_shapes_and_drop_last(tiny_arrays, recipe):
    train, _ = tiny_arrays
    loader = GpuLoader(train, batch_size=32, recipe=recipe, seed=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 3  # 100 images: the partial batch of 4 is dropped
    for x, y in batches:
        assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (32,) and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
    small = GpuLoader(train, batch_size=256, recipe=recipe)
    assert [len(y) for _, y in small] == [100]  # a set smaller than one batch still trains


def test_train_without_augmentation_is_a_permutation(tiny_arrays):
    train, _ = tiny_arrays
    x, y = collect(GpuLoader(train, batch_size=20, recipe="none", seed=3))
    x_ref, y_ref = collect(make_loader(train, batch_size=100, train=False, workers=0))
    key, key_ref = x.flatten(1).sum(1) + 1000 * y, x_ref.flatten(1).sum(1) + 1000 * y_ref
    torch.testing.assert_close(x[key.argsort()], x_ref[key_ref.argsort()], atol=1e-5, rtol=0)
    assert not torch.equal(y, y_ref)  # shuffled


def test_new_order_each_epoch_and_seeding(tiny_arrays):
    train, _ = tiny_arrays
    loader = GpuLoader(train, batch_size=25, recipe="davidnet", seed=7)
    first, second = collect(loader), collect(loader)
    assert not torch.equal(first[1], second[1]) and not torch.equal(first[0], second[0])
    again = GpuLoader(train, batch_size=25, recipe="davidnet", seed=7)
    assert all(torch.equal(a, b) for a, b in zip(collect(again), first))
    other = collect(GpuLoader(train, batch_size=25, recipe="davidnet", seed=8))
    assert not torch.equal(other[0], first[0])


def test_generator_state_replays_the_next_epoch(tiny_arrays):
    train, _ = tiny_arrays
    loader = GpuLoader(train, batch_size=25, recipe="resnet18", seed=5)
    collect(loader)
    state = data.sampling_generator(loader).get_state()  # what fit's checkpoint stores
    expected = collect(loader)
    resumed = GpuLoader(train, batch_size=25, recipe="resnet18", seed=123)
    data.sampling_generator(resumed).set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(collect(resumed), expected))


def test_rejects_recipes_it_cannot_batch(tiny_arrays):
    with pytest.raises(ValueError, match="make_loader"):
        GpuLoader(tiny_arrays[0], recipe="depthwise")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_equal_cpu_batches(tiny_arrays):
    train, _ = tiny_arrays
    cpu = collect(GpuLoader(train, batch_size=25, recipe="davidnet", seed=2))
    gpu = collect(GpuLoader(train, batch_size=25, recipe="davidnet", seed=2, device="cuda"))
    assert gpu[0].device.type == "cuda"
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-5, rtol=0)
    assert torch.equal(gpu[1].cpu(), cpu[1])


# ---------------------------------------------------------------------------------------------------------
# Augmentation: exact against a per-image numpy reference, and in distribution against albumentations


def reference_augment(image: np.ndarray, dy: int, dx: int, flip: bool, hole, size: int, fill) -> np.ndarray:
    """One image the slow, obvious way: np.pad 'reflect', crop, flip, fill a size x size box."""
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    out = padded[4 + dy:36 + dy, 4 + dx:36 + dx].copy()
    if flip:
        out = out[:, ::-1].copy()
    if hole is not None:
        out[hole[0]:hole[0] + size, hole[1]:hole[1] + size] = fill
    return out


@pytest.mark.parametrize("recipe", ["davidnet", "resnet18"])
def test_augment_batch_matches_per_image_reference(recipe):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    params = data.draw_augmentation(200, recipe, torch.Generator().manual_seed(0))
    fill = torch.tensor([125, 123, 114], dtype=torch.uint8)
    out = data.augment_batch(torch.from_numpy(images), params, fill).numpy()
    size = int(params["size"])
    for i in range(200):
        dy, dx = params["shift"][i].tolist()
        hole = params["hole"][i].tolist() if params["hole_on"][i] else None
        expected = reference_augment(images[i], dy, dx, bool(params["flip"][i]), hole, size, fill.numpy())
        np.testing.assert_array_equal(out[i], expected, err_msg=f"image {i}: shift {dy, dx}, hole {hole}")


N_DRAWS = 4000  # per path; frequencies good to about +-0.008 (1 sigma) at p = 0.5


def structured_set(n: int) -> CifarArrays:
    """n copies of an image whose pixels say where they came from: R = 8 * row, G = 8 * column, B = 200.

    B never equals the hole fill's B (114), so a hole is where B == 114; R and G give the shift and flip.
    """
    i = np.arange(32, dtype=np.uint8) * 8
    image = np.stack(np.broadcast_arrays(i[:, None], i[None, :], np.uint8(200)), -1).astype(np.uint8)
    return CifarArrays(np.repeat(image[None], n, 0), np.zeros(n, dtype=np.int64), ["x"] * 10)


def measure(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image: shift dy, dx (-4..4), flipped, hole pixel count, hole top-left, and the (32, 32) hole map."""
    px = to_uint8(x).long()
    hole = px[..., 2] == 114  # (B, H, W)
    ar = torch.arange(32)
    centre = (ar >= 4) & (ar < 28)  # rows/cols that never read the reflected border for shifts within 4
    keep = ~hole & centre[:, None] & centre[None, :]
    right = (px[:, :, 1:, 1] - px[:, :, :-1, 1]) * (keep[:, :, 1:] & keep[:, :, :-1])
    flipped = right.sum((1, 2)) < 0  # G falls left to right in a flipped image
    col = torch.where(flipped[:, None], 31 - ar, ar)  # (B, W): the source column before the shift
    dy = ((px[..., 0] // 8 - ar[:, None]) * keep).sum((1, 2)) // keep.sum((1, 2))
    dx = ((px[..., 1] // 8 - col[:, None, :]) * keep).sum((1, 2)) // keep.sum((1, 2))
    rows, cols = hole.any(2), hole.any(1)
    return {
        "dy": dy.numpy(), "dx": dx.numpy(), "flip": flipped.numpy(), "area": hole.sum((1, 2)).numpy(),
        "top": rows.float().argmax(1).numpy(), "left": cols.float().argmax(1).numpy(),
        "map": hole.float().mean(0).numpy(),
    }


@pytest.fixture(scope="module", params=["davidnet", "resnet18"])
def both_paths(request):
    recipe = request.param
    arrays = structured_set(N_DRAWS)
    ours = measure(collect(GpuLoader(arrays, batch_size=500, recipe=recipe, seed=11))[0])
    theirs = measure(collect(make_loader(arrays, batch_size=500, recipe=recipe, workers=0, seed=11))[0])
    return recipe, ours, theirs


def uniform_p(values: np.ndarray, low: int, high: int) -> float:
    counts = np.bincount(values - low, minlength=high - low + 1)
    assert counts.sum() == len(values) and len(counts) == high - low + 1, "values outside the expected range"
    return stats.chisquare(counts).pvalue


def same_distribution_p(a: np.ndarray, b: np.ndarray) -> float:
    values = np.union1d(a, b)
    table = np.array([[np.sum(a == v) for v in values], [np.sum(b == v) for v in values]])
    return stats.chi2_contingency(table).pvalue if len(values) > 1 else 1.0


def test_crop_shift_is_uniform_over_minus4_to_4(both_paths):
    _, ours, theirs = both_paths
    for axis in ("dy", "dx"):
        assert uniform_p(ours[axis], -4, 4) > P_FLOOR
        assert uniform_p(theirs[axis], -4, 4) > P_FLOOR  # the decoder reads albumentations right too
        assert same_distribution_p(ours[axis], theirs[axis]) > P_FLOOR


def test_flip_rate_is_one_half(both_paths):
    _, ours, theirs = both_paths
    for m in (ours, theirs):
        assert abs(m["flip"].mean() - 0.5) < 4 * 0.5 / np.sqrt(N_DRAWS)
    flips = np.array([[ours["flip"].sum(), theirs["flip"].sum()], [N_DRAWS - ours["flip"].sum(),
                                                                    N_DRAWS - theirs["flip"].sum()]])
    assert stats.chi2_contingency(flips).pvalue > P_FLOOR


def test_cutout_area_and_rate(both_paths):
    recipe, ours, theirs = both_paths
    size, p = data.GPU_CUTOUT[recipe]
    for m in (ours, theirs):
        assert set(np.unique(m["area"])) <= {0, size * size}  # a whole hole or none: never clipped at the border
        assert abs((m["area"] > 0).mean() - p) < 4 * np.sqrt(p * (1 - p) / N_DRAWS) + 1e-9


def test_cutout_position_matches_albumentations(both_paths):
    recipe, ours, theirs = both_paths
    size, _ = data.GPU_CUTOUT[recipe]
    for axis in ("top", "left"):
        a, b = (m[axis][m["area"] > 0] for m in (ours, theirs))
        assert uniform_p(a, 0, 32 - size) > P_FLOOR
        assert uniform_p(b, 0, 32 - size) > P_FLOOR
        assert same_distribution_p(a, b) > P_FLOOR
    # how often each pixel lies in a hole: edges are covered less than the centre, in both paths alike
    assert np.abs(ours["map"] - theirs["map"]).max() < 0.04
    assert ours["map"][0, 0] < ours["map"][16, 16] / 2


# ---------------------------------------------------------------------------------------------------------
# Through fit: a run interrupted and resumed on GpuLoader equals the uninterrupted run


class Interrupted(GpuLoader):
    """A GpuLoader whose `stop`-th pass raises KeyboardInterrupt (Ctrl-C at an epoch's start)."""

    def __init__(self, *args, stop: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop, self.passes = stop, 0

    def __iter__(self):
        self.passes += 1
        if self.passes == self.stop:
            raise KeyboardInterrupt
        return super().__iter__()


@pytest.fixture
def one_thread():
    """Tiny conv steps on a shared 2-core CPU run ~10x faster on one thread (no OpenMP spin-waiting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fit_resumes_exactly_on_gpu_loader(tiny_arrays, tmp_path, one_thread):
    from helpers.models import build_model
    from helpers.train import TrainConfig, fit

    train, test = (data.balanced_subset(a, 40) for a in tiny_arrays)  # small: fit is slow on a shared CPU
    config = TrainConfig.for_model("depthwise_net", epochs=2, batch_size=10, max_lr=0.05, amp=False,
                                   augment="davidnet", loader="gpu")

    def run(loader_cls=GpuLoader, resume=None, **extra):
        torch.manual_seed(0)
        loaders = (loader_cls(train, batch_size=10, recipe="davidnet", seed=0, **extra),
                   GpuLoader(test, batch_size=64, train=False))
        return fit(build_model(config.model), *loaders, config, device="cpu", checkpoint=tmp_path / "ckpt.pt",
                   resume=resume, quiet=True)

    full = run()
    with pytest.raises(KeyboardInterrupt):
        run(Interrupted, stop=2)  # epoch 1 done and saved; epoch 2 must replay the same draws
    resumed = run(resume=tmp_path / "ckpt.pt")
    drop_time = [[{k: v for k, v in r.items() if k != "seconds"} for r in h.records] for h in (full, resumed)]
    assert drop_time[0] == drop_time[1]
