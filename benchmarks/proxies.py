"""CPU proxies of what a GPU pays for, measured without one:

    python -m benchmarks.proxies --model custom_resnet --recipe fast --json proxies.json

- syncs_per_step: host syncs per training step of `fit` on the GPU code path. A sync is counted where the code asks
  for a value on the host: `.item()`, `bool()`/`float()`/`int()` of a tensor (all reach aten's
  `_local_scalar_dense`), `.tolist()`, `.cpu()`, a blocking `.to("cpu")`, and
  torch.cuda.synchronize / Event.synchronize. On a GPU each waits for every queued kernel.
- ops_per_step and bare_ops_per_step: aten operators dispatched per training step by `fit` and by the bare PyTorch
  loop (benchmarks.bare) over the same loader (each one or more kernel launches on a GPU; on a launch-bound step
  their count is the cost).
- syncs_per_epoch: the syncs outside the steps (end-of-epoch numbers, evaluation, checkpoint), per epoch.

The GPU code path, emulated on the CPU: fit's per-step reads that it makes only where they are free
(helpers.train.host_reads_are_free) are off, the optimizer is fused (helpers.engine.fused_kernels) and autocast is
bf16, as on CUDA; the mode is eager (graphs and compile replay the same step). What the CPU cannot show: kernel
times, and the snapshot's pinned, non-blocking copy (on the CPU a checkpoint copy is a plain one; neither counts as
a sync). The loader is the GpuLoader on the CPU; a step is counted from one batch's request to the next, so the
loader's own work is in it. Synthetic data (random images), small batches (counts do not depend on batch size).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.bare import train_bare
from helpers import data, engine
from helpers import train as train_module
from helpers.config import RECIPES, TrainConfig, evolve
from helpers.models import build_model
from helpers.utils import atomic_write_text, seed_everything

SYNC_OP = "aten._local_scalar_dense.default"  # .item(), bool(), float(), int() of a tensor


class Counts(TorchDispatchMode):
    """Counts aten ops and host syncs while `active` (the steps); syncs outside them go to `syncs_outside`."""

    def __init__(self):
        super().__init__()
        self.active, self.steps = False, 0
        self.ops, self.syncs, self.syncs_outside = Counter(), Counter(), Counter()

    def sync(self, what: str) -> None:
        (self.syncs if self.active else self.syncs_outside)[what] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name == SYNC_OP:
            self.sync(".item()/bool()/float()")
        if self.active and not name.startswith("profiler."):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_host_reads(counts: Counts):
    """Count the host reads that do not reach aten (.tolist(), .cpu(), .to("cpu"), synchronize). `.numpy()` is
    not one: it takes CPU tensors only, so on the GPU path a `.cpu()` (counted) comes first."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "cpu", "to")}

    def counted(name):
        def method(self, *args, **kwargs):
            counts.sync(f".{name}()")
            return originals[name](self, *args, **kwargs)
        return method

    def to(self, *args, **kwargs):  # a blocking copy to the host as the code writes it: .to("cpu")
        if "cpu" in [a for a in args if isinstance(a, str)] + [kwargs.get("device")] and not kwargs.get(
                "non_blocking", False):
            counts.sync('.to("cpu")')
        return originals["to"](self, *args, **kwargs)

    patches = {"tolist": counted("tolist"), "cpu": counted("cpu"), "to": to}
    sync_fns = [(torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda.Stream, "synchronize")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in sync_fns]
    try:
        for name, fn in patches.items():
            setattr(torch.Tensor, name, fn)
        for owner, name, _ in saved:
            setattr(owner, name, lambda *a, _n=name, **k: counts.sync(f"{_n}()"))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        for owner, name, fn in saved:
            setattr(owner, name, fn)


@contextlib.contextmanager
def gpu_code_path():
    """fit and the optimizer take their CUDA branches on the CPU (see the module's docstring)."""
    with contextlib.ExitStack() as stack:
        from unittest import mock

        stack.enter_context(mock.patch.object(train_module, "host_reads_are_free", lambda device: False))
        stack.enter_context(mock.patch.object(engine, "fused_kernels", lambda device: True))
        yield


class CountedLoader:
    """A loader whose iteration marks the steps: from the first batch's request to the end of the pass, with a
    step counted each time the next batch is asked for (the consumer's step has run)."""

    def __init__(self, loader, counts: Counts):
        self.loader, self.counts = loader, counts

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.counts.active = True
        try:
            for batch in self.loader:
                yield batch
                self.counts.steps += 1
        finally:
            self.counts.active = False


def proxy_config(model: str, recipe: str, *, epochs: int, batch_size: int) -> TrainConfig:
    """The recipe on the GPU path's precision (bf16 autocast), shortened: `epochs` epochs, every one of them
    averaging when the recipe averages, small batches, a found peak fixed (the LR does not change a step)."""
    config = TrainConfig.for_model(model, recipe=recipe, epochs=epochs, batch_size=batch_size, amp=True,
                                   mode="eager", workers=0)
    if config.ema:
        config = evolve(config, ema_epochs=epochs)
    return evolve(config, max_lr=0.01) if config.max_lr == "auto" else config


def synthetic(n: int, seed: int = 0) -> data.CifarArrays:
    rng = np.random.default_rng(seed)
    return data.CifarArrays(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                            rng.integers(0, 10, n).astype(np.int64), [str(i) for i in range(10)])


def measure(model_name: str, recipe: str, *, epochs: int = 2, batch_size: int = 8, steps_per_epoch: int = 3,
            bare_loop: bool = True) -> dict:
    """syncs_per_step, ops_per_step, bare_ops_per_step (None without `bare_loop`), syncs_per_epoch (and what they
    were) for one recipe."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    config = proxy_config(model_name, recipe, epochs=epochs, batch_size=batch_size)
    train, test = synthetic(batch_size * steps_per_epoch), synthetic(2 * batch_size, seed=1)
    device = torch.device("cpu")

    def loaders():
        return data.make_loaders(train, test, kind="gpu", batch_size=batch_size, recipe=config.augment,
                                 device=device)

    ours = Counts()
    seed_everything(0)
    train_loader, test_loader = loaders()
    with tempfile.TemporaryDirectory() as tmp, gpu_code_path(), counting_host_reads(ours), ours:
        train_module.fit(build_model(model_name), CountedLoader(train_loader, ours), test_loader, config,
                         device=device, quiet=True, checkpoint=Path(tmp) / "checkpoint.pt")
    bare = Counts()
    if bare_loop:
        seed_everything(0)
        train_loader, _ = loaders()
        with gpu_code_path(), counting_host_reads(bare), bare:
            train_bare(build_model(model_name), CountedLoader(train_loader, bare), config, device=device,
                       epochs=epochs)
    extra = ours.ops - bare.ops
    return {
        "model": model_name, "recipe": recipe, "steps": ours.steps, "epochs": epochs,
        "syncs_per_step": sum(ours.syncs.values()) / ours.steps,
        "ops_per_step": sum(ours.ops.values()) / ours.steps,
        "bare_ops_per_step": sum(bare.ops.values()) / bare.steps if bare.steps else None,
        "bare_syncs_per_step": sum(bare.syncs.values()) / bare.steps if bare.steps else None,
        "syncs_per_epoch": sum(ours.syncs_outside.values()) / epochs,
        "syncs_in_steps": dict(ours.syncs), "syncs_outside_steps": dict(ours.syncs_outside),
        "ops_more_than_bare_per_step": {k: v / ours.steps for k, v in extra.most_common(12)},
        "ops_fewer_than_bare_per_step": {k: v / ours.steps for k, v in (bare.ops - ours.ops).most_common(12)},
        "emulated": "GPU code path on the CPU: fused optimizer, bf16 autocast, no per-step reads, eager",
        "batch_size": batch_size, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.proxies", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="custom_resnet", choices=list(RECIPES))
    p.add_argument("--recipe", default="writeup")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    if args.recipe not in RECIPES[args.model]:
        p.error(f"{args.model} has no recipe {args.recipe!r}: choose from {', '.join(RECIPES[args.model])}")
    result = measure(args.model, args.recipe, epochs=args.epochs)
    text = json.dumps(result, indent=1)
    if args.json:
        atomic_write_text(args.json, text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
