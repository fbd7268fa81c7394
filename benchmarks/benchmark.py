"""Speed and accuracy of the toolkit, measured in one run on one machine: `python -m benchmarks.benchmark`.

Sections (--sections, comma-separated; default all but sweep):
  loaders   images/s of the albumentations DataLoader (0, 2 and all workers) and of GpuLoader, delivered to --device
  epochs    seconds per training epoch and peak GPU memory: each model x fp32/mixed x each loader x each --modes,
            with the warm-up (capture/compile) timed apart
  accuracy  each --accuracy-runs model:recipe over --seeds (helpers.sweep.trial each): final accuracy (with the
            recipe's TTA too), training time to airbench94's same-run accuracy (without TTA, and with), ratios
  airbench  airbench 0.1.8's train94 on the same arrays (needs CUDA and airbench; skipped with a note otherwise)
  overhead  fit against the bare PyTorch loop (benchmarks.bare): same model, loader, optimizer, loss, autocast, steps,
            test pass; both eager
  lrtest    the LR range test alone for each --sweep-runs model:recipe: every rule's pick beside the recipe's peak
  sweep     final accuracy against the one-cycle peak LR (--sweep-peaks) for each --sweep-runs model:recipe
            (helpers.sweep.peak_sweep: here one run after another, or on Ray Tune with --sweep-engine ray),
            with the LR range test's picks (every rule) marked: which rule lands within 0.5 points of the best

Every section times helpers.engine.TrainStep, the step fit runs: what it reports is fit's.

Prints one table per section and writes everything, with the machine, torch version, data and command, to --out.
Timings on CUDA synchronize before every clock read. `--quick` is a CPU smoke run for CI (tiny subset, a few steps).

    python -m benchmarks.benchmark --data-dir data --out benchmarks/results/h100.json          # everything
    python -m benchmarks.benchmark --data-dir data --sections loaders,epochs --subset-train 5000
    python -m benchmarks.benchmark --data-dir data --sections sweep --sweep-runs resnet18:fast,custom_resnet:writeup
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.bare import train_bare
from helpers import data
from helpers.config import TrainConfig, evolve
from helpers.engine import WARMUP_STEPS, clock, time_epoch
from helpers.lr_finder import RULES, lr_range_test
from helpers.models import build_model
from helpers.sweep import SWEEP_PEAKS, describe_picks, peak_sweep, trial
from helpers.train import evaluate, fit
from helpers.utils import atomic_write_text, seed_everything

SECTIONS = ("loaders", "epochs", "airbench", "accuracy", "overhead", "lrtest", "sweep")  # airbench sets the bar
DEFAULT_SECTIONS = SECTIONS[:-2]  # asked for by name: the sweep trains a dozen full runs
TARGET = 94.0  # % test accuracy for "time to 94%" (official data; on the JPEG copy use airbench94's, --target)


# ---------------------------------------------------------------------------------------------------------
# Setup: machine, data, timing


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "gpu": gpu, "cpu": cpu, "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min": os.getloadavg()[0]}  # other processes on the machine skew CPU timings


def load_data(args) -> tuple[data.CifarArrays, data.CifarArrays]:
    train = data.balanced_subset(data.load_cifar10(args.data_dir, train=True, download=False), args.subset_train)
    test = data.balanced_subset(data.load_cifar10(args.data_dir, train=False, download=False), args.subset_test)
    return train, test


# ---------------------------------------------------------------------------------------------------------
# loaders: images/s delivered to the device


def time_loader(loader, device: torch.device, max_batches: int | None) -> dict:
    """One warm-up pass (starts persistent workers), then a timed pass, each batch copied to `device`."""
    for _ in zip(range(2), loader):
        pass
    n, t0 = 0, clock(device)
    for k, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n += len(y)
        if max_batches and k + 1 >= max_batches:
            break
    seconds = clock(device) - t0
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


def bench_loaders(args, train, test, device) -> list[dict]:
    rows = []
    for workers in sorted({0, 2, os.cpu_count() or 1} | set(args.workers)) if args.albumentations else []:
        loader = data.make_loader(train, batch_size=args.batch_size, recipe=args.recipe, workers=workers)
        rows.append({"loader": f"DataLoader albumentations, {workers} workers", "kind": "torch", "workers": workers,
                     **time_loader(loader, device, args.max_batches)})
        del loader  # stops its workers before the next measurement
    for where in dict.fromkeys([device, torch.device("cpu")]):
        loader = data.GpuLoader(train, batch_size=args.batch_size, recipe=args.recipe, device=where)
        rows.append({"loader": f"GpuLoader on {where}", "kind": "gpu", "workers": 0,
                     **time_loader(loader, device, args.max_batches)})
    return rows


# ---------------------------------------------------------------------------------------------------------
# epochs: the cost of one pass over the training set, with fit's step


def recipe(model_name: str, args, **overrides) -> TrainConfig:
    """The model's default recipe (or recipe=...); --quick shrinks the batch to fit its tiny set (512 would drop
    every image). A found peak stays "auto": a section that trains resolves it as `--max-lr auto` does."""
    quick = {"batch_size": args.batch_size} if args.quick else {}
    return TrainConfig.for_model(model_name, **quick, **overrides)


def timing_recipe(model_name: str, args, **overrides) -> TrainConfig:
    """recipe(), with a found peak set to 0.01: the LR does not change a step's cost."""
    config = recipe(model_name, args, **overrides)
    return evolve(config, max_lr=0.01) if config.max_lr == "auto" else config


def bench_epoch(model_name: str, amp: bool, kind: str, mode: str, args, train, test, device, *,
                batch_size: int | None = None) -> dict:
    """One warm epoch's time of the model's default recipe (at `batch_size`, if given; --quick's stays)."""
    sized = {"batch_size": batch_size} if batch_size and not args.quick else {}
    config = timing_recipe(model_name, args, epochs=1, amp=amp, mode=mode, **sized)
    loader, test_loader = data.make_loaders(train, test, kind=kind, batch_size=config.batch_size,
                                            recipe=config.augment, device=device)
    seed_everything(0)
    timing = time_epoch(build_model(model_name), config, loader, test_loader, device=device,
                        max_steps=args.epoch_steps, warmup_steps=args.warmup_steps)
    return {"model": model_name, "loader": kind, "batch_size": config.batch_size, **timing}


def bench_epochs(args, train, test, device) -> list[dict]:
    rows = []
    for model_name in args.models:
        for amp in args.precisions:
            for kind in args.loaders:
                for mode in args.modes:
                    for batch_size in args.epoch_batch_sizes or [None]:
                        rows.append(bench_epoch(model_name, amp, kind, mode, args, train, test, device,
                                                batch_size=batch_size))
                        print(_row_text(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------------------
# accuracy: recipes through fit, several seeds, against airbench94's accuracy


def time_to(history, target: float | None = TARGET, *, key: str = "test_acc",
            seconds: str = "seconds") -> float | None:
    """Seconds until the first epoch whose `key` (test_acc, or test_acc_tta: the last epoch's alone, so with TTA
    the whole run's, as airbench's) is >= target %, summing each epoch's `seconds` (training and test pass) or
    `train_seconds` (the training steps alone); never the warm-up."""
    elapsed = 0.0
    for record in history.records:
        elapsed += record[seconds]
        if target is not None and record.get(key) is not None and record[key] >= target:
            return elapsed
    return None


def bench_accuracy(args, train, test, device) -> list[dict]:
    """Each --accuracy-runs model:recipe over --seeds, one after another (each a helpers.sweep.trial: the run layer's
    run): final accuracy (and with the recipe's TTA), and the time to the targets (airbench94's same-run accuracy:
    without TTA against its without, TTA against TTA)."""
    rows = []
    for spec in args.accuracy_runs:
        model_name, recipe_name = spec.split(":")
        runs = []
        for seed in range(args.seeds):
            config = recipe(model_name, args, recipe=recipe_name, mode=args.fit_mode,
                            loader=args.fit_loader, lr_test_steps=args.lr_test_steps, adapt_small_runs=False,
                            **({"epochs": args.epochs} if args.epochs else {}))
            found = config.max_lr == "auto"  # as --max-lr auto: the run layer's range test picks the peak first
            t0 = clock(device)
            run = trial(config, {"seed": seed}, arrays=(train, test), device=device)  # in memory: no outputs
            total = clock(device) - t0
            config, history = run.config, run.history
            runs.append({"seed": seed, "epochs": config.epochs, "max_lr": config.max_lr,
                         "max_lr_from": "the LR range test" if found else "the recipe", "tta": config.tta,
                         "final_acc": history.test_acc[-1],
                         "final_acc_tta": history.test_acc_tta[-1],
                         "time_to_target_s": time_to(history, args.target),
                         "train_time_to_target_s": time_to(history, args.target, seconds="train_seconds"),
                         "time_to_target_tta_s": time_to(history, args.target_tta, key="test_acc_tta"),
                         "train_time_to_target_tta_s": time_to(history, args.target_tta, key="test_acc_tta",
                                                               seconds="train_seconds"),
                         "total_s": total, "train_s": sum(history.seconds),
                         "train_only_s": sum(history.train_seconds), "warmup_s": history.warmup_seconds,
                         "mode": history.mode, "epoch_s": history.seconds})
            tta = f" (TTA {runs[-1]['final_acc_tta']:.2f}%)" if config.tta != "none" else ""
            print(f"  {spec} seed {seed}: {runs[-1]['final_acc']:.2f}%{tta} in {runs[-1]['train_s']:.1f} s + "
                  f"{history.warmup_seconds:.1f} s warm-up ({history.mode}; {args.target}% at "
                  f"{runs[-1]['time_to_target_s']})", flush=True)
        rows.append({"model": model_name, "recipe": recipe_name, "loader": args.fit_loader, "target": args.target,
                     "target_tta": args.target_tta, "runs": runs, **summarise(runs)})
    return rows


def summarise(runs: list[dict]) -> dict:
    """Means over seeds; a time to target is averaged over the runs that reached it (`reached` says how many)."""
    accs = [r["final_acc"] for r in runs]
    spread = statistics.stdev if len(runs) > 1 else (lambda _: 0.0)

    def mean(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.mean(values) if values else None

    times = ("time_to_target_s", "train_time_to_target_s", "time_to_target_tta_s", "train_time_to_target_tta_s")
    return {
        "final_acc_mean": statistics.mean(accs), "final_acc_std": spread(accs), "final_acc_min": min(accs),
        "final_acc_tta_mean": mean("final_acc_tta"),
        "reached_target": f"{sum(r['time_to_target_s'] is not None for r in runs)}/{len(runs)}",
        "reached_target_tta": f"{sum(r['time_to_target_tta_s'] is not None for r in runs)}/{len(runs)}",
        **{f"{key[:-2]}_mean_s": mean(key) for key in times},
        "train_s_mean": mean("train_s"), "train_only_s_mean": mean("train_only_s"),
        "warmup_s_mean": mean("warmup_s"), "total_s_mean": mean("total_s"),
    }


# ---------------------------------------------------------------------------------------------------------
# airbench: train94 on our arrays, same machine, same run


def bench_airbench(args, train, test, device) -> dict:
    try:
        import airbench
    except ImportError:
        return {"skipped": "airbench is not installed (pip install airbench==0.1.8)"}
    if device.type != "cuda":
        return {"skipped": "airbench needs CUDA"}
    Path("cifar10").mkdir(exist_ok=True)  # train94 reads ./cifar10/test.pt for its own test loader
    for name, arrays in (("train", train), ("test", test)):
        torch.save({"images": torch.from_numpy(arrays.images), "labels": torch.from_numpy(arrays.labels),
                    "classes": arrays.classes}, f"cifar10/{name}.pt")
    loader = airbench.CifarLoader("cifar10", train=True, batch_size=1024, aug={"flip": True, "translate": 2},
                                  altflip=True)
    test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
    airbench.warmup94(loader)
    runs = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        t0 = clock(device)
        net = airbench.train94(loader, verbose=False)
        seconds = clock(device) - t0
        runs.append({"seed": seed, "seconds": seconds, "acc_tta0": 100 * airbench.evaluate(net, test_loader, 0),
                     "acc_tta2": 100 * airbench.evaluate(net, test_loader, 2)})
    return {"version": getattr(airbench, "__version__", "0.1.8?"), "runs": runs,
            "seconds_mean": statistics.mean(r["seconds"] for r in runs),
            "acc_tta2_mean": statistics.mean(r["acc_tta2"] for r in runs),
            "acc_tta0_mean": statistics.mean(r["acc_tta0"] for r in runs)}


# ---------------------------------------------------------------------------------------------------------
# overhead: fit against a bare loop on the same model, loader and steps


def bare_run(model, config, loader, test_loader, device) -> None:
    """The least a training run must do, written plainly (benchmarks.bare): the bare loop for every batch, then one
    test pass per epoch."""
    for _ in range(config.epochs):
        train_bare(model, loader, config, device=device)
        evaluate(model, test_loader, device=device, amp=config.amp)


def bench_overhead(args, train, test, device) -> dict:
    """fit (eager, as the bare loop) against the bare PyTorch loop (benchmarks.bare: same model, loader, optimizer,
    loss, autocast; no TrainStep), timed before and after fit. Each side's one-time work runs untimed first: fit's
    warm-up (prepare), and for the bare loop a few steps on a throwaway copy (cuDNN autotuning, the allocator)."""
    config = timing_recipe("custom_resnet", args, epochs=args.overhead_epochs, mode="eager")
    result = {"model": "custom_resnet", "loader": args.fit_loader, "epochs": config.epochs, "mode": "eager"}
    for name in ("bare_s", "fit_s", "bare_again_s"):
        train_loader, test_loader = data.make_loaders(train, test, kind=args.fit_loader,
                                                      batch_size=config.batch_size, recipe=config.augment,
                                                      device=device)
        seed_everything(0)
        model = build_model("custom_resnet")
        if name == "fit_s":
            history = fit(model, train_loader, test_loader, config, device=device, quiet=True)
            result[name] = sum(history.seconds)  # warm-up apart, as bare
            continue
        train_bare(build_model("custom_resnet"), train_loader, config, device=device, max_steps=WARMUP_STEPS)
        t0 = clock(device)
        bare_run(model, config, train_loader, test_loader, device)
        result[name] = clock(device) - t0
    bare = min(result["bare_s"], result["bare_again_s"])  # before and after fit: drift shows as their difference
    result["overhead_pct"] = 100 * (result["fit_s"] / bare - 1)
    result["steps"] = config.epochs * len(train_loader)
    return result


# ---------------------------------------------------------------------------------------------------------
# sweep: final accuracy against the one-cycle peak, and where the LR range test's rules land


def range_test(spec: str, args, train, test, device):
    """spec's recipe (model:recipe) and the LR range test on a fresh model: every rule's pick."""
    model_name, recipe_name = spec.split(":")
    base = recipe(model_name, args, recipe=recipe_name, mode=args.fit_mode, loader=args.fit_loader,
                  adapt_small_runs=False, **({"epochs": args.epochs} if args.epochs else {}))
    loaders = data.make_loaders(train, test, kind=args.fit_loader, batch_size=base.batch_size, recipe=base.augment,
                                device=device)
    seed_everything(0)
    t0 = time.perf_counter()
    found = lr_range_test(build_model(model_name).to(device), loaders[0], config=base, device=device,
                          num_iter=args.lr_test_steps, progress=False)
    row = {"model": model_name, "recipe": recipe_name, "optimizer": base.optimizer, "batch_size": base.batch_size,
           "epochs": base.epochs, "recipe_peak": base.max_lr, "picks": found.suggestions,
           "min_loss_lr": found.min_loss_lr, "diverged": found.diverged, "lr_test_s": time.perf_counter() - t0,
           "lr_curve": {"lrs": found.lrs, "losses": found.losses}}
    print(f"  {spec}: " + ", ".join(f"{rule} {lr:.3g}" for rule, lr in found.suggestions.items())
          + f" (the recipe's peak: {base.max_lr})", flush=True)
    return base, found, row


def bench_lrtest(args, train, test, device) -> list[dict]:
    """The LR range test alone for each --sweep-runs model:recipe: where each rule lands beside the recipe's peak."""
    return [range_test(spec, args, train, test, device)[-1] for spec in args.sweep_runs]


def bench_sweep(args, train, test, device) -> list[dict]:
    """For each model:recipe, the LR range test once, then full runs at each swept peak and at each rule's pick
    (helpers.sweep.peak_sweep, seed 0): one after another here (--sweep-engine local), or as Ray Tune trials
    (ray; --sweep-gpus-per-trial 0.25 runs four at once on one GPU, their timings then shared)."""
    rows = []
    for spec in args.sweep_runs:
        base, found, row = range_test(spec, args, train, test, device)
        out = Path(args.sweep_dir) / spec.replace(":", "-") if args.sweep_dir else None
        ray = {"gpus_per_trial": args.sweep_gpus_per_trial} if args.sweep_engine == "ray" else {}
        base = evolve(base, seed=0, data_dir=args.data_dir, subset_train=args.subset_train,  # Ray's trials load
                      subset_test=args.subset_test)  # these images themselves; here they are `train` and `test`
        rows.append({**row, **peak_sweep(base, out, found=found, engine=args.sweep_engine,
                                         peaks=args.sweep_peaks[base.optimizer], arrays=(train, test),
                                         device=device, **ray),
                     "engine": args.sweep_engine})
    return rows


# ---------------------------------------------------------------------------------------------------------
# Report


def _row_text(r: dict) -> str:
    mem = f"{r['peak_gpu_mem_gib']:.2f} GiB" if r["peak_gpu_mem_gib"] is not None else "-"
    note = "" if r["full_epoch_timed"] else f" (from {r['steps_timed']} of {r['steps_per_epoch']} steps)"
    return (f"  {r['model']:<14} b{r['batch_size']:<4} {r['precision']:<5} {r['loader']:<6} {r['mode']:<8} "
            f"{r['images_per_s']:>9.1f} img/s "
            f"{r['ms_per_step']:>8.2f} ms/step {r['seconds_per_epoch']:>8.2f} s/epoch  warm-up {r['warmup_s']:>5.1f} s"
            f" {mem:>10}{note}")


def print_report(report: dict) -> None:
    m = report["machine"]
    print(f"\n== {m['gpu'] or m['cpu']} ({m['cpu_cores']} CPU cores) | torch {m['torch']} | {report['date']} | "
          f"load average {m['load_avg_1min']:.1f} -> {m.get('load_avg_1min_end', float('nan')):.1f}")
    print(f"   data: {report['data']['description']} ({report['data']['train']} train / {report['data']['test']} test)")
    print(f"   command: {report['command']}")
    for note in report.get("notes", []):
        print(f"   note: {note}")
    res = report["results"]
    if "loaders" in res:
        print("\nloader                                   images/s")
        for r in res["loaders"]:
            print(f"  {r['loader']:<38} {r['images_per_s']:>9.0f}")
    if "epochs" in res:
        print("\nmodel          prec. loader mode        train speed       step    time/epoch   (apart)   peak GPU mem")
        for r in res["epochs"]:
            print(_row_text(r))
    if "airbench" in res:
        b = res["airbench"]
        if "skipped" in b:
            print(f"\nairbench94: skipped ({b['skipped']})")
        else:
            print(f"\nairbench94 x {len(b['runs'])}: {b['seconds_mean']:.2f} s, {b['acc_tta2_mean']:.2f}% (TTA 2), "
                  f"{b['acc_tta0_mean']:.2f}% (no TTA)")
    for a in res.get("accuracy", []):
        when = {k: f"{v:.1f} s" if v is not None else "never" for k, v in a.items() if k.endswith("_mean_s")}
        tta = (f", with {a['runs'][0]['tta']} TTA {a['final_acc_tta_mean']:.2f}% (reached {a['target_tta']:.2f}%: "
               f"{a['reached_target_tta']}, training time to it {when['train_time_to_target_tta_mean_s']})"
               if a["final_acc_tta_mean"] is not None else "")
        print(f"\n{a['model']} {a['recipe']} x {len(a['runs'])} seeds ({a['loader']} loader): final "
              f"{a['final_acc_mean']:.2f}% +- {a['final_acc_std']:.2f} (min {a['final_acc_min']:.2f}); reached "
              f"{a['target']:.2f}%: {a['reached_target']}, training time to it "
              f"{when['train_time_to_target_mean_s']} ({when['time_to_target_mean_s']} with the test passes){tta}; "
              f"whole run {a['train_only_s_mean']:.1f} s training, {a['train_s_mean']:.1f} s with the test passes, "
              f"+ warm-up {a['warmup_s_mean']:.1f} s")
        for key, label in (("vs_airbench", "without TTA"), ("vs_airbench_tta", "with TTA"),
                           ("full_run_vs_airbench", "whole run")):
            if a.get(key) is not None:
                print(f"  training time / airbench94's ({label}): {a[key]:.2f}")
    if "overhead" in res:
        o = res["overhead"]
        print(f"\nfit vs bare loop ({o['steps']} steps, {o['loader']} loader, {o['mode']}): fit {o['fit_s']:.2f} s, "
              f"bare {o['bare_s']:.2f} / {o['bare_again_s']:.2f} s -> overhead {o['overhead_pct']:+.1f}%")
    if "lrtest" in res:
        print(f"\n{'LR range test':<44}{'recipe peak':>12}" + "".join(f"{k:>18}" for k in RULES))
        for r in res["lrtest"]:
            run = f"{r['model']}:{r['recipe']} ({r['optimizer']}, batch {r['batch_size']})"
            print(f"  {run:<42}{r['recipe_peak']:>12}" + "".join(f"{r['picks'][k]:>18.3g}" for k in RULES))
    for r in res.get("sweep", []):
        print(f"\nsweep {r['model']} {r['recipe']} recipe, {r['optimizer']} (batch {r['batch_size']}, "
              f"{r['epochs']} epochs): best swept "
              f"{r['best_swept_acc']:.2f}%")
        for label, run in r["runs"].items():
            acc = f"{run['final_acc']:.2f}%" if run["final_acc"] is not None else "did not finish"
            print(f"  peak {run['max_lr']:<10.3g} {label:<18} {acc}")
        for line in describe_picks(r):
            print(f"  rule {line}")


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py (never downloads)")
    p.add_argument("--data-name", default="CIFAR-10", help="what the data is, for the report")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--out", default="benchmarks/results/benchmark.json", help="JSON report")
    p.add_argument("--quick", "--size-tiny", dest="quick", action="store_true",
                   help="CPU smoke run: 10/10 images, batch 5, 1-2 steps per timing, fp32, 1 epoch, 1 seed")
    p.add_argument("--subset-train", type=int, help="class-balanced training subset (default: all)")
    p.add_argument("--subset-test", type=int, help="class-balanced test subset (default: all)")
    p.add_argument("--batch-size", type=int, default=512, help="loaders section")
    p.add_argument("--recipe", default="davidnet", choices=list(data.AUGMENTATIONS), help="loaders section")
    p.add_argument("--workers", type=int, nargs="*", default=[], help="extra DataLoader worker counts to time")
    p.add_argument("--max-batches", type=int, help="loaders: time at most this many batches (default: one epoch)")
    p.add_argument("--models", default="custom_resnet,resnet18", help="epochs section")
    p.add_argument("--precisions", default="fp32,amp", help="epochs section: fp32 and/or amp")
    p.add_argument("--loaders", default="gpu,torch", help="epochs section: gpu and/or torch")
    p.add_argument("--epoch-batch-sizes", default="", help="epochs section: batch sizes to time (default: each "
                   "model's recipe's), e.g. 128,512")
    p.add_argument("--epoch-steps", type=int, help="epochs: time at most this many steps (default: one epoch)")
    p.add_argument("--warmup-steps", type=int, default=3, help="epochs: untimed steps first")
    p.add_argument("--seeds", type=int, default=3, help="accuracy and airbench: runs")
    p.add_argument("--modes", default="auto", help="epochs section: any of auto, eager, graphs, compile")
    p.add_argument("--epochs", type=int, help="accuracy and sweep: epochs (default: the recipe's)")
    p.add_argument("--accuracy-runs", default="custom_resnet:writeup",
                   help="accuracy: model:recipe pairs, each trained --seeds times")
    p.add_argument("--target", type=float, help="accuracy: %% for 'time to target' (default: airbench94's no-TTA "
                   f"accuracy when the airbench section ran first, else {TARGET})")
    p.add_argument("--target-tta", type=float, help="accuracy: %% for the time to target with the recipe's TTA "
                   "(default: airbench94's TTA accuracy when the airbench section ran, else --target)")
    p.add_argument("--overhead-epochs", type=int, default=2)
    p.add_argument("--fit-loader", choices=["gpu", "torch"], default="gpu", help="accuracy, overhead, sweep")
    p.add_argument("--fit-mode", choices=["auto", "eager", "graphs", "compile"], default="auto",
                   help="accuracy, overhead and sweep: the step's execution mode")
    p.add_argument("--sweep-runs", default="resnet18:fast,resnet18:writeup,custom_resnet:writeup",
                   help="lrtest, sweep: model:recipe pairs (the recipe's optimizer picks --sweep-peaks-sgd or -adam)")
    p.add_argument("--sweep-peaks-sgd", default=",".join(f"{v:g}" for v in SWEEP_PEAKS["sgd"]),
                   help="sweep: peaks for SGD")
    p.add_argument("--sweep-peaks-adam", default=",".join(f"{v:g}" for v in SWEEP_PEAKS["adam"]),
                   help="sweep: peaks for Adam")
    p.add_argument("--sweep-engine", choices=["local", "ray"], default="local", help="sweep: its runs one after "
                   "another in this process (local), or as Ray Tune trials (ray: needs --sweep-dir)")
    p.add_argument("--sweep-dir", help="sweep: keep each model:recipe's sweep here (trials' run folders, results.csv, "
                   "sweep.png); default: local runs in memory")
    p.add_argument("--sweep-gpus-per-trial", type=float, help="sweep, --sweep-engine ray: GPUs per trial (default: 1 "
                   "with CUDA)")
    p.add_argument("--lr-test-steps", type=int, default=100, help="lrtest, sweep: LR range test iterations")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's). On a CPU shared with other "
                   "jobs, 1 avoids OpenMP threads spin-waiting on each other (seen: 10x slower steps with 2)")
    return p


def parse_args(argv: list[str] | None):
    args = build_parser().parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {', '.join(sorted(unknown))}: choose from {', '.join(SECTIONS)}")
    if args.quick:  # small enough for CI on 2 CPU cores: well under a minute (fp32: bf16 is ~17x slower on CPUs)
        args.subset_train, args.subset_test = args.subset_train or 10, args.subset_test or 10
        args.batch_size, args.max_batches, args.epoch_steps, args.warmup_steps = 5, 2, 1, 1
        args.seeds, args.epochs, args.overhead_epochs, args.workers, args.precisions = 1, 1, 1, [], "fp32"
        args.sweep_runs, args.sweep_peaks_sgd, args.sweep_peaks_adam = "custom_resnet:writeup", "0.05", "1e-3"
        args.lr_test_steps = 17
        args.threads = args.threads or 1
    if "sweep" in args.sections and args.sweep_engine == "ray" and not args.sweep_dir:
        raise SystemExit("error: --sweep-engine ray keeps its trials in a folder: give --sweep-dir DIR")
    args.models = args.models.split(",")
    # the DataLoader path needs albumentations and OpenCV; a bare GPU machine may lack them: time the rest
    args.albumentations = all(importlib.util.find_spec(m) for m in ("albumentations", "cv2"))
    args.loaders = [k for k in args.loaders.split(",") if k == "gpu" or args.albumentations]
    args.fit_loader = args.fit_loader if args.albumentations else "gpu"
    args.precisions = [p == "amp" for p in args.precisions.split(",")]
    args.modes = args.modes.split(",")
    args.epoch_batch_sizes = [int(v) for v in args.epoch_batch_sizes.split(",") if v]
    args.sweep_runs = args.sweep_runs.split(",")
    args.accuracy_runs = args.accuracy_runs.split(",")
    args.sweep_peaks = {"sgd": [float(v) for v in args.sweep_peaks_sgd.split(",")],
                        "adam": [float(v) for v in args.sweep_peaks_adam.split(",")]}
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        train, test = load_data(args)
    except data.DataError as err:
        raise SystemExit(f"error: {err}") from None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as fit does: every section times autotuned kernels
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "benchmarks.benchmark", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(device),
        "data": {"dir": str(Path(args.data_dir).resolve()), "description": args.data_name,
                 "train": len(train), "test": len(test)},
        "settings": vars(args),
        "results": {},
        "section_seconds": {},  # wall time of each section, warm-ups included
        "notes": [] if args.albumentations else ["albumentations/cv2 missing: DataLoader path not measured"],
    }
    benches = {"loaders": bench_loaders, "epochs": bench_epochs, "accuracy": bench_accuracy,
               "airbench": bench_airbench, "overhead": bench_overhead, "lrtest": bench_lrtest,
               "sweep": bench_sweep}
    for name in sorted(args.sections, key=SECTIONS.index):
        print(f"-- {name}", flush=True)
        if name == "accuracy":  # the bar: airbench94's accuracy in this run, without TTA and with it
            airbench = report["results"].get("airbench", {})
            args.target = args.target if args.target is not None else airbench.get("acc_tta0_mean", TARGET)
            args.target_tta = args.target_tta if args.target_tta is not None else airbench.get("acc_tta2_mean",
                                                                                               args.target)
        t0 = time.perf_counter()
        report["results"][name] = benches[name](args, train, test, device)
        report["section_seconds"][name] = time.perf_counter() - t0
        report["machine"]["load_avg_1min_end"] = os.getloadavg()[0]
        _write(report, args.out)  # after every section: a crash late in a long run keeps the rest
    add_airbench_ratios(report["results"])
    _write(report, args.out)
    print_report(report)
    return report


def add_airbench_ratios(results: dict) -> None:
    """Each accuracy row's mean training time (the steps alone, as airbench94 is timed) over airbench94's mean
    time in this run: to its no-TTA accuracy, to its TTA accuracy with the recipe's TTA, and for the whole run."""
    theirs = results.get("airbench", {}).get("seconds_mean")
    for row in results.get("accuracy", []):
        for key, ours in (("vs_airbench", "train_time_to_target_mean_s"),
                          ("vs_airbench_tta", "train_time_to_target_tta_mean_s"),
                          ("full_run_vs_airbench", "train_only_s_mean")):
            row[key] = row[ours] / theirs if theirs and row[ours] else None


def _write(report: dict, path: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
