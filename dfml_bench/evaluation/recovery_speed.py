"""Time to quality: how long a method takes to recover ONE task its teacher recognises.

FREE's speed claim (about 20x) is that a meta-learned generator recovers a task in a few steps
where inverting from scratch takes hundreds. Seconds per image of a fixed budget measure neither,
so each data-recovering run ends with probes: for a few teachers of the zoo (the same teachers
for every method of a seed), it recovers the teacher's task again, one update at a time, until
the teacher assigns at least `threshold` of the recovered images to their target classes, or
`max_steps` updates have passed. Every method is judged by the same teacher on the images it
would train on (no augmentation). The runs record the median seconds and updates over probes,
the share of probes that reached the quality, and the probe-wise ratios between recoverers.

A second judge independent of the inverted teacher would need another teacher covering all of a
task's classes; the zoos here draw each teacher's classes at random, so none does.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, Field
from torch import nn

from dfml_bench.device import synchronize
from dfml_bench.inversion.deepinversion import (
    DeepInversionWeights,
    deep_inversion_loss,
    fit_to_teacher,
)

PROBE_SEED_OFFSET = 7_000_003  # probes draw their own numbers, never the training's


class TimeToQualitySettings(BaseModel):
    """Mixed into the settings of methods that recover data."""

    time_to_quality_probes: int = Field(
        5, ge=0, description="teachers probed after meta-training (0: no measurement)"
    )
    time_to_quality_threshold: float = Field(
        0.9, gt=0, le=1, description="share of images the teacher must assign to their class"
    )
    time_to_quality_max_steps: int = Field(
        200, ge=1, description="updates before a probe counts as not reached"
    )


@dataclass(frozen=True)
class TimeToQuality:
    steps: int | None  # updates until the quality was reached; None: not within max_steps
    seconds: float  # until reached (or spent on max_steps updates), quality checks included
    quality: float  # share of images the teacher assigned to their class at the end


def teacher_agreement(teacher: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of `inputs` (normalised) the teacher classifies as their target."""
    with torch.no_grad():
        logits = teacher(fit_to_teacher(teacher, inputs))
    return float((logits.argmax(1) == targets).float().mean())


def time_to_quality(
    step: Callable[[], object],
    judge: Callable[[], float],
    threshold: float,
    max_steps: int,
    device: torch.device,
) -> TimeToQuality:
    """Run `step` until `judge()` reaches `threshold` (judged before the first step too)."""
    synchronize(device)
    started = time.perf_counter()
    quality, steps = judge(), 0
    while quality < threshold and steps < max_steps:
        step()
        steps += 1
        quality = judge()
    seconds = time.perf_counter() - started
    return TimeToQuality(steps if quality >= threshold else None, seconds, quality)


def probe_teachers(teachers: int, probes: int, seed: int) -> list[int]:
    """The zoo indices a seed probes: the same for every method of that seed."""
    generator = torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET)
    return torch.randperm(teachers, generator=generator)[: min(probes, teachers)].tolist()


def probe_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + PROBE_SEED_OFFSET + 1)


class PoolRecovery:
    """A fresh block of pseudo images for one teacher, updated as ECI updates its pool: Adam on
    the DeepInversion loss (normalised pixel space, jittered). The per-teacher share of ECI's data
    step, which updates every teacher's block at once."""

    def __init__(
        self,
        teacher: nn.Module,
        classes: int,
        per_class: int,
        image_size: int,
        weights: DeepInversionWeights,
        jitter: int,
        lr: float,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.teacher, self.weights, self.jitter, self.generator = (
            teacher,
            weights,
            jitter,
            generator,
        )
        self.targets = torch.arange(classes, device=device).repeat(per_class)
        images = torch.randn(classes * per_class, 3, image_size, image_size, generator=generator)
        self.images = images.to(device).requires_grad_()
        self.optimizer = torch.optim.Adam([self.images], lr=lr)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = deep_inversion_loss(
            self.teacher, self.images, self.targets, self.weights, self.jitter, self.generator
        )
        loss.total.backward()
        self.optimizer.step()

    def quality(self) -> float:
        return teacher_agreement(self.teacher, self.images.detach(), self.targets)


def summarise(results: dict[str, list[TimeToQuality]], max_steps: int) -> dict[str, float]:
    """Record fields per recoverer: median seconds and updates over probes (a probe that did not
    reach the quality counts with what it spent, max_steps updates), and the share reached."""
    fields: dict[str, float] = {}
    for name, probes in results.items():
        if not probes:
            continue
        fields[f"ttq_{name}_s"] = statistics.median(p.seconds for p in probes)
        fields[f"ttq_{name}_steps"] = float(
            statistics.median(max_steps if p.steps is None else p.steps for p in probes)
        )
        fields[f"ttq_{name}_reached"] = sum(p.steps is not None for p in probes) / len(probes)
    return fields


def speedup(slow: list[TimeToQuality], fast: list[TimeToQuality], name: str) -> dict[str, float]:
    """Slow seconds / fast seconds per probe task (the same task for both): the median and the
    smallest and largest, as record fields `ttq_speedup_<name>`, `_min`, `_max`."""
    ratios = [s.seconds / max(f.seconds, 1e-9) for s, f in zip(slow, fast)]
    return {
        f"ttq_speedup_{name}": statistics.median(ratios),
        f"ttq_speedup_{name}_min": min(ratios),
        f"ttq_speedup_{name}_max": max(ratios),
    }
