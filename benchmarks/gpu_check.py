"""The GPU check in one command: `python -m benchmarks.gpu_check --data-dir DIR --out OUT`.

For anyone with a CUDA machine (no network needed once the wheels are installed). Runs, each part in its own
process with its log kept:
  tests      the test suite's fast part (CUDA-only tests run instead of skipping)
  benchmark  every benchmark section but the sweep, the epochs section in every mode (eager, graphs, compile)
  sweep      the benchmark's peak-LR sweep (a dozen full runs: ~10 minutes on an H100)
  cli        the command line's default run of each model (`python -m helpers.train --model M`)
  notebooks  all five notebooks with papermill and their default parameters
and writes OUT/SUMMARY.md: one table of what ran, its status and seconds, and the headline numbers, next to the
JSON, the logs and the figures. A part that fails is reported and the others still run. --parts picks some;
--quick is a smoke run on any machine (tiny settings: it checks the plumbing, not the GPU).

    python -m benchmarks.gpu_check --data-dir data --data-name "CIFAR-10" --out gpu-check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ("tests", "benchmark", "sweep", "cli", "notebooks")
MODELS = ("custom_resnet", "resnet18", "depthwise_net")
SECTIONS = "loaders,epochs,airbench,accuracy,overhead"  # the benchmark part's (the sweep is a part of its own)
ACCURACY_RUNS = "custom_resnet:writeup,custom_resnet:fast,resnet18:fast"  # each recipe against airbench94
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def commands(args) -> list[tuple[str, str, list[str], dict]]:
    """(part, name, argv, extra environment) of every run, in order."""
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
        params = ["-p", "DATA_DIR", args.data_dir, "-p", "OUT_DIR", str(out / "notebooks" / path.stem)]
        runs.append(("notebooks", path.stem, [py, "-m", "papermill", str(path), str(out / "notebooks" / path.name),
                                              *params, "--cwd", str(REPO), "--no-progress-bar"],
                     {"SMOKE": "1"} if quick else {}))
    return [r for r in runs if r[0] in args.parts]


def run_one(name: str, argv: list[str], env: dict, out: Path, timeout: float) -> dict:
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(argv)}\n")
        f.flush()
        try:
            code = subprocess.run(argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, "TQDM_DISABLE": "1", "MPLBACKEND": "Agg", **env}).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    return {"name": name, "command": shlex.join(argv), "status": "ok" if code == 0 else f"failed ({code})",
            "seconds": time.perf_counter() - t0, "log": str(log.relative_to(out))}


def headline(name: str, out: Path) -> str:
    """The one number worth a glance for a run, read from what it wrote."""
    try:
        if name.startswith("cli_"):
            m = json.loads((out / name / "metrics.json").read_text())
            tta = f", flip TTA {m['test_acc_tta']:.2f}%" if m.get("test_acc_tta") is not None else ""
            return (f"{m['test_acc']:.2f}%{tta} in {m['epochs']} epochs, {m['total_seconds']:.1f} s "
                    f"(+{m['warmup_seconds']:.1f} s warm-up, {m['mode']}, {m['precision']})")
        if name == "benchmark":
            res = json.loads((out / "benchmark.json").read_text())["results"]
            over = res.get("overhead", {}).get("overhead_pct", float("nan"))

            def ratio(v):
                return f"{v:.2f}x" if v is not None else "-"

            return "; ".join([*(
                f"{a['model']} {a['recipe']} {a['final_acc_mean']:.2f}%"
                + (f" (TTA {a['final_acc_tta_mean']:.2f}%)" if a["final_acc_tta_mean"] is not None else "")
                + f" in {a['train_only_s_mean']:.1f} s, airbench94's time x {ratio(a.get('vs_airbench'))}"
                + f" (TTA {ratio(a.get('vs_airbench_tta'))})" for a in res.get("accuracy", [])),
                f"fit overhead {over:+.1f}%"])
        if name == "sweep":
            rows = json.loads((out / "sweep.json").read_text())["results"]["sweep"]
            return "; ".join(f"{r['model']} {r['recipe']}: " + ", ".join(
                f"{rule} {v['gap_to_best']:+.2f}" for rule, v in r["rules"].items()) for r in rows)
    except (OSError, KeyError, ValueError, TypeError):
        return ""
    return ""


def write_summary(out: Path, args, results: list[dict]) -> Path:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
    commit = os.environ.get("GIT_COMMIT", "")  # a copy of the tree without .git (or without git) can say it
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                          text=True).stdout.strip()
    except OSError:
        pass
    lines = [f"# GPU check, {datetime.date.today()}", "",
             f"{gpu}, torch {torch.__version__}, commit {commit or 'unknown (set GIT_COMMIT)'}, "
             f"data: {args.data_name} ({args.data_dir})"
             + (" -- QUICK smoke run: tiny settings, not a measurement" if args.quick else ""), "",
             f"Command: `{shlex.join([Path(sys.executable).name, '-m', 'benchmarks.gpu_check', *sys.argv[1:]])}`",
             "", "| part | run | status | seconds | headline | log |", "| --- | --- | --- | ---: | --- | --- |"]
    lines += [f"| {r['part']} | {r['name']} | {r['status']} | {r['seconds']:.0f} | {headline(r['name'], out)} | "
              f"{r['log']} |" for r in results]
    path = out / "SUMMARY.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py")
    p.add_argument("--data-name", default="CIFAR-10", help="what the data is, for the reports")
    p.add_argument("--out", default="gpu-check", help="folder for the summary, JSON, logs and figures")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke run of the plumbing")
    p.add_argument("--accuracy-runs", default=ACCURACY_RUNS,
                   help="benchmark part: the model:recipe pairs of its accuracy section (3 seeds each)")
    p.add_argument("--sections", default=SECTIONS, help="benchmark part: the benchmark's sections")
    p.add_argument("--sweep-runs", help="sweep part: model:recipe pairs (default: the benchmark's)")
    p.add_argument("--models", default=",".join(MODELS), help="cli part: the models whose default run it makes")
    args = p.parse_args(argv)
    args.parts, args.models = args.parts.split(","), args.models.split(",")
    if set(args.parts) - set(PARTS):
        p.error(f"unknown parts {', '.join(sorted(set(args.parts) - set(PARTS)))}: choose from {', '.join(PARTS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    results = []
    for part, name, command, env in commands(args):
        print(f"-- {part}: {name}", flush=True)
        results.append({"part": part, **run_one(name, command, env, out, args.timeout)})
        print(f"   {results[-1]['status']} in {results[-1]['seconds']:.0f} s", flush=True)
        write_summary(out, args, results)  # after every run: an interrupted check keeps what it measured
    print(write_summary(out, args, results).read_text())
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
