"""A learnable pool of pseudo images, `per_class` for every class of every teacher (PURER's ECI).

Images are stored per teacher (each teacher inverts its own block, with its local targets) and
labelled by ABSOLUTE class id as well, so pseudo tasks mix classes from the whole zoo.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dfml_bench import atomic
from dfml_bench.data.task import Task


class PseudoImagePool(nn.Module):
    def __init__(
        self,
        class_ids_per_teacher: Sequence[Sequence[int]],
        per_class: int,
        image_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        self.per_class = per_class
        blocks, local, absolute = [], [], []
        for class_ids in class_ids_per_teacher:
            count = len(class_ids) * per_class
            noise = torch.randn(count, 3, image_size, image_size, generator=generator)
            # channels_last: convolutions and BatchNorm on CPU run about 2x faster in NHWC
            blocks.append(nn.Parameter(noise.contiguous(memory_format=torch.channels_last)))
            local.append(torch.arange(len(class_ids)).repeat_interleave(per_class))
            absolute.append(torch.tensor(list(class_ids)).repeat_interleave(per_class))
        self.blocks = nn.ParameterList(blocks)
        self.local_labels = local
        self.absolute_labels = torch.cat(absolute)
        self.classes = sorted(set(self.absolute_labels.tolist()))
        self._indices_by_class = {
            c: torch.nonzero(self.absolute_labels == c).flatten() for c in self.classes
        }

    @property
    def num_images(self) -> int:
        return int(self.absolute_labels.numel())

    def to(self, *args, **kwargs) -> PseudoImagePool:  # type: ignore[override]
        super().to(*args, **kwargs)
        device = self.blocks[0].device
        self.local_labels = [labels.to(device) for labels in self.local_labels]
        self.absolute_labels = self.absolute_labels.to(device)
        self._indices_by_class = {c: i.to(device) for c, i in self._indices_by_class.items()}
        return self

    def sample_task(
        self, ways: int, shots: int, queries: int, generator: torch.Generator, detach: bool = True
    ) -> Task:
        """`ways` classes drawn from the whole pool, `shots` + `queries` distinct images each.

        With `detach=False` the task's images stay differentiable w.r.t. the pool (the adversarial
        curriculum step maximises the meta-model's loss through them).
        """
        images = torch.cat(list(self.blocks))
        if detach:
            images = images.detach()
        return draw_task(images, self._indices_by_class, ways, shots, queries, generator)


def draw_task(
    images: torch.Tensor,
    indices_by_class: dict[int, torch.Tensor],
    ways: int,
    shots: int,
    queries: int,
    generator: torch.Generator,
) -> Task:
    """`ways` classes among those with at least shots + queries images, distinct images each."""
    needed = shots + queries
    eligible = sorted(c for c, indices in indices_by_class.items() if len(indices) >= needed)
    if len(eligible) < ways:
        raise ValueError(
            f"{ways}-way tasks with {needed} images per class need {ways} such classes; "
            f"{len(eligible)} have enough pseudo images (raise per_class)"
        )
    chosen = torch.randperm(len(eligible), generator=generator)[:ways].tolist()
    support, query = [], []
    for class_index in chosen:
        indices = indices_by_class[eligible[class_index]]
        picked = indices[torch.randperm(len(indices), generator=generator)[:needed].tolist()]
        support.append(picked[:shots])
        query.append(picked[shots:])
    labels = torch.arange(ways, device=images.device)
    return Task(
        support_images=images[torch.cat(support)],
        support_labels=labels.repeat_interleave(shots),
        query_images=images[torch.cat(query)],
        query_labels=labels.repeat_interleave(queries),
    )


def save_task_grid(task: Task, ways: int, path: Path | str) -> Path:
    """PNG of a pseudo task, one row per class (support then query images)."""
    rows = [
        torch.cat(
            [
                task.support_images[task.support_labels == label],
                task.query_images[task.query_labels == label],
            ]
        )
        for label in range(ways)
    ]
    return save_image_rows(rows, path)


def save_image_rows(rows: Sequence[torch.Tensor], path: Path | str) -> Path:
    """PNG with one row per tensor of images (rows padded to the longest). Each image is min-max
    scaled on its own because pseudo images live in normalised, unbounded pixel space."""
    # imported here: torchvision costs ~2 s at import, which every run process would pay
    from torchvision.utils import make_grid, save_image

    per_row = max(row.shape[0] for row in rows)
    padded = [
        torch.cat([row, row.new_zeros(per_row - row.shape[0], *row.shape[1:])]) for row in rows
    ]
    images = torch.cat(padded).detach().float().cpu().contiguous()
    grid = make_grid(images, nrow=per_row, normalize=True, scale_each=True, padding=1)
    return atomic.write_with(Path(path), lambda tmp: save_image(grid, tmp, format="png"))
