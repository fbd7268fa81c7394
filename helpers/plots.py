"""Every figure of the project. Each function returns a matplotlib Figure and, given save=path, writes it there
(PNG, dpi 120, tight bounding box). Nothing here calls plt.show() or closes a figure it returns.

Data:      plot_samples, plot_class_grid, plot_channels, plot_augmentations, plot_dataset_stats
Training:  plot_lr_finder, plot_lr_sweep, plot_history, plot_sweep (helpers.sweep's results)
Results:   plot_misclassified, plot_gradcam, plot_confusion_matrix, plot_per_class_accuracy, plot_top_confusions
A run:     save_run_figures(out, model=, history=, result=, test_arrays=) writes the results figures of a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt  # headless (no DISPLAY) it falls back to Agg by itself
import numpy as np
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from helpers.data import CIFAR10_MEAN, CIFAR10_STD, augmented_copies, channel_stats, denormalize
from helpers.gradcam import find_layer, gradcam_maps, misclassified, normalize_images, overlay
from helpers.utils import atomic_write, safe_text, unwrap

DPI = 120
CHANNELS = ("red", "green", "blue")
MAX_LABELLED_CLASSES = 20  # past this many classes (CIFAR-100) a figure names some classes (the worst) not every one


def plain(text) -> str:
    """Text from a file (a class or run name) as a figure label shown as written: control characters escaped
    (helpers.utils.safe_text) and '$' kept literal (matplotlib would parse '$...$' as math, and fail on bad math
    when the figure is drawn)."""
    return safe_text(text).replace("$", r"\$")


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` to `path` atomically (a crash leaves the previous file, never half a new one), creating the
    folder; the format follows the name (.png, .jpg, .pdf, .svg)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = path.suffix.lower().lstrip(".").replace("jpg", "jpeg") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=kind, dpi=DPI, bbox_inches="tight"))


def finish_figure(fig: Figure, save) -> Figure:
    """`fig`, written to `save` first when given (save_figure)."""
    if save is not None:
        save_figure(fig, save)
    return fig


def _image_grid(images, titles, *, cols: int, size: float = 1.5, suptitle: str | None = None, colors=None):
    """One figure of images (uint8 or float [0, 1], HWC) in a grid, each with a small title."""
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * size, rows * (size + 0.35)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k])
            ax.set_title(titles[k], fontsize=8, color=colors[k] if colors else "black")
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# The data


def plot_samples(arrays, *, n: int = 20, cols: int = 10, seed: int = 0, save=None):
    """`n` random images of a split, each titled with its class."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(arrays), size=min(n, len(arrays)), replace=False)
    titles = [plain(arrays.classes[arrays.labels[i]]) for i in pick]
    return finish_figure(_image_grid(arrays.images[pick], titles, cols=cols, suptitle="Random training images"), save)


def plot_class_grid(arrays, *, per_class: int = 8, seed: int = 0, save=None):
    """One row per class: `per_class` random images of it, the class name on the left (the first
    MAX_LABELLED_CLASSES classes of a data set with more)."""
    rng = np.random.default_rng(seed)
    n_classes = min(len(arrays.classes), MAX_LABELLED_CLASSES)
    fig, axes = plt.subplots(n_classes, per_class, figsize=(per_class * 1.1, n_classes * 1.1), squeeze=False)
    for c, row in enumerate(axes):
        idx = np.flatnonzero(arrays.labels == c)
        pick = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        for k, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if k < len(pick):
                ax.imshow(arrays.images[pick[k]])
        row[0].set_ylabel(plain(arrays.classes[c]), rotation=0, ha="right", va="center", fontsize=10)
    more = len(arrays.classes) - n_classes
    fig.suptitle("Samples per class" + (f" (the first {n_classes} of {len(arrays.classes)} classes)" if more else ""))
    fig.tight_layout()
    return finish_figure(fig, save)


def plot_channels(image: np.ndarray, *, title: str | None = None, save=None):
    """An RGB uint8 image (H, W, 3) and its red, green and blue channels (0-255, each in its colour)."""
    fig, axes = plt.subplots(1, 4, figsize=(11, 3))
    axes[0].imshow(image)
    axes[0].set_title(title or "image")
    for ax, name, k in zip(axes[1:], CHANNELS, range(3)):
        # black -> full colour, as the channel lights the screen: bright where the channel is strong
        dark_to_colour = LinearSegmentedColormap.from_list(name, ["black", {"green": "lime"}.get(name, name)])
        shown = ax.imshow(image[..., k], cmap=dark_to_colour, vmin=0, vmax=255)
        ax.set_title(f"{name} channel (mean {image[..., k].mean():.0f})")
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return finish_figure(fig, save)


def plot_augmentations(image: np.ndarray, recipe: str, *, n: int = 15, cols: int = 8, seed: int = 0, save=None):
    """The uint8 image (H, W, 3) and `n` draws of augmentation `recipe` on it, drawn as training draws them
    (helpers.data.augmented_copies)."""
    if recipe == "none":  # n identical copies say nothing: one image and the reason
        return finish_figure(_image_grid([image], ["original = every draw"], cols=1, size=2.2,
                                   suptitle="Recipe 'none':\nno augmentation"), save)
    draws = denormalize(augmented_copies(image, recipe, n=n, seed=seed))  # as a training epoch draws them
    images = [image, *draws]
    titles = ["original", *[f"draw {k + 1}" for k in range(n)]]
    return finish_figure(_image_grid(images, titles, cols=min(cols, len(images)),  # no empty columns for small n
                               suptitle=f"Augmentation recipe '{recipe}'"), save)


def plot_dataset_stats(arrays, *, save=None):
    """Images per class (bar) and per-channel pixel histograms with each channel's mean and std."""
    counts = np.bincount(arrays.labels, minlength=len(arrays.classes))
    mean, std = channel_stats(arrays.images)
    fig, (ax_bar, ax_hist) = plt.subplots(1, 2, figsize=(13, 4))
    if len(arrays.classes) > MAX_LABELLED_CLASSES:  # 100 names side by side are unreadable: class numbers
        ax_bar.bar(np.arange(len(counts)), counts, color="tab:blue")
        ax_bar.set_xlabel(f"class (0-{len(counts) - 1}: the data set's order of names)")
    else:
        ax_bar.bar(list(map(plain, arrays.classes)), counts, color="tab:blue")
        ax_bar.tick_params(axis="x", rotation=45)
    ax_bar.set_title(f"Images per class ({len(arrays):,} in all)")
    ax_bar.set_ylabel("images")
    for k, name in enumerate(CHANNELS):
        values = arrays.images[..., k].ravel()
        ax_hist.hist(values, bins=64, range=(0, 255), histtype="step", color=name, linewidth=1.5,
                     label=f"{name}: mean {mean[k]:.3f}, std {std[k]:.3f}")
    ax_hist.set_title("Pixel values per channel (mean, std in [0, 1] units)")
    ax_hist.set_xlabel("pixel value")
    ax_hist.set_ylabel("pixels")
    ax_hist.legend(fontsize=8)
    fig.tight_layout()
    return finish_figure(fig, save)


# ---------------------------------------------------------------------------------------------------------
# Training


RULE_LABELS = {"decade_below_min": "a decade below the minimum", "steepest": "steepest descent",
               "min_loss": "the lowest smoothed loss"}


def plot_lr_finder(found, *, ax=None, save=None):
    """The LR range test: smoothed loss against learning rate (log scale), the suggestion (`found.rule`, by
    default the rule `--max-lr auto` uses) marked as a red dot, the other rules as dashed lines, the lowest loss
    dotted.

    Trims the first 10 and last 5 points as the suggestion rules do (all points when there are few).
    """
    fig, ax = (plt.subplots(figsize=(7, 4.5)) if ax is None else (ax.figure, ax))
    lrs, losses = np.asarray(found.lrs), np.asarray(found.losses)
    keep = slice(10, len(lrs) - 5) if len(lrs) > 30 else slice(None)
    ax.plot(lrs[keep], losses[keep], color="tab:blue", label="smoothed training loss")
    i = found.suggested_index
    ax.scatter([lrs[i]], [losses[i]], s=70, color="red", zorder=3,
               label=f"suggested, {RULE_LABELS.get(found.rule, found.rule)}: {found.suggested_lr:.2e}")
    for rule, lr in found.suggestions.items():
        if rule not in (found.rule, "min_loss"):  # the lowest loss has its own dotted line
            ax.axvline(lr, color="gray", linestyle="--", linewidth=1, label=f"{RULE_LABELS.get(rule, rule)}: {lr:.2e}")
    ax.axvline(found.min_loss_lr, color="gray", linestyle=":", linewidth=1,
               label=f"lowest smoothed loss: {found.min_loss_lr:.2e}")
    shown = losses[keep]
    if shown.max() > 1.5 * shown[0] > shown.min():  # the blow-up would flatten the part worth reading
        ax.set_ylim(shown.min() - 0.05 * (1.5 * shown[0] - shown.min()), 1.5 * shown[0])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.set_title(f"LR range test ({len(lrs)} iterations{', stopped at divergence' if found.diverged else ''})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return finish_figure(fig, save)


def plot_lr_sweep(row: dict, *, ax=None, save=None):
    """Final test accuracy against the one-cycle peak LR (one benchmark `sweep` row), with each LR range test
    rule's pick marked: where `--max-lr auto` lands against the best peak a sweep finds."""
    fig, ax = (plt.subplots(figsize=(7, 4.5)) if ax is None else (ax.figure, ax))
    swept = sorted((r["max_lr"], r["final_acc"]) for k, r in row["runs"].items()
                   if k not in row["rules"] and r["final_acc"] is not None)  # a run that did not finish: no point
    ax.plot(*zip(*swept), "o-", color="tab:blue", label="swept peaks")
    for (rule, pick), color in zip(row["rules"].items(), ("red", "tab:orange", "tab:purple", "tab:brown")):
        acc = row["runs"][rule]["final_acc"]
        if acc is None:
            ax.plot([], [], " ", label=f"{RULE_LABELS.get(rule, rule)}: {pick['max_lr']:.3g} (did not finish)")
            continue
        ax.scatter([pick["max_lr"]], [acc], s=80, marker="*", color=color, zorder=3,
                   label=f"{RULE_LABELS.get(rule, rule)}: {pick['max_lr']:.3g} ({-pick['gap_to_best']:+.2f} points)")
    ax.axhline(row["best_swept_acc"] - 0.5, color="gray", linestyle=":", linewidth=1, label="best - 0.5 points")
    ax.set_xscale("log")
    ax.set_xlabel("one-cycle peak learning rate (log scale)")
    on = "validation" if row.get("selected_on") == "validation split" else "test"
    ax.set_ylabel(f"final {on} accuracy (%)")
    ax.set_title(f"{row['model']} {row.get('recipe', '')}, {row['optimizer']}, batch {row['batch_size']}, "
                 f"{row['epochs']} epoch{'s' if row['epochs'] != 1 else ''}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return finish_figure(fig, save)


def plot_sweep(rows: list[dict], varied: list[str], *, save=None):
    """Final test accuracy (%) against each varied setting of a sweep (helpers.sweep's results rows): per value the
    mean over seeds (a line per combination of the other varied settings) and the seeds' min-max as a bar. A
    setting that moves in step with an earlier one (the peak sweep's start LR with its peak) gets no panel of its
    own. With nothing varied but the seed, the seeds' accuracies and their mean."""
    rows = [r for r in rows if r.get("test_acc") not in (None, "")]

    def follows(b: str, a: str) -> bool:  # one value of b per value of a: b moves with a (the peak sweep's lr)
        return all(len({r[b] for r in rows if r[a] == v}) == 1 for v in {r[a] for r in rows})

    varied = [k for i, k in enumerate(varied) if not any(follows(k, a) and follows(a, k) for a in varied[:i])]
    panels = varied or ["seed"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        others = [k for k in varied if k != key and not follows(k, key)]
        groups: dict[tuple, dict] = {}
        for r in rows:
            groups.setdefault(tuple(r[k] for k in others), {}).setdefault(r[key], []).append(float(r["test_acc"]))
        for label, by_value in sorted(groups.items(), key=lambda g: str(g[0])):
            xs = sorted(by_value, key=lambda v: (isinstance(v, str), v))
            accs = [np.array(by_value[x]) for x in xs]
            mean = [a.mean() for a in accs]
            spread = np.array([[m - a.min() for m, a in zip(mean, accs)], [a.max() - m for m, a in zip(mean, accs)]])
            pos = xs if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs) else range(len(xs))
            name = ", ".join(f"{k}={v}" for k, v in zip(others, label)) or None
            ax.errorbar(list(pos), mean, yerr=spread if key != "seed" else None, marker="o", capsize=3, label=name)
            if pos is not xs:
                ax.set_xticks(list(pos), [str(x) for x in xs])
            numeric = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if key != "seed" and len(numeric) == len(xs) and min(numeric) > 0 and max(numeric) / min(numeric) >= 4:
                ax.set_xscale("log")  # ticks at the values swept: log ticks of a short range crowd each other
                ax.set_xticks(xs, [f"{x:.3g}" for x in xs], minor=False)
                ax.xaxis.set_minor_formatter(plt.NullFormatter())
        n_seeds = len({r["seed"] for r in rows})
        ax.set(xlabel=key, ylabel="final test accuracy (%)",
               title=f"{key}: mean and min-max over {n_seeds} seed(s)" if key != "seed" else "accuracy per seed")
        ax.grid(alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return finish_figure(fig, save)


def plot_history(history, *, save=None):
    """Train and test loss, train and test accuracy (%), and the learning rate through the run (each epoch's
    first and last step: the one-cycle shape, without steps at the epoch boundaries). A run with a validation
    split shows its validation curves in place of the test ones."""
    epochs = history.epoch
    n = len(history)
    split = history.eval_split
    name = {"val": "validation"}.get(split, split)
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(epochs, history.train_loss, "o-", label="train")
    ax_loss.plot(epochs, getattr(history, f"{split}_loss"), "o-", label=name)
    ax_loss.set_title("Loss")
    ax_loss.set_ylabel("cross-entropy (train: with any label smoothing)")
    ax_acc.plot(epochs, history.train_acc, "o-", label="train")
    accuracy = getattr(history, f"{split}_acc")
    ax_acc.plot(epochs, accuracy, "o-", label=name)
    ax_acc.set_title(f"Accuracy (last {name}: {accuracy[-1]:.2f}%)" if n else "Accuracy")
    ax_acc.set_ylabel("%")
    if n and all("lr_end" in r for r in history.records):
        # step k of epoch e sits at e - 1 + k/steps (its last at e - 1/steps: the next epoch's first LR is one
        # scheduler step further); a peak inside an epoch is drawn where it was
        points = []
        for r in history.records:
            steps = r.get("steps", 10**9)
            inner = [(r["lr_max_step"], r["lr_max"])] if 0 < r.get("lr_max_step", 0) < steps - 1 else []
            for k, lr in [(0, r["lr"]), *inner, (steps - 1, r["lr_end"])]:
                points.append((r["epoch"] - 1 + k / steps, lr))
        ax_lr.plot(*zip(*points), "-", color="tab:green")
        ax_lr.set_xlim(0, max(n, 1))
        ax_lr.set_title("Learning rate (through each epoch)")
    else:
        ax_lr.plot(epochs, history.lr, "o-", color="tab:green")
        ax_lr.set_title("Learning rate (at epoch start)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (ax_loss, ax_acc):
        ax.set_xlim(0.5, max(n, 1) + 0.5)  # one epoch is one point, not a zoom into 0.95..1.05
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs
    ax_loss.legend()
    ax_acc.legend()
    fig.tight_layout()
    return finish_figure(fig, save)


# ---------------------------------------------------------------------------------------------------------
# Results


def plot_misclassified(items, *, cols: int = 5, save=None):
    """A gallery of helpers.gradcam.misclassified(...) items: true and predicted class, confidence."""
    if not items:
        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.set_title("Misclassified images")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
        return finish_figure(fig, save)
    titles = [f"true: {plain(m.target_name)}\npred: {plain(m.prediction_name)} ({m.confidence:.0%})" for m in items]
    fig = _image_grid([m.image for m in items], titles, cols=min(cols, len(items)), size=1.9,
                      suptitle="Misclassified test images, most confident first", colors=["firebrick"] * len(items))
    return finish_figure(fig, save)


def plot_gradcam(model, items, *, layer: str | None = None, title: str = "GradCAM on misclassified images",
                 normalization=None, save=None):
    """GradCAM for misclassified `items` (helpers.gradcam.misclassified): per row the image, then heatmap and
    overlay for the predicted class, then for the true class. Maps are min-max scaled per image.
    normalization: (mean, std) the model was trained with (default CIFAR-10's)."""
    mean, std = normalization or (CIFAR10_MEAN, CIFAR10_STD)
    find_layer(model, layer)  # a wrong name fails here, before any work
    x = normalize_images(np.stack([m.image for m in items]), mean=mean, std=std)  # (B, 3, 32, 32), what it sees
    shown = denormalize(x, mean, std)  # (B, 32, 32, 3) in [0, 1]
    pred_maps = gradcam_maps(model, x, [m.prediction for m in items], layer=layer)
    true_maps = gradcam_maps(model, x, [m.target for m in items], layer=layer)
    pred_over, true_over = overlay(shown, pred_maps), overlay(shown, true_maps)
    layer_name = layer or getattr(unwrap(model), "cam_layer", "?")
    headers = ("image", "CAM: predicted", "overlay: predicted", "CAM: true", "overlay: true")
    fig, axes = plt.subplots(len(items), 5, figsize=(5 * 1.9, len(items) * 2.05 + 0.9), squeeze=False,
                             layout="constrained")
    for r, m in enumerate(items):
        panels = (shown[r], pred_maps[r], pred_over[r], true_maps[r], true_over[r])
        true, pred = plain(m.target_name), plain(m.prediction_name)
        captions = (f"{true} -> {pred} ({m.confidence:.0%})", pred, "", true, "")
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            shown_map = ax.imshow(panel, cmap="jet" if panel.ndim == 2 else None, vmin=0, vmax=1)
            ax.axis("off")
            ax.set_title(captions[c], fontsize=8, pad=3, color="firebrick" if c == 0 else "black")
            if r == 0:  # the column header sits a caption's height above the caption, never on it
                ax.annotate(headers[c], (0.5, 1), xycoords="axes fraction", xytext=(0, 16),
                            textcoords="offset points", ha="center", va="bottom", fontsize=9, fontweight="bold")
            if c == 1:
                cam_image = shown_map
    fig.colorbar(cam_image, ax=axes[:, 1:], location="bottom", shrink=0.5, aspect=40, pad=0.01,
                 label="GradCAM weight (each map scaled to 0-1)")
    fig.suptitle(f"{title} (layer '{layer_name}')")
    return finish_figure(fig, save)


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    flat = np.asarray(targets) * num_classes + np.asarray(predictions)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def plot_confusion_matrix(result, classes, *, save=None):
    """Counts and row-normalised (per true class) confusion matrices side by side (seaborn heatmaps). Past
    MAX_LABELLED_CLASSES classes (CIFAR-100) numbers in 10,000 cells are unreadable: one heatmap of the shares,
    unannotated, with the classes' names on the axes in small type (the most confused pairs are
    `plot_top_confusions`'s)."""
    import seaborn as sns  # deferred: seaborn (and pandas), for this figure alone

    counts = confusion_matrix(result.targets, result.predictions, len(classes))
    classes = list(map(plain, classes))
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    title = f"({len(result.targets):,} images, {result.accuracy:.2f}% correct)"
    if len(classes) > MAX_LABELLED_CLASSES:
        fig, ax = plt.subplots(figsize=(14, 12))
        sns.heatmap(rates, cmap="Blues", vmin=0, vmax=1, xticklabels=classes, yticklabels=classes, ax=ax,
                    square=True, cbar_kws={"shrink": 0.6, "label": "share of the true class"})
        ax.tick_params(labelsize=5)
        ax.set_title(f"Confusion matrix: share of each true class {title}; the most confused pairs are in "
                     "confused_pairs.png", fontsize=10)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        fig.tight_layout()
        return finish_figure(fig, save)
    fig, (ax_n, ax_r) = plt.subplots(1, 2, figsize=(17, 7))
    sns.heatmap(counts, annot=True, fmt="d", cmap="Blues", xticklabels=classes, yticklabels=classes, ax=ax_n,
                cbar_kws={"shrink": 0.8})
    sns.heatmap(rates, annot=True, fmt=".2f", cmap="Blues", vmin=0, vmax=1, xticklabels=classes,
                yticklabels=classes, ax=ax_r, cbar_kws={"shrink": 0.8})
    ax_n.set_title(f"Confusion matrix: counts {title}")
    ax_r.set_title("Confusion matrix: share of each true class")
    for ax in (ax_n, ax_r):
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.tick_params(axis="x", rotation=45)
        ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return finish_figure(fig, save)


def plot_per_class_accuracy(result, classes, *, save=None):
    """Accuracy (%) on each true class, with the overall accuracy as a line; past MAX_LABELLED_CLASSES classes,
    the worst MAX_LABELLED_CLASSES of them, worst first."""
    counts = confusion_matrix(result.targets, result.predictions, len(classes))
    acc = 100 * np.diag(counts) / np.maximum(counts.sum(1), 1)
    names, title = list(classes), "Accuracy per class"
    if len(classes) > MAX_LABELLED_CLASSES:
        worst = np.argsort(acc, kind="stable")[:MAX_LABELLED_CLASSES]
        names, acc = [classes[i] for i in worst], acc[worst]
        title = f"Accuracy per class: the {len(worst)} worst of {len(classes)}"
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.bar(list(map(plain, names)), acc, color="tab:blue", zorder=2)
    # the overall line runs behind the bars, and each label has a white ground: the line never crosses a number
    ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=3, zorder=4,
                 bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
    ax.axhline(result.accuracy, color="red", linestyle="--", zorder=1, label=f"overall {result.accuracy:.2f}%")
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return finish_figure(fig, save)


def top_confusions(result, classes, *, k: int = 10) -> list[tuple[str, str, int]]:
    """The `k` most frequent (true, predicted, count) mistakes, largest first."""
    counts = confusion_matrix(result.targets, result.predictions, len(classes))
    np.fill_diagonal(counts, 0)
    order = np.argsort(-counts, axis=None, kind="stable")[:k]
    pairs = [(classes[i // len(classes)], classes[i % len(classes)], int(counts.flat[i])) for i in order]
    return [p for p in pairs if p[2] > 0]


def plot_top_confusions(result, classes, *, k: int = 10, save=None):
    """The most confused (true -> predicted) class pairs as a horizontal bar chart."""
    pairs = top_confusions(result, classes, k=k)
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(pairs), 3) + 1))
    labels = [plain(f"{t} -> {p}") for t, p, _ in pairs]
    bars = ax.barh(labels[::-1], [n for *_, n in pairs][::-1], color="tab:orange")
    ax.bar_label(bars, fontsize=8)
    ax.set_xlabel("test images")
    ax.set_title(f"Most confused pairs (true -> predicted), top {len(pairs)}")
    if not pairs:
        ax.text(0.5, 0.5, "no mistakes", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return finish_figure(fig, save)


# ---------------------------------------------------------------------------------------------------------


# the figures of a run folder (save_run_figures)
RUN_FIGURES = ["curves.png", "confusion_matrix.png", "class_accuracy.png", "confused_pairs.png", "misclassified.png",
               "gradcam.png"]


def save_run_figures(out, *, model, history, result, test_arrays, device=None, n_misclassified: int = 20,
                     n_gradcam: int = 6, layer: str | None = None, names=None, normalization=None) -> list[Path]:
    """Write a run's figures (RUN_FIGURES, or those of them in `names`) into `out`. `result` is evaluate() on an
    unshuffled loader of `test_arrays`. GradCAM runs on the model's own device (`device` is accepted for symmetry
    and not needed), on images normalised with `normalization` ((mean, std); default CIFAR-10's). Returns the
    paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wrong = misclassified(result, test_arrays, n=max(n_misclassified, n_gradcam))
    figures = {
        "curves.png": lambda p: plot_history(history, save=p),
        "confusion_matrix.png": lambda p: plot_confusion_matrix(result, test_arrays.classes, save=p),
        "class_accuracy.png": lambda p: plot_per_class_accuracy(result, test_arrays.classes, save=p),
        "confused_pairs.png": lambda p: plot_top_confusions(result, test_arrays.classes, save=p),
        "misclassified.png": lambda p: plot_misclassified(wrong[:n_misclassified], save=p),
        "gradcam.png": lambda p: _gradcam_or_note(model, wrong[:n_gradcam], layer, p, normalization),
    }
    if list(figures) != RUN_FIGURES:
        raise RuntimeError("save_run_figures draws other figures than RUN_FIGURES names: keep the two in step")
    written = []
    for name, draw in figures.items():
        if names is not None and name not in names:
            continue
        fig = draw(out / name)
        plt.close(fig)  # ours alone: a long run must not pile up open figures
        written.append(out / name)
    return written


def _gradcam_or_note(model, items, layer, path, normalization=None):
    if items:
        return plot_gradcam(model, items, layer=layer, normalization=normalization, save=path)
    fig, ax = plt.subplots(figsize=(5, 1.5))
    ax.axis("off")
    ax.set_title("GradCAM on misclassified images")
    ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    return finish_figure(fig, path)
