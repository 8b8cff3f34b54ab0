"""Conv4: the 4-block, 32-filter ConvNet every DFML paper uses for teachers and meta-models."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

GlobalPool = Literal["mean", "max"]


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Conv4(nn.Module):
    """4 x [conv3x3 -> BN -> ReLU -> maxpool2] then a linear head on the flattened feature map.

    `global_pool` pools the last map to one value per channel instead of flattening it, so one
    head fits any input size: "max" is the MH meta-model of FREE's code (AdaptiveMaxPool2d),
    "mean" averages; by default (None) the head size follows `image_size`.
    """

    def __init__(
        self,
        num_classes: int,
        image_size: int,
        width: int = 32,
        global_pool: GlobalPool | None = None,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *(_conv_block(3 if i == 0 else width, width) for i in range(4))
        )
        self.global_pool = global_pool
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"Conv4 needs images of at least 16 px, got {image_size}")
        self.feature_dim = width if global_pool is not None else width * side * side
        self.head = nn.Linear(self.feature_dim, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.features(images)
        if self.global_pool == "mean":
            return maps.mean(dim=(2, 3))
        if self.global_pool == "max":
            return maps.amax(dim=(2, 3))
        return maps.flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))
