"""Run by tests/test_distributed.py under torchrun (2 gloo processes on the CPU); not a test module itself.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py run DATA OUT DUMP [--stop]
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py nobn DATA DUMP BATCH

run: helpers.run.train_run of a tiny depthwise_net into OUT (resumed if OUT holds an unfinished run); --stop
interrupts it on every process after epoch 1 (as Ctrl-C would). nobn: fit of a model without batch norm on each
loader kind. Each process saves its final weights and history to DUMP/<what>-rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from helpers import distributed
from helpers.config import TrainConfig

RUN = dict(model="depthwise_net", epochs=2, batch_size=20, max_lr=0.05, workers=0, seed=0)


def no_bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, 10))


def fit_no_bn(data_dir: str, loader: str, batch: int) -> tuple[dict, list[dict]]:
    """(weights, history records) of a model without batch norm after 2 epochs at global batch `batch`."""
    from helpers.run import prepare_data
    from helpers.train import fit
    from helpers.utils import seed_everything

    config = TrainConfig(**RUN | dict(batch_size=batch, loader=loader, data_dir=data_dir, augment="davidnet"))
    train_loader, test_loader, _, _ = prepare_data(config, "cpu")
    seed_everything(0)
    model = no_bn_model()
    history = fit(model, train_loader, test_loader, config, device="cpu", quiet=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, history.records


def main(argv: list[str]) -> int:
    from helpers.run import RunInterrupted, train_run

    torch.set_num_threads(1)
    device = distributed.setup(torch.device("cpu"))
    rank = distributed.world().rank
    what, data_dir = argv[0], argv[1]
    if what == "nobn":
        dump, batch = Path(argv[2]), int(argv[3])
        for loader in ("torch", "gpu"):
            weights, records = fit_no_bn(data_dir, loader, batch)
            torch.save({"weights": weights, "history": records}, dump / f"nobn-{loader}-rank{rank}.pt")
        return 0
    out, dump = Path(argv[2]), Path(argv[3])
    if "--stop" in argv:  # every process stops where epoch 2's training has ended, before its checkpoint
        real, calls = distributed.broadcast_buffers, []

        def stop(*models):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            real(*models)

        import helpers.train

        helpers.train.distributed.broadcast_buffers = stop
    try:
        result = train_run(TrainConfig(**RUN, data_dir=data_dir), out, device=device, resume=True, figures=False,
                           quiet=True)
    except RunInterrupted:
        return 130
    torch.save({"weights": result.model.state_dict(), "history": result.history.records},
               dump / f"run-rank{rank}.pt")
    return 0


if __name__ == "__main__":
    distributed.exit_process(main(sys.argv[1:]))
