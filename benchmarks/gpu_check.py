"""The GPU check in one command: `python -m benchmarks.gpu_check --data-dir DIR --out OUT [--budget SECONDS]`.

For anyone with a CUDA machine (no network needed once the wheels are installed).

With --budget (a machine lent for minutes): runs the measurements in a fixed priority order, most informative first
(ITEMS), and starts one only when its estimate (ESTIMATES, scaled by how this run's finished items compared with
theirs) fits in what is left of the budget; the rest are listed as skipped, with why. OUT/SUMMARY.md and
OUT/summary.json are rewritten after every item, and a check killed by SIGTERM, SIGINT or its budget still leaves them
saying what ran, what was cut and what was never started. --items picks some.

Without --budget, the full check (--parts picks some), each part in its own process with its log kept:
  tests      the test suite's fast part (CUDA-only tests run instead of skipping)
  benchmark  every benchmark section but the sweep, the epochs section in every mode (eager, graphs, compile)
  sweep      the benchmark's peak-LR sweep (a dozen full runs: ~10 minutes on an H100)
  cli        the command line's default run of each model (`python -m helpers.train --model M`)
  notebooks  all five notebooks with papermill and their default parameters

Either way OUT holds one table of what ran, its status, seconds and headline numbers (SUMMARY.md), beside the JSON,
the logs and the figures; a run that fails is reported and the others still run. --quick is a smoke run on any
machine (tiny settings: it checks the plumbing, not the GPU).

    python -m benchmarks.gpu_check --data-dir data --data-name "CIFAR-10" --out gpu-check --budget 500
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tests", "benchmark", "sweep", "cli", "notebooks")
SECTIONS = "loaders,epochs,airbench,accuracy,overhead"  # the benchmark part's (the sweep is a part of its own)
ACCURACY_RUNS = "custom_resnet:writeup,custom_resnet:fast,resnet18:fast"  # each recipe against airbench94
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# ---------------------------------------------------------------------------------------------------------
# The budgeted check: its items, in priority order, and the one table of their estimates

# Seconds each item takes on the lent GPU (an H200: Hopper, as the H100), its process start, data load and warm-ups
# included. From the last measured figures: the H100 run at commit 858b4af, 2026-11-23 (BENCHMARKS.md, "GPU
# results"; its JSON and logs: h100_acc.json, h100_epochs.json, airbench10.json, steps.txt, notebook logs). That
# version had no execution modes, so these are upper-ish guesses; a run scales them by its own finished items.
# Replace them with a GPU run's measured seconds (its summary.json, "seconds") when there is one.
ESTIMATES = {
    # name: (seconds, where the number comes from)
    "resnet9": (140, "airbench94 3 x 2.1-2.5 s + warm-up ~10 s (airbench10.json); ResNet-9 writeup 3 x 18-20 s, "
                     "fast 3 x 10 epochs at ~0.8 s/epoch + TTA, 6 s first-epoch warm-up (h100_acc.json); start and "
                     "data ~15 s"),
    "overhead": (35, "3 x 2 ResNet-9 epochs at ~0.8 s + test passes (h100_acc.json), warm-ups, process start"),
    "resnet18_epochs": (40, "resnet18 1.0-4.4 s/epoch at batch 512/128 (steps.txt), 2 timed epochs + warm-ups + "
                            "process start"),
    "modes": (100, "4 epoch timings: compile warm-ups 10-22 s each (steps.txt), epochs 0.4-1.6 s "
                   "(h100_epochs.log), graphs capture ~1 s, eager; + process start"),
    "cuda_tests": (60, "not measured; 2 compiles of custom_resnet at 10-22 s each (steps.txt) + pytest start"),
    "resnet18_fast": (75, "ResNet-18 fast-recipe CLI run 25.8 s for 20 epochs (BENCHMARKS.md) x 2 + start"),
    "share": (150, "not measured; 9 CLI runs of custom_resnet `fast` (1 warm-up epoch, 4 at once, 4 in turn): "
                   "10 epochs at ~0.8 s (h100_acc.json) + ~15 s process start, data and warm-up each"),
    "sweep": (90, "<= 6 runs of 10 ResNet-9 epochs at ~0.8 s (h100_acc.json) + warm-ups + 100-step range test"),
    "depthwise": (40, "depthwise_net 8 s/epoch on the DataLoader, first epoch 27 s (858b4af CLI); GPU loader new"),
    "nb02": (30, "notebook 02 cells 12.2 s (02_lr_range_test.log) + kernel start"),
    "nb04": (55, "notebook 04 cells 41.2 s (04_custom_resnet_mixed_precision.log) + kernel start"),
}
ITEMS = {  # name -> what it measures, in priority order (the order runs follow)
    "resnet9": "airbench94 x 3, then custom_resnet `writeup` (24 epochs) and `fast` (10 epochs) x 3 seeds each in "
               "the same process on the same data: accuracy, flip/translate TTA, time, time to airbench94's accuracy",
    "overhead": "fit against the bare PyTorch loop (benchmarks.bare: same model, loader, optimizer, loss, autocast), "
                "custom_resnet, 2 epochs, eager",
    "resnet18_epochs": "resnet18 s/epoch at batch 128 (the seed's) and 512, mixed precision, GpuLoader, mode auto",
    "modes": "s/epoch in eager, graphs and compile (warm-up apart), both models, mixed precision: what `auto` "
             "weighs (helpers.engine.STEP_STUDY)",
    "cuda_tests": "the CUDA-only tests (graphs and compile train like eager, GpuLoader on CUDA)",
    "resnet18_fast": "resnet18 `fast` x 2 seeds against airbench94",
    "share": "4 custom_resnet `fast` runs at once on the GPU against the same 4 one after another (what "
             "helpers.sweep --gpus-per-trial 0.25 does; the target: at most 0.6x the time)",
    "sweep": "a reduced LR sweep: custom_resnet `fast` at peaks 0.2, 0.4, 0.8 and at each LR rule's pick",
    "depthwise": "depthwise_net's epoch on the GpuLoader (its GPU augmentation)",
    "nb02": "notebook 02 (LR range test), default parameters",
    "nb04": "notebook 04 (ResNet-9, mixed precision), default parameters",
}
AIRBENCH_ITEM = "resnet9"  # the item that measures airbench94; later accuracy items take its numbers
CAP = 2.5  # no item runs past this many times its (scaled) estimate: one slow item cannot eat the others' time
LOG_TAIL = 25  # lines of a failed item's log in SUMMARY.md
SCALE_RANGE = (0.5, 3.0)  # how far a run's own timings may move the table's estimates


# What the items import, and who needs it: checked in a few seconds before anything starts (`preflight`)
PREFLIGHT = {
    "torch": "everything", "torchvision": "helpers.data", "numpy": "everything", "matplotlib": "figures",
    "seaborn": "helpers.plots", "tqdm": "fit", "filelock": "helpers.data, helpers.run", "PIL": "helpers.predict",
    "yaml": "albumentations", "scipy": "albumentations", "cv2": "albumentations",
    "albumentations": "the DataLoader path (modes' torch loader, notebooks)", "airbench": "resnet9 (airbench94)",
    "pytest": "cuda_tests", "papermill": "nb02, nb04", "ipykernel": "nb02, nb04 (their kernel)",
    "nbformat": "papermill", "jsonschema": "nbformat", "attr": "jsonschema (attrs)", "click": "papermill",
    "requests": "papermill", "aiohttp": "papermill", "psutil": "ipython", "pygments": "ipython",
    "pytorch_grad_cam": "helpers.gradcam (notebook 05)", "sklearn": "pytorch_grad_cam",
    "torch_lr_finder": "helpers.lr_finder (nb02)", "torchinfo": "helpers.models (summaries)",
}


def preflight(python: str = sys.executable, timeout: float = 120) -> dict[str, str]:
    """{module: why it did not import} for PREFLIGHT's modules, imported in one child process (the check's own
    process stays free of CUDA); empty when all import."""
    script = ("import importlib, json, sys\nmissing = {}\nfor name in sys.argv[1:]:\n    try:\n"
              "        importlib.import_module(name)\n    except Exception as err:\n"
              "        missing[name] = f'{type(err).__name__}: {err}'[:200]\nprint(json.dumps(missing))\n")
    try:
        done = subprocess.run([python, "-c", script, *PREFLIGHT], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)
        missing = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as err:
        return {"(preflight)": f"could not run ({type(err).__name__}: {err})"}
    return {name: f"{why} (needed by {PREFLIGHT[name]})" for name, why in missing.items()}


class Killed(Exception):
    """SIGTERM or SIGINT reached the check."""


def commands(args) -> list[tuple[str, str, list[str], dict]]:
    """(part, name, argv, extra environment) of every run of the full check, in order."""
    py, out, data = sys.executable, Path(args.out), ["--data-dir", args.data_dir]
    quick = args.quick
    runs = [("tests", "pytest", [py, "-m", "pytest", "-q", "-rs", "-m", "not slow", "tests"], {})]
    bench = [py, "-m", "benchmarks.benchmark", *data, "--data-name", args.data_name, "--device", args.device]
    if quick:
        bench += ["--quick"]
    runs.append(("benchmark", "benchmark", [*bench, "--sections", args.sections,
                                            "--modes", "eager" if quick else "eager,graphs,compile",
                                            *([] if quick else ["--accuracy-runs", args.accuracy_runs]),
                                            "--out", str(out / "benchmark.json")], {}))
    sweep = ["--sweep-runs", args.sweep_runs] if args.sweep_runs and not quick else []
    runs.append(("sweep", "sweep", [*bench, "--sections", "sweep", *sweep, "--out", str(out / "sweep.json")], {}))
    for model in args.models:
        tiny = ["--epochs", "1", "--subset-train", "200", "--subset-test", "100"] if quick else []
        runs.append(("cli", f"cli_{model}", [py, "-m", "helpers.train", "--model", model, *data, "--device",
                                             args.device, "--out", str(out / f"cli_{model}"), "--overwrite",
                                             "--tta", *tiny], {}))
    for path in NOTEBOOKS:
        runs.append(("notebooks", path.stem, notebook_command(path, args, out), {"SMOKE": "1"} if quick else {}))
    return [r for r in runs if r[0] in args.parts]


def notebook_command(path: Path, args, out: Path) -> list[str]:
    (out / "notebooks").mkdir(parents=True, exist_ok=True)  # papermill writes into an existing folder only
    params = ["-p", "DATA_DIR", args.data_dir, "-p", "OUT_DIR", str(out / "notebooks" / path.stem)]
    return [sys.executable, "-m", "papermill", str(path), str(out / "notebooks" / path.name), *params,
            "--cwd", str(REPO), "--no-progress-bar"]


def item_command(name: str, args, out: Path) -> tuple[list[str], dict] | str:
    """(argv, extra environment) of a budgeted item, built when it starts (the accuracy items take airbench94's
    accuracy measured by an earlier one as their target), or why it cannot run here."""
    py = sys.executable
    bench = [py, "-m", "benchmarks.benchmark", "--data-dir", args.data_dir, "--data-name", args.data_name,
             "--device", args.device, "--out", str(out / f"{name}.json"), *(["--quick"] if args.quick else [])]
    accuracy = [*bench, "--sections", "accuracy", *airbench_targets(out)]
    argv = {
        "resnet9": [*bench, "--sections", "airbench,accuracy", "--seeds", "3",
                    "--accuracy-runs", "custom_resnet:writeup,custom_resnet:fast"],
        "overhead": [*bench, "--sections", "overhead"],
        "resnet18_epochs": [*bench, "--sections", "epochs", "--models", "resnet18", "--precisions", "amp",
                            "--loaders", "gpu", "--modes", "auto", "--epoch-batch-sizes", "128,512"],
        "modes": [*bench, "--sections", "epochs", "--models", "custom_resnet,resnet18", "--precisions", "amp",
                  "--loaders", "gpu", "--modes", "eager" if args.quick else "eager,graphs,compile"],
        "cuda_tests": [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda", "tests"],
        "resnet18_fast": [*accuracy, "--seeds", "2", "--accuracy-runs", "resnet18:fast"],
        "sweep": [*bench, "--sections", "sweep", "--sweep-runs", "custom_resnet:fast", "--sweep-peaks-sgd",
                  "0.2,0.4,0.8"],
        "share": [py, "-m", "benchmarks.share", "--data-dir", args.data_dir, "--data-name", args.data_name,
                  "--device", args.device, "--out", str(out / "share.json"),
                  *(["--runs", "2", "--epochs", "1", "--", "--subset-train", "200", "--subset-test", "100"]
                    if args.quick else [])],
        "depthwise": [*bench, "--sections", "epochs", "--models", "depthwise_net", "--precisions", "amp",
                      "--loaders", "gpu"],
    }
    if name in argv:
        return argv[name], {}
    if importlib.util.find_spec("papermill") is None:
        return "papermill is not installed (it travels in .device/whl)"
    path = next(p for p in NOTEBOOKS if p.stem.startswith(name[2:] + "_"))
    return notebook_command(path, args, out), {"SMOKE": "1"} if args.quick else {}


def airbench_numbers(out: Path) -> dict | None:
    """airbench94's summary as this check's AIRBENCH_ITEM measured it, or None (not run, skipped, or a file that
    is not what the benchmark writes)."""
    try:
        bench = json.loads((out / f"{AIRBENCH_ITEM}.json").read_text())["results"]["airbench"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return bench if isinstance(bench, dict) and "seconds_mean" in bench else None


def airbench_targets(out: Path) -> list[str]:
    """--target and --target-tta from airbench94's accuracy in this check's AIRBENCH_ITEM, if it measured it."""
    bench = airbench_numbers(out)
    try:
        return ["--target", f"{bench['acc_tta0_mean']:.4f}", "--target-tta", f"{bench['acc_tta2_mean']:.4f}"]
    except (KeyError, TypeError, ValueError):
        return []


def attach_airbench(out: Path, name: str) -> None:
    """An accuracy item run apart from airbench94: its JSON gets the AIRBENCH_ITEM's time and the ratios. A
    missing or malformed JSON on either side leaves everything as it is."""
    path, theirs = out / f"{name}.json", airbench_numbers(out)
    try:
        report = json.loads(path.read_text())
        results = report["results"]
        if theirs is None or "accuracy" not in results or "airbench" in results:
            return
    except (OSError, ValueError, KeyError, TypeError):
        return
    from benchmarks.benchmark import add_airbench_ratios

    results["airbench"] = {**theirs, "from": f"{AIRBENCH_ITEM}.json (the same check, an earlier process)"}
    add_airbench_ratios(results)
    atomic_write(path, json.dumps(report, indent=1))


# ---------------------------------------------------------------------------------------------------------
# Running: one process per run, its log kept; a SIGTERM or timeout ends its whole process group


def run_one(name: str, argv: list[str], env: dict, out: Path, timeout: float) -> dict:
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "TQDM_DISABLE": "1", "MPLBACKEND": "Agg", **env})
        try:
            code = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            code = "timeout"
        finally:  # a timeout, or Killed raised in the wait: end the run and whatever it started
            if proc.poll() is None:
                stop(proc)
    return {"name": name, "command": shlex.join(argv), "status": "ok" if code == 0 else f"failed ({code})",
            "seconds": time.perf_counter() - t0, "log": str(log.relative_to(out))}


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _raise_killed(signum, frame):
    raise Killed(signal.Signals(signum).name)


def scale_factor(results: list[dict], estimates: dict) -> float:
    """How this run's finished items compared with the table: their measured seconds over their estimates (failed
    runs left out: a crash says nothing about speed), clamped to SCALE_RANGE; 1 before any has finished."""
    done = [r for r in results if r["status"] == "ok" or "timeout" in r["status"]]
    estimated = sum(estimates[r["name"]][0] for r in done)
    if not estimated:
        return 1.0
    return min(max(sum(r["seconds"] for r in done) / estimated, SCALE_RANGE[0]), SCALE_RANGE[1])


def fits(name: str, estimates: dict, scale: float, left: float) -> str | None:
    """None when `name`'s scaled estimate fits in the `left` seconds, else why it is skipped."""
    need = estimates[name][0] * scale
    if need <= left:
        return None
    return f"estimate {need:.0f} s ({estimates[name][0]} s x {scale:.2f}) > {max(left, 0):.0f} s left"


def run_budget(args, out: Path, estimates: dict = ESTIMATES, runner=run_one, clock=time.monotonic) -> dict:
    """Each of args.items in priority order, started only when its scaled estimate fits in what is left of
    args.budget, and stopped at CAP times that estimate; the summary is rewritten before and after each, and when a
    signal ends the check. No item can end the check: whatever goes wrong in one (its process, its command, its
    JSON) is recorded as its failure, with its log's last lines, and the next one starts."""
    t0 = clock()
    state = {"budget_s": args.budget, "state": "running", "results": [], "skipped": [], "running": None,
             "preflight": getattr(args, "preflight", None)}
    pending = [name for name in ITEMS if name in args.items]
    try:
        while pending:
            name = pending.pop(0)
            scale, left = scale_factor(state["results"], estimates), args.budget - (clock() - t0)
            need = estimates[name][0] * scale
            why = fits(name, estimates, scale, left)
            try:
                command = item_command(name, args, out) if why is None else why
            except Exception as err:  # noqa: BLE001 - a broken item is reported, the check goes on
                command = f"could not build its command ({type(err).__name__}: {err})"
            if isinstance(command, str):
                state["skipped"].append({"name": name, "why": command})
                print(f"-- {name}: skipped ({command})", flush=True)
                continue
            state["running"] = {"name": name, "estimate_s": need, "since": time.time()}
            write_summary(out, args, state)
            cap = left if args.quick else min(left, CAP * need)  # --quick on a CPU: estimates are the GPU's
            print(f"-- {name}: {ITEMS[name]} (estimate {need:.0f} s, cap {cap:.0f} s, {left:.0f} s left)", flush=True)
            started = clock()
            try:
                result = runner(name, *command, out, timeout=cap)
            except Killed:
                raise
            except Exception as err:  # noqa: BLE001 - the runner itself failed: the item failed, not the check
                result = {"name": name, "command": shlex.join(command[0]), "seconds": clock() - started,
                          "status": f"failed ({type(err).__name__}: {err})", "log": f"logs/{name}.log"}
            if result["status"] == "failed (timeout)":
                result["status"] = f"failed (timeout: capped at {cap:.0f} s)"
            try:
                attach_airbench(out, name)
            except Exception as err:  # noqa: BLE001 - an unreadable JSON costs the ratios, not the check
                result["note"] = f"airbench94's ratios not added ({type(err).__name__}: {err})"
            state["results"].append({"part": "budget", **result, "estimate_s": need})
            state["running"] = None
            print(f"   {result['status']} in {result['seconds']:.0f} s", flush=True)
            write_summary(out, args, state)
        state["state"] = "done"
    except Killed as signal_name:
        running = state.pop("running") or {}
        if running:
            state["results"].append({"part": "budget", "name": running["name"], "status": f"killed ({signal_name})",
                                     "seconds": time.time() - running["since"], "estimate_s": running["estimate_s"],
                                     "log": f"logs/{running['name']}.log", "command": ""})
        state["skipped"] += [{"name": n, "why": f"not started: the check was killed ({signal_name})"}
                             for n in pending]
        state["state"] = f"killed ({signal_name}) after {clock() - t0:.0f} s"
    state["running"], state["scale"] = None, scale_factor(state["results"], estimates)
    state["elapsed_s"] = clock() - t0
    write_summary(out, args, state)
    return state


# ---------------------------------------------------------------------------------------------------------
# Summary: SUMMARY.md and summary.json, written whole (a reader never sees half a file)


def headline(name: str, out: Path) -> str:
    """The numbers worth a glance for a run, read from what it wrote."""
    try:
        if name.startswith("cli_"):
            m = json.loads((out / name / "metrics.json").read_text())
            tta = f", flip TTA {m['test_acc_tta']:.2f}%" if m.get("test_acc_tta") is not None else ""
            return (f"{m['test_acc']:.2f}%{tta} in {m['epochs']} epochs, {m['total_seconds']:.1f} s "
                    f"(+{m['warmup_seconds']:.1f} s warm-up, {m['mode']}, {m['precision']})")
        if name == "share":
            r = json.loads((out / "share.json").read_text())
            return (f"{r['runs']} runs at once {r['together_s']:.1f} s, one after another {r['sequential_s']:.1f} s: "
                    f"{r['ratio']:.2f}x (target <= {r['target_ratio']})")
        if (out / f"{name}.json").exists():
            return bench_headline(json.loads((out / f"{name}.json").read_text())["results"])
        if name in ("pytest", "cuda_tests"):  # pytest's last line: "5 passed, 2 skipped in 12.3s"
            lines = [line for line in (out / "logs" / f"{name}.log").read_text().splitlines() if line.strip()]
            return lines[-1].strip("= ") if lines else ""
    except Exception:  # noqa: BLE001 - a file that is not what the run writes: no headline, never a crash
        return ""
    return ""


def bench_headline(res: dict) -> str:
    def ratio(v):
        return f"{v:.2f}x" if v is not None else "-"

    parts = []
    b = res.get("airbench", {})
    if "seconds_mean" in b:
        parts.append(f"airbench94 x {len(b['runs'])}: {b['seconds_mean']:.2f} s, {b['acc_tta0_mean']:.2f}% "
                     f"({b['acc_tta2_mean']:.2f}% TTA)")
    elif "skipped" in b:
        parts.append(f"airbench94 skipped: {b['skipped']}")
    parts += [f"{a['model']} {a['recipe']} x {len(a['runs'])}: {a['final_acc_mean']:.2f}%"
              + (f" (TTA {a['final_acc_tta_mean']:.2f}%)" if a["final_acc_tta_mean"] is not None else "")
              + f" in {a['train_only_s_mean']:.1f} s (+{a['warmup_s_mean']:.1f} s warm-up), airbench94's time x "
              f"{ratio(a.get('vs_airbench'))} (TTA {ratio(a.get('vs_airbench_tta'))}, whole run "
              f"{ratio(a.get('full_run_vs_airbench'))})" for a in res.get("accuracy", [])]
    parts += [f"{r['model']} {r['precision']} {r['loader']} {r['mode']} {r['seconds_per_epoch']:.2f} s/epoch "
              f"(warm-up {r['warmup_s']:.1f} s)" for r in res.get("epochs", [])]
    if "overhead" in res:
        parts.append(f"fit overhead {res['overhead']['overhead_pct']:+.1f}% ({res['overhead']['mode']})")
    parts += [f"sweep {r['model']} {r['recipe']}: best swept {r['best_swept_acc']:.2f}%; " + ", ".join(
        f"{rule} {v['max_lr']:.3g} " + (f"{-v['gap_to_best']:+.2f}" if v["gap_to_best"] is not None else "failed")
        for rule, v in r["rules"].items())
        for r in res.get("sweep", [])]
    return "; ".join(parts)


def machine_line(args) -> str:
    """GPU, torch and commit, without importing torch or starting CUDA in this process (the runs need the GPU)."""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().replace("\n", ", ") or "no CUDA GPU"
    except (OSError, subprocess.SubprocessError):
        gpu = "no CUDA GPU (no nvidia-smi)"
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "?"
    commit = os.environ.get("GIT_COMMIT", "")  # a copy of the tree without .git (or without git) can say it
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                          text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return (f"{gpu}, torch {torch_version}, Python {sys.version.split()[0]}, commit "
            f"{commit or 'unknown (set GIT_COMMIT)'}, data: {args.data_name} ({args.data_dir})")


def write_summary(out: Path, args, state: dict) -> Path:
    if not hasattr(args, "machine"):
        args.machine = machine_line(args)
    budget = f"budget {args.budget:.0f} s, " if args.budget else ""
    lines = [f"# GPU check, {datetime.date.today()}", "", args.machine
             + (" -- QUICK smoke run: tiny settings, not a measurement" if args.quick else ""), "",
             f"Command: `{shlex.join([Path(sys.executable).name, '-m', 'benchmarks.gpu_check', *args.argv])}`", "",
             f"State: {budget}{state['state']}"
             + (f", {state['elapsed_s']:.0f} s in all" if "elapsed_s" in state else ""), "",
             "| part | run | status | seconds | estimate | headline | log |",
             "| --- | --- | --- | ---: | ---: | --- | --- |"]
    for r in state["results"]:
        estimate = f"{r['estimate_s']:.0f}" if "estimate_s" in r else "-"
        lines.append(f"| {r['part']} | {r['name']} | {r['status']} | {r['seconds']:.0f} | {estimate} | "
                     f"{headline(r['name'], out)} | {r['log']} |")
    if state.get("running"):
        lines.append(f"| budget | {state['running']['name']} | running | - | {state['running']['estimate_s']:.0f} "
                     f"| | logs/{state['running']['name']}.log |")
    if state.get("preflight"):
        lines += ["", "Missing before the start (import preflight; the items that need them fail):", ""]
        lines += [f"- `{module}`: {why}" for module, why in state["preflight"].items()]
    if state.get("skipped"):
        lines += ["", "Skipped:", ""] + [f"- {s['name']} ({ITEMS.get(s['name'], '')}): {s['why']}"
                                         for s in state["skipped"]]
    for r in state["results"]:
        if r["status"] != "ok":
            lines += ["", f"### {r['name']}: {r['status']}", "", f"Last lines of {r['log']}:", "", "```",
                      *log_tail(out / r["log"]), "```"]
    notes = [f"- {r['name']}: {r['note']}" for r in state["results"] if r.get("note")]
    if notes:
        lines += ["", "Notes:", "", *notes]
    if args.budget:
        lines += ["", f"Estimates: ESTIMATES in benchmarks/gpu_check.py, scaled by this run's measured/estimated "
                      f"seconds ({scale_factor(state['results'], ESTIMATES):.2f} now)."]
    text = "\n".join(lines) + "\n"
    payload = json.dumps({"machine": args.machine, "command": args.argv, "quick": args.quick, **state}, indent=1)
    for folder in [out, *([Path(args.summary_to)] if args.summary_to else [])]:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "summary.json", payload)
        atomic_write(folder / "SUMMARY.md", text)
    return out / "SUMMARY.md"


def log_tail(path: Path, lines: int = LOG_TAIL) -> list[str]:
    """The last `lines` lines of a log, made safe to show: control characters out, a code fence broken."""
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return [f"(no log: {err.strerror or err})"]
    tail = text.splitlines()[-lines:]
    return ["".join(c if c.isprintable() or c == "\t" else "?" for c in line).replace("```", "~~~") for line in tail]


def atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename it over `path` (atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the summary from other readers
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py")
    p.add_argument("--data-name", default="CIFAR-10", help="what the data is, for the reports")
    p.add_argument("--out", default="gpu-check", help="folder for the summary, JSON, logs and figures")
    p.add_argument("--budget", type=float, help="seconds: run the budgeted check (ITEMS, in priority order)")
    p.add_argument("--items", default=",".join(ITEMS), help=f"--budget: some of {', '.join(ITEMS)}")
    p.add_argument("--summary-to", help="a second folder that gets SUMMARY.md and summary.json on every write")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run (without --budget)")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of the plumbing")
    p.add_argument("--preflight-only", action="store_true", help="import every module the items use (PREFLIGHT), "
                   "write what is missing into SUMMARY.md, and stop (--budget runs it first anyway)")
    p.add_argument("--accuracy-runs", default=ACCURACY_RUNS,
                   help="benchmark part: the model:recipe pairs of its accuracy section (3 seeds each)")
    p.add_argument("--sections", default=SECTIONS, help="benchmark part: the benchmark's sections")
    p.add_argument("--sweep-runs", help="sweep part: model:recipe pairs (default: the benchmark's)")
    p.add_argument("--models", default="all", help="cli part: the models whose default run it makes, comma-separated "
                   "(default: all of helpers.models.MODELS)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.parts, args.models, args.items = args.parts.split(","), args.models.split(","), args.items.split(",")
    if args.models == ["all"]:
        from helpers.models import MODELS  # deferred: torch, for this default alone (the check itself needs none)

        args.models = list(MODELS)
    for kind, asked, known in (("parts", args.parts, PARTS), ("items", args.items, ITEMS)):
        if set(asked) - set(known):
            p.error(f"unknown {kind} {', '.join(sorted(set(asked) - set(known)))}: choose from {', '.join(known)}")
    args.out = str(Path(args.out).resolve())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.preflight_only or args.budget:
        args.preflight = preflight()
        print("preflight: " + ("every module imports" if not args.preflight else
                               "missing " + "; ".join(f"{k}: {v}" for k, v in args.preflight.items())), flush=True)
    if args.preflight_only:  # device_check.sh's first step: SUMMARY.md says what is missing before anything runs
        write_summary(out, args, {"state": "preflight only", "results": [], "preflight": args.preflight})
        return 0
    handlers = {s: signal.signal(s, _raise_killed) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        state = run_budget(args, out) if args.budget else run_parts(args, out)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    print((out / "SUMMARY.md").read_text())
    if state["state"] != "done":
        return 128 + signal.SIGTERM
    return 0 if all(r["status"] == "ok" for r in state["results"]) else 1


def run_parts(args, out: Path) -> dict:
    """The full check (no budget): every run of --parts in order, the summary after each."""
    state = {"state": "running", "results": []}
    try:
        for part, name, command, env in commands(args):
            print(f"-- {part}: {name}", flush=True)
            state["results"].append({"part": part, **run_one(name, command, env, out, args.timeout)})
            print(f"   {state['results'][-1]['status']} in {state['results'][-1]['seconds']:.0f} s", flush=True)
            write_summary(out, args, state)  # after every run: an interrupted check keeps what it measured
        state["state"] = "done"
    except Killed as signal_name:
        state["state"] = f"killed ({signal_name})"
    write_summary(out, args, state)
    return state


if __name__ == "__main__":
    sys.exit(main())
