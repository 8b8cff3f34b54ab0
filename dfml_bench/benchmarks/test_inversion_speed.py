"""Data-recovery speed: PURER's ECI data step and one meta-iteration (13 Conv4 teachers), teachers
one by one (the loop, the reference) against vectorised over the zoo (torch.func.vmap), eager or
compiled (`inversion_compile`: the warm-up round compiles, so the timed rounds run the compiled
kernels); FREE's generator adaptation and one epoch without replay (4 teachers, one after the
other, as the authors' code recovers them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfml_bench.benchmarks.helpers import SMOKE, measure, sized
from dfml_bench.inversion import DeepInversionWeights
from dfml_bench.inversion.generator import Generator
from dfml_bench.inversion.pixels import CropFlip, Normalisation
from dfml_bench.inversion.pool import PseudoImagePool
from dfml_bench.inversion.vectorised import StackedTeachers
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.meta.maml import maml_outer_loss
from dfml_bench.methods import create_method
from dfml_bench.methods.free import (
    Recovery,
    RecoveryTarget,
    Student,
    distil_and_align,
    meta_generator_step,
    recover_task,
)
from dfml_bench.methods.purer import eci_data_step
from dfml_bench.models import build_model

STRATEGIES = ["loop", "vectorised"]
COMPILED = "vectorised compiled"


def _teachers(count: int, device: torch.device) -> list[nn.Module]:
    """Frozen Conv4 teachers in eval mode with non-trivial BN running statistics."""
    torch.manual_seed(0)
    teachers = []
    for _ in range(count):
        teacher = build_model("conv4", 5, 32)
        for layer in teacher.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.normal_(0, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
        teacher = teacher.eval().requires_grad_(False).to(device)
        teachers.append(teacher.to(memory_format=torch.channels_last))
    return teachers


def _zoo(strategy: str, count: int, device: torch.device) -> list[nn.Module] | StackedTeachers:
    teachers = _teachers(count, device)
    if strategy == "loop":
        return teachers
    return StackedTeachers(teachers, compile=strategy == COMPILED)


def _opt_in(strategy: str, precision: str = "float32") -> str | None:
    """The setting a variant needs beyond the defaults (None: `auto` may run it)."""
    needs = [f"inversion_precision: {precision}"] if precision != "float32" else []
    needs += ["inversion_compile: true"] if strategy == COMPILED else []
    return ", ".join(needs) or None


def _pool(teachers: int, per_class: int, device: torch.device) -> PseudoImagePool:
    classes = [list(range(5 * t, 5 * t + 5)) for t in range(teachers)]
    return PseudoImagePool(classes, per_class, 32, torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize(
    ("strategy", "precision"),
    [
        ("loop", "float32"),
        ("vectorised", "float32"),
        (COMPILED, "float32"),
        ("loop", "bfloat16"),
        ("vectorised", "bfloat16"),
    ],
)
def test_eci_data_step(benchmark, device: torch.device, strategy: str, precision: str) -> None:
    """One ECI data step: DeepInversion loss of 13 teachers, each on its 5 classes x 20 images,
    backward, Adam on the pool (PURER's 5-shot setting); teacher passes in float32 or under
    bfloat16 autocast (`inversion_precision`)."""
    count = sized(13, 3)
    zoo, pool = _zoo(strategy, count, device), _pool(count, 20, device)
    optimizer = torch.optim.Adam(pool.parameters(), lr=0.25)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        eci_data_step(
            zoo, pool, optimizer, DeepInversionWeights(), 2, generator, precision=precision
        )

    measure(
        benchmark,
        step,
        device,
        group="PURER ECI data step",
        variant=strategy if precision == "float32" else f"{strategy} bf16",
        baseline=strategy == "loop" and precision == "float32",
        settings=f"{count} conv4 teachers x 5 classes x 20 images, 32px, Adam",
        reference_ms=297.0,
        tasks_per_call=count,  # one 5-way task of 20 images per class per teacher
        rounds=10,
        opt_in=_opt_in(strategy, precision),
    )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_purer_meta_iteration(benchmark, device: torch.device, strategy: str) -> None:
    """One PURER meta-iteration without the curriculum: the ECI data step, then a MAML
    meta-batch of 4 pseudo 5-way 5-shot tasks (1 inner step, second order) and Adam."""
    count = sized(13, 3)
    zoo, pool = _zoo(strategy, count, device), _pool(count, 20, device)
    data_optimizer = torch.optim.Adam(pool.parameters(), lr=0.25)
    model = use_batch_statistics(build_model("conv4", 5, 32)).to(device)
    meta_optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def iteration() -> None:
        eci_data_step(zoo, pool, data_optimizer, DeepInversionWeights(), 2, generator)
        tasks = [pool.sample_task(5, 5, 15, generator) for _ in range(4)]
        loss, _ = maml_outer_loss(model, dict(model.named_parameters()), tasks, 1, 0.01)
        meta_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        meta_optimizer.step()

    measure(
        benchmark,
        iteration,
        device,
        group="PURER meta-iteration",
        variant=strategy,
        baseline=strategy == "loop",
        settings=f"{count} conv4 teachers, 5-way 5-shot pseudo tasks, meta-batch 4",
        reference_ms=359.0,
        rounds=5,
    )


def _free(device: torch.device):
    """FREE at the paper's settings (generator width 64, 5 steps, 20 images per class) with 4
    sampled teachers, recovered one after the other as the authors' code does."""
    smoke = {"generator_width": 8, "per_class": 2, "generator_steps": 1} if SMOKE else {}
    settings = create_method("free", smoke).settings
    count = sized(4, 2)
    teachers = _teachers(count, device)
    student = use_batch_statistics(build_model("conv4", 5, 32)).to(device)
    student_params = Student(student, {k: v.detach() for k, v in student.named_parameters()})
    meta_gen = Generator(32, settings.latent_dim, settings.generator_width).to(device)
    optimizer = torch.optim.Adam(meta_gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    normalisation = Normalisation((0.5,) * 3, (0.25,) * 3)
    targets = [
        RecoveryTarget(t, normalisation, list(range(5)), 0, i) for i, t in enumerate(teachers)
    ]
    generator = torch.Generator().manual_seed(0)

    def synthesize() -> list[Recovery]:
        recoveries = []
        for target in targets:
            latent = torch.randn(5 * settings.per_class, settings.latent_dim, generator=generator)
            recoveries.append(
                recover_task(
                    meta_gen,
                    target,
                    latent.to(device),
                    settings,
                    student_params,
                    lambda: CropFlip.draw(4, generator),
                )
            )
        meta_generator_step(meta_gen, optimizer, [r.meta_gradient for r in recoveries])
        return recoveries

    return settings, teachers, student, synthesize


def test_free_synthesize(benchmark, device: torch.device) -> None:
    """FREE's data recovery per epoch: 4 teachers x 5 generator steps, 400 images, and the
    meta-generator's step."""
    *_, synthesize = _free(device)
    measure(
        benchmark,
        synthesize,
        device,
        group="FREE synthesize (4 teachers x 5 steps)",
        variant="loop",
        baseline=True,
        settings="generator width 64, 4 conv4 teachers x 5 classes x 20 images, 32px",
        reference_ms=300.0,
        tasks_per_call=4,
        rounds=3 if device.type == "cpu" else 10,
    )


def test_free_epoch_without_replay(benchmark, device: torch.device) -> None:
    """One FREE epoch minus the replay loop: synthesize, then the implicit gradient alignment of
    the meta-learner on the 4 teachers (one fast-copy Adam step each, then the Reptile step)."""
    settings, teachers, student, synthesize = _free(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=settings.outer_lr)
    normalisation = Normalisation((0.5,) * 3, (0.25,) * 3)

    def epoch() -> None:
        inputs = [normalisation.apply(r.pixels) for r in synthesize()]
        distil_and_align(student, optimizer, teachers, inputs, settings)

    measure(
        benchmark,
        epoch,
        device,
        group="FREE epoch without replay",
        variant="loop",
        baseline=True,
        settings="4 conv4 teachers, generator width 64, one KD step per teacher + Reptile step",
        rounds=3 if device.type == "cpu" else 10,
    )
