"""Every setting of a run, and the one table of each model's training recipes.

`TrainConfig` is the one schema: each field carries its type, allowed values and help (`Setting`), the command
line's flags are generated from it (helpers.cli), and a value of the wrong type or out of range is a
`ConfigError` in Python exactly as on the command line. Recipe settings left as None are filled from
`RECIPES[model][recipe]`. A config is frozen once it has checked itself: `evolve(config, **changes)` returns a new,
checked one.

The write-ups the recipes come from (their published results, on the official CIFAR-10 files):
- "ResNet18 and GradCAM on CIFAR 10": ResNet-18, Adam to the LR finder's peak, 91.81% in 20 epochs.
- the depthwise-separable, dilated network write-up: depthwise_net, 87.17% in 200 epochs.
- "Training of a custom ResNet architecture for CIFAR 10" (D. Page's ResNet-9, "DavidNet"): 94.12% in 24 epochs.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from helpers.data import AUGMENTATIONS, default_data_dir
from helpers.models import MODELS
from helpers.utils import UserError, read_text_file, setting_name

MODES = ("auto", "eager", "graphs", "compile")
SCHEDULERS = ("onecycle", "plateau", "none")
OPTIMIZERS = ("sgd", "adam")
LOADERS = ("auto", "gpu", "torch")
TTA = ("none", "flip", "flip_translate")
# the LR range test's (helpers.lr_finder, which reads them here): its suggestion rules, the default one, and the
# fewest steps it can suggest from (torch-lr-finder skips 10 points at the start and 5 at the end, and needs 2 more)
LR_RULES = ("steepest", "decade_below_min", "min_loss")
LR_DEFAULT_RULE = "steepest"
LR_TEST_MIN_STEPS = 17
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit

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
        # ours: SGD Nesterov one-cycle 0.04 -> 0.4, label smoothing, batch 512 (measured: BENCHMARKS.md)
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
    # last 2 epochs, flip + translate TTA. Not the default until a GPU run shows it beats "writeup" (BENCHMARKS.md).
    epochs=10, batch_size=512, optimizer="sgd", lr=0.08, max_lr=0.8, pct_start=0.2, momentum=0.9, nesterov=True,
    weight_decay=5e-4, label_smoothing=0.2, l1=0.0, scheduler="onecycle", augment="davidnet",
    ema=0.99, ema_epochs=2, bias_lr_scale=64.0, freeze_bn_weight=True, tta="flip_translate",
)
DEFAULT_RECIPE = {"custom_resnet": "writeup", "resnet18": "fast", "depthwise_net": "writeup"}


class ConfigError(UserError, ValueError):
    """A setting is out of range, of the wrong type or unknown; the message names it and what is allowed."""


def setting(default, help: str, kind: str, *, allowed: str = "", ok=None, choices=None, recipe: bool = False,
            nullable: bool = False, const=None, resume_free: bool = False):
    """A TrainConfig field with its schema. kind: int | float | bool | str | path | peak (a float or 'auto') | dataset
    (cifar10, cifar100 or folder:PATH).
    ok(value) -> bool checks the range and `allowed` says it in words; choices: the allowed strings; recipe: None
    means the recipe's value; nullable: None is a value of its own (after the recipe's are filled in); const: the
    flag's value when given bare; resume_free: a resumed run may change it (where the data is, how the step
    executes: never what the run computes)."""
    meta = dict(help=help, kind=kind, allowed=allowed, ok=ok, choices=choices, recipe=recipe, nullable=nullable,
                const=const, resume_free=resume_free)
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _recipe(help: str, kind: str, **schema):
    return setting(None, help, kind, recipe=True, **schema)


def _positive(v) -> bool:
    return v > 0


def _fraction(v) -> bool:
    return 0 <= v < 1


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run (saved in checkpoints and metrics.json). Accuracies are in percent.

    Recipe settings left as None come from RECIPES[model][recipe] (recipe None: the model's default recipe).
    """

    model: str = setting("custom_resnet", "the network (helpers.models.MODELS)", "str", choices=tuple(MODELS))
    recipe: str | None = setting(None, "a recipe of the model (default: the model's default)", "str", nullable=True)
    # --- recipe settings (None: the recipe's)
    epochs: int | None = _recipe("training epochs", "int", ok=_positive, allowed="> 0")
    batch_size: int | None = _recipe("images per step (a small training set gets a smaller one: adapt_small_runs)",
                                     "int", ok=_positive, allowed="> 0")
    optimizer: str | None = _recipe("the optimizer (momentum is Adam's beta1)", "str", choices=OPTIMIZERS)
    lr: float | None = _recipe("one-cycle: the starting LR (default: max_lr / 10); plateau/none: the LR", "float",
                               ok=_positive, allowed="> 0", nullable=True)  # None: max_lr / 10
    max_lr: float | str | None = _recipe("one-cycle peak LR, or 'auto': the LR range test finds it first", "peak",
                                         ok=_positive, allowed="a positive number or 'auto' (the LR range test)")
    pct_start: float | None = _recipe("share of one-cycle steps spent rising to the peak", "float",
                                      ok=lambda v: 0 < v < 1, allowed="between 0 and 1")
    momentum: float | None = _recipe("SGD momentum; Adam's beta1", "float", ok=_fraction, allowed="in [0, 1)")
    nesterov: bool | None = _recipe("Nesterov momentum (SGD)", "bool")
    weight_decay: float | None = _recipe("coupled L2 weight decay, on a mean loss", "float", ok=lambda v: v >= 0,
                                         allowed=">= 0")
    label_smoothing: float | None = _recipe("share of each target spread over all classes", "float", ok=_fraction,
                                            allowed="in [0, 1)")
    l1: float | None = _recipe("L1 penalty factor on all parameters", "float", ok=lambda v: v >= 0, allowed=">= 0")
    scheduler: str | None = _recipe("onecycle (per batch), plateau (per epoch, on the validation loss with "
                                    "--val-split, else the test loss) or none", "str",
                                    choices=SCHEDULERS)
    augment: str | None = _recipe("training augmentation (helpers.data.AUGMENTATIONS)", "str",
                                  choices=tuple(AUGMENTATIONS))
    ema: float | None = _recipe("per-step decay of a weight average evaluated instead (0: off)", "float",
                                ok=_fraction, allowed="in [0, 1) (0: off)")
    ema_epochs: int | None = _recipe("average over the last N epochs only (0: all)", "int", ok=lambda v: v >= 0,
                                     allowed=">= 0")
    bias_lr_scale: float | None = _recipe("LR x this, weight decay / this, for batch-norm parameters", "float",
                                          ok=_positive, allowed="> 0")
    freeze_bn_weight: bool | None = _recipe("keep batch-norm scales at 1", "bool")
    tta: str | None = _recipe("test-time augmentation reported beside the plain accuracy after the last epoch: "
                              "flip (when given alone) or flip_translate (airbench's flips and 1-px shifts)", "str",
                              choices=TTA,
                              const="flip")
    # --- how to run it
    amp: bool | None = setting(None, "mixed precision (default: on for CUDA, bf16 or fp16 on GPUs without bf16; "
                               "off on the CPU)", "bool", nullable=True)
    channels_last: bool = setting(True, "channels-last memory format", "bool")
    mode: str = setting("auto", "how the step runs: auto (eager on the CPU, CUDA graphs or compile on a GPU), "
                        "eager, graphs, compile", "str", choices=MODES, resume_free=True)
    sync_bn: bool = setting(False, "under torchrun: batch-norm statistics over the global batch (SyncBatchNorm, "
                            "CUDA only) instead of each process's slice", "bool")
    deterministic: bool = setting(False, "bit-for-bit repeatable on one machine: deterministic algorithms only, no "
                                  "cuDNN autotuning (slower: see the README)", "bool", resume_free=True)
    tensorboard: bool = setting(False, "also log each epoch's scalars and the run's figures for TensorBoard, in "
                                "OUT/tensorboard (needs the tensorboard package)", "bool", resume_free=True)
    seed: int = setting(0, "seed of weights, data order, augmentation and subsets", "int",
                        ok=lambda v: 0 <= v <= SEED_MAX, allowed=f"between 0 and {SEED_MAX}")
    dataset: str = setting("cifar10", "cifar10, cifar100 (downloaded into --data-dir like CIFAR-10), or folder:PATH: "
                           "your images in class folders (PATH/<class>/*.jpg, or PATH/train/<class> and "
                           "PATH/test/<class>), resized to 32x32 once and cached in --data-dir; the recipes are "
                           "CIFAR-10's", "dataset", allowed="cifar10, cifar100 or folder:PATH")
    data_dir: str = setting(default_data_dir, "folder holding cifar-10-batches-py (cifar-100-python), or that folder "
                            "itself; downloaded if missing (default: $CIFAR_DIR, else the clone's data/)", "path",
                            resume_free=True)
    subset_train: int | None = setting(None, "class-balanced training subset size (default: all)", "int",
                                       nullable=True,
                                       ok=lambda v: v >= 10, allowed="at least 10 (one image per class)")
    subset_test: int | None = setting(None, "class-balanced test subset size (default: all)", "int", nullable=True,
                                      ok=lambda v: v >= 10, allowed="at least 10 (one image per class)")
    val_split: int | None = setting(None, "hold out this many training images (class-balanced, seeded, kept by "
                                    "--resume) for validation: the per-epoch table, the plateau scheduler and "
                                    "sweeps select on it and the test set is evaluated once, at the end (default: "
                                    "none, every epoch is tested on the test set)", "int", nullable=True,
                                    ok=_positive, allowed="> 0 (and at least one image per class)")
    workers: int | None = setting(None, "DataLoader workers (default: CPU cores - 1, at most 8)", "int",
                                  nullable=True, ok=lambda v: v >= 0, allowed=">= 0", resume_free=True)
    loader: str = setting("auto", "gpu: the whole set on the device, batched augmentation (auto: gpu with CUDA)",
                          "str", choices=LOADERS)
    lr_test_steps: int = setting(100, "steps of the LR range test run when max_lr is 'auto'", "int",
                                 ok=lambda v: v >= LR_TEST_MIN_STEPS, allowed=f"at least {LR_TEST_MIN_STEPS}")
    lr_rule: str = setting(LR_DEFAULT_RULE, "which range-test pick max_lr 'auto' takes (helpers.lr_finder)", "str",
                           choices=LR_RULES)
    adapt_small_runs: bool = setting(True, "fit the batch and the weight averaging to a small training set "
                                     "(helpers.run.adapt_to_data)", "bool")

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # frozen: only while checking itself
        _check(self, fields(self)[:2])  # model and recipe first: the recipe table depends on them
        set_("recipe", self.recipe or DEFAULT_RECIPE[self.model])
        if self.recipe not in RECIPES[self.model]:
            raise ConfigError(f"{self.model} has no recipe {self.recipe!r}: choose one of "
                              f"{', '.join(RECIPES[self.model])}")
        recipe = RECIPE_OPTIONAL | RECIPES[self.model][self.recipe]
        filled = [key for key in RECIPE_KEYS if getattr(self, key) is None]
        for key in filled:
            if key not in recipe:
                raise ConfigError(f"recipe {self.recipe!r} of {self.model} has no {key}: give it one, or pass {key}")
            set_(key, recipe[key])
        if "ema_epochs" in filled and _is_int(self.epochs) and self.epochs > 0:
            set_("ema_epochs", min(self.ema_epochs, self.epochs))  # the recipe's averaging fits a shorter run
        set_("tta", tta_name(self.tta))
        for f in fields(self):
            set_(f.name, _checked(f, getattr(self, f.name)))
        if self.ema_epochs > self.epochs:
            raise ConfigError(f"ema_epochs must be between 0 and epochs ({self.epochs}), got {self.ema_epochs!r}")

    @classmethod
    def for_model(cls, model: str, **overrides) -> TrainConfig:
        """The model's default recipe (or recipe=...), with any settings overridden."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
        return cls(model=model, **overrides)

    @classmethod
    def from_dict(cls, saved: dict) -> TrainConfig:
        """A config saved by to_dict (checkpoints, metrics.json); settings it does not know are left out (older
        checkpoints are brought up to date by helpers.checkpoints)."""
        if not isinstance(saved, dict):
            raise ConfigError(f"a saved config must be a dict of settings, got {type(saved).__name__}")
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
            "(or helpers.run.train_run, which runs it for max_lr='auto') and pass its suggestion"
        )


# the settings a resumed run may change (the schema's resume_free) and those a recipe fills in (its recipe)
RESUME_FREE = frozenset(f.name for f in fields(TrainConfig) if f.metadata["resume_free"])
RECIPE_KEYS = tuple(f.name for f in fields(TrainConfig) if f.metadata["recipe"])


def tta_name(tta: str | bool | None) -> str:
    """A test-time augmentation setting as one of TTA: True (the bare flag of older versions) is 'flip', False
    and None are 'none'."""
    return "flip" if tta is True else "none" if tta is False or tta is None else tta


def _check_registries() -> None:
    """The tables above agree (run at import, so a mistake in them shows at once): a recipe table per model of
    helpers.models, a default recipe that exists, and every recipe giving each recipe setting or leaving it to
    RECIPE_OPTIONAL, and nothing else."""
    if set(RECIPES) != set(MODELS) or set(DEFAULT_RECIPE) != set(MODELS):
        raise ImportError(f"RECIPES and DEFAULT_RECIPE must have one entry per model of helpers.models.MODELS "
                          f"({', '.join(MODELS)})")
    for model, recipes in RECIPES.items():
        if DEFAULT_RECIPE[model] not in recipes:
            raise ImportError(f"DEFAULT_RECIPE[{model!r}] names no recipe of {model}")
        for name, recipe in recipes.items():
            wrong = set(recipe) ^ (set(RECIPE_KEYS) - set(RECIPE_OPTIONAL))
            if wrong - set(RECIPE_OPTIONAL):
                raise ImportError(f"recipe {model} {name}: missing or unknown settings {sorted(wrong)}")


_check_registries()


def evolve(config: TrainConfig, **changes) -> TrainConfig:
    """A new, checked config with `changes` (the recipe's values are not filled again)."""
    unknown = set(changes) - {f.name for f in fields(config)}
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    return replace(config, **changes)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _checked(f, value):
    """`value` for field `f`, normalised (ints for int fields, floats for float fields, str paths), or a
    ConfigError naming the field and what it allows."""
    meta = f.metadata
    kind, allowed = meta["kind"], meta["allowed"]

    def fail(what: str):
        raise ConfigError(f"{setting_name(f.name)} must be {what}, got {value!r}")

    if value is None:
        return None if meta["nullable"] else fail(allowed or kind)
    if kind == "bool":
        return value if isinstance(value, bool) else fail("True or False")
    if kind == "path":
        return str(Path(os.fspath(value)).expanduser()) if isinstance(value, (str, os.PathLike)) and str(value) \
            else fail("a folder path")
    if kind == "dataset":  # a folder is kept as an absolute path: a run resumed or a trial run elsewhere finds it
        if value in ("cifar10", "cifar100"):
            return value
        if not isinstance(value, str) or not value.startswith("folder:") or not value[len("folder:"):]:
            fail(allowed)
        return "folder:" + str(Path(value[len("folder:"):]).expanduser().absolute())
    if kind == "str" or (kind == "peak" and isinstance(value, str)):
        choices = meta["choices"] or (("auto",) if kind == "peak" else None)
        if not isinstance(value, str) or (choices and value not in choices):
            fail(allowed or ("one of " + ", ".join(choices)))
        return value
    if kind == "int":
        if not _is_int(value):
            fail(f"an integer ({allowed})" if allowed else "an integer")
        value = int(value)
    else:  # float, peak
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            fail(f"a finite number ({allowed})" if allowed else "a finite number")
        value = float(value)
    if meta["ok"] is not None and not meta["ok"](value):
        fail(allowed)
    return value


def _check(config: TrainConfig, some) -> None:
    for f in some:
        _checked(f, getattr(config, f.name))


def recipe_table() -> str:
    """One line per model and recipe, for --help and the README: epochs, batch, optimizer, peak LR, augmentation."""
    lines = []
    for model, recipes in RECIPES.items():
        for name, r in recipes.items():
            default = " (default)" if DEFAULT_RECIPE[model] == name else ""
            r = {k: r.get(k, "?") for k in ("epochs", "batch_size", "optimizer", "max_lr", "augment")} | {
                "nesterov": " nesterov" if r.get("nesterov") else ""}
            lines.append(f"{model} {name}{default}: {r['epochs']} epochs, batch {r['batch_size']}, {r['optimizer']}"
                         f"{r['nesterov']}, peak LR {r['max_lr']}, augment {r['augment']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# A config as a file: `--print-config` writes it, `--config FILE` reads it, a run folder keeps it (config.yaml)


def _yaml():
    try:
        import yaml  # deferred: optional (Colab has PyYAML; elsewhere pip install pyyaml), JSON without it
    except ImportError:
        return None
    return yaml


def config_file_name() -> str:
    """The name a run folder keeps its settings under: config.yaml with PyYAML, else config.json."""
    return "config.yaml" if _yaml() is not None else "config.json"


def config_text(config: TrainConfig, *, fmt: str | None = None) -> str:
    """Every setting of `config`, as YAML (fmt 'yaml'; the default when PyYAML is installed) or JSON: the text
    `read_config_file` reads back."""
    fmt = fmt or config_file_name().rsplit(".", 1)[1]
    if fmt == "json":
        return json.dumps(config.to_dict(), indent=1) + "\n"
    from helpers import __version__  # deferred: the package's version, for the file's header

    header = (f"# cifar10-helpers {__version__}: every setting of a run. `cifar10 train --config THIS --out DIR` "
              "makes it again;\n# flags given after --config change a setting.\n")
    return header + _yaml().safe_dump(config.to_dict(), sort_keys=False)


def read_config_file(path: str | os.PathLike) -> dict:
    """The settings in a config file (.yaml/.yml: YAML, read with yaml.safe_load, so no code in it ever runs;
    else JSON); a ConfigError that says what to do when it is missing, unreadable or names an unknown setting.
    The values are checked when a TrainConfig is made of them."""
    path = Path(path).expanduser()
    try:
        text = read_text_file(path)
    except (OSError, ValueError) as err:  # missing, unreadable, a pipe, too large, not UTF-8
        raise ConfigError(f"cannot read config file {path} ({getattr(err, 'strerror', None) or err}): give a file "
                          "written by --print-config or kept in a run folder (config.yaml)") from None
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    if is_yaml and _yaml() is None:
        raise ConfigError(f"{path} is YAML and PyYAML is not installed: pip install pyyaml, or give a JSON config")
    try:
        settings = _yaml().safe_load(text) if is_yaml else json.loads(text)
    except Exception as err:  # noqa: BLE001 - yaml's and json's parse errors: one line either way
        mark = getattr(err, "problem_mark", None)  # yaml's; json's errors carry lineno
        line = mark.line + 1 if mark is not None else getattr(err, "lineno", None)
        raise ConfigError(f"{path} is not valid {'YAML' if is_yaml else 'JSON'}{f' (line {line})' if line else ''}: "
                          "fix it, or write it anew with --print-config") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{path} must hold settings as `name: value` lines, got a {type(settings).__name__}")
    kinds = {f.name: f.metadata["kind"] for f in fields(TrainConfig)}
    unknown = sorted(str(k) for k in settings if k not in kinds)
    if unknown:
        raise ConfigError(f"{path} names unknown settings: {', '.join(unknown)} (see cifar10 train --help)")
    for name, value in settings.items():  # YAML 1.1 reads 1e-3 (no dot) as text: a number was meant
        if kinds[name] in ("float", "peak") and isinstance(value, str) and value != "auto":
            try:
                settings[name] = float(value)
            except ValueError:
                pass  # the config check names it
    return settings
