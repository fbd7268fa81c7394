"""Predict and explain your own images with a trained model.

    python -m helpers.predict RUN_OR_CHECKPOINT IMAGE [IMAGE ...] [--top K] [--gradcam FILE.png] [--class NAME]

prints each image's top-K classes with their probabilities and, with --gradcam, draws per image what you gave,
the 32x32 the model saw and the GradCAM of its top class (and of --class). From Python (a notebook):

    predictor = load_predictor("runs/latest")      # a run folder or its checkpoint.pt
    p = predictor.predict("cat.jpg")              # a path, a PIL image or a numpy array
    p.top(3), p.seen                               # [(class, probability), ...], the uint8 (32, 32, 3) input
    plot_predictions(predictor, [p])

How an image becomes the model's input (the test images' way: no augmentation):
1. read by Pillow (PNG, JPEG, WebP, GIF, BMP, TIFF, ...: the first frame), turned upright by its EXIF orientation
   (phone photos are stored sideways with a note to turn them);
2. made RGB: grayscale repeated into 3 channels, 16-bit scaled to 8 bits, and transparency (RGBA, LA, a palette
   with a transparent colour) composited on white, as an image viewer shows it;
3. centre-cropped to a square: CIFAR-10 photos are square with the object in the middle, and squashing a 4:3
   photo into a square would distort every shape;
4. resized to 32x32 with Lanczos (Pillow's Lanczos spans the whole footprint when it shrinks, so a large photo
   does not alias);
5. normalised with the mean and std stored in the checkpoint (the training set's; CIFAR-10's for older ones).

A bad input (not an image, a folder, a truncated file, a checkpoint of another kind) ends in one `error: ...` line
and exit status 2; nothing is written over an existing file unless --overwrite.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from helpers import data
from helpers.checkpoints import read_checkpoint
from helpers.cli import Parser
from helpers.config import TrainConfig
from helpers.data import (  # how an image becomes the model's input lives in data: a folder data set reads the same
    SIZE,
    centre_square,
    normalize,
    square_input,
    to_rgb,
)
from helpers.gradcam import gradcam_maps, overlay
from helpers.models import build_model
from helpers.utils import UserError, add_version_flag, check_can_write, resolve_device, run_command, safe_text

DISPLAY = 256  # side of the centre square kept for display and overlays, px


class InputError(UserError, ValueError):
    """A bad input (not a readable image, a wrong class name or flag); the message says which and what to do."""


# ---------------------------------------------------------------------------------------------------------
# Reading an image


def open_image(path: str | os.PathLike) -> Image.Image:
    """An image file, decoded fully and upright by its EXIF orientation (data.open_image); an InputError when not."""
    return data.open_image(path, InputError, "pass image files (PNG, JPEG, WebP, ...)")


def check_pixels(size: tuple[int, int], name: str) -> None:
    """An InputError when an image of `size` (width, height) is larger than MAX_PIXELS."""
    data.check_pixels(size, name, InputError)


def image_from_array(array) -> Image.Image:
    """A channels-last array: (H, W) gray, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA; uint8, or float in [0, 1]."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or a.size == 0:
        raise InputError(f"an image array is (H, W), (H, W, 3) or (H, W, 4), channels last; got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InputError("a float image array must hold values in [0, 1] (de-normalise it first, e.g. with "
                             "helpers.data.denormalize), or pass uint8")
        a = np.rint(a * 255)
    elif a.dtype != np.uint8:
        raise InputError(f"an image array is uint8, or float in [0, 1]; got {a.dtype}")
    return Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)))


def as_pil(image) -> Image.Image:
    """A path, a PIL image or a numpy array (see image_from_array) as a PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, Image.Image):
        check_pixels(image.size, "the image")
        try:
            return ImageOps.exif_transpose(image)  # upright, as a file would be; a copy
        except (OSError, SyntaxError, ValueError) as err:
            raise InputError(f"the image could not be decoded ({err}): it is damaged or cut short") from None
    if isinstance(image, (np.ndarray, list, tuple)):
        return image_from_array(image)
    raise InputError(f"expected an image path, a PIL image or a numpy array, got {type(image).__name__}")


# ---------------------------------------------------------------------------------------------------------
# Predicting


@dataclass
class Prediction:
    """One image's prediction and the views of it that the figures show."""

    name: str  # the file's name, or "image" for an image given in memory
    size: tuple[int, int]  # (width, height) as given, px
    mode: str  # Pillow's mode as given: RGB, L (gray), RGBA, P (palette), ...
    square: np.ndarray  # uint8 (DISPLAY, DISPLAY, 3): the centre square, at display size
    seen: np.ndarray  # uint8 (32, 32, 3): what the model saw
    probabilities: np.ndarray  # (C,) float32 softmax
    classes: list[str]

    def top(self, k: int = 3) -> list[tuple[str, float]]:
        """The k likeliest classes with their probabilities (0-1), likeliest first."""
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(self.classes[i], float(self.probabilities[i])) for i in order]

    @property
    def label(self) -> str:
        return self.top(1)[0][0]

    @property
    def index(self) -> int:
        return int(np.argmax(self.probabilities))

    def describe(self) -> str:
        side = min(self.size)
        return f"{self.size[0]}x{self.size[1]} {self.mode}, centre {side}x{side} -> {SIZE}x{SIZE}"


@dataclass
class Predictor:
    """A trained model with what it needs to read new images: its class names and its normalisation."""

    model: nn.Module  # in eval mode, on its device
    classes: list[str]
    mean: tuple[float, float, float]  # 0-1 units
    std: tuple[float, float, float]
    model_name: str
    source: Path  # the checkpoint
    epoch: int  # epochs trained
    epochs: int  # epochs planned
    config: TrainConfig  # the run's settings

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> str:
        return f"{self.model_name}, epoch {self.epoch}/{self.epochs}, from {self.source}"

    def class_index(self, name: str) -> int:
        """The index of a class name (any case); a wrong name lists the valid ones."""
        lowered = [c.lower() for c in self.classes]
        if name.lower() not in lowered:
            raise InputError(f"no class {safe_text(repr(name))}: choose one of "
                             f"{', '.join(safe_text(c) for c in self.classes)}")
        return lowered.index(name.lower())

    def normalize(self, seen: np.ndarray) -> torch.Tensor:
        """uint8 (B, 32, 32, 3) -> the normalised float (B, 3, 32, 32) on the model's device."""
        return normalize(seen, self.mean, self.std).to(self.device)

    def predict(self, image, *, name: str | None = None) -> Prediction:
        """Read `image` (a path, a PIL image or an array), resize it as the module docstring says, classify it."""
        img = as_pil(image)
        if name is None:
            name = Path(image).name if isinstance(image, (str, os.PathLike)) else "image"
        size, mode = img.size, img.mode
        rgb = to_rgb(img)
        box = centre_square(*rgb.size)
        seen = square_input(rgb)
        enlarge = box[2] - box[0] < DISPLAY  # a small image is shown with its pixels as squares, not blurred
        square = np.asarray(rgb.resize((DISPLAY, DISPLAY), Image.Resampling.NEAREST if enlarge else
                                       Image.Resampling.LANCZOS, box=box))
        with torch.inference_mode():
            probabilities = self.model(self.normalize(seen[None])).float().softmax(1)[0].cpu().numpy()
        return Prediction(name, size, mode, square, seen, probabilities, list(self.classes))

    def gradcam(self, prediction: Prediction, target: int | None = None) -> np.ndarray:
        """GradCAM (32, 32) in [0, 1] of what the model saw, for class `target` (default: its top class)."""
        target = prediction.index if target is None else target
        return gradcam_maps(self.model, self.normalize(prediction.seen[None]), [target])[0]


def load_predictor(path: str | os.PathLike, *, device: str | torch.device = "auto") -> Predictor:
    """The model of a run folder or checkpoint, ready to predict: its evaluated weights (the weight average for
    recipes with one), in eval mode; class names and normalisation from the checkpoint (CIFAR-10's for
    checkpoints written before they were stored). Raises CheckpointError for a missing or foreign file."""
    ckpt = read_checkpoint(path)
    model = ckpt.apply_to(build_model(ckpt.config.model, num_classes=len(ckpt.classes)))
    model.to(resolve_device(device)).eval()
    return Predictor(model, list(ckpt.classes), ckpt.mean, ckpt.std, ckpt.config.model, ckpt.path, ckpt.epoch,
                     ckpt.config.epochs, ckpt.config)


def predict(run_or_predictor, image, *, top: int = 3) -> list[tuple[str, float]]:
    """The `top` likeliest classes of one image: a one-call version of load_predictor(...).predict(image)."""
    predictor = run_or_predictor if isinstance(run_or_predictor, Predictor) else load_predictor(run_or_predictor)
    return predictor.predict(image).top(top)


def overlay_on_square(prediction: Prediction, cam: np.ndarray) -> np.ndarray:
    """A (32, 32) GradCAM upsampled (bilinear) over the centre square at display size -> uint8 (DISPLAY, DISPLAY, 3).
    The square is the region the 32x32 was made from, so the two line up."""
    big = torch.nn.functional.interpolate(torch.from_numpy(cam)[None, None], size=(DISPLAY, DISPLAY),
                                          mode="bilinear", align_corners=False)[0, 0].clamp(0, 1).numpy()
    return overlay(prediction.square[None] / 255.0, big[None])[0]


# ---------------------------------------------------------------------------------------------------------
# The figure


def plot_predictions(predictor: Predictor, predictions: list[Prediction], *, target: int | None = None,
                     top: int = 3, save=None):
    """One row per image: the centre square it was cut to, the 32x32 the model saw, the GradCAM of the top class
    (and of class index `target`), and the top-`top` probabilities."""
    import matplotlib.pyplot as plt  # deferred, with helpers.plots: matplotlib, for figures alone

    from helpers.plots import finish_figure, plain

    cols = 5 if target is not None else 4
    fig, axes = plt.subplots(len(predictions), cols, figsize=(cols * 2.6, len(predictions) * 2.7), squeeze=False,
                             gridspec_kw={"width_ratios": [1] * (cols - 1) + [1.3]})
    for row, p in zip(axes, predictions):
        panels = [(p.square, f"{plain(p.name)}\n({p.describe()})"), (p.seen, f"what the model saw ({SIZE}x{SIZE})")]
        for k in [p.index] + ([target] if target is not None else []):
            cam = predictor.gradcam(p, k)
            none = "\nno evidence for it: map all 0" if cam.max() == 0 else ""
            title = f"GradCAM: {plain(p.classes[k])} ({p.probabilities[k]:.0%}){none}"
            panels.append((overlay_on_square(p, cam), title))
        for ax, (picture, title) in zip(row, panels):
            ax.imshow(picture, interpolation="nearest" if picture.shape[0] == SIZE else "antialiased")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        ranked = p.top(top)[::-1]
        bars = row[-1].barh([plain(c) for c, _ in ranked], [100 * v for _, v in ranked], color="tab:blue")
        bars[-1].set_color("tab:orange")
        row[-1].bar_label(bars, fmt="%.1f%%", fontsize=8, padding=2)
        row[-1].set_xlim(0, 119)
        row[-1].set_xlabel("probability, %", fontsize=8)
        row[-1].tick_params(labelsize=8)
        row[-1].set_title(f"top {len(ranked)}", fontsize=8)
        for side in ("top", "right"):
            row[-1].spines[side].set_visible(False)
    fig.suptitle(f"{predictor.model_name}: predictions and where it looked (GradCAM maps scaled per image)",
                 fontsize=10)
    fig.tight_layout()
    return finish_figure(fig, save)


# ---------------------------------------------------------------------------------------------------------
# The command line


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="cifar10 predict", description=__doc__.split("\n\n")[0],
                                epilog="Images are centre-cropped to a square and resized to 32x32 (Lanczos); "
                                       "transparent pixels become white.")
    add_version_flag(p)
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="a run folder (holding checkpoint.pt) or a "
                   "checkpoint file written by helpers.train")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files: PNG, JPEG, WebP, ...; any size")
    p.add_argument("--top", type=int, default=3, metavar="K", help="classes to print per image (default: 3)")
    p.add_argument("--gradcam", metavar="FILE.png", help="also draw each image, the 32x32 the model saw and the "
                   "GradCAM of its top class into this new file")
    p.add_argument("--class", dest="target", metavar="NAME", help="also explain this class (in --gradcam's figure) "
                   "and print its probability")
    p.add_argument("--overwrite", action="store_true", help="let --gradcam replace an existing file")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)")
    return p


FIGURE_TYPES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")
IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")  # what a user's photo is called


def new_figure_path(path: str, *, overwrite: bool, flag: str = "--gradcam") -> Path:
    """A figure file named on the command line, checked before any work: a name matplotlib writes, not a folder,
    not an existing file unless `overwrite` (nothing of the user's is replaced unasked), in a folder that can be
    made and written to on a disk with space (check_can_write)."""
    out = check_can_write(path, f"{flag} {path}")
    if out.is_dir():
        raise InputError(f"{flag} {out} is a folder: give a file name, e.g. {out / 'figure.png'}")
    if out.suffix.lower() not in FIGURE_TYPES:
        raise InputError(f"{flag} {out}: end the name in .png (or .jpg, .pdf, .svg)")
    if out.exists() and not overwrite:
        raise InputError(f"{flag} {out} exists: choose another name, or pass --overwrite to replace it")
    return out


def format_prediction(p: Prediction, top: int, target: int | None = None) -> str:
    """One image's lines: its name and size, then its top classes; names from files are made safe (safe_text)."""
    lines = [f"{safe_text(p.name)} ({p.describe()}):"]
    lines += [f"  {safe_text(name):<12} {100 * prob:5.1f}%" for name, prob in p.top(top)]
    if target is not None and p.classes[target] not in dict(p.top(top)):
        lines.append(f"  {safe_text(p.classes[target]):<12} {100 * p.probabilities[target]:5.1f}%  (--class)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        out = new_figure_path(args.gradcam, overwrite=args.overwrite) if args.gradcam else None
        if Path(args.checkpoint).suffix.lower() in IMAGE_TYPES:  # the arguments swapped
            raise InputError(f"{args.checkpoint} is an image, not a run: give the run first, then the images "
                             "(python -m helpers.predict RUN_OR_CHECKPOINT IMAGE ...)")
        predictor = load_predictor(args.checkpoint, device=args.device)
        if not 1 <= args.top <= len(predictor.classes):
            raise InputError(f"--top {args.top}: choose 1 to {len(predictor.classes)}")
        target = predictor.class_index(args.target) if args.target else None
        images = [(Path(path).name, open_image(path)) for path in args.images]  # all read before any output
        print(safe_text(predictor.describe()))
        predictions = [predictor.predict(img, name=name) for name, img in images]
        for p in predictions:
            print(format_prediction(p, args.top, target))
        if out is not None:
            from helpers.plots import save_figure  # deferred: matplotlib, for --gradcam alone

            save_figure(plot_predictions(predictor, predictions, target=target, top=args.top), out)
            print(f"GradCAM figure: {safe_text(out)}")

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
