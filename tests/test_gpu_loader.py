"""GpuLoader: same batches as make_loader's contract, exact resume, and the albumentations recipes in distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from helpers import data
from helpers.data import CIFAR10_MEAN, CIFAR10_STD, CifarArrays, GpuLoader, make_loader

from .conftest import without_time

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


@pytest.mark.parametrize("recipe", tuple(data.AUGMENTATIONS))
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


@pytest.mark.parametrize("recipe", ["davidnet", "depthwise"])
def test_new_order_each_epoch_and_seeding(tiny_arrays, recipe):
    train, _ = tiny_arrays
    loader = GpuLoader(train, batch_size=25, recipe=recipe, seed=7)
    first, second = collect(loader), collect(loader)
    assert not torch.equal(first[1], second[1]) and not torch.equal(first[0], second[0])
    again = GpuLoader(train, batch_size=25, recipe=recipe, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(collect(again), first))
    other = collect(GpuLoader(train, batch_size=25, recipe=recipe, seed=8))
    assert not torch.equal(other[0], first[0])


@pytest.mark.parametrize("recipe", ["resnet18", "depthwise"])
def test_generator_state_replays_the_next_epoch(tiny_arrays, recipe):
    train, _ = tiny_arrays
    loader = GpuLoader(train, batch_size=25, recipe=recipe, seed=5)
    collect(loader)
    state = loader.rng.get_state()  # what fit's checkpoint stores
    expected = collect(loader)
    resumed = GpuLoader(train, batch_size=25, recipe=recipe, seed=123)
    resumed.rng.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(collect(resumed), expected))


def test_batches_every_recipe_and_rejects_unknown_ones(tiny_arrays):
    assert tuple(data.AUGMENTATIONS) == ("davidnet", "resnet18", "depthwise", "none")
    with pytest.raises(ValueError, match="unknown augmentation recipe 'cutmix'"):
        GpuLoader(tiny_arrays[0], recipe="cutmix")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", ["davidnet", "depthwise"])
def test_cuda_batches_equal_cpu_batches(tiny_arrays, recipe):
    train, _ = tiny_arrays
    cpu = collect(GpuLoader(train, batch_size=25, recipe=recipe, seed=2))
    gpu = collect(GpuLoader(train, batch_size=25, recipe=recipe, seed=2, device="cuda"))
    assert gpu[0].device.type == "cuda"
    if recipe == "depthwise":  # the affine's bilinear sums may round differently on the GPU: a level, rarely
        diff = (to_uint8(gpu[0].cpu()).int() - to_uint8(cpu[0]).int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 1e-3
    else:
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
    size, p = data.AUGMENTATIONS[recipe]["hole"]
    for m in (ours, theirs):
        assert set(np.unique(m["area"])) <= {0, size * size}  # a whole hole or none: never clipped at the border
        assert abs((m["area"] > 0).mean() - p) < 4 * np.sqrt(p * (1 - p) / N_DRAWS) + 1e-9


def test_cutout_position_matches_albumentations(both_paths):
    recipe, ours, theirs = both_paths
    size, _ = data.AUGMENTATIONS[recipe]["hole"]
    for axis in ("top", "left"):
        a, b = (m[axis][m["area"] > 0] for m in (ours, theirs))
        assert uniform_p(a, 0, 32 - size) > P_FLOOR
        assert uniform_p(b, 0, 32 - size) > P_FLOOR
        assert same_distribution_p(a, b) > P_FLOOR
    # how often each pixel lies in a hole: edges are covered less than the centre, in both paths alike
    assert np.abs(ours["map"] - theirs["map"]).max() < 0.04
    assert ours["map"][0, 0] < ours["map"][16, 16] / 2


# ---------------------------------------------------------------------------------------------------------
# The depthwise recipe: flip, affine (rotate, scale, translate), gray, hole. The affine is compared with
# albumentations' pixel for pixel under forced parameters, and in distribution through both loaders.


def ramp_image() -> np.ndarray:
    """uint8 (32, 32, 3) with R = 8 * column, G = 4 * row + 60, B = 200: R and G say where a pixel came from.

    No pixel is the hole fill (its B is 114; a gray pixel has R = G = B), and only a gray image has three equal
    channels everywhere.
    """
    i = np.arange(32)
    return np.stack(np.broadcast_arrays(8 * i[None, :], 4 * i[:, None] + 60, 200), -1).astype(np.uint8)


def smooth_images(n: int, seed: int = 0) -> np.ndarray:
    """n photograph-like uint8 images (blurred, contrast-stretched noise): what interpolation meets in CIFAR."""
    import cv2

    noise = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    blurred = np.stack([cv2.GaussianBlur(im, (0, 0), 1.5) for im in noise]).astype(np.float64)
    return np.clip((blurred - 128) * 4 + 128, 0, 255).astype(np.uint8)


def forced_affine(rotate: float, scale, translate):
    """albumentations' Affine with its parameters forced: rotate degrees, scale (x, y), translate (x, y) px."""
    import albumentations as A
    import cv2

    return A.Affine(rotate=(rotate, rotate), scale={"x": (scale[0],) * 2, "y": (scale[1],) * 2},
                    translate_px={"x": (int(translate[0]),) * 2, "y": (int(translate[1]),) * 2},
                    border_mode=cv2.BORDER_REFLECT_101, p=1.0)


def our_affine(images: np.ndarray, rotate: float, scale, translate) -> np.ndarray:
    n = len(images)
    theta = data.affine_theta(torch.full((n,), float(rotate)), torch.tensor([scale] * n, dtype=torch.float64),
                              torch.tensor([translate] * n, dtype=torch.float64))
    return data.warp_affine(torch.from_numpy(images), theta).numpy()


@pytest.mark.parametrize("rotate, scale, translate", [
    (10.0, (1.0, 1.0), (0, 0)), (-15.0, (0.9, 1.1), (1, -1)), (7.0, (1.1, 0.95), (-1, 0)), (0.0, (1.0, 1.0), (1, 1)),
])
def test_affine_matches_albumentations_with_forced_parameters(rotate, scale, translate):
    images = np.concatenate([ramp_image()[None], smooth_images(15)])
    transform = forced_affine(rotate, scale, translate)
    expected = np.stack([transform(image=im)["image"] for im in images]).astype(int)
    diff = np.abs(our_affine(images, rotate, scale, translate).astype(int) - expected)
    # OpenCV 5.0 (float coordinates): ~0.0001 levels; OpenCV 4.x steps coordinates by 1/32 px: ~0.25
    assert diff.mean() < 0.5 and diff[:, 4:28, 4:28].mean() < 0.5
    border = np.ones((32, 32), dtype=bool)
    border[4:28, 4:28] = False
    assert diff[:, border].mean() < 0.75  # grid_sample's align_corners=False reflection (BORDER_REFLECT) gives ~2.5
    # the other rotation and translation directions are far off: the comparison does see the sign conventions
    wrong = our_affine(images, -rotate, scale, (-translate[0], -translate[1])).astype(int)
    assert np.abs(wrong - expected).mean() > 5 * max(diff.mean(), 1)


def test_identity_affine_gives_back_the_pixels():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    theta = data.affine_theta(torch.zeros(64), torch.ones(64, 2), torch.zeros(64, 2))
    assert torch.equal(theta, torch.eye(2, 3).expand(64, 2, 3))
    assert torch.equal(data.warp_affine(images, theta), images)  # grid_sample itself, before any torch.where
    params = data.draw_augmentation(64, "depthwise", torch.Generator().manual_seed(0))
    on = params["affine"]
    assert 0 < on.sum() < 64 and torch.equal(params["theta"][~on], theta[~on])  # identity where not drawn
    out = data.warp_affine(images, params["theta"], on)
    assert torch.equal(out[~on], images[~on])
    assert all(not torch.equal(a, b) for a, b in zip(out[on], images[on]))


def test_gray_matches_albumentations():
    import albumentations as A

    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    expected = A.ToGray(p=1.0)(image=pixels)["image"].astype(int)
    ours = data.to_gray(torch.from_numpy(pixels)).numpy().astype(int)
    assert ours.shape == expected.shape and (ours == ours[..., :1]).all()
    diff = np.abs(ours - expected)
    assert diff.max() <= 1 and diff.mean() < 0.01  # equal with OpenCV 5.0; 4.x rounds 0.26% of colours down


def test_depthwise_augment_batch_matches_per_image_albumentations():
    import albumentations as A

    images = smooth_images(120, seed=1)
    params = data.draw_augmentation(120, "depthwise", torch.Generator().manual_seed(3))
    fill = torch.tensor([125, 123, 114], dtype=torch.uint8)
    out = data.augment_batch(torch.from_numpy(images), params, fill).numpy().astype(int)
    assert torch.equal(params["shift"], torch.zeros(120, 2, dtype=torch.int64))  # no crop in this recipe
    size = int(params["size"])
    gray = A.ToGray(p=1.0)
    for i in range(120):
        expected = images[i, :, ::-1] if params["flip"][i] else images[i]
        if params["affine"][i]:
            transform = forced_affine(float(params["rotate"][i]), params["scale"][i].tolist(),
                                      params["translate"][i].tolist())
            expected = transform(image=np.ascontiguousarray(expected))["image"]
        if params["gray"][i]:
            expected = gray(image=np.ascontiguousarray(expected))["image"]
        expected = expected.astype(int)  # a copy
        if params["hole_on"][i]:
            top, left = params["hole"][i].tolist()
            expected[top:top + size, left:left + size] = fill.numpy()
        diff = np.abs(out[i] - expected)
        msg = f"image {i}: flip {bool(params['flip'][i])}, affine {bool(params['affine'][i])}"
        if params["affine"][i]:
            assert diff.mean() < 0.5, msg  # OpenCV 4.x steps coordinates by 1/32 px: ~0.25
        else:
            assert diff.max() <= 1 and diff.mean() < 0.01, msg  # flip and hole exact; luma to a level


N_DEPTHWISE = 2000  # images per loader; rates good to about +-0.011 (1 sigma) at p = 0.5
N_AFFINE = 1000  # albumentations' Affine step alone
FIT_RADIUS = 12  # px from the centre: for every affine of the recipe, these pixels' sources lie inside the image


def measure_depthwise(px: np.ndarray) -> dict[str, np.ndarray]:
    """Per augmented ramp_image (uint8 (B, 32, 32, 3)): hole area, gray, flipped, warped and, for images that are
    not gray, the affine read back from the ramps: rotate (degrees), scale (B, 2), translate (B, 2) px, as (x, y).

    Least-squares planes a0 + a1 x + a2 y (x, y from the centre) of R and G over the disc of FIT_RADIUS, hole left
    out: R / 8 (31 - R / 8 when flipped) and (G - 60) / 4 are a pixel's source column and row, so (a1, a2) / 8 and
    (a1, a2) / 4 are the rows of the inverse map S^-1 R^-1, and the planes at the centre give the translation.
    """
    import cv2

    px = px.astype(np.int64)
    hole = (px == np.array([round(255 * m) for m in CIFAR10_MEAN])).all(-1)  # (B, H, W)
    gray = ((px[..., 0] == px[..., 1]) & (px[..., 1] == px[..., 2]) | hole).all((1, 2))
    ar = np.arange(32) - 15.5
    y, x = np.meshgrid(ar, ar, indexing="ij")
    design = np.stack([np.ones_like(x), x, y], -1)  # (H, W, 3)
    weight = (x ** 2 + y ** 2 <= FIT_RADIUS ** 2) & ~hole
    normal = np.einsum("hwi,bhw,hwj->bij", design, weight, design)

    def plane(v: np.ndarray) -> np.ndarray:  # (B, H, W) -> (B, 3): a0, a1, a2
        return np.linalg.solve(normal, np.einsum("hwi,bhw,bhw->bi", design, weight, v)[..., None])[..., 0]

    red, green = plane(px[..., 0]), plane(px[..., 1])
    flip = red[:, 1] < 0  # R (in a gray image, the luma) falls from left to right
    # not warped: the ramp, flipped and gray as measured, outside the hole (to a level: OpenCV versions round the
    # luma differently)
    refs = {}
    for f in (False, True):
        im = np.ascontiguousarray(ramp_image()[:, ::-1] if f else ramp_image())
        refs[f] = im, np.repeat(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)[..., None], 3, -1)
    ref = np.stack([refs[bool(f)][int(g)] for f, g in zip(flip, gray)]).astype(np.int64)
    warped = ((np.abs(px - ref).max(-1) > 1) & ~hole).any((1, 2))
    inverse = np.stack([red[:, 1:] / 8 * np.where(flip, -1, 1)[:, None], green[:, 1:] / 4], 1)  # (B, 2, 2)
    inverse[gray] = np.eye(2)  # gray mixes R and G: nothing to read
    source = np.stack([np.where(flip, 31 - red[:, 0] / 8, red[:, 0] / 8), (green[:, 0] - 60) / 4], -1) - 15.5
    return {
        "area": hole.sum((1, 2)), "gray": gray, "flip": flip, "warped": warped,
        "rotate": np.degrees(np.arctan2(-inverse[:, 0, 1], inverse[:, 0, 0])),
        "scale": 1 / np.linalg.norm(inverse, axis=2),
        "translate": np.linalg.solve(inverse, -source[..., None])[..., 0],  # centre's source = -S^-1 R^-1 t
    }


@pytest.fixture(scope="module")
def depthwise_paths():
    import albumentations as A

    arrays = CifarArrays(np.repeat(ramp_image()[None], N_DEPTHWISE, 0), np.zeros(N_DEPTHWISE, dtype=np.int64),
                         ["x"] * 10)
    ours = collect(GpuLoader(arrays, batch_size=500, recipe="depthwise", seed=11))[0]
    theirs = collect(make_loader(arrays, batch_size=500, recipe="depthwise", workers=0, seed=11))[0]
    # the recipe's Affine step on its own stream, always applied: the reference for the parameters, measured on
    # every image rather than on the half that make_loader warps
    affine = next(t for t in data.build_transform("depthwise").transforms if isinstance(t, A.Affine))
    affine.p = 1.0
    affine.set_random_seed(11)
    alone = np.stack([affine(image=ramp_image())["image"] for _ in range(N_AFFINE)])
    return measure_depthwise(to_uint8(ours).numpy()), measure_depthwise(to_uint8(theirs).numpy()), \
        measure_depthwise(alone)


def test_depthwise_step_rates_match_albumentations(depthwise_paths):
    ours, theirs, _ = depthwise_paths
    spec = data.AUGMENTATIONS["depthwise"]
    size, p_hole = spec["hole"]
    rates = {"flip": spec["flip"], "warped": spec["affine"]["p"], "gray": spec["gray"], "hole": p_hole}
    ours, theirs = ({**m, "hole": m["area"] > 0} for m in (ours, theirs))
    for m in (ours, theirs):
        assert set(np.unique(m["area"])) <= {0, size * size}  # the hole comes last: never warped nor grayed
        for step, p in rates.items():
            assert abs(m[step].mean() - p) < 4 * np.sqrt(p * (1 - p) / N_DEPTHWISE), step
    for step in rates:
        hits = np.array([ours[step].sum(), theirs[step].sum()])
        assert stats.chi2_contingency([hits, N_DEPTHWISE - hits]).pvalue > P_FLOOR, step


def test_depthwise_steps_are_drawn_independently(depthwise_paths):
    ours, _, _ = depthwise_paths
    combo = ours["flip"] * 8 + ours["warped"] * 4 + ours["gray"] * 2 + (ours["area"] > 0)
    assert uniform_p(combo, 0, 15) > P_FLOOR  # all p = 0.5: the 16 combinations equally likely


def test_depthwise_affine_parameters_match_albumentations(depthwise_paths):
    ours, _, alone = depthwise_paths
    a = data.AUGMENTATIONS["depthwise"]["affine"]
    low, high = a["scale"]
    assert a["translate"] * 32 == 2  # albumentations truncates uniform(-2, 2): -1, 0, 1 with p 1/4, 1/2, 1/4
    mine = ours["warped"] & ~ours["gray"]
    assert mine.sum() > N_DEPTHWISE / 4 - 4 * np.sqrt(N_DEPTHWISE * 3 / 16)
    assert alone["warped"].mean() > 0.99 and not alone["gray"].any() and not alone["flip"].any()
    for m, keep in ((ours, mine), (alone, alone["warped"])):
        assert stats.kstest(m["rotate"][keep], stats.uniform(-a["rotate"], 2 * a["rotate"]).cdf).pvalue > P_FLOOR
        # x and y scales drawn apart (keep_ratio=False)
        assert abs(np.corrcoef(m["scale"][keep].T)[0, 1]) < 4 / np.sqrt(keep.sum())
        for axis in (0, 1):
            assert stats.kstest(m["scale"][keep, axis], stats.uniform(low, high - low).cdf).pvalue > P_FLOOR
            t = m["translate"][keep, axis]
            assert np.abs(t - t.round()).max() < 0.2  # whole px
            counts = np.bincount(t.round().astype(int) + 1, minlength=3)
            assert len(counts) == 3, "translations outside -1..1"
            assert stats.chisquare(counts, len(t) * np.array([0.25, 0.5, 0.25])).pvalue > P_FLOOR
    # and the two samples alike
    assert stats.ks_2samp(ours["rotate"][mine], alone["rotate"][alone["warped"]]).pvalue > P_FLOOR
    for axis in (0, 1):
        assert stats.ks_2samp(ours["scale"][mine, axis], alone["scale"][alone["warped"], axis]).pvalue > P_FLOOR
        assert same_distribution_p(ours["translate"][mine, axis].round(), alone["translate"][alone["warped"], axis]
                                   .round()) > P_FLOOR


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
    assert without_time(full) == without_time(resumed)
