"""Insight tools: LR range test, GradCAM, model summary and ONNX export (figures: test_plots.py).

Each test of a library trap (LIBRARIES.md) is named after it. Runs on the tiny fixture data with depthwise_net
(96k parameters) so the file stays fast on a 2-core CPU.
"""

from __future__ import annotations

import os
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from helpers.data import make_loader
from helpers.models import MODELS, build_model, count_parameters, summary
from helpers.train import TrainConfig

from .conftest import REPO

MODEL = "depthwise_net"


def snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def optimizer_equal(a: dict, b: dict) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(eq(u, v) for u, v in zip(x, y))
        return x == y

    return eq(a, b)


@pytest.fixture(scope="module")
def loader(tiny_arrays):
    return make_loader(tiny_arrays[0], batch_size=16, train=True, recipe="davidnet", workers=0, seed=3)


@pytest.fixture
def model():
    """A small conv net with BN: the LR range test's mechanics need no full CIFAR model (and stay fast)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


# ---------------------------------------------------------------------------------------------------------
# LR range test


def test_lr_range_test_restores_model_modes_and_rng(model, loader):
    from helpers.lr_finder import lr_range_test

    model.train()
    model[3].eval()  # a mixed state, which model.train(was_training) alone would not restore
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()  # moved BN stats, gradients present
    before, modes_before = snapshot(model), modes(model)
    rng, sampler_rng = torch.get_rng_state(), loader.sampler.generator.get_state()
    loader_rng = loader.generator.get_state()

    found = lr_range_test(model, loader, num_iter=20, end_lr=1.0, progress=False)

    assert len(found.lrs) == len(found.losses) == 20  # 6 batches per pass: the loader was restarted
    assert_same_state(before, snapshot(model))  # weights and BN running stats / num_batches_tracked
    assert modes(model) == modes_before
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(loader.sampler.generator.get_state(), sampler_rng)  # a later fit sees the same data order
    assert torch.equal(loader.generator.get_state(), loader_rng)
    assert all(p.is_contiguous() for p in model.parameters())  # not left in channels_last
    # a scheduler built afterwards on a fresh optimizer works (the finder's optimizer is its own)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=found.suggested_lr, total_steps=10)
    assert scheduler.get_last_lr()[0] == pytest.approx(found.suggested_lr / 25)


def test_lr_range_test_runs_the_training_step_l1_included(model, loader):
    """The sweep runs fit's step: the config's L1 term changes the losses it records (it did not before)."""
    from helpers.lr_finder import lr_range_test

    base = TrainConfig.for_model(MODEL, augment="none", amp=False, max_lr="auto", l1=0.0)
    plain = lr_range_test(model, loader, config=base, num_iter=17, end_lr=1.0, progress=False)
    heavy = lr_range_test(model, loader, config=replace(base, l1=0.05), num_iter=17, end_lr=1.0, progress=False)
    assert plain.losses[0] == pytest.approx(heavy.losses[0])  # same start: same weights, same first batch
    assert abs(plain.losses[-1] - heavy.losses[-1]) > 1e-3


def test_lr_range_test_keeps_the_bias_lr_scale(model, loader, monkeypatch):
    """With bias_lr_scale the run steps biases at 64x the weights' LR: so does the sweep, and the LR it records
    (and suggests) is the weights' (the library alone sets every group to the one swept LR)."""
    from helpers.lr_finder import lr_range_test

    seen = []
    original = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append([g["lr"] for g in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    config = TrainConfig.for_model(MODEL, augment="none", amp=False, max_lr="auto", bias_lr_scale=64.0)
    found = lr_range_test(model, loader, config=config, num_iter=17, end_lr=1.0, progress=False)
    assert len(seen) == len(found.lrs) == 17
    for (weights, biases), recorded in zip(seen, found.lrs):
        assert weights == pytest.approx(recorded) and biases == pytest.approx(64 * recorded)


def test_lr_range_test_with_config_builds_optimizer_and_suggests(model, loader):
    from helpers.lr_finder import from_curve, lr_range_test, steepest_descent

    config = TrainConfig.for_model(MODEL, optimizer="adam", label_smoothing=0.1, amp=False, max_lr="auto")
    found = lr_range_test(model, loader, config=config, start_lr=1e-6, end_lr=1.0, num_iter=25, progress=False)
    assert found.settings["optimizer"] == "Adam" and found.settings["amp"] is None
    assert found.lrs[0] == pytest.approx(1e-6) and found.lrs[-1] <= 1.0
    assert np.all(np.diff(found.lrs) > 0)  # exponential sweep
    assert found.suggested_lr == found.lrs[found.suggested_index] and found.rule == "steepest"
    assert found.min_loss_lr_over_10 == pytest.approx(found.lrs[int(np.argmin(found.losses))] / 10)
    step = np.log(found.lrs[1] / found.lrs[0])  # the sweep point nearest a tenth of the minimum's LR
    assert abs(np.log(found.suggestions["decade_below_min"] / found.min_loss_lr_over_10)) <= step / 2 + 1e-9
    assert found.steepest_lr == found.lrs[steepest_descent(found.lrs, found.losses)] == found.suggested_lr
    assert found.suggestions == {"steepest": found.steepest_lr, "decade_below_min": found.suggestions[
        "decade_below_min"], "min_loss": found.min_loss_lr}
    again = from_curve(found.lrs, found.losses)  # a curve kept in a benchmark JSON scores the same
    assert (again.suggestions, again.min_loss_lr, again.suggested_lr) == (
        found.suggestions, found.min_loss_lr, found.suggested_lr)


def test_at_peak_moves_the_start_as_the_recipe_has_it():
    from helpers.sweep import at_peak

    numeric = TrainConfig.for_model("custom_resnet", recipe="writeup")  # 0.045 -> 0.45: the start stays a tenth
    assert (at_peak(numeric, 0.2).max_lr, at_peak(numeric, 0.2).start_lr) == pytest.approx((0.2, 0.02))
    found = TrainConfig.for_model("resnet18", recipe="writeup")  # 1e-5 -> the range test's pick: start stays 1e-5
    assert (at_peak(found, 2e-3).max_lr, at_peak(found, 2e-3).start_lr) == pytest.approx((2e-3, 1e-5))
    assert numeric.max_lr == 0.45 and found.max_lr == "auto"  # the configs given are left alone


def test_peak_sweep_trains_the_recipe_at_each_peak_and_scores_the_rules(tiny_arrays):
    """Each run is the run layer's run of the recipe at that peak; the rules' gaps are to the best swept."""
    from helpers.run import train_run
    from helpers.sweep import at_peak, peak_sweep

    config = TrainConfig.for_model(MODEL, epochs=1, batch_size=16, augment="none", amp=False, seed=3, loader="gpu")
    found = SimpleNamespace(suggestions={"steepest": 0.01, "decade_below_min": 0.03})
    row = peak_sweep(config, arrays=tiny_arrays, peaks=(0.01, 0.1), found=found, device="cpu", progress=False)

    assert list(row["runs"]) == ["0.01", "0.1", "steepest", "decade_below_min"]
    alone = train_run(at_peak(config, 0.1), device="cpu", quiet=True, arrays=tiny_arrays)
    assert row["runs"]["0.1"]["final_acc"] == alone.accuracy
    assert row["runs"]["steepest"]["final_acc"] == row["runs"]["0.01"]["final_acc"]  # same peak, same run
    assert row["best_swept_acc"] == max(row["runs"][k]["final_acc"] for k in ("0.01", "0.1"))
    for rule, lr in found.suggestions.items():
        gap = row["best_swept_acc"] - row["runs"][rule]["final_acc"]
        assert row["rules"][rule] == {"max_lr": lr, "gap_to_best": gap}
    assert (row["model"], row["optimizer"], row["epochs"]) == (MODEL, config.optimizer, 1)


def test_suggestion_is_the_library_plot_rule(capsys):
    """Our steepest-descent index equals what torch-lr-finder's own plot() suggests on the same history."""
    import matplotlib.pyplot as plt
    from torch_lr_finder import LRFinder

    from helpers.lr_finder import steepest_descent

    rng = np.random.default_rng(0)
    lrs = list(np.logspace(-6, 1, 60))
    losses = list(2.3 - np.tanh(np.linspace(-3, 3, 60)) + 0.05 * rng.standard_normal(60))
    fig, ax = plt.subplots()
    _, library_lr = LRFinder.plot(SimpleNamespace(history={"lr": lrs, "loss": losses}), ax=ax)
    plt.close(fig)
    assert lrs[steepest_descent(lrs, losses)] == library_lr


def test_suggestion_ignores_dips_after_the_minimum():
    """A short sweep's loss falls, bottoms out, then climbs with a noisy dip: the dip is no suggestion."""
    from helpers.lr_finder import steepest_descent

    lrs = list(np.logspace(-5, 0, 40))
    losses = list(np.r_[np.linspace(2.35, 2.30, 15), np.linspace(2.29, 2.2, 5), np.linspace(2.25, 2.72, 19), 2.5])
    losses[-6] = 2.40  # a sharp drop deep in the divergence zone (inside the library's window)
    index = steepest_descent(lrs, losses)
    assert 15 <= index <= int(np.argmin(losses))


def test_too_short_sweep_is_a_clear_error(model, loader):
    from helpers.lr_finder import LRRangeTestError, lr_range_test

    before = snapshot(model)
    with pytest.raises(LRRangeTestError, match="at least 17"):
        lr_range_test(model, loader, num_iter=16, progress=False)
    with pytest.raises(LRRangeTestError, match="no batches"):
        lr_range_test(model, [], num_iter=20, progress=False)
    assert_same_state(before, snapshot(model))


def test_diverging_sweep_is_a_clear_error_and_restores(model, loader):
    from helpers.lr_finder import LRRangeTestError, lr_range_test

    model.train()
    before = snapshot(model)
    with pytest.raises(LRRangeTestError, match="diverged"):
        lr_range_test(model, loader, start_lr=10.0, end_lr=1e8, num_iter=50, diverge_th=1.5, progress=False)
    assert_same_state(before, snapshot(model))
    assert model.training


def test_mixed_precision_path(model, tiny_arrays):
    """bf16 autocast on the CPU (amp=True): the library needs amp_backend, amp_config and a grad_scaler."""
    from helpers.data import CifarArrays
    from helpers.lr_finder import lr_range_test

    train = tiny_arrays[0]
    few = CifarArrays(train.images[:8], train.labels[:8], train.classes)  # bf16 is ~17x slower on this CPU
    loader = make_loader(few, batch_size=4, train=True, recipe="none", workers=0)
    before = snapshot(model)
    config = TrainConfig.for_model(MODEL, amp=True, max_lr="auto")
    found = lr_range_test(model, loader, config=config, device="cpu", num_iter=17, end_lr=1.0, progress=False)
    assert found.settings["amp"] == "bf16"
    assert np.isfinite(found.losses).all() and len(found.losses) == 17
    assert_same_state(before, snapshot(model))


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_switch(model, loader, capsys, progress):
    from helpers.lr_finder import lr_range_test

    lr_range_test(model, loader, num_iter=17, end_lr=1.0, progress=progress)
    captured = capsys.readouterr()
    assert ("17/17" in captured.err) == progress
    assert "Learning rate search finished" not in captured.out  # the library's prints are kept out


def test_lr_finder_import_is_quiet_in_a_notebook_kernel():
    """torch-lr-finder imports tqdm.autonotebook, which warns in every Jupyter/Colab kernel; ours keeps it quiet.

    A fresh interpreter that looks like a Jupyter kernel to tqdm (ipykernel.zmqshell loaded, a ZMQ shell running),
    with warnings turned into errors.
    """
    import subprocess
    import sys

    pytest.importorskip("IPython")
    code = "\n".join([
        "import sys, types, warnings, IPython",
        "sys.modules['ipykernel.zmqshell'] = types.ModuleType('ipykernel.zmqshell')",
        # a kernel's shell as tqdm 4.67 (Colab's: IPKernelApp in its config) and 4.70 (its class name) recognise it
        "IPython.get_ipython = lambda: type('ZMQInteractiveShell', (), {'config': {'IPKernelApp': {}}})()",
        "warnings.simplefilter('error')",
        # matplotlib's own import may warn (pyparsing 3.3 under matplotlib 3.10): its, not ours, and hidden in a kernel
        r"warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'matplotlib\.')",
        "from helpers.lr_finder import _library",
        "library = _library()",
        "assert 'notebook' in library.tqdm.__module__, library.tqdm.__module__",  # it did take the notebook path
    ])
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "TQDM_DISABLE": ""})
    if "IProgress" in run.stderr:
        pytest.skip("ipywidgets missing: tqdm takes its console path (requirements-dev.txt installs it)")
    assert run.returncode == 0, run.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------
# GradCAM


@pytest.fixture(scope="module")
def images(tiny_arrays):
    from helpers.gradcam import normalize_images

    return normalize_images(tiny_arrays[1].images[:6]), tiny_arrays[1].labels[:6]


@pytest.fixture(scope="module")
def cam_model(images):
    """depthwise_net with BN statistics moved off their initial values (one train-mode pass), left in train mode.

    The traps are about mechanics, not accuracy: test_plots.py draws GradCAM from a trained model.
    """
    torch.manual_seed(0)
    net = build_model(MODEL)
    with torch.no_grad():
        net(images[0] * 2 + 0.5)
    return net


def test_gradcam_maps_shape_range_and_class_dependence(cam_model, images):
    from helpers.gradcam import gradcam_maps

    x, _ = images
    a = gradcam_maps(cam_model, x, [0] * len(x))
    b = gradcam_maps(cam_model, x, [5] * len(x))
    assert a.shape == (len(x), 32, 32) and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1 + 1e-6
    assert not np.allclose(a, b)  # the target class matters
    default = gradcam_maps(cam_model, x)  # None: the predicted class
    with torch.no_grad():
        cam_model.eval()
        predicted = cam_model(x).argmax(1).numpy()
    cam_model.train()
    np.testing.assert_allclose(default, gradcam_maps(cam_model, x, predicted), atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_gradcam_restores_modes_releases_hooks_and_keeps_grads(cam_model, images, training):
    from helpers.gradcam import gradcam_maps

    x, _ = images
    cam_model.train(training)
    cam_model.block1.train(not training)  # mixed modes must come back as they were
    before_modes, before_hooks, before_state = modes(cam_model), hook_count(cam_model), snapshot(cam_model)
    params = list(cam_model.parameters())
    params[0].grad, params[1].grad = torch.ones_like(params[0]), None
    grads = [p.grad if p.grad is None else p.grad.clone() for p in params]
    gradcam_maps(cam_model, x, [1] * len(x))
    assert modes(cam_model) == before_modes
    assert hook_count(cam_model) == before_hooks
    assert_same_state(before_state, snapshot(cam_model))  # BN ran in eval: no running-stat update
    assert all(p.requires_grad for p in params)
    for p, g in zip(params, grads):  # a training step's gradients survive a GradCAM call in between
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    cam_model.train()


def test_gradcam_under_no_grad_inference_mode_and_autocast(cam_model, images):
    from helpers.gradcam import gradcam_maps

    x, y = images
    reference = gradcam_maps(cam_model, x, y)
    with torch.no_grad():
        np.testing.assert_allclose(gradcam_maps(cam_model, x, y), reference, atol=1e-5)
    with torch.inference_mode():
        inference_x = x.clone()  # an inference tensor
        np.testing.assert_allclose(gradcam_maps(cam_model, inference_x, y), reference, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # runs in fp32 all the same
        np.testing.assert_allclose(gradcam_maps(cam_model, x, y), reference, atol=1e-5)


def test_gradcam_on_compiled_model_uses_original_module(cam_model, images):
    from helpers.gradcam import find_layer, gradcam_maps

    x, y = images
    compiled = torch.compile(cam_model)  # lazy: nothing is compiled unless its forward runs
    assert find_layer(compiled) is cam_model.block4
    assert find_layer(compiled, "block3.4") is cam_model.block3[4]
    np.testing.assert_allclose(gradcam_maps(compiled, x, y), gradcam_maps(cam_model, x, y), atol=1e-6)


def test_gradcam_any_dotted_layer_and_default_layers():
    from helpers.gradcam import find_layer

    for name in MODELS:
        net = build_model(name)
        assert find_layer(net) is dict(net.named_modules())[net.cam_layer]
    net = build_model("resnet18")
    assert find_layer(net, "layer3.0.bn2") is net.layer3[0].bn2


def test_gradcam_wrong_layer_lists_valid_names(cam_model, images):
    from helpers.gradcam import LayerNotFound, gradcam_maps

    x, y = images
    before = hook_count(cam_model)
    with pytest.raises(LayerNotFound, match="no layer 'block9'") as err:
        gradcam_maps(cam_model, x, y, layer="block9")
    assert "block4" in str(err.value) and "trans3" in str(err.value)
    assert hook_count(cam_model) == before


def test_gradcam_bad_target_is_not_swallowed(cam_model, images):
    """The library's `with` block swallows IndexError: an out-of-range class must still raise."""
    from helpers.gradcam import gradcam_maps

    x, _ = images
    with pytest.raises(ValueError, match="target class"):
        gradcam_maps(cam_model, x, [99] * len(x))
    with pytest.raises(ValueError, match="one target class per image"):
        gradcam_maps(cam_model, x, [1])
    assert cam_model.training and hook_count(cam_model) == 0


def test_gradcam_pred_and_true_and_overlay(cam_model, images):
    from helpers.data import denormalize
    from helpers.gradcam import gradcam_pred_and_true, overlay

    x, y = images
    pair = gradcam_pred_and_true(cam_model, x, y)
    assert pair.predicted_maps.shape == pair.true_maps.shape == (len(x), 32, 32)
    assert pair.predictions.shape == (len(x),)
    over = overlay(denormalize(x), pair.true_maps)
    assert over.shape == (len(x), 32, 32, 3) and over.dtype == np.uint8
    with pytest.raises(ValueError, match="denormalize"):
        overlay(x.movedim(1, -1).numpy(), pair.true_maps)  # still normalised: negative values


def test_misclassified_most_confident_first(tiny_arrays):
    from helpers.gradcam import misclassified
    from helpers.train import EvalResult

    test = tiny_arrays[1]
    targets = test.labels.copy()
    predictions = targets.copy()
    predictions[[3, 7, 11]] = (targets[[3, 7, 11]] + 1) % 10
    confidences = np.full(len(targets), 0.9, dtype=np.float32)
    confidences[[3, 7, 11]] = [0.4, 0.8, 0.6]
    result = EvalResult(1.0, 94.0, predictions, confidences, targets, np.zeros((len(targets), 10), np.float32))
    items = misclassified(result, test, n=2)
    assert [m.index for m in items] == [7, 11]
    assert items[0].target == targets[7] and items[0].prediction == predictions[7]
    assert items[0].target_name == test.classes[targets[7]] and items[0].confidence == pytest.approx(0.8)
    assert np.array_equal(items[0].image, test.images[7])
    shuffled = EvalResult(1.0, 94.0, predictions[::-1], confidences, targets[::-1], result.probabilities)
    with pytest.raises(ValueError, match="line up"):
        misclassified(shuffled, test)


# ---------------------------------------------------------------------------------------------------------
# Model summary and ONNX export


@pytest.mark.parametrize("name, expected", [("resnet18", 11_173_962), ("custom_resnet", 6_573_130),
                                            ("depthwise_net", None)])
def test_summary_counts_parameters_and_touches_nothing(name, expected):
    net = build_model(name)
    net.train()
    before = snapshot(net)
    stats = summary(net)
    assert stats.total_params == stats.trainable_params == count_parameters(net)
    if expected is None:
        assert stats.total_params <= 100_000
    else:
        assert stats.total_params == expected
    assert net.training and all(modes(net))
    assert_same_state(before, snapshot(net))  # BN running stats and num_batches_tracked untouched


def test_export_onnx_matches_pytorch(tmp_path, cam_model):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from helpers.models import export_onnx

    cam_model.train()
    path = export_onnx(cam_model, tmp_path / "model.onnx")
    assert cam_model.training  # mode restored
    x = torch.randn(5, 3, 32, 32)  # another batch size than the export's example: the batch axis is dynamic
    cam_model.eval()
    with torch.no_grad():
        expected = cam_model(x).numpy()
    cam_model.train()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_export_onnx_without_extras_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from helpers.models import export_onnx

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="pip install onnx onnxscript"):
        export_onnx(build_model(MODEL), tmp_path / "m.onnx")
