"""Seeded N-way K-shot Q-query episodes; episode i depends only on (seed, i), so every method
sees exactly the same test tasks (paired comparisons) and episodes can be drawn in any order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dfml_bench.data.base import ClassSplit


@dataclass(frozen=True)
class Episode:
    """One few-shot task; labels are 0..N-1 in the order of `class_ids`."""

    support_images: torch.Tensor  # uint8 [N*K, 3, H, W]
    support_labels: torch.Tensor  # int64 [N*K]
    query_images: torch.Tensor  # uint8 [N*Q, 3, H, W]
    query_labels: torch.Tensor  # int64 [N*Q]
    class_ids: tuple[int, ...]  # indices into the split's class_names


@dataclass(frozen=True)
class EpisodeBatch:
    """Episodes stacked along a leading task dim T, to adapt them together (vmap over tasks)."""

    support_images: torch.Tensor  # uint8 [T, N*K, 3, H, W]
    support_labels: torch.Tensor  # int64 [T, N*K]
    query_images: torch.Tensor  # uint8 [T, N*Q, 3, H, W]
    query_labels: torch.Tensor  # int64 [T, N*Q]
    class_ids: tuple[tuple[int, ...], ...]


class EpisodeSampler:
    def __init__(
        self, split: ClassSplit, ways: int, shots: int, queries: int, num_episodes: int, seed: int
    ) -> None:
        if ways > split.num_classes:
            raise ValueError(f"{ways}-way tasks need {ways} classes, split has {split.num_classes}")
        self.split = split
        self.ways, self.shots, self.queries = ways, shots, queries
        self.num_episodes = num_episodes
        self.seed = seed
        self._by_class = split.indices_by_class()
        smallest = min(len(indices) for indices in self._by_class)
        if smallest < shots + queries:
            raise ValueError(
                f"a class has {smallest} images, fewer than shots + queries = {shots + queries}"
            )

    def __len__(self) -> int:
        return self.num_episodes

    def __iter__(self) -> Iterator[Episode]:
        return (self.episode(index) for index in range(self.num_episodes))

    def _draw(self, index: int) -> tuple[tuple[int, ...], torch.Tensor]:
        """Episode `index`'s classes and its image indices, support ([:N*K]) then query."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        classes = torch.randperm(self.split.num_classes, generator=generator)[: self.ways].tolist()
        chosen = torch.stack(
            [
                self._by_class[c][
                    torch.randperm(len(self._by_class[c]), generator=generator)[
                        : self.shots + self.queries
                    ]
                ]
                for c in classes
            ]
        )  # [N, K + Q]
        return tuple(classes), torch.cat(
            [chosen[:, : self.shots].flatten(), chosen[:, self.shots :].flatten()]
        )

    def _labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(self.ways)
        return labels.repeat_interleave(self.shots), labels.repeat_interleave(self.queries)

    def episode(self, index: int) -> Episode:
        classes, indices = self._draw(index)
        images = self.split.images[indices]  # one gather for support and query
        support_labels, query_labels = self._labels()
        return Episode(
            support_images=images[: support_labels.numel()],
            support_labels=support_labels,
            query_images=images[support_labels.numel() :],
            query_labels=query_labels,
            class_ids=classes,
        )

    def batch(self, indices: Sequence[int]) -> EpisodeBatch:
        """Episodes `indices` (each exactly as `episode` draws it) stacked along a task dim."""
        draws = [self._draw(index) for index in indices]
        images = self.split.images[torch.stack([drawn for _, drawn in draws])]
        support_labels, query_labels = self._labels()
        tasks = len(draws)
        return EpisodeBatch(
            support_images=images[:, : support_labels.numel()],
            support_labels=support_labels.expand(tasks, -1),
            query_images=images[:, support_labels.numel() :],
            query_labels=query_labels.expand(tasks, -1),
            class_ids=tuple(classes for classes, _ in draws),
        )
