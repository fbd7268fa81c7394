"""The three CIFAR-10 models of the write-ups, behind one registry: `build_model(name)`.

resnet18       CIFAR ResNet-18 (kuangliu/pytorch-cifar layout, the ResNet-18 write-up's): 11,173,962 parameters.
custom_resnet  ResNet-9 / "DavidNet" (D. Page; the custom-ResNet write-up's summary): 6,573,130 parameters.
depthwise_net  the depthwise-net write-up's small dilated, depthwise-separable net: 96,202 parameters, receptive
               field 61.

Each model names the module GradCAM should hook by default in its `cam_layer` attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from helpers.utils import atomic_write, preserved_modes, unwrap


def conv_bn(c_in: int, c_out: int, **conv) -> list[nn.Module]:
    """3x3 conv (no bias: BN follows) -> BN -> ReLU."""
    conv = {"kernel_size": 3, "padding": 1, "bias": False, **conv}
    return [nn.Conv2d(c_in, c_out, **conv), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


# ---------------------------------------------------------------------------------------------------------
# ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool; layer4 gives 512 x 4 x 4.


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # match the residual's shape with a 1x1 projection
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    cam_layer = "layer4.1"  # last block of layer4: a 4x4 map

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 64))
        widths, strides = (64, 128, 256, 512), (1, 2, 2, 2)
        c_in = 64
        for i, (width, stride) in enumerate(zip(widths, strides), start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width)))
            c_in = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, 32, 32) -> (B, num_classes)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------------------------------------------------
# ResNet-9 ("DavidNet"): prep, then three stages of conv -> max-pool -> BN -> ReLU (pool before BN, Page's
# faster order), stages 1 and 3 with a residual pair of convs.


class Stage(nn.Module):
    """conv -> pool -> BN -> ReLU, plus x + res(x) when residual. Its output is the post-residual sum."""

    def __init__(self, c_in: int, c_out: int, *, residual: bool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(c_out)
        self.res = nn.Sequential(*conv_bn(c_out, c_out), *conv_bn(c_out, c_out)) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.pool(self.conv(x))))
        return x if self.res is None else x + self.res(x)


class CustomResNet(nn.Module):
    cam_layer = "layer3"  # the last residual stage's output: 512 x 4 x 4
    logit_scale = 0.125  # Page scales the logits down: softer outputs at the start, steadier high-LR training

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.prep = nn.Sequential(*conv_bn(3, 64))  # 64 x 32 x 32
        self.layer1 = Stage(64, 128, residual=True)  # 128 x 16 x 16
        self.layer2 = Stage(128, 256, residual=False)  # 256 x 8 x 8
        self.layer3 = Stage(256, 512, residual=True)  # 512 x 4 x 4
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale


# ---------------------------------------------------------------------------------------------------------
# Seed 002's small net: conv blocks of a 3x3 conv and depthwise-separable convs; transitions 1-2 are 3x3
# convs with dilation 2 and no padding (a 5x5 view that shrinks the map by 4), transition 3 a stride-2 conv;
# the last block ends in a dilated 3x3; then global average pool and a 1x1 conv classifier.


def separable(c_in: int, c_out: int) -> list[nn.Module]:
    """Depthwise 3x3 (one filter per channel) then pointwise 1x1: ~9/c_out of a full conv's parameters."""
    return [
        nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class DepthwiseNet(nn.Module):
    cam_layer = "block4"  # its last conv block: 8 x 8

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(*conv_bn(3, 16), *separable(16, 32))  # 32 x 32
        self.trans1 = nn.Sequential(*conv_bn(32, 32, dilation=2, padding=0))  # 28 x 28
        self.block2 = nn.Sequential(*separable(32, 48), *separable(48, 48))
        self.trans2 = nn.Sequential(*conv_bn(48, 40, dilation=2, padding=0))  # 24 x 24
        self.block3 = nn.Sequential(*separable(40, 56), *separable(56, 56))
        self.trans3 = nn.Sequential(*conv_bn(56, 32, stride=2))  # 12 x 12
        self.block4 = nn.Sequential(*conv_bn(32, 40), *conv_bn(40, 40), *conv_bn(40, 40, dilation=2, padding=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(40, num_classes, 1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in (self.block1, self.trans1, self.block2, self.trans2, self.block3, self.trans3, self.block4):
            x = stage(x)
        return self.head(x)


# ---------------------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "custom_resnet": CustomResNet,
    "depthwise_net": DepthwiseNet,
}


def _check_registry() -> None:
    """Every model names the module GradCAM hooks by default (checked at import; tests check that it exists)."""
    for name, builder in MODELS.items():
        if not isinstance(getattr(builder, "cam_layer", None), str):
            raise ImportError(f"MODELS[{name!r}] has no cam_layer: name the module GradCAM should hook")


_check_registry()


def build_model(name: str, *, num_classes: int = 10) -> nn.Module:
    """A fresh model by registry name (see MODELS)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def receptive_field(model: nn.Module, input_size: int = 32) -> int:
    """Receptive field in input pixels of the model's output, traced through its layers in execution order.

    rf grows by (kernel - 1) * dilation * jump at each conv or pool; jump (input pixels per output step)
    multiplies by the stride. A global pool counts as a kernel the size of its input map, as the depthwise-net
    write-up's calculator counts it (depthwise_net: 39 up to its last conv, 61 with the global average pool).
    Valid for chains of layers (no parallel branches of different depth), such as depthwise_net.
    """
    layers: list[tuple[int, int, int]] = []  # (kernel, stride, dilation) in execution order

    def record(mod: nn.Module, inputs, output) -> None:
        if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            layers.append((inputs[0].shape[-1], 1, 1))
        else:
            k, s, d = (getattr(mod, a, 1) for a in ("kernel_size", "stride", "dilation"))
            layers.append(tuple(v[0] if isinstance(v, tuple) else v for v in (k, s, d)))

    layer_types = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, layer_types)]
    try:
        with preserved_modes(model), torch.no_grad():
            model.eval()
            model(torch.zeros(1, 3, input_size, input_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    rf, jump = 1, 1
    for k, s, d in layers:
        rf += (k - 1) * d * jump
        jump *= s
    return rf


def summary(model: nn.Module, *, input_size=(1, 3, 32, 32), depth: int = 3, verbose: int = 0):
    """The torchinfo table (layers, output shapes, parameters, mult-adds) on the model's own device."""
    from torchinfo import summary as torchinfo_summary  # deferred: a development extra

    device = next(model.parameters()).device  # without it torchinfo moves a CPU model to the GPU
    return torchinfo_summary(
        model,
        input_size=input_size,
        device=device,
        depth=depth,
        col_names=("output_size", "num_params", "mult_adds"),
        row_settings=("var_names",),
        verbose=verbose,
    )


def export_onnx(model: nn.Module, path, *, input_size=(3, 32, 32), dynamic_batch: bool = True, dynamo: bool = True,
                metadata: dict[str, str] | None = None):
    """Write `model` (eval mode, fp32) to an ONNX file at `path` with a dynamic batch axis; returns the path.

    Input "images" (B, 3, 32, 32) normalised as for training, output "logits" (B, num_classes). Uses the dynamo
    exporter (torch's default), which needs the optional extras onnx and onnxscript; onnxruntime runs the file.
    input_size: one image's (C, H, W); dynamo=False: the older TorchScript exporter. metadata: text entries stored in
    the file's metadata_props (onnxruntime: session.get_modelmeta().custom_metadata_map; helpers.export puts the
    class names, mean and std there). The file is written whole or not at all (atomic); every module's
    train/eval mode is restored afterwards.
    """
    try:
        import onnx  # deferred: optional extras, and the exporter needs both
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"export_onnx needs the optional packages onnx and onnxscript ({err.name} is missing): "
            "pip install onnx onnxscript (and onnxruntime to run the exported file)"
        ) from None
    model = unwrap(model)  # torch.compile's wrapper: export the original module
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    example = torch.randn(2, *input_size, device=device)  # batch 2: torch.export specialises a batch of 1
    shapes = {}
    if dynamic_batch and dynamo:
        shapes = {"dynamic_shapes": ({0: torch.export.Dim.DYNAMIC},)}
    elif dynamic_batch:
        shapes = {"dynamic_axes": {"images": {0: "batch"}, "logits": {0: "batch"}}}

    def write(tmp: Path) -> None:
        with preserved_modes(model):
            model.eval()
            torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                              dynamo=dynamo, external_data=False, verbose=False, **shapes)
        if metadata:
            proto = onnx.load(str(tmp))
            for key, value in metadata.items():
                proto.metadata_props.add(key=key, value=value)
            onnx.save(proto, str(tmp))

    return atomic_write(path, write)
