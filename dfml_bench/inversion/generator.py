"""The DCGAN-like image generator of FREE (and of CMI / Fast data-free KD it builds on)."""

from __future__ import annotations

import torch
from torch import nn


class Generator(nn.Module):
    """latent [B, latent_dim] -> images [B, 3, S, S] in [0, 1] pixel space (sigmoid), as in the
    authors' code: each teacher's normalisation is applied afterwards, so one generator serves
    teachers of datasets with different pixel statistics.

    Linear projection to a (S/4)x(S/4) map, two x2 upsampling conv blocks with BatchNorm and
    LeakyReLU, a 3-channel conv, a sigmoid.
    """

    def __init__(self, image_size: int, latent_dim: int = 256, width: int = 64) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"the generator needs an image size divisible by 4, got {image_size}")
        self.latent_dim = latent_dim
        self.width = width
        self.image_size = image_size
        self.init_size = image_size // 4
        self.project = nn.Linear(latent_dim, 2 * width * self.init_size**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 3, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        maps = self.project(latent).view(latent.shape[0], -1, self.init_size, self.init_size)
        return self.body(maps)
