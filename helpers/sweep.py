"""Many runs of the run layer: `peak_sweep` trains a recipe at a range of one-cycle peaks and at each LR rule's pick.

Every run is a normal `helpers.run.train_run` (in memory here: no folders), so a sweep's run equals the run the
command line makes with the same settings.
"""

from __future__ import annotations

from helpers.config import TrainConfig, evolve

SWEEP_PEAKS = {"sgd": (0.05, 0.1, 0.2, 0.4, 0.8), "adam": (2e-4, 5e-4, 1e-3, 2e-3, 5e-3)}  # one-cycle peaks swept


def at_peak(config: TrainConfig, peak: float) -> TrainConfig:
    """`config` with one-cycle peak `peak`. Its start follows as the recipe has it: a recipe with a numeric peak
    keeps its start/peak ratio; one whose peak is found ('auto') keeps its start LR, as `--max-lr auto` does."""
    if config.max_lr == "auto" or config.lr is None:  # lr None: the start is peak / 10 anyway
        return evolve(config, max_lr=peak)
    return evolve(config, max_lr=peak, lr=peak * config.lr / config.peak_lr)


def peak_sweep(config: TrainConfig, *, arrays=None, peaks=None, found=None, device=None,
               progress: bool = True) -> dict:
    """Train `config` to the end at each one-cycle peak (default SWEEP_PEAKS[config.optimizer]) and at each rule's
    pick of `found` (an lr_range_test result), each a `train_run` from the same seed; returns the row
    helpers.plots.plot_lr_sweep draws: final accuracy per run, the best swept peak's, and each rule's gap to it
    (how far `--max-lr auto` lands from the best peak). A pick equal to a peak already trained is not trained
    again. arrays: (train, test) already loaded (helpers.data.load_run_data). progress: a line per run."""
    from helpers.data import load_run_data
    from helpers.run import train_run

    arrays = arrays if arrays is not None else load_run_data(config)
    peaks = SWEEP_PEAKS[config.optimizer] if peaks is None else peaks
    picks = found.suggestions if found is not None else {}
    runs, trained = {}, {}  # a pick equal to a peak already trained reuses its run (same seed: same result)
    for label, peak in {**{f"{p:g}": p for p in peaks}, **picks}.items():
        if peak not in trained:
            run = train_run(at_peak(config, peak), device=device or "auto", quiet=True, arrays=arrays)
            trained[peak] = {"max_lr": peak, "final_acc": run.accuracy, "train_s": sum(run.history.seconds)}
        runs[label] = dict(trained[peak])
        if progress:
            print(f"peak {peak:<9.3g} {label:<17} {runs[label]['final_acc']:6.2f}%  ({runs[label]['train_s']:.0f} s)",
                  flush=True)
    best = max(r["final_acc"] for label, r in runs.items() if label not in picks)
    return {"model": config.model, "recipe": config.recipe, "optimizer": config.optimizer,
            "batch_size": config.batch_size, "epochs": config.epochs, "runs": runs, "best_swept_acc": best,
            "rules": {rule: {"max_lr": lr, "gap_to_best": best - runs[rule]["final_acc"]}
                      for rule, lr in picks.items()}}
