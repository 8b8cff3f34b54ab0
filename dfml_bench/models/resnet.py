"""ResNet-10 / ResNet-18, the few-shot variants: 4 stages of basic blocks, GAP, linear head.

Two stems: "closerlook" (CloserLookFewShot, torchvision's ImageNet stem: 7x7 stride-2 conv, BN,
ReLU, 3x3 stride-2 max-pool, so stage 1 works at 1/4 of the input side) and "authors" (PURER's and
FREE's network.py: a 3x3 stride-1 conv and BN, with their ReLU and max-pool commented out, so stage
1 works at the full resolution: 14x (ResNet-10) and 15x (ResNet-18) the FLOPs).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

ResNetStem = Literal["closerlook", "authors"]


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class FewShotResNet(nn.Module):
    """Stages of 64/128/256/512 channels; global average pooling makes it input-size agnostic."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, int, int, int],
        num_classes: int,
        stem: ResNetStem = "closerlook",
    ) -> None:
        super().__init__()
        layers = _stem(stem)
        in_channels = 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_channels
        self.head = nn.Linear(in_channels, num_classes)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def _stem(stem: ResNetStem) -> list[nn.Module]:
    """The layers before stage 1 (3 -> 64 channels)."""
    if stem == "closerlook":
        return [
            nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ]
    if stem == "authors":
        return [
            nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
        ]
    raise ValueError(f"unknown ResNet stem {stem!r}; known: closerlook, authors")
