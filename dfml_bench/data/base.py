"""The in-memory form every dataset loader returns: class-split uint8 image tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClassSplit:
    """Images of one meta-split (classes disjoint from the other splits).

    `images` is uint8 [n, 3, H, W]; `labels` is int64 [n] indexing `class_names`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 [n, 3, H, W], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")
        if len(self.labels) and int(self.labels.max()) >= len(self.class_names):
            raise ValueError("a label indexes past class_names")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices_by_class(self) -> list[torch.Tensor]:
        """Image indices of each class, in class order (used by samplers and zoo training)."""
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return list(torch.split(order, counts))


@dataclass(frozen=True)
class FewShotDataset:
    """A dataset split by class into meta-train / meta-val / meta-test, at one image size."""

    name: str
    image_size: int
    splits: dict[str, ClassSplit]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    stand_in_for: str | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> ClassSplit:
        return self.splits[name]

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 [.., 3, H, W] -> float, scaled to [0, 1] then standardised with mean/std."""
        mean = torch.tensor(self.mean, device=images_uint8.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=images_uint8.device).view(3, 1, 1)
        return (images_uint8.float() / 255.0 - mean) / std
