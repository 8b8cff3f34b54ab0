"""The DeepInversion loss (Yin et al., 2020) as PURER's ECI data step uses it, teacher by teacher.

The loss on pseudo images x for a frozen teacher T and target classes y is

    ce * CE(T(jitter(x)), y) + bn * sum_l BN_l + tv * TV(jitter(x)) + l2 * ||jitter(x)||_2

where BN_l matches the batch statistics of the input of T's l-th BatchNorm layer to that layer's
running statistics. The forms follow the authors' code (see each function), so PURER's default
weights mean what they mean there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dfml_bench.inversion.precision import at_least_float32


@dataclass
class BNStatistics:
    """BN-matching losses of the hooked BatchNorm layers: one per layer per forward pass."""

    losses: list[torch.Tensor] = field(default_factory=list)

    def total(self) -> torch.Tensor:
        """Sum over layers (and over forward passes, if several ran inside the context)."""
        if not self.losses:
            raise RuntimeError("no BatchNorm layer ran: call the model inside the context")
        return torch.stack(self.losses).sum()


def channel_statistics(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every dimension but the channel one (dim 1).

    Two-pass, on a [values, channels] view (a free reshape of channels_last inputs): forward and
    backward run 1.4-3x faster on CPU than `var_mean` or reducing over dims (0, 2, 3)."""
    channels = inputs.movedim(1, -1).reshape(-1, inputs.shape[1])
    mean = channels.mean(dim=0)
    return mean, (channels - mean).square().mean(dim=0)


def _bn_matching_loss(module: nn.BatchNorm2d, inputs: torch.Tensor) -> torch.Tensor:
    """||mean - running_mean||_2 + ||var - running_var||_2 over channels, for one layer's input.

    `var` is the BIASED batch variance (as the authors' code), while PyTorch's running_var averages
    unbiased ones; for a real batch (n = N*H*W values per channel) the n/(n-1) gap is negligible.
    """
    # under bfloat16 autocast: statistics in float32 all the same
    mean, var = channel_statistics(at_least_float32(inputs))
    return torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(
        var - module.running_var
    )


@contextmanager
def bn_feature_statistics(model: nn.Module) -> Iterator[BNStatistics]:
    """Hook every `nn.BatchNorm2d` of `model`; forward passes inside add their BN-matching losses.

    The model must be in eval mode: in train mode BatchNorm would first update its running
    statistics with the very batch being matched (and corrupt the teacher). The hooks are removed on
    exit, also when the body raises.
    """
    layers = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    if not layers:
        raise ValueError("the model has no BatchNorm2d layer, so there are no statistics to match")
    if any(layer.training for layer in layers):
        raise ValueError("put the model in eval mode before matching its BatchNorm statistics")
    if any(layer.running_mean is None or layer.running_var is None for layer in layers):
        raise ValueError(
            "a BatchNorm2d layer keeps no running statistics; nothing to match against"
        )
    statistics = BNStatistics()

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        statistics.losses.append(_bn_matching_loss(module, inputs[0]))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield statistics
    finally:
        for handle in handles:
            handle.remove()


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """DeepInversion's L2 smoothness prior: the sum of the Frobenius norms of the differences
    between each pixel and its right, lower and two diagonal neighbours (the authors'
    `loss_var_l2`; not squared, not averaged)."""
    horizontal = images[..., :, :-1] - images[..., :, 1:]
    vertical = images[..., :-1, :] - images[..., 1:, :]
    diagonal = images[..., 1:, :-1] - images[..., :-1, 1:]
    anti_diagonal = images[..., :-1, :-1] - images[..., 1:, 1:]
    diffs = (horizontal, vertical, diagonal, anti_diagonal)
    return torch.stack([torch.linalg.vector_norm(diff) for diff in diffs]).sum()


def l2_prior(images: torch.Tensor) -> torch.Tensor:
    """The norm of the whole batch, `torch.norm(images, 2)` in the authors' code: keeps pixel
    values from drifting far outside the normalised data range."""
    return torch.linalg.vector_norm(images)


def random_jitter(
    images: torch.Tensor, max_shift: int = 2, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Roll the batch by one random (dy, dx), each uniform in [-max_shift, max_shift], with
    wrap-around, as DeepInversion does: the teacher never sees the same pixel grid twice, which
    suppresses high-frequency adversarial patterns. Differentiable; the shift is shared by the
    batch."""
    if max_shift == 0:
        return images
    dy, dx = draw_shift(max_shift, generator)
    return torch.roll(images, shifts=(int(dy), int(dx)), dims=(-2, -1))


def draw_shift(max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The (dy, dx) of one `random_jitter` call, on the generator's device: the one RNG call a
    jitter makes, shared with the vectorised path so both consume the stream identically."""
    device = generator.device if generator is not None else None
    return torch.randint(-max_shift, max_shift + 1, (2,), generator=generator, device=device)


@dataclass
class DeepInversionWeights:
    """Term weights; the defaults are PURER's (its ECI scripts)."""

    ce: float = 1.0
    bn: float = 0.01
    tv: float = 1e-4
    l2: float = 1e-5


@dataclass
class InversionLoss:
    """`total` is the weighted loss (differentiable w.r.t. the images); `terms` holds the UNWEIGHTED
    (ce, bn, tv, l2), detached and still on the device. Reading `.ce`, `.bn`, `.tv` or `.l2`
    copies all four to the host once (one device sync per loss, none while losses are summed)."""

    total: torch.Tensor
    terms: torch.Tensor
    logits: torch.Tensor | None = field(default=None, repr=False)  # teacher's, single loss only
    _values: list[float] | None = field(default=None, init=False, repr=False, compare=False)

    def values(self) -> list[float]:
        """[ce, bn, tv, l2] as floats, fetched from the device on first use."""
        if self._values is None:
            self._values = self.terms.tolist()
        return self._values

    @property
    def ce(self) -> float:
        return self.values()[0]

    @property
    def bn(self) -> float:
        return self.values()[1]

    @property
    def tv(self) -> float:
        return self.values()[2]

    @property
    def l2(self) -> float:
        return self.values()[3]

    def __repr__(self) -> str:
        ce, bn, tv, l2 = self.values()
        return f"InversionLoss(ce={ce:.4g}, bn={bn:.4g}, tv={tv:.4g}, l2={l2:.4g})"


@contextmanager
def _parameters_frozen(model: nn.Module) -> Iterator[None]:
    """Turn off requires_grad on `model`'s parameters for the body, then restore the flags.

    A graph built inside never records the parameters, so a later `.backward()` on it leaves their
    `.grad` untouched, even after the flags are restored (the teacher may be trained elsewhere).
    """
    flags = [(param, param.requires_grad) for param in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def fit_to_teacher(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize to the teacher's `image_size` (set by `build_model`) when it differs, so
    one image pool can serve teachers trained at different resolutions."""
    size = getattr(teacher, "image_size", None)
    if size is None or images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )


def deep_inversion_loss(
    teacher: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    weights: DeepInversionWeights | None = None,
    jitter: int = 2,
    generator: torch.Generator | None = None,
) -> InversionLoss:
    """The DeepInversion loss of `images` [N, 3, H, W] (normalised pixels) for `teacher`.

    `targets` are the teacher's own (local) class indices. The teacher must be in eval mode; its
    parameters never receive a gradient. The priors are computed on the jittered images at their own
    resolution; only the teacher sees them resized. With `weights.bn == 0` the BN term is skipped,
    so models without running statistics can be inverted too.
    """
    weights = weights or DeepInversionWeights()
    if teacher.training:
        raise ValueError("the teacher must be in eval mode (call .eval()) to be inverted")
    jittered = random_jitter(images, jitter, generator)
    teacher_input = fit_to_teacher(teacher, jittered)
    with _parameters_frozen(teacher):
        if weights.bn == 0:
            logits = teacher(teacher_input)
            bn = torch.zeros((), device=images.device)
        else:
            with bn_feature_statistics(teacher) as statistics:
                logits = teacher(teacher_input)
            bn = statistics.total()
        logits = at_least_float32(logits)
        ce = F.cross_entropy(logits, targets)
    tv = total_variation(jittered)
    l2 = l2_prior(jittered)
    total = weights.ce * ce + weights.bn * bn + weights.tv * tv + weights.l2 * l2
    return InversionLoss(total, torch.stack([ce, bn, tv, l2]).detach(), logits=logits)


def check_one_per_teacher(
    teachers: int,
    images_per_teacher: Sequence[torch.Tensor],
    targets_per_teacher: Sequence[torch.Tensor],
) -> None:
    """Every zoo-wide inversion (loop or vectorised) takes one image and one target tensor per
    teacher; say which counts disagree."""
    if not teachers:
        raise ValueError("no teachers to invert")
    if not teachers == len(images_per_teacher) == len(targets_per_teacher):
        raise ValueError(
            f"{teachers} teachers but {len(images_per_teacher)} image tensors and "
            f"{len(targets_per_teacher)} target tensors; give one of each per teacher"
        )


def deep_inversion_loss_over_teachers(
    teachers: Sequence[nn.Module],
    images_per_teacher: Sequence[torch.Tensor],
    targets_per_teacher: Sequence[torch.Tensor],
    weights: DeepInversionWeights | None = None,
    jitter: int = 2,
    generator: torch.Generator | None = None,
    teacher_weights: Sequence[float] | None = None,
    shifts: torch.Tensor | None = None,
) -> InversionLoss:
    """The sum of `deep_inversion_loss` over teachers, each with its own images and local targets:
    the objective of one ECI data step, which updates the pseudo images of every teacher at once.

    `teacher_weights` scales each teacher's total (default 1 each; `eci_teacher_weights`), the
    unweighted `terms` stay plain sums. `shifts` [teachers, 2] replaces the jitter draws (a
    recorded step replayed); otherwise one draw per teacher, in order."""
    check_one_per_teacher(len(teachers), images_per_teacher, targets_per_teacher)
    scales = check_teacher_weights(len(teachers), teacher_weights)
    losses = []
    for index, (teacher, images, targets) in enumerate(
        zip(teachers, images_per_teacher, targets_per_teacher)
    ):
        if shifts is None:
            loss = deep_inversion_loss(teacher, images, targets, weights, jitter, generator)
        else:
            rolled = torch.roll(images, shifts=tuple(shifts[index].tolist()), dims=(-2, -1))
            loss = deep_inversion_loss(teacher, rolled, targets, weights, jitter=0)
        losses.append(loss)
    total = torch.stack([scale * loss.total for scale, loss in zip(scales, losses)]).sum()
    return InversionLoss(total, torch.stack([loss.terms for loss in losses]).sum(0))


def check_teacher_weights(teachers: int, teacher_weights: Sequence[float] | None) -> list[float]:
    """One non-negative weight per teacher (all 1 when none are given)."""
    if teacher_weights is None:
        return [1.0] * teachers
    if len(teacher_weights) != teachers or any(w < 0 for w in teacher_weights):
        raise ValueError(
            f"give one non-negative weight per teacher: {teachers} teachers, "
            f"weights {list(teacher_weights)}"
        )
    return [float(w) for w in teacher_weights]


TeacherWeighting = Literal["cumulative", "plain"]


def eci_teacher_weights(teachers: int, weighting: TeacherWeighting) -> list[float]:
    """Per-teacher weights of ECI's inversion objective. `plain`: each teacher once (the paper's
    sum). `cumulative`: teacher j (0-based) weighted N - j, as the authors' main.py computes it
    (it adds a running sum of the teachers' losses to the objective after every teacher)."""
    if weighting == "plain":
        return [1.0] * teachers
    return [float(teachers - j) for j in range(teachers)]
