"""FREE's memory of recovered images, from which pseudo tasks are replayed.

As in the authors' code, every class keeps a ring of its last `batches_per_class` writes (one
write = one teacher's images of that class in one epoch), stored as 8-bit pixels the way their
PNG files hold them: floor(255 x clamp(x, 0, 1)), truncated, not rounded. A task is read back
with the normalisation of the dataset its classes come from.
"""

from __future__ import annotations

import torch

from dfml_bench.data.task import Task
from dfml_bench.inversion.pixels import Normalisation


class ImageMemory:
    """Per-class rings of uint8 images on one device; classes are absolute ids."""

    def __init__(self, batches_per_class: int | None, normalisations: list[Normalisation]) -> None:
        self.batches_per_class = batches_per_class
        self.normalisations = normalisations  # indexed by the `dataset` given to `add`
        self.rings: dict[int, list[torch.Tensor]] = {}  # in the order classes became ready
        self.next_write: dict[int, int] = {}
        self.class_dataset: dict[int, int] = {}
        self.class_sources: dict[int, set[int]] = {}

    def __len__(self) -> int:
        return sum(int(batch.shape[0]) for ring in self.rings.values() for batch in ring)

    def add(self, pixels: torch.Tensor, labels: torch.Tensor, dataset: int, teacher: int) -> None:
        """Store `pixels` [N, 3, H, W] in [0, 1] under their absolute class `labels` [N]."""
        stored = (pixels.detach().clamp(0, 1) * 255).to(torch.uint8)  # truncates, as PIL saving
        labels = labels.to(stored.device)
        for label in dict.fromkeys(labels.tolist()):  # classes in order of first appearance
            batch = stored[labels == label]
            ring = self.rings.setdefault(label, [])
            slot = self.next_write.get(label, 0)
            if slot < len(ring):
                ring[slot] = batch
            else:
                ring.append(batch)
            if self.batches_per_class is not None:
                slot = (slot + 1) % self.batches_per_class
            else:
                slot += 1
            self.next_write[label] = slot
            self.class_dataset[label] = dataset
            self.class_sources.setdefault(label, set()).add(teacher)

    def teachers(self) -> set[int]:
        return set().union(*self.class_sources.values()) if self.class_sources else set()

    def sample_task(self, ways: int, shots: int, queries: int, generator: torch.Generator) -> Task:
        """`ways` ready classes (uniformly, no repeats), `shots + queries` distinct images each,
        labelled by their position in the task (class-major), normalised per dataset."""
        ready = list(self.rings)
        if len(ready) < ways:
            raise ValueError(
                f"the memory holds {len(ready)} classes; a {ways}-way task needs {ways} (recover "
                "images of more classes first)"
            )
        needed = shots + queries
        support, query = [], []
        for position in torch.randperm(len(ready), generator=generator)[:ways].tolist():
            label = ready[position]
            images = torch.cat(self.rings[label])
            if len(images) < needed:
                raise ValueError(
                    f"class {label} has {len(images)} images in the memory; a task needs "
                    f"{needed} (raise per_class)"
                )
            picked = images[torch.randperm(len(images), generator=generator)[:needed].tolist()]
            pixels = picked.float() / 255
            normalised = self.normalisations[self.class_dataset[label]].apply(pixels)
            support.append(normalised[:shots])
            query.append(normalised[shots:])
        labels = torch.arange(ways, device=support[0].device)
        return Task(
            support_images=torch.cat(support),
            support_labels=labels.repeat_interleave(shots),
            query_images=torch.cat(query),
            query_labels=labels.repeat_interleave(queries),
        )

    def state_dict(self) -> dict[str, object]:
        return {
            "rings": {label: list(ring) for label, ring in self.rings.items()},
            "next_write": dict(self.next_write),
            "class_dataset": dict(self.class_dataset),
            "class_sources": {label: sorted(s) for label, s in self.class_sources.items()},
        }

    def load_state_dict(self, state: dict[str, object], device: torch.device) -> None:
        rings: dict[int, list[torch.Tensor]] = state["rings"]  # type: ignore[assignment]
        self.rings = {int(c): [b.to(device) for b in ring] for c, ring in rings.items()}
        self.next_write = {int(c): int(v) for c, v in state["next_write"].items()}  # type: ignore[attr-defined]
        self.class_dataset = {int(c): int(v) for c, v in state["class_dataset"].items()}  # type: ignore[attr-defined]
        sources: dict[int, list[int]] = state["class_sources"]  # type: ignore[assignment]
        self.class_sources = {int(c): set(v) for c, v in sources.items()}
