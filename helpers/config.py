"""Every setting of a run, and the one table of each model's training recipes.

`TrainConfig(model=..., recipe=...)` fills every recipe setting you leave out from `RECIPES[model][recipe]`;
the command line's defaults and help, the notebooks and the benchmark read the same table. A TrainConfig checks
itself when it is made: a bad value is a `ConfigError` that says what is allowed, in a notebook as on the command
line.

The write-ups the recipes come from (their published results, on the official CIFAR-10 files):
- "ResNet18 and GradCAM on CIFAR 10": ResNet-18, Adam to the LR finder's peak, 91.81% in 20 epochs.
- the depthwise-separable, dilated network write-up: depthwise_net, 87.17% in 200 epochs.
- "Training of a custom ResNet architecture for CIFAR 10" (D. Page's ResNet-9, "DavidNet"): 94.12% in 24 epochs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

MODES = ("auto", "eager", "graphs", "compile")
SCHEDULERS = ("onecycle", "plateau", "none")
OPTIMIZERS = ("sgd", "adam")
LOADERS = ("auto", "gpu", "torch")

# model -> recipe name -> settings. "writeup": the recipe as its write-up published it; "fast": ours, where we have
# measured a better one. Learning rates are for a mean loss (Page's lr 0.4/512 and wd 5e-4*512 are for a summed one).
RECIPES: dict[str, dict[str, dict]] = {
    "custom_resnet": {
        # the custom-ResNet write-up: SGD 0.9, one-cycle 0.045 -> 0.45 peaking at the start of epoch 8 of 24, then
        # linear down; label smoothing 0.1; Page's crop/flip/8x8-cutout augmentation
        "writeup": dict(epochs=24, batch_size=512, optimizer="sgd", lr=0.045, max_lr=0.45, pct_start=7 / 24,
                        momentum=0.9, nesterov=False, weight_decay=5e-4, label_smoothing=0.1, l1=0.0,
                        scheduler="onecycle", augment="davidnet"),
    },
    "resnet18": {
        # the ResNet-18 write-up: Adam from 1e-5 (wd 1e-3) one-cycle up to the LR range test's pick, batch 128
        "writeup": dict(epochs=20, batch_size=128, optimizer="adam", lr=1e-5, max_lr="auto", pct_start=0.25,
                        momentum=0.9, nesterov=False, weight_decay=1e-3, label_smoothing=0.0, l1=0.0,
                        scheduler="onecycle", augment="resnet18"),
        # ours: SGD Nesterov one-cycle 0.04 -> 0.4, label smoothing, batch 512. H100, commit 858b4af, CIFAR-10 (JPEG
        # copy): 90.23% in 25.8 s (one seed), against the write-up recipe's 87.65% in 112 s
        "fast": dict(epochs=20, batch_size=512, optimizer="sgd", lr=0.04, max_lr=0.4, pct_start=0.25,
                     momentum=0.9, nesterov=True, weight_decay=5e-4, label_smoothing=0.1, l1=0.0,
                     scheduler="onecycle", augment="davidnet"),
    },
    "depthwise_net": {
        # the depthwise-net write-up: SGD 0.8, one-cycle 0.025 -> 0.2, L1 5e-4 on all weights, 200 epochs
        "writeup": dict(epochs=200, batch_size=128, optimizer="sgd", lr=0.025, max_lr=0.2, pct_start=0.25,
                        momentum=0.8, nesterov=False, weight_decay=0.0, label_smoothing=0.0, l1=5e-4,
                        scheduler="onecycle", augment="depthwise"),
    },
}
# recipe settings most recipes leave at these values
RECIPE_OPTIONAL = dict(
    ema=0.0,  # per-step decay of an exponential moving average of the weights, evaluated instead (0: off)
    ema_epochs=0,  # average over the last this many epochs only (0: all)
    bias_lr_scale=1.0,  # LR x this and weight decay / this for batch-norm parameters (Page's and airbench's: 64)
    freeze_bn_weight=False,  # batch-norm scales stay at 1 (Page's and airbench's trick)
    tta="none",  # test-time augmentation reported beside the plain accuracy: none | flip | flip_translate
)
RECIPES["custom_resnet"]["fast"] = dict(
    # ours, after Page's "bag of tricks" (as re-implemented in KellerJordan/cifar10-zoo, dawnbench_nogbn.py: 94.16%
    # in 11 epochs on the official files) with our ResNet-9's layers (no whitening layer, ReLU, logit scale 1/8):
    # Nesterov, label smoothing 0.2, frozen batch-norm scales with 64x LR on their biases, weight averaging over the
    # last 2 epochs, flip + translate TTA. NOT YET MEASURED ON A GPU: not the default until it is.
    epochs=10, batch_size=512, optimizer="sgd", lr=0.08, max_lr=0.8, pct_start=0.2, momentum=0.9, nesterov=True,
    weight_decay=5e-4, label_smoothing=0.2, l1=0.0, scheduler="onecycle", augment="davidnet",
    ema=0.99, ema_epochs=2, bias_lr_scale=64.0, freeze_bn_weight=True, tta="flip_translate",
)
DEFAULT_RECIPE = {"custom_resnet": "writeup", "resnet18": "fast", "depthwise_net": "writeup"}
RECIPE_KEYS = tuple(RECIPES["custom_resnet"]["writeup"]) + tuple(RECIPE_OPTIONAL)
TTA = ("none", "flip", "flip_translate")


class ConfigError(ValueError):
    """A setting is out of range or unknown; the message names it and what is allowed."""


@dataclass
class TrainConfig:
    """Every setting of a run (saved in checkpoints and metrics.json). Accuracies are in percent.

    Recipe settings left as None come from RECIPES[model][recipe] (recipe None: the model's default recipe).
    """

    model: str = "custom_resnet"
    recipe: str | None = None  # a name in RECIPES[model]
    # --- recipe settings (None: the recipe's)
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None  # sgd | adam
    lr: float | None = None  # one-cycle: starting LR (None in the recipe too: max_lr / 10); plateau/none: the LR
    max_lr: float | str | None = None  # one-cycle peak; "auto": the LR range test finds it (fit needs a number)
    pct_start: float | None = None  # share of one-cycle steps spent warming up
    momentum: float | None = None  # SGD momentum; Adam's beta1
    nesterov: bool | None = None
    weight_decay: float | None = None  # coupled L2, on a mean loss
    label_smoothing: float | None = None
    l1: float | None = None  # L1 penalty factor on all parameters
    scheduler: str | None = None  # onecycle (stepped per batch) | plateau (per epoch, on test loss) | none
    augment: str | None = None  # a recipe of helpers.data.AUGMENTATIONS
    ema: float | None = None  # see RECIPE_OPTIONAL
    ema_epochs: int | None = None
    bias_lr_scale: float | None = None
    freeze_bn_weight: bool | None = None
    tta: str | bool | None = None  # none | flip | flip_translate (True: flip); reported beside the plain accuracy
    # --- how to run it
    amp: bool | None = None  # mixed precision; None: on for CUDA, off on the CPU
    channels_last: bool = True
    mode: str = "auto"  # auto | eager | graphs | compile (helpers.engine.choose_mode)
    seed: int = 0
    data_dir: str = "data"
    subset_train: int | None = None  # class-balanced subset sizes (None: everything)
    subset_test: int | None = None
    workers: int | None = None  # DataLoader workers (None: CPU cores - 1)
    loader: str = "auto"  # auto | gpu | torch

    def __post_init__(self):
        if self.model not in RECIPES:
            raise ConfigError(f"unknown model {self.model!r}: choose one of {', '.join(RECIPES)}")
        self.recipe = self.recipe or DEFAULT_RECIPE[self.model]
        if self.recipe not in RECIPES[self.model]:
            raise ConfigError(f"{self.model} has no recipe {self.recipe!r}: choose one of "
                              f"{', '.join(RECIPES[self.model])}")
        recipe = RECIPES[self.model][self.recipe]
        filled = [key for key in RECIPE_KEYS if getattr(self, key) is None]
        for key in filled:
            setattr(self, key, recipe.get(key, RECIPE_OPTIONAL.get(key)))
        if "ema_epochs" in filled and isinstance(self.epochs, int) and self.epochs > 0:
            self.ema_epochs = min(self.ema_epochs, self.epochs)  # the recipe's averaging fits a shorter run
        if isinstance(self.tta, bool):
            self.tta = "flip" if self.tta else "none"
        self.validate()

    @classmethod
    def for_model(cls, model: str, **overrides) -> TrainConfig:
        """The model's default recipe (or recipe=...), with any settings overridden."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(model=model, **overrides)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainConfig:
        """A config saved by asdict (checkpoints, metrics.json), including those of older versions."""
        saved = dict(saved)
        if saved.pop("compile", False):  # format 1 had compile: bool
            saved["mode"] = "compile"
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def start_lr(self) -> float:
        """The one-cycle start (or the constant LR of plateau/none)."""
        return self.lr if self.lr is not None else self.peak_lr / 10

    @property
    def peak_lr(self) -> float:
        """max_lr as a number; 'auto' must have been resolved by the LR range test first."""
        if isinstance(self.max_lr, (int, float)):
            return float(self.max_lr)
        if self.scheduler != "onecycle" and self.lr is not None:
            return self.lr * 10
        raise ConfigError(
            f"max_lr must be a positive number here, got {self.max_lr!r}: run helpers.lr_finder.lr_range_test "
            "(or `python -m helpers.train --max-lr auto`) and pass its suggestion"
        )

    def validate(self) -> None:
        """Raise ConfigError for the first setting out of range."""
        from helpers.data import RECIPES as AUGMENTATIONS  # the augmentation recipes' names

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        def positive(name: str, kind=(int, float)) -> None:
            value = getattr(self, name)
            need(isinstance(value, kind) and not isinstance(value, bool) and value > 0, name, "> 0")

        def non_negative(name: str) -> None:
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, name, ">= 0")

        positive("epochs", int)
        positive("batch_size", int)
        need(self.optimizer in OPTIMIZERS, "optimizer", " or ".join(OPTIMIZERS))
        need(self.scheduler in SCHEDULERS, "scheduler", ", ".join(SCHEDULERS))
        need(self.augment in AUGMENTATIONS, "augment", ", ".join(AUGMENTATIONS))
        need(self.mode in MODES, "mode", ", ".join(MODES))
        need(self.loader in LOADERS, "loader", ", ".join(LOADERS))
        if self.lr is not None:
            positive("lr")
        need(self.max_lr == "auto" or (isinstance(self.max_lr, (int, float)) and self.max_lr > 0
                                       and math.isfinite(self.max_lr)),
             "max_lr", "a positive number or 'auto' (the LR range test)")
        need(isinstance(self.pct_start, (int, float)) and 0 < self.pct_start < 1, "pct_start", "between 0 and 1")
        for name in ("momentum", "weight_decay", "l1"):
            non_negative(name)
        need(isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 1,
             "label_smoothing", "in [0, 1)")
        need(self.tta in TTA, "tta", ", ".join(TTA))
        need(isinstance(self.ema, (int, float)) and 0 <= self.ema < 1, "ema", "in [0, 1) (0: off)")
        need(isinstance(self.ema_epochs, int) and 0 <= self.ema_epochs <= self.epochs, "ema_epochs",
             f"between 0 and epochs ({self.epochs})")
        positive("bias_lr_scale")
        for name in ("subset_train", "subset_test"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 10), name,
                 "at least 10 (one image per class)")
        need(self.workers is None or (isinstance(self.workers, int) and self.workers >= 0), "workers", ">= 0")


def recipe_table() -> str:
    """One line per model and recipe, for --help and the README: epochs, batch, optimizer, peak LR, augmentation."""
    lines = []
    for model, recipes in RECIPES.items():
        for name, r in recipes.items():
            default = " (default)" if DEFAULT_RECIPE[model] == name else ""
            lines.append(f"{model} {name}{default}: {r['epochs']} epochs, batch {r['batch_size']}, {r['optimizer']}"
                         f"{' nesterov' if r['nesterov'] else ''}, peak LR {r['max_lr']}, augment {r['augment']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Small runs

MIN_STEPS = 20  # training steps per epoch below which a run without a given batch size gets a smaller batch


def adapt_small_run(config: TrainConfig, images: int, given: dict) -> str | None:
    """A recipe's batch on a small training set gives a handful of steps: one-cycle then barely leaves its start
    LR and the run learns nothing. Unless the batch size was given (a key of `given`: the settings the user set),
    halve the batch (to 16 at least) until an epoch has MIN_STEPS steps, scaling SGD's learning rates with it
    (the linear scaling rule). Changes `config` in place; returns what was chosen, for the user to read."""
    if "batch_size" in given or steps_per_epoch(images, config.batch_size) >= MIN_STEPS:
        return None
    old_batch, batch = config.batch_size, config.batch_size
    while batch > 16 and steps_per_epoch(images, batch) < MIN_STEPS:
        batch //= 2
    config.batch_size = batch
    note = (f"small run: {images:,} training images at the recipe's batch {old_batch} would be "
            f"{steps_per_epoch(images, old_batch)} step(s) per epoch; using batch {batch} "
            f"({steps_per_epoch(images, batch)} steps)")
    if config.optimizer == "sgd" and isinstance(config.max_lr, float) and not {"lr", "max_lr"} & set(given):
        scale = batch / old_batch
        config.max_lr *= scale
        config.lr = config.lr * scale if config.lr is not None else None
        note += f" and peak LR {config.max_lr:.3g} (scaled with the batch)"
    return note + ". Set the batch size (--batch-size) to choose yourself."


def steps_per_epoch(images: int, batch: int) -> int:
    """Training steps per epoch: full batches only (drop_last), or one batch when the set is smaller."""
    return images // batch if images >= batch else 1


def too_few_steps(config: TrainConfig, images: int) -> str | None:
    steps = steps_per_epoch(images, config.batch_size)
    if steps * config.epochs >= 2 * MIN_STEPS:
        return None
    return (f"warning: only {steps * config.epochs} training step(s) in all ({images:,} images, batch "
            f"{config.batch_size}, {config.epochs} epoch(s)): too few to learn much; use a smaller --batch-size or "
            "more data")
