"""Name registry of architectures, so recipes and run configs name models by string."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dfml_bench.errors import DfmlError
from dfml_bench.models.conv4 import Conv4
from dfml_bench.models.resnet import FewShotResNet

ModelFactory = Callable[[int, int], nn.Module]

_ARCHITECTURES: dict[str, ModelFactory] = {
    "conv4": lambda num_classes, image_size: Conv4(num_classes, image_size),
    "conv4-gap": lambda num_classes, image_size: Conv4(num_classes, image_size, global_pool=True),
    "resnet10": lambda num_classes, image_size: FewShotResNet((1, 1, 1, 1), num_classes),
    "resnet18": lambda num_classes, image_size: FewShotResNet((2, 2, 2, 2), num_classes),
}


def architecture_names() -> list[str]:
    return sorted(_ARCHITECTURES)


def build_model(architecture: str, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialised model; every model has `.embed(x)` and a linear `.head`."""
    if architecture not in _ARCHITECTURES:
        raise DfmlError(
            f"unknown architecture {architecture!r}; known: {', '.join(architecture_names())}"
        )
    model = _ARCHITECTURES[architecture](num_classes, image_size)
    model.image_size = image_size  # read by the harness to resize test images
    model.architecture = architecture
    return model
