"""Which weight-average decay a 2-epoch run of the fast ResNet-9 recipe wants (the README's CPU run).

Trains custom_resnet `fast` as the run layer would on 2,000 / 1,000 images (batch 64, peak 0.1), keeps the weights
after every step of epoch 2, then evaluates the exponential average over epoch 2 at several decays (as
torch.optim.swa_utils.AveragedModel with use_buffers=True computes it: the first step copied, then
ema = d * ema + (1 - d) * w). decay 0 is the trained weights. Usage: python ema_decay_study.py DATA_DIR
"""

import copy
import json
import sys

import torch

from helpers.config import TrainConfig, evolve
from helpers.engine import TrainStep
from helpers.models import build_model
from helpers.run import adapt_to_data, load_run_data, prepare_data
from helpers.train import evaluate
from helpers.utils import seed_everything

config = TrainConfig(model="custom_resnet", recipe="fast", epochs=2, subset_train=2000, subset_test=1000,
                     data_dir=sys.argv[1])
arrays = load_run_data(config)
config, notes = adapt_to_data(config, len(arrays[0]))
config = evolve(config, ema=0.0)  # the step without averaging: the average is computed here, after the fact
train_loader, test_loader, _, _ = prepare_data(config, "cpu", arrays=arrays)
seed_everything(config.seed)
model = build_model(config.model)
step = TrainStep(model, config, device=torch.device("cpu"), steps_per_epoch=len(train_loader))
kept = []
for epoch in (1, 2):
    model.train()
    for x, y in train_loader:
        step(x, y)
        if epoch == 2:
            kept.append({k: v.detach().clone() for k, v in model.state_dict().items()})
results = {}
for decay in (0.0, 0.5, 0.7, 0.8, 0.87, 0.9, 0.95, 0.9528, 0.99):
    avg = copy.deepcopy(kept[0])
    for w in kept[1:]:
        for k, v in avg.items():
            if v.dtype.is_floating_point:
                v.mul_(decay).add_(w[k], alpha=1 - decay)
            else:
                v.copy_(w[k])
    probe = build_model(config.model)
    probe.load_state_dict(avg)
    results[decay] = evaluate(probe, test_loader, device="cpu").accuracy
    print(f"decay {decay:<6} test accuracy {results[decay]:.2f}%", flush=True)
print(json.dumps({"steps_in_epoch_2": len(kept), "notes": notes, "accuracy_by_decay": results}))
