"""The bare PyTorch loop: what fit is measured against (benchmarks.benchmark's `overhead` section, the GPU check)
and counted against (benchmarks.proxies' `bare_ops_per_step`).

Written plainly, as a tutorial writes it, on purpose: none of helpers.engine.TrainStep or helpers.train.fit runs
in it. It shares with them only what must be the same for the comparison to mean something: the model, the
loader, the optimizer and scheduler objects (built by the same factories, so the same torch.optim classes, param
groups, fused kernels and schedule), the loss and the autocast dtype. No weight average, L1 term, accuracy
bookkeeping, divergence check or checkpoint: everything fit adds is what the comparison measures.
"""

from __future__ import annotations

import torch
from torch import nn

from helpers.config import TrainConfig
from helpers.engine import make_optimizer, make_scheduler
from helpers.utils import amp_dtype


def train_bare(model: nn.Module, loader, config: TrainConfig, *, device: torch.device, epochs: int = 1,
               max_steps: int | None = None, steps_per_epoch: int | None = None) -> int:
    """Train `model` in place for `epochs` passes over `loader` (or `max_steps` steps); returns the steps run.
    The schedule spans config.epochs x steps_per_epoch (default len(loader)) steps, as fit's does."""
    device = torch.device(device)
    fmt = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as TrainStep sets it
    optimizer = make_optimizer(model, config, device)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch or len(loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    dtype = amp_dtype(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # a no-op unless fp16
    steps = 0
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True, memory_format=fmt), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if config.scheduler == "onecycle":
                scheduler.step()
            steps += 1
            if max_steps and steps >= max_steps:
                return steps
    return steps
