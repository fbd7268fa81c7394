"""torch.hub entry points: a model of this repository, untrained or from a trained run.

    model = torch.hub.load("path/to/clone", "custom_resnet", source="local", weights="runs/x")
    model = torch.hub.load("cifar10-helpers/cifar10-helpers", "resnet18", weights="model.safetensors")

weights: a run folder or checkpoint written by `cifar10 train`, or a file written by `cifar10 export --weights`
(.safetensors, .pt); None gives the untrained network. The model comes on the CPU in eval mode, with `classes`,
`mean` and `std` attributes: its input is (B, 3, 32, 32) float32, (image / 255 - mean) / std.
"""

dependencies = ["torch", "numpy"]  # what torch.hub checks before it imports this file


def _load(name: str, weights, num_classes: int):
    from helpers.models import build_model

    if weights is None:
        return build_model(name, num_classes=num_classes).eval()
    from helpers.export import load_model

    return load_model(weights, model=name)


def custom_resnet(weights=None, num_classes: int = 10):
    """ResNet-9 ("DavidNet", the custom-ResNet write-up's): 6,573,130 parameters."""
    return _load("custom_resnet", weights, num_classes)


def resnet18(weights=None, num_classes: int = 10):
    """CIFAR ResNet-18 (3x3 stem, no max-pool): 11,173,962 parameters."""
    return _load("resnet18", weights, num_classes)


def depthwise_net(weights=None, num_classes: int = 10):
    """The depthwise-net write-up's dilated, depthwise-separable network: 96,202 parameters."""
    return _load("depthwise_net", weights, num_classes)
