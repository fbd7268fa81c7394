"""Where the model looked: GradCAM (Selvaraju et al., 2017) over pytorch-grad-cam 1.5.7, and the misclassified images.

`gradcam_maps(model, images, classes)` returns one (32, 32) map in [0, 1] per image for the class asked for. It
works around the library's traps: it runs in fp32 outside autocast and with gradients on (the library fails under
no_grad, inference_mode and bf16 autocast), restores every module's train/eval mode (the library leaves the model
in eval), leaves parameters' `.grad` and `requires_grad` as they were, releases its hooks, hooks the original
module of a `torch.compile`d model, and names the valid layers when a layer name is wrong. Each map is min-max
normalised per image (the library's choice): a hot spot is there even when the map is uninformative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from helpers.data import CIFAR10_MEAN, CIFAR10_STD, normalize
from helpers.utils import preserved_modes, unwrap


class LayerNotFound(ValueError):
    """No module of that dotted name; the message lists the valid ones."""


@dataclass
class Misclassified:
    """One wrong prediction on the test set (index into the test arrays)."""

    index: int
    image: np.ndarray  # uint8 (32, 32, 3)
    target: int
    prediction: int
    confidence: float  # softmax probability of the (wrong) predicted class
    target_name: str
    prediction_name: str


def misclassified(result, test_arrays, *, n: int = 10) -> list[Misclassified]:
    """The `n` misclassified test images, most confident first, from `evaluate` on an unshuffled test loader."""
    if len(result.targets) != len(test_arrays) or not np.array_equal(result.targets, test_arrays.labels):
        raise ValueError(
            f"the evaluation ({len(result.targets)} images) does not line up with test_arrays ({len(test_arrays)}): "
            "evaluate on make_loader(test_arrays, train=False), which keeps the dataset's order"
        )
    names = test_arrays.classes
    return [
        Misclassified(
            index=int(i), image=test_arrays.images[i], target=int(result.targets[i]),
            prediction=int(result.predictions[i]), confidence=float(result.confidences[i]),
            target_name=names[result.targets[i]], prediction_name=names[result.predictions[i]],
        )
        for i in result.misclassified[:n]
    ]


def normalize_images(images: np.ndarray, *, mean=None, std=None) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) images -> the normalised float (B, 3, 32, 32) tensor a test loader would give.
    mean, std: the run's normalisation ([0, 1] units; default CIFAR-10's)."""
    return normalize(images, mean or CIFAR10_MEAN, std or CIFAR10_STD)


# ---------------------------------------------------------------------------------------------------------


def find_layer(model: nn.Module, name: str | None = None) -> nn.Module:
    """The submodule at dotted `name` (default: the model's `cam_layer`); a wrong name lists the valid ones."""
    base = unwrap(model)
    name = name if name is not None else getattr(base, "cam_layer", None)
    if name is None:
        raise LayerNotFound(f"{type(base).__name__} has no `cam_layer`: pass layer= (a dotted module name)")
    modules = dict(base.named_modules())
    if name not in modules or name == "":
        valid = ", ".join(n for n in modules if n)
        raise LayerNotFound(f"{type(base).__name__} has no layer {name!r}. Valid layer names: {valid}")
    return modules[name]


def gradcam_maps(
    model: nn.Module,
    images: torch.Tensor,
    target_classes=None,
    *,
    layer: str | None = None,
    aug_smooth: bool = False,
) -> np.ndarray:
    """GradCAM maps (B, H, W) float32 in [0, 1] of normalised `images` (B, 3, H, W) for `target_classes` (B,).

    target_classes: one class per image (None: each image's predicted class). layer: dotted module name
    (default `model.cam_layer`). The model's device is used; its modes, gradients and hooks are left as found.
    """
    from pytorch_grad_cam import GradCAM  # deferred: pytorch-grad-cam and OpenCV, for GradCAM alone
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    base = unwrap(model)
    target_layer = find_layer(base, layer)
    device = next(base.parameters()).device
    if images.ndim != 4:
        raise ValueError(f"images must be a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
    targets = None
    if target_classes is not None:
        classes = [int(c) for c in np.asarray(target_classes).reshape(-1)]
        if any(c < 0 for c in classes):  # a negative index would silently pick a class from the end
            raise ValueError(f"target classes must be >= 0, got {classes}")
        if len(classes) != len(images):
            raise ValueError(f"one target class per image: got {len(classes)} for {len(images)} images")
        targets = [ClassifierOutputTarget(c) for c in classes]

    failure = None
    maps = None
    # fp32 and gradients even inside no_grad / inference_mode / autocast (numpy has no bf16); GradCAM calls
    # model.eval() and never restores it
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
            preserved_modes(base, grads=True):
        x = images.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
        for p in base.parameters():  # gradients flow to the activations through the input only: no parameter .grad
            p.requires_grad_(False)
        with GradCAM(model=base, target_layers=[target_layer]) as cam:  # releases its hooks on exit
            try:
                maps = cam(input_tensor=x, targets=targets, aug_smooth=aug_smooth)
            except IndexError as err:  # the library's `with` swallows IndexError: carry it out
                failure = err
    if failure is not None or maps is None:
        raise ValueError(
            f"GradCAM failed ({failure}): is every target class in 0..num_classes-1, and does layer "
            f"{layer or getattr(base, 'cam_layer', None)!r} output a (B, C, H, W) map?"
        )
    return maps.astype(np.float32)


@dataclass
class CamPair:
    """GradCAM for the predicted and for the true class of each image."""

    predictions: np.ndarray  # (B,) int64
    predicted_maps: np.ndarray  # (B, H, W) in [0, 1]
    true_maps: np.ndarray  # (B, H, W) in [0, 1]


def gradcam_pred_and_true(model: nn.Module, images: torch.Tensor, labels, *, layer: str | None = None) -> CamPair:
    """Maps for each image's predicted class and for its true class `labels` (B,): where it looked, and why not."""
    base = unwrap(model)
    device = next(base.parameters()).device
    with preserved_modes(base), torch.inference_mode(False), torch.no_grad(), \
            torch.autocast(device.type, enabled=False):
        base.eval()
        predictions = base(images.detach().to(device, torch.float32).clone()).argmax(1).cpu().numpy()
    return CamPair(
        predictions=predictions,
        predicted_maps=gradcam_maps(model, images, predictions, layer=layer),
        true_maps=gradcam_maps(model, images, labels, layer=layer),
    )


def overlay(images: np.ndarray, maps: np.ndarray, *, image_weight: float = 0.5) -> np.ndarray:
    """Heatmaps (B, H, W) in [0, 1] over float images (B, H, W, 3) in [0, 1] (use data.denormalize) -> uint8."""
    from pytorch_grad_cam.utils.image import show_cam_on_image  # deferred: as above

    images = np.asarray(images, dtype=np.float32)
    if images.min() < -1e-6 or images.max() > 1.0 + 1e-6:
        raise ValueError("overlay wants float images in [0, 1]: de-normalise with helpers.data.denormalize first")
    return np.stack([show_cam_on_image(img, m, use_rgb=True, image_weight=image_weight)
                     for img, m in zip(images, maps)])
