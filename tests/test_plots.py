"""Every figure of helpers.plots, headless (conftest sets MPLBACKEND=Agg), from real model output on tiny data:
the expected panels (axes), titles and plotted values, and save= writing a PNG."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from helpers import plots
from helpers.data import make_loader
from helpers.models import build_model
from helpers.train import TrainConfig, evaluate, fit

MODEL = "depthwise_net"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def run(tiny_arrays):
    """depthwise_net after one epoch on the tiny data: (model, history, evaluate result, test arrays)."""
    torch.manual_seed(0)
    train, test = tiny_arrays
    model = build_model(MODEL)
    config = TrainConfig.for_model(MODEL, epochs=1, batch_size=16, max_lr=0.05, amp=False, channels_last=False)
    test_loader = make_loader(test, batch_size=50, train=False, workers=0)
    history = fit(model, make_loader(train, batch_size=16, train=True, recipe="none", workers=0), test_loader,
                  config, device="cpu", quiet=True)
    return model, history, evaluate(model, test_loader, device="cpu"), test


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_save_writes_png(tiny_arrays, tmp_path):
    fig = plots.plot_samples(tiny_arrays[0], n=4, cols=4, save=tmp_path / "sub" / "s.png")
    assert (tmp_path / "sub" / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plt.fignum_exists(fig.number)  # returned open, for the caller


def test_plot_samples(tiny_arrays):
    train = tiny_arrays[0]
    fig = plots.plot_samples(train, n=20, cols=10, seed=1)
    assert len(fig.axes) == 20
    shown = [ax.get_images()[0].get_array() for ax in fig.axes]
    for ax, image in zip(fig.axes, shown):  # each title is the class of the image shown
        i = next(k for k in range(len(train)) if np.array_equal(train.images[k], image))
        assert ax.get_title() == train.classes[train.labels[i]]


def test_plot_class_grid(tiny_arrays):
    fig = plots.plot_class_grid(tiny_arrays[0], per_class=3)
    assert len(fig.axes) == 30
    assert [fig.axes[3 * c].get_ylabel() for c in range(10)] == tiny_arrays[0].classes


def test_plot_channels(tiny_arrays):
    image = tiny_arrays[0].images[0]
    fig = plots.plot_channels(image, title="cat")
    assert len(fig.axes) == 7  # image, three channels, three colour bars
    assert fig.axes[0].get_title() == "cat"
    assert [t.split()[0] for t in titles(fig)[1:4]] == ["red", "green", "blue"]
    for k, ax in enumerate(fig.axes[1:4]):
        assert np.array_equal(ax.get_images()[0].get_array(), image[..., k])


def test_plot_augmentations_denormalises_and_draws_differ(tiny_arrays):
    image = tiny_arrays[0].images[0]
    fig = plots.plot_augmentations(image, "davidnet", n=7, cols=4)
    assert len(fig.axes) == 8 and titles(fig)[:2] == ["original", "draw 1"]
    draws = [np.asarray(ax.get_images()[0].get_array()) for ax in fig.axes[1:]]
    assert all(d.min() >= 0 and d.max() <= 1 and d.shape == (32, 32, 3) for d in draws)
    assert len({d.tobytes() for d in draws}) == len(draws)  # every draw is different
    few = plots.plot_augmentations(image, "davidnet", n=3)  # fewer draws than columns: no empty columns
    assert len(few.axes) == 4
    same = plots.plot_augmentations(image, "none")  # identical copies say nothing: the image once, and why
    assert len(same.axes) == 1 and "every draw" in titles(same)[0]
    np.testing.assert_array_equal(same.axes[0].get_images()[0].get_array(), image)


def test_plot_dataset_stats(tiny_arrays):
    train = tiny_arrays[0]
    fig = plots.plot_dataset_stats(train)
    assert len(fig.axes) == 2
    bars, hist = fig.axes
    assert [p.get_height() for p in bars.patches] == np.bincount(train.labels, minlength=10).tolist()
    labels = [t.get_text() for t in hist.get_legend().get_texts()]
    assert len(labels) == 3 and all("mean" in t and "std" in t for t in labels)


def test_plot_lr_finder(tiny_arrays):
    from helpers.lr_finder import lr_range_test

    torch.manual_seed(0)
    loader = make_loader(tiny_arrays[0], batch_size=16, train=True, workers=0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 10))
    found = lr_range_test(net, loader, num_iter=20, end_lr=1.0, progress=False)
    fig = plots.plot_lr_finder(found)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and "LR range test" in ax.get_title()
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert f"{found.suggested_lr:.2e}" in legend
    marked = ax.collections[0].get_offsets()[0]
    assert marked[0] == pytest.approx(found.suggested_lr) and marked[1] == pytest.approx(found.losses[
        found.suggested_index])


def test_plot_lr_sweep_marks_each_rule(tmp_path):
    row = {"model": "resnet18", "optimizer": "sgd", "batch_size": 512, "epochs": 20, "best_swept_acc": 90.2,
           "runs": {"0.1": {"max_lr": 0.1, "final_acc": 89.0}, "0.4": {"max_lr": 0.4, "final_acc": 90.2},
                    "0.8": {"max_lr": 0.8, "final_acc": 89.9},
                    "decade_below_min": {"max_lr": 0.3, "final_acc": 90.0},
                    "steepest": {"max_lr": 0.0148, "final_acc": 86.9}},
           "rules": {"decade_below_min": {"max_lr": 0.3, "gap_to_best": 0.2},
                     "steepest": {"max_lr": 0.0148, "gap_to_best": 3.3}}}
    fig = plots.plot_lr_sweep(row, save=tmp_path / "sweep.png")
    (ax,) = fig.axes
    assert list(ax.lines[0].get_xdata()) == [0.1, 0.4, 0.8]  # the swept peaks only, in order
    stars = [tuple(c.get_offsets()[0]) for c in ax.collections]
    assert stars == [(0.3, 90.0), (0.0148, 86.9)]
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "steepest descent: 0.0148 (-3.30 points)" in legend and (tmp_path / "sweep.png").stat().st_size > 1000


def test_a_peak_sweep_run_that_did_not_finish_is_said_not_drawn(tmp_path):
    from helpers.sweep import describe_picks

    row = {"model": "resnet18", "optimizer": "sgd", "batch_size": 512, "epochs": 20, "best_swept_acc": 90.2,
           "runs": {"0.4": {"max_lr": 0.4, "final_acc": 90.2}, "0.8": {"max_lr": 0.8, "final_acc": None},
                    "steepest": {"max_lr": 3.0, "final_acc": None}, "valley": {"max_lr": 0.4, "final_acc": 90.2}},
           "rules": {"steepest": {"max_lr": 3.0, "gap_to_best": None}, "valley": {"max_lr": 0.4, "gap_to_best": 0.0}}}
    fig = plots.plot_lr_sweep(row, save=tmp_path / "sweep.png")
    (ax,) = fig.axes
    assert list(ax.lines[0].get_xdata()) == [0.4] and [tuple(c.get_offsets()[0]) for c in ax.collections] == [
        (0.4, 90.2)]
    assert "steepest descent: 3 (did not finish)" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert describe_picks(row) == ["steepest: 3, its run did not finish (see the sweep's results.csv)",
                                   "valley: 0.4, 0.00 points below the best swept peak (90.20%)"]


def test_plot_history(run):
    _, history, _, _ = run
    fig = plots.plot_history(history)
    assert len(fig.axes) == 3
    assert titles(fig)[0] == "Loss" and titles(fig)[1].startswith("Accuracy") and "Learning rate" in titles(fig)[2]
    loss_ax, acc_ax, lr_ax = fig.axes
    assert list(loss_ax.lines[1].get_ydata()) == history.test_loss
    assert list(acc_ax.lines[0].get_ydata()) == history.train_acc
    # one epoch of 6 steps: its first step, the one-cycle peak inside it, its last step (one step before 1)
    r = history.records[0]
    assert 0 < r["lr_max_step"] < r["steps"] - 1 and r["lr_max"] > max(r["lr"], r["lr_end"])
    assert list(lr_ax.lines[0].get_ydata()) == [r["lr"], r["lr_max"], r["lr_end"]]
    assert list(lr_ax.lines[0].get_xdata()) == pytest.approx([0, r["lr_max_step"] / 6, 5 / 6])


def test_plot_misclassified(run):
    from helpers.gradcam import misclassified

    _, _, result, test = run
    items = misclassified(result, test, n=8)
    assert len(items) == 8  # one epoch on the tiny data leaves plenty of mistakes
    fig = plots.plot_misclassified(items, cols=4)
    assert len(fig.axes) == 8
    assert titles(fig)[0] == f"true: {items[0].target_name}\npred: {items[0].prediction_name} " \
                             f"({items[0].confidence:.0%})"
    empty = plots.plot_misclassified([])
    assert "no misclassified" in empty.axes[0].texts[0].get_text()


def test_plot_gradcam(run):
    from helpers.gradcam import misclassified

    model, _, result, test = run
    items = misclassified(result, test, n=3)
    model.train()
    fig = plots.plot_gradcam(model, items)
    assert len(fig.axes) == 16  # 3 rows x (image, CAM and overlay for predicted, CAM and overlay for true), a scale
    headers = [t.get_text() for ax in fig.axes[:5] for t in ax.texts]
    assert headers == ["image", "CAM: predicted", "overlay: predicted", "CAM: true", "overlay: true"]
    assert titles(fig)[0].startswith(f"{items[0].target_name} -> {items[0].prediction_name}")  # the caption
    assert "GradCAM" in fig.axes[-1].get_xlabel()  # the colour scale of the maps
    assert model.training
    shown = fig.axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(shown, items[0].image / 255, atol=1 / 255)  # de-normalised, not model input
    cam = fig.axes[1].get_images()[0].get_array()
    assert cam.shape == (32, 32) and cam.min() >= 0 and cam.max() <= 1


def test_confusion_matrix_and_its_figures(run):
    _, _, result, test = run
    counts = plots.confusion_matrix(result.targets, result.predictions, 10)
    assert counts.sum() == len(result.targets)
    assert np.trace(counts) == int((result.targets == result.predictions).sum())
    i = 0
    assert counts[result.targets[i], result.predictions[i]] >= 1
    fig = plots.plot_confusion_matrix(result, test.classes)
    assert len(fig.axes) == 4  # two heatmaps and their colour bars
    assert titles(fig)[0].startswith("Confusion matrix: counts") and "share" in titles(fig)[1]
    annotations = [int(t.get_text()) for t in fig.axes[0].texts]
    assert sum(annotations) == len(result.targets)
    fig = plots.plot_per_class_accuracy(result, test.classes)
    heights = [p.get_height() for p in fig.axes[0].patches]
    expected = 100 * np.diag(counts) / np.maximum(counts.sum(1), 1)
    np.testing.assert_allclose(heights, expected)
    pairs = plots.top_confusions(result, test.classes, k=5)
    assert [n for *_, n in pairs] == sorted((n for *_, n in pairs), reverse=True)
    assert all(t != p for t, p, _ in pairs)
    fig = plots.plot_top_confusions(result, test.classes, k=5)
    assert len(fig.axes[0].patches) == len(pairs) and "Most confused" in titles(fig)[0]


def test_save_run_figures(run, tmp_path):
    model, history, result, test = run
    open_before = plt.get_fignums()
    written = plots.save_run_figures(tmp_path, model=model, history=history, result=result, test_arrays=test,
                                     device="cpu", n_misclassified=6, n_gradcam=2)
    names = {p.name for p in written}
    assert {"curves.png", "confusion_matrix.png", "misclassified.png", "gradcam.png"} <= names
    assert all(p.parent == tmp_path and p.stat().st_size > 1000 for p in written)
    assert plt.get_fignums() == open_before  # its own figures closed, nothing else


def test_plot_augmentations_shows_the_training_draws(tiny_arrays):
    from helpers.data import augmented_copies, denormalize

    image = tiny_arrays[0].images[3]
    fig = plots.plot_augmentations(image, "depthwise", n=5, seed=2)
    shown = np.stack([np.asarray(ax.get_images()[0].get_array()) for ax in fig.axes[1:]])
    np.testing.assert_allclose(shown, denormalize(augmented_copies(image, "depthwise", n=5, seed=2)), atol=1e-6)
