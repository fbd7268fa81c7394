"""LR range test (L. Smith, 2015): a thin wrapper over torch-lr-finder 0.2.2 that leaves no trace.

`lr_range_test(model, loader, config=...)` raises the learning rate exponentially from `start_lr` to `end_lr` over
`num_iter` mini-batches, records the smoothed training loss, and suggests a one-cycle peak. Each mini-batch is one
step of helpers.engine.TrainStep (the training step fit runs: its precision, channels_last, L1 term), driven by the
library's schedule, smoothing and divergence stop. Afterwards the model (weights, BN statistics, each module's
train/eval mode), the optimizer, the global torch RNG and the loader's shuffling generator are exactly as before,
so a run after `--max-lr auto` equals a run given that LR by hand.

Suggestion rules (all are computed; `rule=` picks the one returned as `suggested_lr`):
- "steepest" (default): the library's steepest descent of the smoothed loss, searched up to its minimum; the rule
  the ResNet-18 write-up used (it found 1.71e-4), so its recipe's `--max-lr auto` reproduces it.
- "decade_below_min": a tenth of the LR at the lowest smoothed loss (fastai's "minimum" suggestion).
- "min_loss": the LR at the lowest smoothed loss (Smith takes the top of the falling region as one-cycle's peak).
With SGD, measured picks land below the peaks that train best, so the SGD recipes carry measured peaks and the
benchmark's `sweep` section scores every rule against a sweep of peaks (BENCHMARKS.md, "Which LR rule").
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import warnings
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn

from helpers.config import LR_DEFAULT_RULE as DEFAULT_RULE
from helpers.config import LR_RULES as RULES
from helpers.config import LR_TEST_MIN_STEPS as MIN_POINTS  # the fewest recorded iterations it can suggest from
from helpers.config import TrainConfig
from helpers.engine import TrainStep
from helpers.utils import precision_name, preserved_modes

SKIP_START, SKIP_END = 10, 5  # points trimmed before suggesting (the library's plot() defaults)
if MIN_POINTS != SKIP_START + SKIP_END + 2:  # the library takes a slope of what is left: two points at least
    raise ImportError("helpers.config.LR_TEST_MIN_STEPS must be SKIP_START + SKIP_END + 2")


class LRRangeTestError(ValueError):
    """The sweep was too short (or diverged too soon) to suggest a learning rate; the message says what to change."""



@dataclass
class LRFinderResult:
    """One LR range test. `lrs` and `losses` (exponentially smoothed training loss) have one entry per iteration."""

    lrs: list[float]
    losses: list[float]
    suggested_lr: float  # the sweep point picked by `rule` (see the module docstring)
    suggested_index: int  # index into lrs/losses of that point
    diverged: bool  # stopped before num_iter because the loss passed diverge_th x its best
    num_iter: int  # iterations asked for
    rule: str = DEFAULT_RULE
    settings: dict = field(default_factory=dict)  # start_lr, end_lr, smooth_f, diverge_th, optimizer, amp dtype

    @property
    def min_loss(self) -> float:
        return float(min(self.losses))

    @property
    def min_loss_lr(self) -> float:
        """LR at the lowest smoothed loss."""
        return self.lrs[int(np.argmin(self.losses))]

    @property
    def min_loss_lr_over_10(self) -> float:
        """A decade below the minimum (decade_below_min picks the sweep point nearest it)."""
        return self.min_loss_lr / 10

    @property
    def steepest_lr(self) -> float:
        """Steepest descent of the smoothed loss before its minimum (see steepest_descent)."""
        return self.lrs[steepest_descent(self.lrs, self.losses)]

    @property
    def suggestions(self) -> dict[str, float]:
        """Every rule's pick, by rule name."""
        return {rule: self.lrs[suggest(self.lrs, self.losses, rule)] for rule in RULES}


# ---------------------------------------------------------------------------------------------------------
# The library, adapted: any iterable of (x, y) batches, a clear error for an empty one, and a switchable bar


def _library():
    """torch_lr_finder.lr_finder, imported without its TqdmExperimentalWarning.

    The library imports `tqdm.autonotebook`, which warns "Using `tqdm.autonotebook.tqdm` in notebook mode" in every
    Jupyter or Colab kernel: a warning about the library's choice, not about anything the user did.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Using `tqdm\.autonotebook\.tqdm` in notebook mode")
        import torch_lr_finder.lr_finder as library  # deferred: imported here only to catch its warning
    return library


def _batch_iter(loader):
    """The library's TrainDataLoaderIter (restarts the loader when it runs out) for any iterable of (x, y)."""
    TrainDataLoaderIter = _library().TrainDataLoaderIter

    class _Iter(TrainDataLoaderIter):
        def __next__(self):
            try:
                return super().__next__()
            except StopIteration:  # a fresh pass yielded nothing: the loader is empty or single-use
                raise LRRangeTestError(
                    "the training loader yielded no batches on a fresh pass: it is empty (batch size larger than "
                    "the data with drop_last?) or a one-shot iterator; pass a DataLoader or a re-iterable loader"
                ) from None

    return _Iter(loader)


@contextlib.contextmanager
def _library_output(progress: bool):
    """Silence the library's tqdm bar unless `progress`, and always its prints ("Learning rate search finished...").

    tqdm reads TQDM_DISABLE once, when it is first imported, so setting it later does nothing: the bar is switched
    set here on the tqdm the library calls.
    """
    library = _library()
    original = library.tqdm
    library.tqdm = partial(original, disable=not progress)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        library.tqdm = original


def _progress_default() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("1", "true", "yes")


def _loader_generators(loader) -> list[torch.Generator]:
    """The generators a loader draws from (its sampler's: order and augmentation; its own: worker seeds)."""
    found = [getattr(owner, "generator", None) for owner in (getattr(loader, "sampler", None), loader)]
    return list({id(g): g for g in found if isinstance(g, torch.Generator)}.values())


def steepest_descent(lrs, losses, *, skip_start: int = SKIP_START, skip_end: int = SKIP_END) -> int:
    """Index (into lrs) of the steepest descent of `losses`: the library's rule (argmin of np.gradient over
    losses[skip_start:-skip_end]), searched only up to the lowest loss. Past the minimum the loss is diverging,
    and a noisy dip there (seen on short, small-batch sweeps) would otherwise suggest an exploding rate."""
    losses = np.asarray(losses, dtype=float)
    end = len(losses) - skip_end if skip_end else len(losses)
    lowest = skip_start + int(losses[skip_start:end].argmin()) if end > skip_start else end
    if lowest - skip_start >= 2:  # np.gradient needs two points
        end = lowest + 1
    return skip_start + int(np.gradient(losses[skip_start:end]).argmin())


def suggest(lrs, losses, rule: str = DEFAULT_RULE) -> int:
    """Index (into lrs) of `rule`'s pick: 'steepest' (steepest_descent), 'decade_below_min' (the sweep point
    nearest, on the log scale, to a tenth of the LR at the lowest smoothed loss) or 'min_loss' (that lowest)."""
    if rule == "steepest":
        return steepest_descent(lrs, losses)
    if rule == "min_loss":
        return int(np.argmin(losses))
    if rule == "decade_below_min":
        target = np.log(lrs[int(np.argmin(losses))] / 10)
        return int(np.abs(np.log(np.asarray(lrs)) - target).argmin())
    raise ValueError(f"unknown rule {rule!r}: choose one of {', '.join(RULES)}")


@contextlib.contextmanager
def _leaves_no_trace(model: nn.Module, loader):
    """Restore the model's modes, device and memory format, the global torch RNG and the loader's generators."""
    device = next(model.parameters()).device
    channels_last = any(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters())
    torch_rng = torch.get_rng_state()
    generators = [(g, g.get_state()) for g in _loader_generators(loader)]
    try:
        with preserved_modes(model):  # the library calls model.train() and never restores
            yield
    finally:
        model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.set_rng_state(torch_rng)
        for generator, state in generators:
            generator.set_state(state)


def _step_finder(step):
    """torch-lr-finder's LRFinder, whose every mini-batch is one step of helpers.engine.TrainStep.

    The library sets every parameter group to the one swept LR; the step's groups keep their own ratios to the
    first (weights) group, as in the run (bias_lr_scale: batch-norm biases at 64x), so the LR recorded is the
    weights' LR, the number max_lr means.
    """
    LRFinder = _library().LRFinder

    groups = step.optimizer.param_groups
    ratios = [g["lr"] / groups[0]["lr"] for g in groups]

    class StepFinder(LRFinder):
        def _train_batch(self, train_iter, accumulation_steps, non_blocking_transfer=True):
            for group, ratio in zip(groups, ratios):
                group["lr"] = groups[0]["lr"] * ratio
            inputs, labels = next(train_iter)
            loss, _ = step(inputs, labels)
            return loss.item()

    return StepFinder(step.model, step.optimizer, step.criterion, device=step.device)


# ---------------------------------------------------------------------------------------------------------


def lr_range_test(
    model: nn.Module,
    train_loader,
    *,
    config=None,
    device: str | torch.device | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    smooth_f: float = 0.05,
    diverge_th: float = 5,
    rule: str = DEFAULT_RULE,
    progress: bool | None = None,
) -> LRFinderResult:
    """Run the LR range test and restore everything it touched; returns the curve and the suggestions.

    config: a helpers.config.TrainConfig: the optimizer (kind, momentum, Nesterov, weight decay), label
        smoothing, L1 term, channels_last and mixed precision (its `amp`) of the step swept. Without it: SGD with
        momentum 0.9, no weight decay, no label smoothing, fp32.
    device: where to run (default: the model's); the model comes back to its own device.
    num_iter: mini-batches in the sweep (at least 17: the suggestion skips the first 10 and the last 5 points
        and needs two to take a slope); the loader is restarted when it runs out.
    rule: which suggestion is `suggested_lr` (one of RULES; every rule's pick is in `.suggestions`).
    progress: show the library's progress bar (default: unless TQDM_DISABLE is set).
    Raises LRRangeTestError when fewer than 17 points are recorded (too short, or the loss diverged early).
    """
    if num_iter < MIN_POINTS:
        raise LRRangeTestError(
            f"num_iter={num_iter} is too short: the suggestion skips the first {SKIP_START} and last {SKIP_END} "
            f"points and needs at least {MIN_POINTS} iterations (100 is usual)"
        )
    if not 0 < start_lr < end_lr:
        raise LRRangeTestError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    if rule not in RULES:
        raise LRRangeTestError(f"unknown rule {rule!r}: choose one of {', '.join(RULES)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    progress = _progress_default() if progress is None else progress
    config = config if config is not None else TrainConfig(
        optimizer="sgd", momentum=0.9, weight_decay=0.0, label_smoothing=0.0, l1=0.0, amp=False)
    # the step the sweep drives: the run's own, at a constant LR that the library's schedule then raises
    sweep = dataclasses.replace(config, lr=start_lr, max_lr=end_lr, scheduler="none", mode="eager")
    with _leaves_no_trace(model, train_loader):
        step = TrainStep(model, sweep, device=device, steps_per_epoch=1)
        try:
            finder = _step_finder(step)
        except RuntimeError as err:
            raise LRRangeTestError(f"the LR finder could not start: {err}") from None
        try:
            with _library_output(progress):
                finder.range_test(_batch_iter(train_loader), start_lr=start_lr, end_lr=end_lr,
                                  num_iter=num_iter, step_mode="exp", smooth_f=smooth_f, diverge_th=diverge_th)
        finally:
            finder.reset()  # weights and BN buffers as they were
    return _result(finder.history, num_iter, rule, settings={
        "start_lr": start_lr, "end_lr": end_lr, "smooth_f": smooth_f, "diverge_th": diverge_th,
        "optimizer": type(step.optimizer).__name__, "amp": None if step.dtype is None else precision_name(step.dtype),
        "device": str(device), "rule": rule})


def from_curve(lrs, losses, *, rule: str = DEFAULT_RULE, num_iter: int | None = None) -> LRFinderResult:
    """The result of a recorded curve (the benchmark's JSON keeps each one): every rule's pick, again or anew."""
    return _result({"lr": lrs, "loss": losses}, num_iter or len(lrs), rule,
                   settings={"end_lr": max(lrs, default=None), "diverge_th": None})


def _result(history: dict, num_iter: int, rule: str, settings: dict) -> LRFinderResult:
    lrs = [float(v) for v in history["lr"]]
    losses = [float(v) for v in history["loss"]]
    finite = np.isfinite(losses)
    if not finite.all():  # NaN never exceeds the divergence threshold, so the library keeps going: cut it here
        lrs, losses = lrs[: int(finite.argmin())], losses[: int(finite.argmin())]
    if len(lrs) < MIN_POINTS:
        where = (f"the loss diverged (passed {settings['diverge_th']} x its best, or went NaN) by LR {lrs[-1]:.3g}"
                 if lrs else "")
        raise LRRangeTestError(
            f"only {len(lrs)} of {num_iter} iterations recorded ({where}); at least {MIN_POINTS} are needed: "
            f"lower end_lr (now {settings['end_lr']}), raise diverge_th (now {settings['diverge_th']}) or start "
            "lower"
        )
    index = suggest(lrs, losses, rule)
    return LRFinderResult(
        lrs=lrs, losses=losses, suggested_lr=lrs[index], suggested_index=index,
        diverged=len(lrs) < num_iter,  # also when cut at a NaN
        num_iter=num_iter, rule=rule, settings=settings,
    )
