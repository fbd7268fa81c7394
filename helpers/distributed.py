"""Data-parallel training under torchrun: the one place that knows about processes.

    torchrun --standalone --nproc_per_node 2 -m helpers.train --model custom_resnet --out runs/ddp

torchrun starts N processes and sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` (called by helpers.run.train_run)
joins them into one process group, NCCL on CUDA (one GPU per process: cuda:LOCAL_RANK), gloo on the CPU. Without
torchrun every function here is a no-op for one process, so the rest of the code has no `if distributed:` of its
own beyond asking `world()`.

What N processes mean for a run (the recipe means the same as on one device):
- batch_size is the global batch: each process takes batch_size / N images of every step (`local_batch`), so the
  recipe's learning rates, schedule and epochs are unchanged. Both loaders take a process's slice of the same
  per-epoch order (helpers.data), so the N slices of a step are exactly the one process's batch.
- DistributedDataParallel averages the gradients: for a model without batch norm, N processes at batch/N each
  compute the step one process computes at batch (up to float summation order; tests/test_distributed.py).
- Batch norm normalises over each process's slice (per-process statistics, as DDP does by default); sync_bn
  (--sync-bn) uses SyncBatchNorm over the global batch, on CUDA only (torch's SyncBatchNorm has no CPU kernel).
- After every epoch the buffers (batch-norm running statistics, the weight average's) are copied from rank 0 to
  all (`broadcast_buffers`, as DDP itself does before each forward), so every process holds the same model and
  evaluates the whole test set to the same numbers: no gather, the plateau scheduler sees one test loss.
- Rank 0 alone holds the run folder, writes checkpoints, history, metrics and figures, and prints.

A script of your own under torchrun (train_run from Python) ends best as the command line does, with
`exit_process(0)`: see there why a DDP process should not go through the interpreter's teardown.
"""

from __future__ import annotations

import atexit
import os
import pickle
import sys
import warnings
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world() -> World:
    """This process's place: from the process group once it exists, else from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once per process) and return this process's device: cuda:LOCAL_RANK on CUDA,
    the CPU otherwise. One process: `device` unchanged."""
    w = world()
    if not w.distributed:
        return device
    if device.type == "cuda":
        if w.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"process {w.rank} wants GPU {w.local_rank}, but this machine has "
                               f"{torch.cuda.device_count()}: use --nproc_per_node {torch.cuda.device_count()} or less")
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        atexit.register(_leave)
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a command-line process with `code` (sys.exit's job). Under torchrun: the atexit handlers (the process
    group's destroy among them), flushed output, then os._exit, as multiprocessing ends its children: no interpreter
    finalization: DistributedDataParallel's gloo threads outlive destroy_process_group, and a process whose
    interpreter is torn down under them can die by SIGABRT after writing everything (BENCHMARKS.md, "A torchrun
    process ends without interpreter teardown").
    """
    if not dist.is_initialized():
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def local_batch(batch_size: int, w: World | None = None) -> int:
    """Images per process in a step of global batch `batch_size`; a ValueError when N does not divide it."""
    w = w or world()
    if batch_size % w.world_size:
        raise ValueError(f"batch size {batch_size} (the global batch) does not divide among {w.world_size} "
                         f"processes: choose a multiple of {w.world_size} (--batch-size)")
    return batch_size // w.world_size


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel when there are several processes, else `model`."""
    if not world().distributed:
        return model
    # A 1x1 kernel in channels_last (ResNet shortcuts, depthwise_net's pointwise convs) has grad strides
    # [C,1,1,1] against the bucket's [C,1,C,C]: the same memory for size-1 dimensions, so DDP's "may impair
    # performance" warning about it says nothing about the run; any other grad-layout warning still shows.
    warnings.filterwarnings("ignore", message=r"Grad strides do not match bucket view strides(?s:.)*"
                                              r"strides\(\) = \[\d+, 1, 1, 1\]")
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def convert_sync_bn(model: nn.Module, device: torch.device) -> tuple[nn.Module, str | None]:
    """(model with SyncBatchNorm, note) for sync_bn: on CUDA with several processes; a ValueError on the CPU."""
    if not world().distributed:
        return model, "sync_bn: one process, nothing to synchronise (plain batch norm)"
    if device.type != "cuda":
        raise ValueError("sync_bn needs CUDA GPUs: torch's SyncBatchNorm has no CPU kernel; drop --sync-bn")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model), None


def broadcast_buffers(*models: nn.Module) -> None:
    """Copy every buffer (batch-norm statistics, a weight average's) from rank 0 into the other processes."""
    if not world().distributed:
        return
    for model in models:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the processes (in place); `t` for one process."""
    if world().distributed:
        dist.all_reduce(t)
    return t


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]; [obj] for one process."""
    if not world().distributed:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj`, on every process."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def agree(fn):
    """Run `fn()` on rank 0 and hand its result, or the exception it raised, to every process (each re-raises it):
    a decision only rank 0 may take (the run folder), kept by all."""
    if not world().distributed:
        return fn()
    outcome = None
    if world().is_main:
        try:
            outcome = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - handed to every process, re-raised there
            try:
                pickle.dumps(err)
                outcome = ("error", err)
            except Exception:  # noqa: BLE001
                outcome = ("error", RuntimeError(str(err)))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise value
    return value

