"""Pixel-space helpers of generator-based recovery: the crop / flip augmentation of FREE's code
and the per-dataset normalisation a teacher expects."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Normalisation:
    """A dataset's per-channel pixel mean and std (what its teachers were trained on)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """[..., 3, H, W] in [0, 1] -> standardised, in the pixels' dtype (as Normalize does)."""
        mean = torch.tensor(self.mean, dtype=pixels.dtype, device=pixels.device)
        std = torch.tensor(self.std, dtype=pixels.dtype, device=pixels.device)
        return (pixels - mean[:, None, None]) / std[:, None, None]


@dataclass(frozen=True)
class CropFlip:
    """One random crop (after zero padding) and one horizontal flip for a whole batch, as
    torchvision's RandomCrop(padding) + RandomHorizontalFlip draw them for a batched tensor."""

    top: int
    left: int
    flip: bool

    @staticmethod
    def draw(padding: int, generator: torch.Generator) -> CropFlip:
        top, left = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
        flip = bool(torch.rand(1, generator=generator) < 0.5)
        return CropFlip(top, left, flip)

    def apply(self, pixels: torch.Tensor, padding: int) -> torch.Tensor:
        """[..., H, W] -> the same size: zero-pad by `padding`, crop at (top, left), flip."""
        height, width = pixels.shape[-2:]
        padded = F.pad(pixels, (padding, padding, padding, padding))
        cropped = padded[..., self.top : self.top + height, self.left : self.left + width]
        return cropped.flip(-1) if self.flip else cropped
