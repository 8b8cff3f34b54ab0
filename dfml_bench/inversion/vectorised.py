"""The DeepInversion loss of a whole zoo in one batched call per architecture (`torch.func.vmap`).

PURER's ECI data step inverts every teacher on its own block of pseudo images, and FREE adapts one
generator per sampled teacher: T small forward/backward passes of identical networks. On a GPU
those launch T x layers tiny kernels; stacking the teachers' weights (`stack_module_state`) and
running `functional_call` under `vmap` turns each layer into one grouped kernel for all of them.

The loss is exactly `deep_inversion_loss`'s (the same functions compute each term, per teacher);
BN statistics are gathered by forward hooks on a weightless copy of the architecture, which fire
inside the vmapped forward with per-teacher (batched) inputs and running statistics. Jitter
shifts are drawn as the per-teacher loop draws them (one `draw_shift` per teacher, in order), so
with the same generator both paths see the same pixels. The loop stays the reference and the CPU
path: on a CPU a vmap over teachers is slower than the loop (see `resolve_strategy`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from dfml_bench.device import vmap_layout, vmap_layouts
from dfml_bench.inversion.deepinversion import (
    DeepInversionWeights,
    InversionLoss,
    _bn_matching_loss,
    check_one_per_teacher,
    check_teacher_weights,
    draw_shift,
    fit_to_teacher,
    l2_prior,
    total_variation,
)
from dfml_bench.inversion.precision import at_least_float32

InversionStrategy = Literal["auto", "loop", "vectorised"]


def resolve_strategy(
    strategy: InversionStrategy, device: torch.device | str, compile: bool = False
) -> Literal["loop", "vectorised"]:
    """`auto` vectorises on CUDA, or wherever the loss is compiled (only the vectorised path is;
    `InversionSpeedSettings` refuses compiling with the loop).
    On a CPU the grouped kernels of an eager vmap over teachers are slower than the loop: one ECI
    step of 13 Conv4 teachers (5 classes x 20 images, 32 px) took 2.2-2.4 s against 0.8 s on 2
    cores, 4.2 s against 1.4 s on 1. On a GPU the loop's many tiny kernels are expected to leave
    it idle, which one vmapped call per group avoids."""
    if strategy == "auto":
        return "vectorised" if compile or torch.device(device).type == "cuda" else "loop"
    return strategy


def draw_jitter_shifts(
    count: int, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor | None:
    """[count, 2] shifts from `count` successive `draw_shift` calls (the loop's order over
    teachers); None without jitter, when the loop draws nothing either."""
    if max_shift == 0:
        return None
    return torch.stack([draw_shift(max_shift, generator) for _ in range(count)])


def roll_each(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """`torch.roll(images[t], shifts[t], dims=(-2, -1))` for every t of [T, N, C, H, W] at once,
    as two gathers, so per-teacher shifts need neither a loop nor host-side integers."""
    height, width = images.shape[-2:]
    shifts = shifts.to(images.device, non_blocking=True)
    rows = (torch.arange(height, device=images.device) - shifts[:, :1]) % height
    cols = (torch.arange(width, device=images.device) - shifts[:, 1:]) % width
    rows = rows[:, None, None, :, None].expand(images.shape)
    cols = cols[:, None, None, None, :].expand(images.shape)
    return images.gather(-2, rows).gather(-1, cols)


def _group_key(teacher: nn.Module) -> tuple:
    """Teachers that can share one vmapped forward: same class, build and tensor shapes."""
    tensors = [*teacher.named_parameters(), *teacher.named_buffers()]
    return (
        type(teacher),
        getattr(teacher, "architecture", None),
        getattr(teacher, "image_size", None),
        tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in tensors),
    )


class _TeacherGroup:
    """Same-architecture teachers stacked once, with a weightless copy whose BN hooks collect the
    matching losses of the batched forward."""

    def __init__(self, members: list[int], teachers: list[nn.Module], compile: bool) -> None:
        self.members = members
        self.row = {index: row for row, index in enumerate(members)}
        params, buffers = stack_module_state(teachers)
        self.params = vmap_layouts({name: value.detach() for name, value in params.items()})
        self.buffers = vmap_layouts(buffers)
        self.base = copy.deepcopy(teachers[0]).to("meta")
        layers = [m for m in self.base.modules() if isinstance(m, nn.BatchNorm2d)]
        self.has_running_stats = bool(layers) and all(
            layer.running_mean is not None and layer.running_var is not None for layer in layers
        )
        self.collect_bn = False
        self.bn_losses: list[torch.Tensor] = []
        for layer in layers:
            layer.register_forward_hook(self._hook)
        # weights, rows and term weights stay outside the compiled call: its inputs are tensors
        # of fixed shapes, so a new set of sampled teachers (FREE) never recompiles it
        self._terms = vmap(self._terms_of_one)
        if compile:
            self._terms = torch.compile(self._terms)

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        if self.collect_bn:
            self.bn_losses.append(_bn_matching_loss(module, inputs[0]))

    def _terms_of_one(
        self,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        jittered: torch.Tensor,
        target: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One teacher's unweighted terms [ce, bn, tv, l2] and logits (vmapped over teachers)."""
        self.bn_losses.clear()
        logits = at_least_float32(
            functional_call(self.base, (params, buffers), (fit_to_teacher(self.base, jittered),))
        )
        if self.collect_bn:
            bn = torch.stack(self.bn_losses).sum()
        else:
            bn = torch.zeros((), device=jittered.device, dtype=jittered.dtype)
        self.bn_losses.clear()
        ce = F.cross_entropy(logits, target)
        return torch.stack([ce, bn, total_variation(jittered), l2_prior(jittered)]), logits

    def state(self, rows: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The stacked weights of `rows`: the stacks themselves when all teachers come in order,
        else one gather per tensor (FREE samples a few teachers per epoch)."""
        if rows == list(range(len(self.members))):
            return self.params, self.buffers
        device = next(iter(self.params.values())).device
        index = torch.tensor(rows).to(device, non_blocking=True)
        return (
            {name: value.index_select(0, index) for name, value in self.params.items()},
            {name: value.index_select(0, index) for name, value in self.buffers.items()},
        )

    def loss(
        self,
        rows: list[int],
        images: torch.Tensor,
        targets: torch.Tensor,
        weights: DeepInversionWeights,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-teacher weighted totals [T], unweighted terms [T, 4] and logits [T, N, classes] for
        jittered `images` [T, N, C, H, W] and local `targets` [T, N]."""
        params, buffers = self.state(rows)
        self.collect_bn = weights.bn != 0
        try:
            terms, logits = self._terms(params, buffers, images, targets)
        finally:
            self.bn_losses.clear()
        ce, bn, tv, l2 = terms.unbind(-1)
        total = weights.ce * ce + weights.bn * bn + weights.tv * tv + weights.l2 * l2
        return total, terms, logits


@dataclass(frozen=True)
class _Batch:
    """Call positions whose teachers share a group and whose images and targets share shapes."""

    group: _TeacherGroup
    positions: list[int]


class StackedTeachers:
    """A zoo stacked once for vectorised inversion: teachers grouped by architecture and tensor
    shapes (conv4 / resnet10 / resnet18, head sizes, image sizes), each group one vmapped forward.

    The weights are a snapshot taken here (teachers are frozen while inverted); teachers must be in
    eval mode, as for `deep_inversion_loss`. With `compile`, each group's vmapped call goes through
    `torch.compile` (fused kernels; the first call of each input shape compiles, which takes tens
    of seconds, so it pays off on long runs only).
    """

    def __init__(self, teachers: Sequence[nn.Module], compile: bool = False) -> None:
        if not teachers:
            raise ValueError("no teachers to stack")
        if any(teacher.training for teacher in teachers):
            raise ValueError("put every teacher in eval mode (call .eval()) before stacking")
        members: dict[tuple, list[int]] = {}
        for index, teacher in enumerate(teachers):
            members.setdefault(_group_key(teacher), []).append(index)
        self.groups = [
            _TeacherGroup(indices, [teachers[i] for i in indices], compile)
            for indices in members.values()
        ]
        self._group_of = {index: group for group in self.groups for index in group.members}

    def __len__(self) -> int:
        return len(self._group_of)

    def loss(
        self,
        images_per_teacher: Sequence[torch.Tensor],
        targets_per_teacher: Sequence[torch.Tensor],
        weights: DeepInversionWeights | None = None,
        jitter: int = 2,
        generator: torch.Generator | None = None,
        indices: Sequence[int] | None = None,
        shifts: torch.Tensor | None = None,
        teacher_weights: Sequence[float] | None = None,
    ) -> tuple[InversionLoss, list[torch.Tensor]]:
        """`deep_inversion_loss_over_teachers` in one vmapped call per group, plus each teacher's
        logits (FREE's adversarial term needs them).

        `indices` names the teacher of each image tensor (default: all, in order). `shifts`
        [len, 2] replaces the jitter draws when a caller must draw them earlier (FREE keeps the
        loop's RNG order that way); otherwise one `draw_shift` per teacher, in order.
        `teacher_weights` scales each position's total, as in the loop.
        """
        weights = weights or DeepInversionWeights()
        indices = list(range(len(self))) if indices is None else list(indices)
        check_one_per_teacher(len(indices), images_per_teacher, targets_per_teacher)
        scales = torch.tensor(check_teacher_weights(len(indices), teacher_weights))
        if shifts is None:
            shifts = draw_jitter_shifts(len(indices), jitter, generator)
        totals, terms = [], []
        logits: list[torch.Tensor | None] = [None] * len(indices)
        for batch in self._batches(indices, images_per_teacher, targets_per_teacher):
            if weights.bn != 0 and not batch.group.has_running_stats:
                raise ValueError(
                    "a BatchNorm2d layer keeps no running statistics; nothing to match against"
                )
            images = vmap_layout(torch.stack([images_per_teacher[p] for p in batch.positions]))
            if shifts is not None:
                images = roll_each(images, shifts[batch.positions])
            targets = torch.stack([targets_per_teacher[p] for p in batch.positions])
            rows = [batch.group.row[indices[p]] for p in batch.positions]
            total, term, logit = batch.group.loss(rows, images, targets, weights)
            scale = scales[batch.positions].to(device=total.device, dtype=total.dtype)
            totals.append((scale * total).sum())
            terms.append(term.detach().sum(0))
            for position, value in zip(batch.positions, logit.unbind(0)):
                logits[position] = value
        loss = InversionLoss(torch.stack(totals).sum(), torch.stack(terms).sum(0))
        return loss, logits  # type: ignore[return-value]  # every position was filled

    def _batches(
        self,
        indices: list[int],
        images_per_teacher: Sequence[torch.Tensor],
        targets_per_teacher: Sequence[torch.Tensor],
    ) -> list[_Batch]:
        """Split the call by group, then by image and target shapes (stacking needs equal ones)."""
        batches: dict[tuple, _Batch] = {}
        for position, index in enumerate(indices):
            if index not in self._group_of:
                raise ValueError(f"no teacher {index}: {len(self)} teachers were stacked")
            group = self._group_of[index]
            key = (
                id(group),
                tuple(images_per_teacher[position].shape),
                tuple(targets_per_teacher[position].shape),
            )
            batches.setdefault(key, _Batch(group, [])).positions.append(position)
        return list(batches.values())
