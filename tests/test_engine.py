"""helpers.engine.TrainStep: the execution modes and their choice, the warm-up that leaves no trace, and fit as
the bare step loop plus bookkeeping."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import engine
from helpers.config import ConfigError, TrainConfig
from helpers.data import make_loader
from helpers.engine import TrainStep, choose_mode
from helpers.models import build_model
from helpers.train import evaluate, fit

from .conftest import without_time

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU


def config(**overrides) -> TrainConfig:
    return TrainConfig(model="depthwise_net", **{"epochs": 2, "batch_size": 20, "max_lr": 0.05, "amp": False,
                                                 "workers": 0, "augment": "none", **overrides})


def loaders(tiny_arrays, cfg):
    return (make_loader(tiny_arrays[0], batch_size=cfg.batch_size, recipe=cfg.augment, workers=0),
            make_loader(tiny_arrays[1], batch_size=25, train=False, workers=0))


def test_auto_mode_rule():
    assert choose_mode("auto", CPU, 10**6)[0] == "eager"
    assert choose_mode("auto", CUDA, 2_328)[0] == "graphs"  # ResNet-9's 24 epochs: compiling would not pay
    assert choose_mode("auto", CUDA, engine.COMPILE_MIN_STEPS)[0] == "compile"
    mode, why = choose_mode("graphs", CPU, 100)
    assert mode == "eager" and "CUDA" in why
    assert choose_mode("compile", CPU, 100)[0] == "compile"
    with pytest.raises(ValueError, match="unknown mode"):
        choose_mode("fast", CPU, 100)


def test_graphs_asked_on_the_cpu_runs_eager_and_says_so(tiny_arrays, capsys):
    cfg = config(epochs=1, mode="graphs")
    torch.manual_seed(0)
    history = fit(build_model(cfg.model), *loaders(tiny_arrays, cfg), cfg, device="cpu")
    assert history.mode == "eager" and history.warmup_seconds == 0.0
    assert "graphs asked for, but CUDA graphs need a CUDA GPU" in capsys.readouterr().out


def test_warm_up_state_is_restored_exactly(tiny_arrays):
    """prepare()'s warm-up steps run on real weights: saving and restoring must leave no trace."""
    cfg = config(optimizer="sgd", l1=1e-3)
    torch.manual_seed(0)
    step = TrainStep(build_model(cfg.model), cfg, device=CPU, steps_per_epoch=5)
    x, y = next(iter(loaders(tiny_arrays, cfg)[0]))
    step(x, y)  # momentum buffers and a scheduler position to restore
    before = (copy.deepcopy(step.model.state_dict()), copy.deepcopy(step.state_dict()), torch.get_rng_state())
    saved = step._save_state()
    for _ in range(engine.WARMUP_STEPS):
        step(torch.zeros_like(x), torch.zeros_like(y))
    step._restore_state(saved)
    for name, value in before[0].items():
        assert torch.equal(step.model.state_dict()[name], value), name
    assert step.lr == before[1]["optimizer"]["param_groups"][0]["lr"]
    assert step.scheduler.state_dict() == before[1]["scheduler"]
    momentum = [s["momentum_buffer"] for s in step.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b["momentum_buffer"]) for a, b in zip(momentum, before[1]["optimizer"]["state"].values()))
    assert torch.equal(torch.get_rng_state(), before[2])


def test_fit_trains_as_the_bare_pytorch_loop(tiny_arrays):
    """fit's weights equal the plain PyTorch loop's (benchmarks.bare: what the overhead benchmark times fit
    against) on the same model, loader, optimizer and schedule: nothing else trains, and the bare loop is the same
    training."""
    from benchmarks.bare import train_bare

    cfg = config(augment="davidnet", l1=0.0)  # the bare loop has no L1 term (depthwise_net's recipe does)
    torch.manual_seed(0)
    fitted = build_model(cfg.model)
    fit(fitted, *loaders(tiny_arrays, cfg), cfg, device="cpu", quiet=True)
    torch.manual_seed(0)
    bare = build_model(cfg.model)
    train_bare(bare, loaders(tiny_arrays, cfg)[0], cfg, device=CPU, epochs=cfg.epochs)
    for (name, a), b in zip(fitted.state_dict().items(), bare.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_compile_matches_eager(tiny_arrays):
    """torch.compile (Inductor, on the CPU here) trains to the same losses as eager, within float tolerance."""
    cfg = config(epochs=1)
    histories = {}
    for mode in ("eager", "compile"):
        torch.manual_seed(0)
        histories[mode] = fit(build_model(cfg.model), *loaders(tiny_arrays, replace_mode(cfg, mode)),
                              replace_mode(cfg, mode), device="cpu", quiet=True)
    assert histories["compile"].mode == "compile" and histories["compile"].warmup_seconds > 0
    eager, compiled = histories["eager"].records[0], histories["compile"].records[0]
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-3)


def replace_mode(cfg: TrainConfig, mode: str, **changes) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, mode=mode, **changes)


def test_evaluate_runs_a_ragged_last_batch_through_the_original_module(tiny_arrays):
    """A compiled model must not recompile for a smaller last test batch: it goes to _orig_mod instead."""
    calls = []

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

        def forward(self, x):
            calls.append(len(x))
            return self._orig_mod(x)

    model = Wrapper(build_model("depthwise_net"))
    loader = make_loader(tiny_arrays[1], batch_size=20, train=False, workers=0)  # 50 images: 20, 20, 10
    result = evaluate(model, loader, device="cpu")
    assert calls == [20, 20] and len(result.predictions) == 50


# --- the fast recipe's mechanisms: bias LR scaling, frozen batch-norm scales, weight averaging, TTA


def test_bias_lr_scaling_and_frozen_bn_scales(tiny_arrays):
    cfg = config(epochs=1, bias_lr_scale=64.0, freeze_bn_weight=True, weight_decay=5e-4)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    bn_scales = [m.weight.detach().clone() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    train_loader, test_loader = loaders(tiny_arrays, cfg)
    step = TrainStep(model, cfg, device=CPU, steps_per_epoch=len(train_loader))
    weights, biases = step.optimizer.param_groups
    bn_biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [id(p) for p in biases["params"]] == [id(p) for p in bn_biases]  # scales frozen: biases only
    assert len(weights["params"]) + len(bn_biases) == sum(p.requires_grad for p in model.parameters())
    resnet9 = build_model("custom_resnet")  # its classifier's bias (Page's has none) stays at the base LR
    base, scaled = engine.param_groups(resnet9, TrainConfig(model="custom_resnet", recipe="fast"))
    assert any(p is resnet9.fc.bias for p in base["params"]) and not any(p is resnet9.fc.bias for p in scaled["params"])
    assert biases["lr"] == pytest.approx(64 * weights["lr"]) and biases["weight_decay"] == pytest.approx(5e-4 / 64)
    assert [g["max_lr"] for g in step.optimizer.param_groups] == pytest.approx([cfg.peak_lr, 64 * cfg.peak_lr])
    assert not any(m.weight.requires_grad for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    fit(model, train_loader, test_loader, cfg, device="cpu", quiet=True)
    after = [m.weight for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(bn_scales, after))


def test_weight_average_is_evaluated_and_resumes_exactly(tiny_arrays, tmp_path):
    """EMA over the last 2 of 3 epochs: evaluation runs the average; an interrupted run resumes to the same."""
    cfg = config(epochs=3, batch_size=50, ema=0.9, ema_epochs=2, augment="davidnet")  # 2 steps an epoch

    def run(**kw):
        torch.manual_seed(0)
        return fit(build_model(cfg.model), *loaders(tiny_arrays, cfg), cfg, device="cpu", quiet=True, **kw)

    full = run(checkpoint=tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    assert state["step_state"]["ema"] is not None and int(state["step_state"]["ema"]["n_averaged"]) == 4
    torch.manual_seed(0)
    no_ema = fit(build_model(cfg.model), *loaders(tiny_arrays, cfg), replace_mode(cfg, "eager", ema=0.0),
                 device="cpu", quiet=True)
    assert no_ema.records[0]["test_loss"] == full.records[0]["test_loss"]  # epoch 1: no average yet
    assert full.records[-1]["test_loss"] != no_ema.records[-1]["test_loss"]  # then the average is evaluated

    from helpers import train as train_module

    real = train_module._train_epoch

    def stop_at_3(step, loader, epoch, **kw):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(step, loader, epoch, **kw)

    train_module._train_epoch = stop_at_3
    try:
        with pytest.raises(KeyboardInterrupt):
            run(checkpoint=tmp_path / "stopped.pt")
    finally:
        train_module._train_epoch = real
    resumed = run(checkpoint=tmp_path / "stopped.pt", resume=tmp_path / "stopped.pt")
    assert without_time(resumed) == without_time(full)


def test_tta_views(tiny_arrays):
    from helpers.train import tta_logits

    torch.manual_seed(0)
    # a per-pixel linear map then a global average: invariant to flips, nearly so to 1-px reflect shifts
    invariant = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(4, 3, 32, 32)
    plain = invariant(x)
    assert torch.equal(tta_logits(invariant, x, "none"), plain)
    assert torch.allclose(tta_logits(invariant, x, "flip"), plain, atol=1e-6)
    assert torch.allclose(tta_logits(invariant, x, "flip_translate"), plain, atol=0.05)
    model = build_model("depthwise_net").eval()
    with torch.no_grad():
        views = tta_logits(model, x, "flip_translate")
        expected = 0.5 * (0.5 * model(x) + 0.5 * model(x.flip(-1))) + 0.5 * torch.stack([
            0.5 * model(v) + 0.5 * model(v.flip(-1)) for v in (
                torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[..., :-2, :-2],
                torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[..., 2:, 2:])]).mean(0)
    assert torch.allclose(views, expected, atol=1e-5)


def test_the_fast_resnet9_recipe_builds():
    cfg = TrainConfig(model="custom_resnet", recipe="fast")
    assert (cfg.epochs, cfg.tta, cfg.bias_lr_scale, cfg.freeze_bn_weight) == (10, "flip_translate", 64.0, True)
    assert TrainConfig(model="custom_resnet").recipe == "writeup"  # unmeasured: not the default
    assert TrainConfig(model="custom_resnet", tta=True).tta == "flip"
    assert TrainConfig(model="custom_resnet", recipe="fast", epochs=1).ema_epochs == 1  # the recipe's 2 fit in 1
    with pytest.raises(ConfigError, match="ema_epochs"):  # asked for by name: not adapted
        TrainConfig(model="custom_resnet", recipe="fast", epochs=1, ema_epochs=2)


def test_time_epoch_of_a_one_epoch_config(tiny_arrays):
    """Warm-up steps plus a whole timed epoch must fit the schedule even when the config has one epoch."""
    cfg = config(epochs=1, batch_size=25)
    train_loader, test_loader = loaders(tiny_arrays, cfg)
    timing = engine.time_epoch(build_model(cfg.model), cfg, train_loader, test_loader, device="cpu")
    assert timing["full_epoch_timed"] and timing["steps_timed"] == len(train_loader) == 4
    assert timing["mode"] == "eager" and timing["warmup_s"] == 0.0 and timing["precision"] == "fp32"


def test_an_averaging_run_leaves_and_saves_the_evaluated_weights(tiny_arrays, tmp_path):
    from helpers.train import load_weights

    cfg = config(epochs=2, batch_size=50, ema=0.5, ema_epochs=1)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    train_loader, test_loader = loaders(tiny_arrays, cfg)
    history = fit(model, train_loader, test_loader, cfg, device="cpu", quiet=True, checkpoint=tmp_path / "c.pt")
    assert evaluate(model, test_loader, device="cpu").loss == pytest.approx(history.test_loss[-1], rel=1e-6)
    loaded = build_model(cfg.model)
    load_weights(loaded, tmp_path / "c.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


# --- CUDA only (run by the GPU check: python -m benchmarks.gpu_check)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("mode", ["graphs", "compile"])
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_modes_train_like_eager(tiny_arrays, mode, amp):
    """Graphs and compile on a GPU: the mode is used, the warm-up is timed apart and leaves no trace (epoch 1's
    loss matches eager's), and training and the averaged evaluation agree with eager within mixed-precision noise."""
    from helpers.data import make_loaders

    histories = {}
    for name in ("eager", mode):
        cfg = TrainConfig(model="custom_resnet", epochs=2, batch_size=20, amp=amp, mode=name, augment="davidnet",
                          tta="flip", ema=0.5, ema_epochs=1)
        torch.manual_seed(0)
        train_loader, test_loader = make_loaders(*tiny_arrays, kind="gpu", batch_size=20, recipe="davidnet",
                                                 device="cuda")
        histories[name] = fit(build_model(cfg.model), train_loader, test_loader, cfg, device="cuda", quiet=True)
    eager, other = histories["eager"], histories[mode]
    assert other.mode == mode and other.warmup_seconds > 0
    tolerance = 0.08 if amp else 0.03  # kernels differ (fusion, cuDNN choices): gross errors only
    for a, b in zip(eager.records, other.records):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=tolerance)
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=tolerance)
    assert "test_acc_tta" in other.records[-1] and "test_acc_tta" not in other.records[0]  # TTA: the final model only


@cuda
def test_cuda_prepare_restores_the_model_exactly(tiny_arrays):
    from helpers.data import make_loaders

    cfg = TrainConfig(model="custom_resnet", epochs=1, batch_size=20, mode="graphs")
    train_loader, test_loader = make_loaders(*tiny_arrays, kind="gpu", batch_size=20, recipe="davidnet",
                                             device="cuda")
    torch.manual_seed(0)
    step = TrainStep(build_model(cfg.model), cfg, device=CUDA, steps_per_epoch=len(train_loader))
    before = copy.deepcopy(step.model.state_dict())
    rng = torch.cuda.get_rng_state()
    assert step.prepare(train_loader, test_loader) > 0 and step.mode == "graphs"
    for name, value in step.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert torch.equal(torch.cuda.get_rng_state(), rng) and step.optimizer.state_dict()["state"] == {}


def test_weight_average_equals_torchs_averaged_model_and_reads_its_state():
    """The sync-free average gives AveragedModel's numbers (EMA rule, buffers averaged, integer buffers by its
    rule), and a state written by AveragedModel (checkpoints before WeightAverage) loads into it."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = build_model("custom_resnet")
    ours = engine.WeightAverage(model, decay=0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):  # train steps move weights, running statistics and num_batches_tracked
        model.train()
        loss = model(torch.randn(8, 3, 32, 32)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ours.update(model)
        theirs.update_parameters(model)
    mine, ref = ours.module.state_dict(), theirs.module.state_dict()
    assert mine.keys() == ref.keys()
    for name in ref:
        assert mine[name].dtype == ref[name].dtype, name
        torch.testing.assert_close(mine[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(t.dtype == torch.long for t in ref.values())  # the integer rule was exercised
    assert ours.state_dict().keys() == theirs.state_dict().keys()

    loaded = engine.WeightAverage(build_model("custom_resnet"), decay=0.9)
    loaded.load_state_dict(theirs.state_dict())  # an old checkpoint's `ema`
    assert loaded.updates == 4
    assert all(torch.equal(loaded.module.state_dict()[k], v) for k, v in ref.items())


def test_auto_weighs_the_measured_step_times_and_warm_ups():
    resnet9 = engine.STEP_STUDY[("custom_resnet", "bf16", 512)]
    mode, why = choose_mode("auto", CUDA, 2_328, measured=resnet9)  # writeup: compiling saves ~3.7 s, costs 14
    assert mode == "graphs" and "compile" in why and "measured" in why
    assert choose_mode("auto", CUDA, 20_000, measured=resnet9)[0] == "compile"  # there it pays back
    assert choose_mode("auto", CPU, 20_000, measured=resnet9)[0] == "eager"


def test_a_failed_compilation_falls_back_to_eager_and_the_run_goes_on(tiny_arrays, monkeypatch):
    """A machine without a C++ compiler (or an op Inductor cannot take): compile's first call raises."""
    def no_compiler(module, **kwargs):
        def compiled(*args, **kw):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    cfg = config(epochs=1, mode="compile")
    train_loader, test_loader = loaders(tiny_arrays, cfg)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        history = fit(build_model(cfg.model), train_loader, test_loader, cfg, device="cpu", quiet=True)
    assert history.mode == "eager" and len(history) == 1
    torch.manual_seed(0)
    eager = fit(build_model(cfg.model), *loaders(tiny_arrays, cfg), replace_mode(cfg, "eager"), device="cpu",
                quiet=True)
    assert history.records[0]["train_loss"] == eager.records[0]["train_loss"]  # the failed try left no trace
