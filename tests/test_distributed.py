"""Data-parallel training (helpers.distributed): the shards, the refusals, and torchrun with 2 gloo processes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import distributed
from helpers.checkpoints import CheckpointError, read_checkpoint
from helpers.data import GpuLoader, SeededSampler
from tests.conftest import REPO


def _as_world(monkeypatch, rank: int, size: int) -> None:
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank, size, rank))


@pytest.mark.parametrize("world_size", [2, 4])
def test_sampler_shards_are_the_single_process_batches(world_size):
    n, batch = 103, 8  # global batch 8: every step's shards, side by side, are one process's batch
    whole = list(SeededSampler(n, shuffle=True, generator=torch.Generator().manual_seed(5)))
    shards = [list(SeededSampler(n, shuffle=True, generator=torch.Generator().manual_seed(5), rank=r,
                                 world_size=world_size, batch=batch // world_size)) for r in range(world_size)]
    per = batch // world_size
    steps = n // batch
    assert all(len(s) == steps * per for s in shards)
    for step in range(steps):
        joined = [item for s in shards for item in s[step * per:(step + 1) * per]]
        assert joined == whole[step * batch:(step + 1) * batch]


def test_gpu_loader_shards_are_the_single_process_batches(tiny_arrays):
    train = tiny_arrays[0]
    whole = GpuLoader(train, batch_size=20, recipe="davidnet", seed=3)
    shards = [GpuLoader(train, batch_size=10, recipe="davidnet", seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert len(whole) == len(shards[0]) == len(shards[1]) == 5
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_refusals_say_what_to_do(monkeypatch, tiny_arrays, trained_run):
    ckpt = read_checkpoint(trained_run)
    _as_world(monkeypatch, 0, 3)
    with pytest.raises(ValueError, match="multiple of 3"):
        distributed.local_batch(512)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GpuLoader(tiny_arrays[0], batch_size=50, world_size=3)
    with pytest.raises(CheckpointError, match="trained on 2 process.*this run has 3.*nproc_per_node 2"):
        dataclasses.replace(ckpt, world_size=2).check_world()
    with pytest.raises(ValueError, match="SyncBatchNorm has no CPU kernel"):
        distributed.convert_sync_bn(torch.nn.BatchNorm2d(4), torch.device("cpu"))
    dataclasses.replace(ckpt, world_size=3).check_world()  # the same world size resumes


def test_exit_process_is_sys_exit_without_a_process_group():
    with pytest.raises(SystemExit) as ended:
        distributed.exit_process(3)
    assert ended.value.code == 3


def test_ddp_modes():
    from helpers.engine import ddp_mode

    assert ddp_mode("auto", "graphs", "graphs (auto: ...)")[0] == "eager"
    assert ddp_mode("graphs", "graphs", "graphs")[0] == "eager"
    assert ddp_mode("compile", "compile", "compile") == ("compile", "compile (under DDP: Inductor's default mode, "
                                                         "no CUDA graphs)")


# ---------------------------------------------------------------------------------------------------------
# torchrun, 2 gloo processes on the CPU (each launch ~10-30 s on a 2-core machine)


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


CLI = ["--model", "depthwise_net", "--epochs", "2", "--batch-size", "20", "--max-lr", "0.05", "--workers", "0",
       "--device", "cpu", "--no-figures", "--quiet"]


@pytest.fixture(scope="module")
def ddp_run(tiny_data, tmp_path_factory) -> Path:
    """A 2-process run of the command line: torchrun -m helpers.train."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    done = torchrun("-m", "helpers.train", *CLI, "--data-dir", str(tiny_data), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final test accuracy") == 1  # rank 0 alone prints
    return out


@pytest.mark.slow
def test_torchrun_writes_one_run(ddp_run):
    files = sorted(p.name for p in ddp_run.iterdir())
    assert [f for f in files if f.endswith(".pt")] == ["checkpoint.pt"]
    assert not [f for f in files if "tmp" in f or f.startswith(".lock.owner")]
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["settings"]["batch_size"] == 20 and metrics["epochs"] == 2
    state = torch.load(ddp_run / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(ddp_run, tiny_data, tmp_path):
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    stopped = torchrun("tests/ddp_worker.py", "run", str(tiny_data), str(out), str(dump), "--stop")
    assert stopped.returncode != 0 and not list(dump.iterdir()), stopped.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = torchrun("tests/ddp_worker.py", "run", str(tiny_data), str(out), str(dump))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ranks = [torch.load(dump / f"run-rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, value in ranks[0]["weights"].items():  # every process holds the same model
        assert torch.equal(value, ranks[1]["weights"][name]), name
    whole = torch.load(ddp_run / "checkpoint.pt", weights_only=True)
    again = torch.load(out / "checkpoint.pt", weights_only=True)
    assert [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in again["history"]] == \
        [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in whole["history"]]
    for name, value in whole["model_state"].items():
        assert torch.equal(value, again["model_state"][name]), name


@pytest.mark.slow
def test_resume_on_another_world_size_is_refused(ddp_run, capsys):
    from helpers import cli

    assert cli.main(["--resume", str(ddp_run), "--device", "cpu", "--quiet"]) == 2
    assert "trained on 2 process(es) and this run has 1" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_at_half_batch_equal_one_at_the_whole(tiny_data, tmp_path):
    from tests.ddp_worker import fit_no_bn

    done = torchrun("tests/ddp_worker.py", "nobn", str(tiny_data), str(tmp_path), "20")
    assert done.returncode == 0, done.stderr[-3000:]
    for loader in ("torch", "gpu"):
        weights, records = fit_no_bn(str(tiny_data), loader, 20)
        ranks = [torch.load(tmp_path / f"nobn-{loader}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        for name, value in weights.items():
            assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), (loader, name)
            assert torch.allclose(ranks[0]["weights"][name], value, rtol=1e-4, atol=1e-6), (loader, name)
        for one, two in zip(records, ranks[0]["history"]):
            assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4), loader
            assert two["test_acc"] == pytest.approx(one["test_acc"], abs=2.01), loader  # 1 of 50 images may flip
