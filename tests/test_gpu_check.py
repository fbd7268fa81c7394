"""benchmarks/gpu_check.py: the one-command GPU check runs its parts and writes a summary (plumbing, on the CPU)."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_check


def test_every_part_has_its_commands():
    args = gpu_check.argparse.Namespace(out="/tmp/o", data_dir="d", data_name="n", device="cuda", quick=False,
                                        parts=list(gpu_check.PARTS), accuracy_runs=gpu_check.ACCURACY_RUNS,
                                        sweep_runs="resnet18:writeup", models=list(gpu_check.MODELS),
                                        sections=gpu_check.SECTIONS)
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


@pytest.mark.slow
def test_quick_cli_part_writes_a_summary(tiny_data, tmp_path):
    out = tmp_path / "check"
    code = gpu_check.main(["--data-dir", str(tiny_data), "--out", str(out), "--parts", "cli", "--device", "cpu",
                           "--quick"])
    summary = (out / "SUMMARY.md").read_text()
    results = json.loads((out / "summary.json").read_text())
    assert code == 0, summary
    assert [r["name"] for r in results] == ["cli_custom_resnet", "cli_resnet18", "cli_depthwise_net"]
    assert "QUICK smoke run" in summary and "cli_resnet18 | ok" in summary
    assert "% in 1 epochs" in summary  # the headline read from metrics.json
