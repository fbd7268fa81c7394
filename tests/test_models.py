"""Models: exact parameter counts, shapes, receptive field, registry errors."""

from __future__ import annotations

import pytest
import torch

from helpers.models import MODELS, build_model, count_parameters, receptive_field


@pytest.mark.parametrize("name, params", [("resnet18", 11_173_962), ("custom_resnet", 6_573_130)])
def test_parameter_counts_match_the_seeds(name, params):
    assert count_parameters(build_model(name)) == params


def test_depthwise_net_budget_and_receptive_field():
    model = build_model("depthwise_net")
    assert count_parameters(model) <= 100_000
    assert receptive_field(model) >= 61


@pytest.mark.parametrize("name", list(MODELS))
def test_output_shape(name):
    model = build_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", list(MODELS))
def test_cam_layer_names_a_module(name):
    model = build_model(name)
    assert model.get_submodule(model.cam_layer) is not None


def test_custom_resnet_stage_output_is_the_post_residual_sum():
    stage = build_model("custom_resnet").eval().layer3
    x = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        inner = torch.relu(stage.bn(stage.pool(stage.conv(x))))
        torch.testing.assert_close(stage(x), inner + stage.res(inner))


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'.*resnet18"):
        build_model("vgg")
