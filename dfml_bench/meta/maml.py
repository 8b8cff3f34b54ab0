"""MAML on pseudo tasks, functional (torch.func.functional_call): the meta-learner of PURER, FREE
and the oracle. Second order by default, as in the authors' PURER code.

A meta-batch is adapted task by task with autograd, or all at once under `torch.func.vmap` (the
strategy follows the device unless `batching` says otherwise, see `batches_tasks`); both give the
same loss and meta-gradient up to float rounding.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from dfml_bench.data.task import Task, stack_tasks
from dfml_bench.device import vmap_layout, vmap_layouts
from dfml_bench.meta.adaptation import (
    Params,
    TaskBatching,
    batches_tasks,
    functional_adapt,
    inner_adapt,
)

Reduction = Literal["mean", "sum"]


class InnerLoopSettings(Protocol):
    """What a method's settings say about its MAML inner loop."""

    inner_steps: int
    inner_lr: float
    second_order: bool


def meta_batch_loss(
    model: nn.Module,
    tasks: list[Task],
    settings: InnerLoopSettings,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, float]:
    """`maml_outer_loss` from the model's own parameters, with a method's inner-loop settings
    (the step PURER, FREE's replay and the oracle share)."""
    return maml_outer_loss(
        model,
        dict(model.named_parameters()),
        tasks,
        settings.inner_steps,
        settings.inner_lr,
        settings.second_order,
        reduction=reduction,
    )


def maml_outer_loss(
    model: nn.Module,
    params: Params,
    tasks: list[Task],
    inner_steps: int,
    inner_lr: float,
    second_order: bool = True,
    batching: TaskBatching = "auto",
    *,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, float]:
    """Query loss after adaptation over `tasks` (the mean or the sum of the per-task mean
    losses), and the query accuracy in percent.

    The authors' PURER and FREE code SUM a meta-batch's query losses, so their outer gradient is
    `len(tasks)` times the mean's: with Adam this barely matters, with SGD it scales the step.
    The accuracy is read back once per meta-batch (one host sync), not once per task."""
    device = next(iter(params.values())).device
    if len(tasks) > 1 and batches_tasks(batching, device) and _same_shapes(tasks):
        return _batched_outer_loss(
            model, params, tasks, inner_steps, inner_lr, second_order, reduction
        )
    losses, correct, total = [], [], 0
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
        correct.append((logits.detach().argmax(1) == task.query_labels).sum())
        total += task.query_labels.numel()
    return _reduce(torch.stack(losses), reduction), 100.0 * int(torch.stack(correct).sum()) / total


def _reduce(task_losses: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return task_losses.mean()
    if reduction == "sum":
        return task_losses.sum()
    raise ValueError(f"unknown reduction {reduction!r}; known: mean, sum")


def _same_shapes(tasks: list[Task]) -> bool:
    """Tasks stack (and so vmap) only when every tensor has the same shape across tasks."""
    first = tasks[0]
    return all(
        task.support_images.shape == first.support_images.shape
        and task.query_images.shape == first.query_images.shape
        and task.support_labels.shape == first.support_labels.shape
        and task.query_labels.shape == first.query_labels.shape
        for task in tasks
    )


def _batched_outer_loss(
    model: nn.Module,
    params: Params,
    tasks: list[Task],
    inner_steps: int,
    inner_lr: float,
    second_order: bool,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, float]:
    """`maml_outer_loss` with every task's inner loop and query pass in one vmapped call."""
    batch = stack_tasks(tasks)
    params = vmap_layouts(params)

    def query_logits(
        support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        adapted = functional_adapt(
            model, params, support, support_labels, inner_steps, inner_lr, second_order
        )
        return functional_call(model, adapted, (query,))

    with _DecomposedBatchNorm() if second_order else nullcontext():
        logits = vmap(query_logits)(
            vmap_layout(batch.support_images), batch.support_labels, vmap_layout(batch.query_images)
        )
    losses = F.cross_entropy(
        logits.flatten(0, 1), batch.query_labels.flatten(), reduction="none"
    ).view(len(tasks), -1)
    correct = (logits.detach().argmax(-1) == batch.query_labels).sum()
    accuracy = 100.0 * int(correct) / batch.query_labels.numel()
    return _reduce(losses.mean(dim=1), reduction), accuracy


_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)


class _DecomposedBatchNorm(TorchFunctionMode):
    """Batch-statistics BatchNorm as plain tensor ops while active.

    Under vmap, the outer (second-order) backward through the native batch-norm kernel is wrong
    (pytorch/functorch#534: the batching rule of its backward; ~1e-4 off in float64 on Conv4),
    while mean/var/rsqrt compose correctly. Other calls and BN with running statistics pass by.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is not F.batch_norm:
            return func(*args, **kwargs)
        bound = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        if not call["training"] or call["running_mean"] is not None:
            return func(*args, **kwargs)
        inputs = call["input"]
        dims = [0, *range(2, inputs.dim())]
        mean = inputs.mean(dim=dims, keepdim=True)
        variance = (inputs - mean).square().mean(dim=dims, keepdim=True)
        outputs = (inputs - mean) * torch.rsqrt(variance + call["eps"])
        shape = (1, -1) + (1,) * (inputs.dim() - 2)
        if call["weight"] is not None:
            outputs = outputs * call["weight"].view(shape)
        if call["bias"] is not None:
            outputs = outputs + call["bias"].view(shape)
        return outputs
