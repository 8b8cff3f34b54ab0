"""MAML on pseudo tasks, functional (torch.func.functional_call): the meta-learner of PURER, FREE
and the oracle. Second order by default, as in the authors' PURER code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dfml_bench.data.task import Task

Params = dict[str, torch.Tensor]


def inner_adapt(
    model: nn.Module,
    params: Params,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
    second_order: bool,
) -> Params:
    """`steps` SGD steps on the support loss; with `second_order` the graph through them is kept,
    so the outer loss differentiates through the adaptation (and into the support images)."""
    for _ in range(steps):
        loss = F.cross_entropy(functional_call(model, params, (images,)), labels)
        gradients = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
        params = {
            name: value - lr * gradient
            for (name, value), gradient in zip(params.items(), gradients)
        }
    return params


def maml_outer_loss(
    model: nn.Module,
    params: Params,
    tasks: list[Task],
    inner_steps: int,
    inner_lr: float,
    second_order: bool = True,
) -> tuple[torch.Tensor, float]:
    """Mean query loss after adaptation over `tasks`, and the query accuracy in percent."""
    losses, correct, total = [], 0, 0
    for task in tasks:
        adapted = inner_adapt(
            model,
            params,
            task.support_images,
            task.support_labels,
            inner_steps,
            inner_lr,
            second_order,
        )
        logits = functional_call(model, adapted, (task.query_images,))
        losses.append(F.cross_entropy(logits, task.query_labels))
        correct += int((logits.detach().argmax(1) == task.query_labels).sum())
        total += task.query_labels.numel()
    return torch.stack(losses).mean(), 100.0 * correct / total
