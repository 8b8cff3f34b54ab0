"""Seeded N-way K-shot Q-query episodes; episode i depends only on (seed, i), so every method
sees exactly the same test tasks (paired comparisons) and episodes can be drawn in any order."""

from __future__ import annotations

from collections.abc import Iterator
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

    def episode(self, index: int) -> Episode:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        classes = torch.randperm(self.split.num_classes, generator=generator)[: self.ways].tolist()
        support, query = [], []
        for class_id in classes:
            pool = self._by_class[class_id]
            chosen = pool[
                torch.randperm(len(pool), generator=generator)[: self.shots + self.queries]
            ]
            support.append(chosen[: self.shots])
            query.append(chosen[self.shots :])
        support_index, query_index = torch.cat(support), torch.cat(query)
        labels = torch.arange(self.ways)
        return Episode(
            support_images=self.split.images[support_index],
            support_labels=labels.repeat_interleave(self.shots),
            query_images=self.split.images[query_index],
            query_labels=labels.repeat_interleave(self.queries),
            class_ids=tuple(classes),
        )
