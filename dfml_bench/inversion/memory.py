"""FREE's memory of recovered images: every image the generators produced, with its absolute
class id, from which pseudo tasks are replayed."""

from __future__ import annotations

import torch

from dfml_bench.data.task import Task
from dfml_bench.inversion.pool import draw_task


class ImageMemory:
    """Append-only (or first-in-first-out when `capacity` is set) store on one device."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.images: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self.sources: torch.Tensor | None = None  # teacher index of each image

    def __len__(self) -> int:
        return 0 if self.labels is None else int(self.labels.numel())

    def add(self, images: torch.Tensor, labels: torch.Tensor, teacher: int) -> None:
        images, labels = images.detach(), labels.to(images.device)
        sources = torch.full_like(labels, teacher)
        if self.images is None:
            self.images, self.labels, self.sources = images, labels, sources
        else:
            self.images = torch.cat([self.images, images])
            self.labels = torch.cat([self.labels, labels])
            self.sources = torch.cat([self.sources, sources])
        if self.capacity is not None and len(self) > self.capacity:
            self.images = self.images[-self.capacity :]
            self.labels = self.labels[-self.capacity :]
            self.sources = self.sources[-self.capacity :]

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"images": self.images, "labels": self.labels, "sources": self.sources}

    def load_state_dict(self, state: dict[str, torch.Tensor | None], device: torch.device) -> None:
        self.images, self.labels, self.sources = (
            None if state[key] is None else state[key].to(device)  # type: ignore[union-attr]
            for key in ("images", "labels", "sources")
        )

    def teachers(self) -> set[int]:
        return set() if self.sources is None else set(self.sources.tolist())

    def sample_task(self, ways: int, shots: int, queries: int, generator: torch.Generator) -> Task:
        if self.images is None or self.labels is None:
            raise ValueError("the memory is empty: recover images before replaying tasks")
        by_class = {int(c): torch.nonzero(self.labels == c).flatten() for c in self.labels.unique()}
        return draw_task(self.images, by_class, ways, shots, queries, generator)
