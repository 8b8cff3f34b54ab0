"""A few-shot task as float tensors ready for a model (pseudo or real), as meta-learners use it."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Task:
    """An N-way K-shot task; labels 0..N-1. Images may carry gradients (adversarial data step)."""

    support_images: torch.Tensor
    support_labels: torch.Tensor
    query_images: torch.Tensor
    query_labels: torch.Tensor


def stack_tasks(tasks: list[Task]) -> Task:
    """Tasks of equal shapes stacked along a new leading task dim, to adapt them under vmap.

    Stacking keeps the autograd graph, so gradients still reach images that carry them."""
    return Task(
        *(
            torch.stack([getattr(task, field) for task in tasks])
            for field in ("support_images", "support_labels", "query_images", "query_labels")
        )
    )
