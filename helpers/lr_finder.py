"""LR range test (L. Smith, 2015): a thin wrapper over torch-lr-finder 0.2.2 that leaves no trace.

`lr_range_test(model, loader, config=...)` raises the learning rate exponentially from `start_lr` to `end_lr` over
`num_iter` mini-batches, records the smoothed training loss, and suggests a one-cycle peak: the steepest descent of
the smoothed loss (the library's own `plot()` rule, skipping the first 10 and last 5 points, searched only up to the
lowest loss). Afterwards the model
(weights, BN statistics, each module's train/eval mode), the optimizer, the global torch RNG and the loader's
shuffling generator are exactly as before, so a run after `--max-lr auto` equals a run given that LR by hand, and a
OneCycleLR can be built on the optimizer (the library leaves `initial_lr` in its param groups until `reset()`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from torch import nn

SKIP_START, SKIP_END = 10, 5  # points trimmed before suggesting (the library's plot() defaults)
MIN_POINTS = SKIP_START + SKIP_END + 2  # the fewest recorded iterations the library can suggest from


class LRRangeTestError(ValueError):
    """The sweep was too short (or diverged too soon) to suggest a learning rate; the message says what to change."""


@dataclass
class LRFinderResult:
    """One LR range test. `lrs` and `losses` (exponentially smoothed training loss) have one entry per iteration."""

    lrs: list[float]
    losses: list[float]
    suggested_lr: float  # steepest descent of the smoothed loss before its minimum (see steepest_descent)
    suggested_index: int  # index into lrs/losses of that point
    min_loss_lr: float  # LR at the lowest smoothed loss
    min_loss_lr_over_10: float  # fast.ai's older rule: a decade below the minimum
    diverged: bool  # stopped before num_iter because the loss passed diverge_th x its best
    num_iter: int  # iterations asked for
    settings: dict = field(default_factory=dict)  # start_lr, end_lr, smooth_f, diverge_th, optimizer, amp dtype

    @property
    def min_loss(self) -> float:
        return float(min(self.losses))


# ---------------------------------------------------------------------------------------------------------
# The library, adapted: any iterable of (x, y) batches, a clear error for an empty one, and a switchable bar


def _batch_iter(loader):
    """The library's TrainDataLoaderIter (restarts the loader when it runs out) for any iterable of (x, y)."""
    from torch_lr_finder import TrainDataLoaderIter

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
    import torch_lr_finder.lr_finder as library

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


# ---------------------------------------------------------------------------------------------------------


def lr_range_test(
    model: nn.Module,
    train_loader,
    *,
    config=None,
    optimizer: torch.optim.Optimizer | None = None,
    criterion: nn.Module | None = None,
    device: str | torch.device | None = None,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    smooth_f: float = 0.05,
    diverge_th: float = 5,
    progress: bool | None = None,
) -> LRFinderResult:
    """Run the LR range test and restore everything it touched; returns the curve and the suggestions.

    config: a helpers.train.TrainConfig; gives the optimizer (kind, momentum, weight decay), the label smoothing
        and mixed precision (its `amp`). Without it: SGD momentum 0.9, plain cross-entropy, fp32.
    optimizer / criterion: use these instead (the optimizer's state is restored afterwards; its LR is the
        sweep's start unless `start_lr` is given; pass start_lr=None to keep it).
    device: where to run (default: the model's); the model comes back to its own device.
    num_iter: mini-batches in the sweep (at least 17); the loader is restarted when it runs out.
    progress: show the library's progress bar (default: unless TQDM_DISABLE is set).
    Raises LRRangeTestError when fewer than 17 points are recorded (too short, or the loss diverged early).
    """
    from torch_lr_finder import LRFinder

    from helpers.train import amp_dtype, make_optimizer

    if num_iter < MIN_POINTS:
        raise LRRangeTestError(
            f"num_iter={num_iter} is too short: the steepest-descent suggestion skips the first {SKIP_START} and "
            f"last {SKIP_END} points and needs at least {MIN_POINTS} iterations (100 is usual)"
        )
    if start_lr is not None and not 0 < start_lr < end_lr:
        raise LRRangeTestError(f"need 0 < start_lr < end_lr, got start_lr={start_lr}, end_lr={end_lr}")
    model_device = next(model.parameters()).device
    device = torch.device(device) if device is not None else model_device
    progress = _progress_default() if progress is None else progress

    if optimizer is None:
        if config is not None:
            optimizer = make_optimizer(model, dataclasses.replace(config, lr=start_lr or 1e-7))
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=start_lr or 1e-7, momentum=0.9)
    if criterion is None:
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing if config is not None else 0.0)
    dtype = amp_dtype(device, config.amp if config is not None else False)
    amp = {}
    if dtype is not None:  # the library needs all three, or it fails at the first batch
        amp = {
            "amp_backend": "torch",
            "amp_config": {"device_type": device.type, "dtype": dtype},
            "grad_scaler": torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),  # bf16: no scaling
        }

    modes = {m: m.training for m in model.modules()}  # the library calls model.train() and never restores
    torch_rng = torch.get_rng_state()
    generators = [(g, g.get_state()) for g in _loader_generators(train_loader)]
    try:
        finder = LRFinder(model, optimizer, criterion, device=device, **amp)
    except RuntimeError as err:
        if "scheduler" in str(err):
            raise LRRangeTestError(
                "the optimizer already has a learning-rate scheduler attached ('initial_lr' in its param groups): "
                "run the LR range test before building any scheduler, or pass a fresh optimizer"
            ) from None
        raise
    try:
        with _library_output(progress):
            finder.range_test(_batch_iter(train_loader), start_lr=start_lr, end_lr=end_lr, num_iter=num_iter,
                              step_mode="exp", smooth_f=smooth_f, diverge_th=diverge_th)
    finally:
        finder.reset()  # weights, BN buffers, optimizer state and param groups (drops 'initial_lr')
        for module, training in modes.items():
            module.train(training)
        torch.set_rng_state(torch_rng)
        for generator, state in generators:
            generator.set_state(state)

    lrs = [float(v) for v in finder.history["lr"]]
    losses = [float(v) for v in finder.history["loss"]]
    finite = np.isfinite(losses)
    if not finite.all():  # NaN never exceeds the divergence threshold, so the library keeps going: cut it here
        lrs, losses = lrs[: int(finite.argmin())], losses[: int(finite.argmin())]
    if len(lrs) < MIN_POINTS:
        where = f"the loss diverged (passed {diverge_th} x its best, or went NaN) by LR {lrs[-1]:.3g}" if lrs else ""
        raise LRRangeTestError(
            f"only {len(lrs)} of {num_iter} iterations recorded ({where}); at least {MIN_POINTS} are needed: "
            f"lower end_lr (now {end_lr}), raise diverge_th (now {diverge_th}) or start lower"
        )
    best = int(np.argmin(losses))
    index = steepest_descent(lrs, losses)
    return LRFinderResult(
        lrs=lrs,
        losses=losses,
        suggested_lr=lrs[index],
        suggested_index=index,
        min_loss_lr=lrs[best],
        min_loss_lr_over_10=lrs[best] / 10,
        diverged=len(lrs) < num_iter,  # also when cut at a NaN
        num_iter=num_iter,
        settings={
            "start_lr": lrs[0], "end_lr": end_lr, "smooth_f": smooth_f, "diverge_th": diverge_th,
            "optimizer": type(optimizer).__name__, "amp": str(dtype).removeprefix("torch.") if dtype else None,
            "device": str(device),
        },
    )
