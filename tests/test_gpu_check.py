"""benchmarks/gpu_check.py and benchmarks/device_check.sh: the GPU check's plumbing, on the CPU.

The budget's logic runs with a fake estimate table, a fake clock and a fake runner (no training); the kill test
sends a real SIGTERM to a check whose item sleeps; the slow tests run the real items in --quick sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_check

REPO = Path(__file__).resolve().parents[1]


def test_every_part_has_its_commands():
    args = gpu_check.parse_args(["--data-dir", "d", "--out", "/tmp/o", "--sweep-runs", "resnet18:writeup"])
    runs = gpu_check.commands(args)
    names = [name for _, name, _, _ in runs]
    assert {part for part, *_ in runs} == set(gpu_check.PARTS)
    assert {"cli_custom_resnet", "cli_resnet18", "cli_depthwise_net"} <= set(names)
    assert sum(part == "notebooks" for part, *_ in runs) == 5
    bench = next(argv for part, _, argv, _ in runs if part == "benchmark")
    assert "eager,graphs,compile" in bench
    assert bench[bench.index("--accuracy-runs") + 1] == "custom_resnet:writeup,custom_resnet:fast,resnet18:fast"
    sweep = next(argv for part, _, argv, _ in runs if part == "sweep")
    assert sweep[sweep.index("--sweep-runs") + 1] == "resnet18:writeup"  # a device session can split the sweep


def test_every_item_has_an_estimate_with_its_source_and_a_command(tmp_path):
    assert list(gpu_check.ESTIMATES) == list(gpu_check.ITEMS)
    assert all(seconds > 0 and source for seconds, source in gpu_check.ESTIMATES.values())
    args = gpu_check.parse_args(["--data-dir", "d", "--out", str(tmp_path), "--budget", "500"])
    for name in gpu_check.ITEMS:
        command = gpu_check.item_command(name, args, tmp_path)
        assert isinstance(command, tuple) or "papermill" in command, name
    argv, _ = gpu_check.item_command("resnet9", args, tmp_path)
    assert argv[argv.index("--sections") + 1] == "airbench,accuracy" and argv[argv.index("--seeds") + 1] == "3"
    assert argv[argv.index("--accuracy-runs") + 1] == "custom_resnet:writeup,custom_resnet:fast"
    assert argv[argv.index("--out") + 1] == str(tmp_path / "resnet9.json")
    argv, _ = gpu_check.item_command("resnet18_epochs", args, tmp_path)
    assert argv[argv.index("--epoch-batch-sizes") + 1] == "128,512"
    assert list(gpu_check.ITEMS)[:3] == ["resnet9", "overhead", "resnet18_epochs"]  # the order of their value


def test_accuracy_items_take_airbench94s_accuracy_and_get_its_ratios(tmp_path):
    args = gpu_check.parse_args(["--data-dir", "d", "--out", str(tmp_path), "--budget", "500"])
    assert "--target" not in gpu_check.item_command("resnet18_fast", args, tmp_path)[0]  # no airbench94 yet
    airbench = {"seconds_mean": 2.0, "acc_tta0_mean": 89.75, "acc_tta2_mean": 90.5, "runs": [{}, {}, {}]}
    (tmp_path / "resnet9.json").write_text(json.dumps({"results": {"airbench": airbench}}))
    argv, _ = gpu_check.item_command("resnet18_fast", args, tmp_path)
    assert argv[argv.index("--target") + 1] == "89.7500" and argv[argv.index("--target-tta") + 1] == "90.5000"
    row = {"train_time_to_target_mean_s": 10.0, "train_time_to_target_tta_mean_s": None, "train_only_s_mean": 16.0}
    (tmp_path / "resnet18_fast.json").write_text(json.dumps({"results": {"accuracy": [row]}}))
    gpu_check.attach_airbench(tmp_path, "resnet18_fast")
    res = json.loads((tmp_path / "resnet18_fast.json").read_text())["results"]
    assert res["accuracy"][0]["vs_airbench"] == pytest.approx(5.0)
    assert res["accuracy"][0]["full_run_vs_airbench"] == pytest.approx(8.0)
    assert res["accuracy"][0]["vs_airbench_tta"] is None and "resnet9.json" in res["airbench"]["from"]


def test_scale_factor_is_measured_over_estimated_clamped_and_ignores_failures():
    table = {"a": (10, ""), "b": (20, ""), "c": (30, "")}
    assert gpu_check.scale_factor([], table) == 1.0
    ok = [{"name": "a", "status": "ok", "seconds": 15}, {"name": "b", "status": "failed (timeout)", "seconds": 30}]
    assert gpu_check.scale_factor(ok, table) == pytest.approx(45 / 30)
    crashed = [*ok, {"name": "c", "status": "failed (1)", "seconds": 1}]
    assert gpu_check.scale_factor(crashed, table) == pytest.approx(45 / 30)  # a crash says nothing about speed
    assert gpu_check.scale_factor([{"name": "a", "status": "ok", "seconds": 1000}], table) == gpu_check.SCALE_RANGE[1]
    assert gpu_check.scale_factor([{"name": "a", "status": "ok", "seconds": 0}], table) == gpu_check.SCALE_RANGE[0]


class FakeMachine:
    """A clock and a runner: each item takes `factor` times its estimate, or raises `kill_at`'s exception."""

    def __init__(self, table, factor=2.0, kill_at=None):
        self.now, self.table, self.factor, self.kill_at, self.ran = 0.0, table, factor, kill_at, []

    def clock(self):
        return self.now

    def run(self, name, argv, env, out, timeout):
        self.ran.append((name, timeout))
        if name == self.kill_at:
            self.now += 5
            raise gpu_check.Killed("SIGTERM")
        seconds = self.table[name][0] * self.factor
        self.now += seconds
        (out / "logs").mkdir(exist_ok=True)
        (out / "logs" / f"{name}.log").write_text("$ fake\n")
        return {"name": name, "command": "fake", "status": "ok", "seconds": seconds, "log": f"logs/{name}.log"}


def fake_table(**seconds):
    return {name: (seconds.get(name, 1000), "fake") for name in gpu_check.ITEMS}


@pytest.fixture
def budget_args(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "item_command", lambda name, args, out: (["true"], {}))
    return gpu_check.parse_args(["--data-dir", "d", "--out", str(tmp_path), "--budget", "100"])


def test_budget_runs_in_priority_order_what_its_scaled_estimate_says_fits(budget_args, tmp_path):
    table = fake_table(resnet9=10, overhead=50, resnet18_epochs=30, modes=30, cuda_tests=5)
    fake = FakeMachine(table, factor=2.0)  # every item takes twice its estimate: the run learns it after the first
    state = gpu_check.run_budget(budget_args, tmp_path, estimates=table, runner=fake.run, clock=fake.clock)
    # resnet9: 10 s estimated, 20 s taken (scale 2); overhead 100 > 80 left; resnet18_epochs 60 fits (20 left);
    # modes 60 > 20; cuda_tests 10 fits; the rest (1000 s each) never
    assert [name for name, _ in fake.ran] == ["resnet9", "resnet18_epochs", "cuda_tests"]
    # each stopped at CAP x its estimate, and never past the budget: min(100, 25), min(80, 150), min(20, 25)
    assert [timeout for _, timeout in fake.ran] == [25, 80, 20]
    skipped = {s["name"]: s["why"] for s in state["skipped"]}
    assert list(skipped) == ["overhead", "modes", "resnet18_fast", "share", "sweep", "depthwise", "nb02", "nb04"]
    assert skipped["overhead"] == "estimate 100 s (50 s x 2.00) > 80 s left"
    assert state["state"] == "done" and state["elapsed_s"] == 90
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "| budget | resnet18_epochs | ok | 60 | 60 |" in summary
    assert "- overhead (fit against the bare PyTorch loop" in summary and "> 80 s left" in summary
    assert json.loads((tmp_path / "summary.json").read_text())["skipped"] == state["skipped"]


def test_budget_skips_nothing_when_everything_fits(budget_args, tmp_path):
    budget_args.budget = 10**6
    table = fake_table()
    fake = FakeMachine(table, factor=0.5)
    state = gpu_check.run_budget(budget_args, tmp_path, estimates=table, runner=fake.run, clock=fake.clock)
    assert [name for name, _ in fake.ran] == list(gpu_check.ITEMS) and state["skipped"] == []


def test_a_kill_mid_item_leaves_a_summary_of_what_ran_and_what_never_started(budget_args, tmp_path):
    budget_args.budget = 10**4
    table = fake_table(resnet9=10, overhead=20)
    fake = FakeMachine(table, factor=1.0, kill_at="resnet18_epochs")
    state = gpu_check.run_budget(budget_args, tmp_path, estimates=table, runner=fake.run, clock=fake.clock)
    assert state["state"].startswith("killed (SIGTERM)")
    assert [(r["name"], r["status"]) for r in state["results"]] == [
        ("resnet9", "ok"), ("overhead", "ok"), ("resnet18_epochs", "killed (SIGTERM)")]
    assert [s["name"] for s in state["skipped"]] == list(gpu_check.ITEMS)[3:]
    assert all("not started: the check was killed" in s["why"] for s in state["skipped"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["state"] == state["state"] and summary["running"] is None


def test_a_failing_item_and_malformed_item_json_do_not_end_the_check(tmp_path, monkeypatch):
    """Real item processes: one exits 3 after printing a traceback (with a terminal escape), one writes a truncated
    JSON, one a JSON without the benchmark's `results` (once a KeyError that ended the check); a command that cannot
    be built and a runner that raises. Every later item still runs; SUMMARY.md shows each failure and its log's
    last lines."""
    airbench = {"seconds_mean": 2.0, "acc_tta0_mean": 89.75, "acc_tta2_mean": 90.5, "runs": [{}]}
    write = "import sys; open(sys.argv[1] + '/{name}.json', 'w').write({text!r})"
    scripts = {
        "resnet9": write.format(name="resnet9", text=json.dumps({"results": {"airbench": airbench}})),
        "overhead": "print('Traceback (most recent call last):'); print('RuntimeError: boom\x1b[31m'); exit(3)",
        "resnet18_epochs": write.format(name="resnet18_epochs", text='{"results": [1'),
        "resnet18_fast": write.format(name="resnet18_fast", text='{"accuracy": 1}'),
    }

    def command(name, args, out):
        if name == "cuda_tests":
            raise ValueError("no such test folder")
        return [sys.executable, "-c", scripts.get(name, "pass"), str(out)], {}

    def runner(name, argv, env, out, timeout):
        if name == "modes":
            raise OSError("fork failed")
        return gpu_check.run_one(name, argv, env, out, timeout)

    monkeypatch.setattr(gpu_check, "item_command", command)
    args = gpu_check.parse_args(["--data-dir", "d", "--out", str(tmp_path), "--budget", "10000",
                                 "--items", "resnet9,overhead,resnet18_epochs,modes,cuda_tests,resnet18_fast"])
    state = gpu_check.run_budget(args, tmp_path, runner=runner)
    assert state["state"] == "done"
    statuses = {r["name"]: r["status"] for r in state["results"]}
    assert statuses == {"resnet9": "ok", "overhead": "failed (3)", "resnet18_epochs": "ok",
                        "modes": "failed (OSError: fork failed)", "resnet18_fast": "ok"}
    assert state["skipped"][0]["name"] == "cuda_tests" and "no such test folder" in state["skipped"][0]["why"]
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "### overhead: failed (3)" in summary and "RuntimeError: boom" in summary and "\x1b" not in summary
    assert "### modes: failed (OSError: fork failed)" in summary
    assert "resnet9 | ok | 0 | 140 | airbench94 x 1" in summary  # its headline, read from its JSON


def test_a_run_past_its_time_is_stopped(tmp_path):
    t0 = time.perf_counter()
    result = gpu_check.run_one("sleepy", [sys.executable, "-c", "import time; time.sleep(60)"], {}, tmp_path, 1)
    assert result["status"] == "failed (timeout)" and time.perf_counter() - t0 < 30
    assert (tmp_path / "logs" / "sleepy.log").read_text().startswith("$ ")


KILLED_CHECK = """
import sys
from benchmarks import gpu_check
sleep = "import os, pathlib, time; pathlib.Path(sys.argv[1]).write_text(str(os.getpid())); time.sleep(120)"
gpu_check.item_command = lambda name, args, out: ([sys.executable, "-c", "import sys; " + sleep, {pid!r}], {{}})
sys.exit(gpu_check.main(["--data-dir", "d", "--out", {out!r}, "--budget", "1000", "--items", "resnet9,overhead"]))
"""


def test_sigterm_ends_the_running_item_and_leaves_a_readable_summary(tmp_path):
    out, pid_file = tmp_path / "check", tmp_path / "item.pid"
    script = KILLED_CHECK.format(pid=str(pid_file), out=str(out))
    check = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():  # the item has started (and the summary says so)
        assert time.monotonic() < deadline and check.poll() is None, check.stdout.read()
        time.sleep(0.1)
    running = json.loads((out / "summary.json").read_text())
    assert running["state"] == "running" and running["running"]["name"] == "resnet9"
    check.send_signal(signal.SIGTERM)
    output = check.communicate(timeout=30)[0]
    assert check.returncode == 128 + signal.SIGTERM, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"].startswith("killed (SIGTERM)")
    assert [(r["name"], r["status"]) for r in summary["results"]] == [("resnet9", "killed (SIGTERM)")]
    assert summary["skipped"][0]["name"] == "overhead"
    assert "resnet9 | killed (SIGTERM)" in (out / "SUMMARY.md").read_text()
    with pytest.raises(ProcessLookupError):  # the item's process went with the check
        os.kill(int(pid_file.read_text()), 0)


@pytest.mark.slow
def test_quick_cli_part_writes_a_summary(tiny_data, tmp_path):
    out = tmp_path / "check"
    code = gpu_check.main(["--data-dir", str(tiny_data), "--out", str(out), "--parts", "cli", "--device", "cpu",
                           "--quick"])
    summary = (out / "SUMMARY.md").read_text()
    results = json.loads((out / "summary.json").read_text())["results"]
    assert code == 0, summary
    assert [r["name"] for r in results] == ["cli_custom_resnet", "cli_resnet18", "cli_depthwise_net"]
    assert "QUICK smoke run" in summary and "cli_resnet18 | ok" in summary
    assert "% in 1 epochs" in summary  # the headline read from metrics.json


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, to see the device script install what .device/whl holds."""
    path = folder / "gpucheckprobe-0.1-py3-none-any.whl"
    info = "gpucheckprobe-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("gpucheckprobe/__init__.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpucheckprobe\nVersion: 0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


@pytest.mark.slow
def test_device_script_makes_the_data_installs_the_wheels_and_packs_at_most_8_files(tiny_data, tmp_path):
    """The one device command, in --quick sizes on the CPU, with two of the items (a minute or so on 2 cores; the
    notebooks' SMOKE runs alone take 2-10 minutes there, and test_notebooks runs them)."""
    dev = tmp_path / "device"
    (dev / "whl").mkdir(parents=True)
    probe_wheel(dev / "whl")
    (dev / "data").mkdir()
    (dev / "data" / "make_cifar10.py").write_text(textwrap.dedent(f"""
        import shutil, sys
        shutil.copytree({str(tiny_data / 'cifar-10-batches-py')!r}, sys.argv[1] + "/cifar-10-batches-py")
    """))
    out = tmp_path / "OUT"
    env = {**os.environ, "OUT": str(out), "DEVICE_DIR": str(dev), "DATA": str(tmp_path / "cifar"),
           "SITE": str(tmp_path / "site"), "WORK": str(tmp_path / "work"), "GIT_COMMIT": "abc1234",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "BUDGET": "3000"}
    flags = ["--quick", "--device", "cpu", "--items", "overhead,modes"]
    done = subprocess.run(["bash", "benchmarks/device_check.sh", *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)
    files = sorted(p.name for p in out.iterdir())
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert files == ["SUMMARY.md", "device_check.log", "gpu-check.tar.gz", "summary.json"]
    assert (tmp_path / "cifar" / "cifar-10-batches-py").is_dir()  # made by the carried script
    assert (tmp_path / "site" / "gpucheckprobe" / "__init__.py").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["state"] == "done" and "commit abc1234" in summary["machine"]
    assert "CIFAR-10 (JPEG copy)" in summary["machine"] and summary["quick"]
    assert [(r["name"], r["status"]) for r in summary["results"]] == [("overhead", "ok"), ("modes", "ok")]
    assert summary["skipped"] == [] and summary["command"][-2:] == ["--items", "overhead,modes"]
    with tarfile.open(out / "gpu-check.tar.gz") as tar:
        names = tar.getnames()
    assert "check/logs/overhead.log" in names and "check/modes.json" in names and "check/SUMMARY.md" in names
    assert not [n for n in names if n.endswith(".pt")]
    assert "budget 3000 s" in (out / "device_check.log").read_text()
