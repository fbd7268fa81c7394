"""A trained run's model for others: `cifar10 export` (ONNX checked against onnxruntime, safetensors, a .pt of plain
values), each carrying its class names, mean and std; `torch.hub.load` of hubconf.py builds a model from a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import export
from helpers.predict import load_predictor

from .conftest import CLASSES, REPO


def logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)  # (B, C, H, W), normalised


def test_onnx_export_matches_pytorch_in_onnxruntime_and_carries_its_metadata(trained_run, tmp_path, images, capsys):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "model.onnx"
    assert export.main([str(trained_run), "--onnx", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    predictor = load_predictor(trained_run, device="cpu")
    assert json.loads(meta["classes"]) == CLASSES and meta["model"] == "depthwise_net"
    assert json.loads(meta["mean"]) == list(predictor.mean) and json.loads(meta["std"]) == list(predictor.std)
    (out,) = session.run(["logits"], {"images": images})  # a batch of 5: the batch axis is dynamic
    np.testing.assert_allclose(out, logits(predictor.model, images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_load_through_torch_hub_as_the_run_does(trained_run, tmp_path, images, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    path = tmp_path / f"model{suffix}"
    assert export.main([str(trained_run), "--weights", str(path)]) == 0
    from_run = torch.hub.load(str(REPO), "depthwise_net", source="local", weights=str(trained_run))
    from_file = torch.hub.load(str(REPO), "depthwise_net", source="local", weights=str(path))
    for model in (from_run, from_file):
        assert not model.training and model.classes == CLASSES and len(model.mean) == len(model.std) == 3
    np.testing.assert_array_equal(logits(from_file, images), logits(from_run, images))
    np.testing.assert_array_equal(logits(from_run, images), logits(load_predictor(trained_run, device="cpu").model,
                                                                   images))
    if suffix == ".pt":  # plain values: torch.load reads it without this package's code
        saved = torch.load(path, weights_only=True)
        assert saved["classes"] == CLASSES and set(saved["state_dict"]) == set(from_run.state_dict())


def test_torch_hub_gives_an_untrained_model_and_refuses_another_architecture(trained_run):
    from helpers.checkpoints import CheckpointError

    untrained = torch.hub.load(str(REPO), "custom_resnet", source="local")
    assert sum(p.numel() for p in untrained.parameters()) == 6_573_130
    with pytest.raises(CheckpointError, match="holds a depthwise_net, not a custom_resnet"):
        torch.hub.load(str(REPO), "custom_resnet", source="local", weights=str(trained_run))


def test_what_cannot_be_exported_is_one_line_and_nothing_is_replaced(trained_run, tmp_path, capsys):
    kept = tmp_path / "mine.pt"
    kept.write_text("the user's")
    for argv, says in (([str(trained_run)], "nothing to export"),
                       ([str(trained_run), "--weights", str(kept)], "exists: choose another name"),
                       ([str(trained_run), "--weights", str(tmp_path / "m.bin")], "end the name in"),
                       ([str(trained_run), "--onnx", str(tmp_path / "m.pt")], "end the name in .onnx"),
                       ([str(tmp_path / "nowhere"), "--weights", str(tmp_path / "m.pt")], "no checkpoint at")):
        assert export.main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1 and err.startswith("error:"), err
    assert kept.read_text() == "the user's" and not (tmp_path / "m.pt").exists()
