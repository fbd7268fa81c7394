"""--deterministic's cost: CPU time per training step of ResNet-9 (custom_resnet, batch 64, fp32, channels-last)
with and without helpers.utils.deterministic_algorithms, interleaved. It measures the process's CPU time (user and
system, all threads), not wall time: on a shared, loaded machine wall time stretches, a step's CPU time much less.

    python -m benchmarks.deterministic_cost   # from the repository root; results: BENCHMARKS.md
"""

import statistics
import time

import torch

from helpers.config import TrainConfig
from helpers.engine import TrainStep
from helpers.models import build_model
from helpers.utils import deterministic_algorithms

ROUNDS, STEPS = 6, 4  # interleaved rounds, training steps per round and setting

torch.manual_seed(0)
config = TrainConfig(model="custom_resnet", epochs=1, batch_size=64, amp=False)
step = TrainStep(build_model("custom_resnet"), config, device=torch.device("cpu"), steps_per_epoch=1000)
x, y = step.to_device(torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))  # a step costs the same on any images
step.model.train()
times = {False: [], True: []}
for det in (False, True):  # warm-up: one step each way
    with deterministic_algorithms(det):
        step(x, y)
for _ in range(ROUNDS):
    for det in (False, True):
        with deterministic_algorithms(det):
            t0 = time.process_time()
            for _ in range(STEPS):
                step(x, y)
            times[det].append((time.process_time() - t0) / STEPS)
for det, t in times.items():
    print(f"deterministic={det}: median {statistics.median(t):.3f} s CPU per step (n={len(t)}: "
          + ", ".join(f"{v:.3f}" for v in t) + ")")
print("torch", torch.__version__, "threads", torch.get_num_threads())
