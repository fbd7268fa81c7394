"""benchmarks.proxies: the GPU code path's host syncs and launches, counted on the CPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks import proxies
from helpers.config import RECIPES


def test_the_counters_see_every_kind_of_host_read():
    counts = proxies.Counts()
    counts.active = True
    t = torch.arange(4.0)
    with proxies.counting_host_reads(counts), counts:
        t.sum().item(), bool(t.sum() > 0), float(t.max()), t.tolist(), t.cpu(), t.to("cpu")
        t.to("cpu", non_blocking=True)  # not a sync
    assert sum(counts.syncs.values()) == 6, counts.syncs
    assert counts.ops["aten.sum.default"] == 2


def test_writeup_step_has_no_host_sync_and_launches_as_the_bare_loop_does():
    """custom_resnet `writeup`: fit's step on the GPU path reads nothing back, and dispatches within 5% of the ops
    of the plain PyTorch loop (fit's extra: the argmax kept for the epoch's accuracy)."""
    r = proxies.measure("custom_resnet", "writeup", epochs=2, batch_size=4, steps_per_epoch=2)
    assert r["steps"] == 4 and r["syncs_per_step"] == 0, r["syncs_in_steps"]
    assert r["ops_per_step"] <= 1.05 * r["bare_ops_per_step"], r["ops_more_than_bare_per_step"]
    assert r["syncs_per_epoch"] <= 1.5  # the epoch's one read (+ the trained weights' score at the end)


@pytest.mark.slow
@pytest.mark.parametrize("model,recipe", [(m, r) for m in RECIPES for r in RECIPES[m]])
def test_no_recipe_syncs_inside_its_steps(model, recipe):
    """Every recipe (weight average, L1, frozen BN, TTA...) runs its steps without a host sync on the GPU path."""
    r = proxies.measure(model, recipe, epochs=2, batch_size=4, steps_per_epoch=2, bare_loop=False)
    assert r["syncs_per_step"] == 0, r["syncs_in_steps"]
