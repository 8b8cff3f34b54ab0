"""Name registry of architectures, so recipes and run configs name models by string."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dfml_bench.errors import DfmlError
from dfml_bench.models.conv4 import Conv4
from dfml_bench.models.init import ModelInit, initialise_
from dfml_bench.models.resnet import FewShotResNet

ModelFactory = Callable[[int, int], nn.Module]

# "-authors": the ResNet stem of PURER's and FREE's network.py (3x3 stride 1, no ReLU, no max-pool)
_ARCHITECTURES: dict[str, ModelFactory] = {
    "conv4": lambda num_classes, image_size: Conv4(num_classes, image_size),
    "conv4-gap": lambda num_classes, image_size: Conv4(num_classes, image_size, global_pool="mean"),
    # FREE's MH meta-model (network.py, arbitrary_input: AdaptiveMaxPool2d(1) before the head)
    "conv4-gmp": lambda num_classes, image_size: Conv4(num_classes, image_size, global_pool="max"),
    "resnet10": lambda num_classes, image_size: FewShotResNet((1, 1, 1, 1), num_classes),
    "resnet18": lambda num_classes, image_size: FewShotResNet((2, 2, 2, 2), num_classes),
    "resnet10-authors": lambda num_classes, image_size: FewShotResNet(
        (1, 1, 1, 1), num_classes, stem="authors"
    ),
    "resnet18-authors": lambda num_classes, image_size: FewShotResNet(
        (2, 2, 2, 2), num_classes, stem="authors"
    ),
}


def architecture_names() -> list[str]:
    return sorted(_ARCHITECTURES)


def build_model(
    architecture: str, num_classes: int, image_size: int, init: ModelInit = "authors"
) -> nn.Module:
    """A freshly initialised model; every model has `.embed(x)` and a linear `.head`.

    `init` "authors" re-draws convs and resets BatchNorm as PURER's and FREE's code does (see
    `dfml_bench.models.init`); "pytorch" keeps PyTorch's default initialisation.
    """
    if architecture not in _ARCHITECTURES:
        raise DfmlError(
            f"unknown architecture {architecture!r}; known: {', '.join(architecture_names())}"
        )
    model = initialise_(_ARCHITECTURES[architecture](num_classes, image_size), init)
    model.image_size = image_size  # read by the harness to resize test images
    model.architecture = architecture
    return model
