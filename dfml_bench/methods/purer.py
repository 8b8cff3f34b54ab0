"""PURER (Hu et al., CVPR 2023): Episode Curriculum Inversion (ECI) + MAML, with ICFIL at test.

Each meta-iteration takes one Adam step on a learnable pool of pseudo images (the DeepInversion
loss summed over all teachers; with the curriculum on and the meta-model's training accuracy on a
plateau, the step also MAXIMISES the meta-model's outer loss), then one second-order MAML step on
pseudo N-way K-shot tasks drawn across the whole class pool. The meta-model starts from the zoo
Average when the zoo has the meta-model's architecture, otherwise from a random init.

Variants (separate table rows): `purer` (ECI + ICFIL), `purer-no-eci` (plain inversion: the same
per-iteration DeepInversion steps, never the curriculum), `purer-no-icfil` (ECI, plain fine-tuning
at test).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dfml_bench.cost import RunShape, WorkRates
from dfml_bench.data.task import Task
from dfml_bench.device import synchronize
from dfml_bench.errors import DfmlError
from dfml_bench.evaluation.recovery_speed import (
    PoolRecovery,
    TimeToQuality,
    TimeToQualitySettings,
    probe_generator,
    probe_teachers,
    summarise,
    time_to_quality,
)
from dfml_bench.fidelity import FidelitySettings
from dfml_bench.inversion import (
    DeepInversionWeights,
    InversionLoss,
    TeacherWeighting,
    deep_inversion_loss_over_teachers,
    eci_teacher_weights,
)
from dfml_bench.inversion.pool import PseudoImagePool, save_task_grid
from dfml_bench.inversion.precision import InversionPrecision, inversion_autocast
from dfml_bench.inversion.settings import InversionSpeedSettings
from dfml_bench.inversion.vectorised import StackedTeachers
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.meta.loop import TrainingLoop, descend
from dfml_bench.meta.maml import maml_outer_loss, meta_batch_loss
from dfml_bench.methods.base import Checkpoint, MetaTrainContext, Method, register_method
from dfml_bench.models import build_model
from dfml_bench.records import RunRecord
from dfml_bench.zoo.fusion import Accumulation, FusedHead, average_of_zoo, set_head

PER_CLASS_BY_SHOTS = {1: 16, 5: 20}  # the authors' synthesis sizes (K + 15 queries otherwise)

CurriculumTrigger = Literal["authors", "all-time-best"]


class PurerSettings(InversionSpeedSettings, TimeToQualitySettings, FidelitySettings):
    """Defaults are the authors' scripts'; budgets are reduced in configs, not here."""

    model_config = ConfigDict(extra="forbid")
    PROFILE_VALUES = {
        "start_accumulation": {"authors": "doubled", "corrected": "mean"},
        "start_head": {"authors": "keep", "corrected": "zero"},
        "teacher_weighting": {"authors": "cumulative", "corrected": "plain"},
    }
    iterations: int = Field(60_000, ge=1, description="meta-iterations (x meta_batch tasks)")
    meta_batch: int = Field(4, ge=1)
    inner_steps: int = Field(1, ge=1)
    inner_lr: float = Field(0.01, gt=0)
    outer_lr: float = Field(1e-3, gt=0)
    second_order: bool = True
    queries: int = Field(15, ge=1, description="query images per class in pseudo tasks")
    per_class: int | None = Field(None, ge=1, description="None: 16 (1-shot) / 20 (5-shot)")
    pool_lr: float = Field(0.25, gt=0)
    bn_weight: float = Field(0.01, ge=0)
    tv_weight: float = Field(1e-4, ge=0)
    l2_weight: float = Field(1e-5, ge=0)
    jitter: int = Field(2, ge=0)
    curriculum_start: int = Field(
        4000, ge=0, description="meta-iteration after which the first adversarial step runs"
    )
    curriculum_patience: int = Field(6, ge=1)
    curriculum_trigger: CurriculumTrigger = Field(
        "authors",
        description="authors: fire at curriculum_start, then after `patience` iterations "
        "without a strict improvement since the last fire; all-time-best: never forced, "
        "plateaus measured against the best accuracy since iteration 1",
    )
    adversarial_weight: float = Field(10.0, ge=0)
    teacher_weighting: TeacherWeighting | None = Field(
        None,
        description="inversion objective: teacher j weighted N - j (cumulative, the authors' "
        "running sum) or each teacher once (plain, the paper's sum)",
    )
    start_accumulation: Accumulation | None = Field(
        None, description="zoo Average it starts from: doubled (authors' FedAvg) or mean"
    )
    start_head: FusedHead | None = Field(
        None, description="head of the Average it starts from: keep (authors) or zero / reinit"
    )
    eval_interval: int | None = Field(
        500,
        ge=1,
        description="meta-iterations between evaluations (authors: --val_interval 2000 tasks "
        "/ 4 per meta-batch); None: the final model only",
    )


class CurriculumSwitch:
    """When ECI's next data step is adversarial, from the meta-model's training accuracy.

    `authors` (their main.py): fires at the end of iteration `start` whatever the accuracy; from
    then on it fires when `patience` iterations in a row bring no STRICT improvement over the
    reference, which restarts empty after each fire (the next accuracy becomes it).
    `all-time-best`: never forced; tracks the best accuracy from iteration 1, never resets it, and
    past `start` fires every `patience` iterations while the accuracy stays below it.
    """

    def __init__(self, start: int, patience: int, trigger: CurriculumTrigger = "authors") -> None:
        self.start, self.patience, self.trigger = start, patience, trigger
        self.best: float | None = None
        self.stale = 0

    def update(self, iteration: int, accuracy: float) -> bool:
        """Record iteration `iteration`'s accuracy (1-based); True: the next data step is
        adversarial."""
        if self.trigger == "authors":
            if iteration == self.start:
                return True
            if iteration < self.start:
                return False
        if self.best is None or accuracy > self.best:
            self.best, self.stale = accuracy, 0
            return False
        self.stale += 1
        if iteration >= self.start and self.stale >= self.patience:
            self.stale = 0
            if self.trigger == "authors":
                self.best = None
            return True
        return False

    def state(self) -> list[float | int | None]:
        return [self.best, self.stale]

    def load(self, state: list[float | int | None]) -> None:
        best, stale = state
        # resume states written before the reference could be empty stored -inf for "none yet"
        self.best = None if best is None or best == float("-inf") else float(best)
        self.stale = int(stale)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Adversary:
    """The curriculum's extra objective: maximise this meta-model's MAML outer loss on a pseudo
    task drawn from the pool (or on `task`, built from the pool without detaching it)."""

    model: nn.Module
    weight: float
    inner_steps: int
    inner_lr: float
    task: Task | None = None


def eci_data_step(
    teachers: Sequence[nn.Module] | StackedTeachers,
    pool: PseudoImagePool,
    optimizer: torch.optim.Optimizer,
    weights: DeepInversionWeights,
    jitter: int,
    generator: torch.Generator,
    adversary: Adversary | None = None,
    task_shape: tuple[int, int, int] = (5, 1, 15),
    precision: InversionPrecision = "float32",
    teacher_weights: Sequence[float] | None = None,
    shifts: torch.Tensor | None = None,
) -> InversionLoss:
    """One Adam step on the pool: the DeepInversion loss over teachers (each on its own block,
    scaled by `teacher_weights`, see `eci_teacher_weights`), minus `adversary.weight` x the
    meta-model's outer loss on a pseudo task of `task_shape` (ways, shots, queries) when an
    adversary is given. Only the pool changes. `shifts` replays recorded jitter offsets.

    Stacked teachers compute the same loss in one vmapped call per architecture; a list of
    teachers inverts them one by one (the reference, and the faster path on a CPU)."""
    optimizer.zero_grad(set_to_none=True)
    blocks, targets = list(pool.blocks), pool.local_labels
    with inversion_autocast(precision, pool.blocks[0].device):
        if isinstance(teachers, StackedTeachers):
            inversion, _ = teachers.loss(
                blocks,
                targets,
                weights,
                jitter,
                generator,
                shifts=shifts,
                teacher_weights=teacher_weights,
            )
        else:
            inversion = deep_inversion_loss_over_teachers(
                teachers, blocks, targets, weights, jitter, generator, teacher_weights, shifts
            )
    objective = inversion.total
    if adversary is not None:
        task = adversary.task or pool.sample_task(*task_shape, generator, detach=False)
        params = {k: v.detach().requires_grad_() for k, v in adversary.model.named_parameters()}
        outer, _ = maml_outer_loss(
            adversary.model, params, [task], adversary.inner_steps, adversary.inner_lr
        )
        objective = objective - adversary.weight * outer
    objective.backward()
    optimizer.step()
    return inversion


@register_method
class Purer(Method):
    name = "purer"
    display_name = "PURER"
    table_order = 4
    Settings = PurerSettings
    uses_icfil = True
    curriculum: ClassVar[bool] = True
    smoke_settings: ClassVar[dict[str, Any]] = {
        "iterations": 8,
        "eval_interval": 3,
        "per_class": 6,
        "queries": 3,
        "meta_batch": 2,
        "curriculum_start": 2,
        "curriculum_patience": 1,
        "time_to_quality_probes": 1,
        "time_to_quality_max_steps": 3,
    }
    cost_assumption = (
        "PURER: iterations x (ECI data step scaled to the zoo's teacher images + the MAML part "
        "of a meta-iteration scaled to the meta-batch); the curriculum's adversarial term is not "
        "counted"
    )

    @classmethod
    def meta_training_seconds(cls, settings: BaseModel, run: RunShape, rates: WorkRates) -> float:
        s: PurerSettings = settings  # type: ignore[assignment]
        per_class = s.per_class or PER_CLASS_BY_SHOTS.get(run.shots, run.shots + s.queries)
        data_step = rates.eci_image * per_class * run.teacher_load
        maml = rates.maml_image * s.meta_batch * run.meta_flops * run.task(s.queries, s.inner_steps)
        return s.iterations * (data_step + maml)

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        settings: PurerSettings = self.settings  # type: ignore[assignment]
        device = context.device
        torch.manual_seed(context.seed)
        generator = torch.Generator().manual_seed(context.seed)
        per_class = settings.per_class or PER_CLASS_BY_SHOTS.get(
            context.shots, context.shots + settings.queries
        )
        if per_class < context.shots + settings.queries:
            raise DfmlError(
                f"per_class={per_class} cannot fill {context.shots}-shot tasks with "
                f"{settings.queries} queries; set per_class >= {context.shots + settings.queries}"
            )
        teachers: list[nn.Module] | StackedTeachers = context.zoo.frozen_teachers(context.device)
        if settings.vectorised_on(device):
            teachers = StackedTeachers(teachers, compile=settings.inversion_compile)
        model = self._initial_model(context).to(device, memory_format=torch.channels_last)
        pool = PseudoImagePool(
            [teacher.class_ids for teacher in context.zoo.teachers],
            per_class,
            context.meta_model.image_size,
            generator,
        ).to(device)
        weights = DeepInversionWeights(
            bn=settings.bn_weight, tv=settings.tv_weight, l2=settings.l2_weight
        )
        data_optimizer = torch.optim.Adam(pool.parameters(), lr=settings.pool_lr)
        meta_optimizer = torch.optim.Adam(model.parameters(), lr=settings.outer_lr)
        switch = (
            CurriculumSwitch(
                settings.curriculum_start,
                settings.curriculum_patience,
                settings.curriculum_trigger,
            )
            if self.curriculum
            else None
        )
        teacher_weights = eci_teacher_weights(len(context.zoo.teachers), settings.teacher_weighting)
        adversarial, adversarial_steps = False, 0
        first_adversarial: int | None = None  # meta-iteration of the first adversarial step
        self.timings.images_recovered = pool.num_images

        def extra_state() -> dict[str, object]:
            return {
                "curriculum": None if switch is None else switch.state(),
                "adversarial": [adversarial, adversarial_steps, first_adversarial],
            }

        def restore_extra(saved: dict[str, Any]) -> None:
            nonlocal adversarial, adversarial_steps, first_adversarial
            if switch is not None:
                switch.load(saved["curriculum"])
            # states saved before first_adversarial was kept hold two entries
            adversarial, adversarial_steps, *first = saved["adversarial"]
            first_adversarial = first[0] if first else None

        loop = TrainingLoop(
            context.resume,
            settings.iterations,
            settings.eval_interval,
            f"{self.name} {context.shots}-shot",
            {
                "model": model,
                "pool": pool,
                "data_optimizer": data_optimizer,
                "meta_optimizer": meta_optimizer,
                "generator": generator,
            },
            extra_state,
            restore_extra,
            context.progress,
        )
        for iteration in loop:
            started = time.perf_counter()
            adversary = None
            if adversarial:
                adversary = Adversary(
                    model, settings.adversarial_weight, settings.inner_steps, settings.inner_lr
                )
                adversarial_steps += 1
                first_adversarial = first_adversarial or iteration
            inversion = eci_data_step(
                teachers,
                pool,
                data_optimizer,
                weights,
                settings.jitter,
                generator,
                adversary,
                (context.ways, context.shots, settings.queries),
                settings.inversion_precision,
                teacher_weights,
            )
            synchronize(device)
            self.recovery_seconds += time.perf_counter() - started
            if not all(map(math.isfinite, (inversion.ce, inversion.bn, inversion.tv))):
                raise DfmlError(
                    f"{self.name}: non-finite inversion loss at meta-iteration {iteration} "
                    f"({inversion}); lower pool_lr"
                )

            tasks = [
                pool.sample_task(context.ways, context.shots, settings.queries, generator)
                for _ in range(settings.meta_batch)
            ]
            loss, accuracy = meta_batch_loss(model, tasks, settings)
            descend(
                meta_optimizer,
                loss,
                f"{self.name}: non-finite meta-loss at meta-iteration {iteration}; lower outer_lr",
            )
            adversarial = switch.update(iteration, accuracy) if switch else False
            loop.show(acc=f"{accuracy:.1f}", ce=f"{inversion.ce:.2f}")

            if loop.evaluates(iteration):
                if iteration == settings.iterations:
                    self._finish(
                        context, pool, generator, settings, adversarial_steps, first_adversarial
                    )
                yield Checkpoint(iteration=iteration, model=copy.deepcopy(model))

    @classmethod
    def inactive_mechanisms(cls, record: RunRecord) -> list[str]:
        """ICFIL's check, and the curriculum: no adversarial data step before the scored
        checkpoint means the row is plain inversion whatever its name."""
        notes = super().inactive_mechanisms(record)
        timings = record.method_timings
        if not cls.curriculum or timings.adversarial_steps is None:
            return notes
        first = timings.first_adversarial_iteration
        if not timings.adversarial_steps:
            notes.append("ECI's curriculum never fired (0 adversarial steps)")
        elif first is not None and record.iteration is not None and record.iteration < first:
            notes.append(f"the scored checkpoint precedes ECI's first adversarial step ({first:g})")
        return notes

    def _initial_model(self, context: MetaTrainContext) -> nn.Module:
        """Zoo Average when the architectures match (PURER's init), else a random init."""
        spec = context.meta_model
        settings: PurerSettings = self.settings  # type: ignore[assignment]
        if self.architecture_mismatch(context) is None:
            model = average_of_zoo(context.zoo, spec, context.ways, settings.start_accumulation)
            set_head(model, settings.start_head, spec, context.ways)
            self.timings.init_from_average = 1.0
        else:
            model = build_model(spec.architecture, context.ways, spec.image_size, spec.init)
            self.timings.init_from_average = 0.0
        return use_batch_statistics(model)

    def _finish(
        self,
        context: MetaTrainContext,
        pool: PseudoImagePool,
        generator: torch.Generator,
        settings: PurerSettings,
        adversarial_steps: int,
        first_adversarial: int | None,
    ) -> None:
        self.timings.adversarial_steps = adversarial_steps
        if first_adversarial is not None:
            self.timings.first_adversarial_iteration = first_adversarial
        tasks = pool.num_images / (context.ways * pool.per_class)
        self.timings.recovery_s_per_task = self.recovery_seconds / tasks
        self.timings.set(**self._time_to_quality(context, pool.per_class, settings))
        if context.artifacts_dir is not None:
            task = pool.sample_task(context.ways, context.shots, settings.queries, generator)
            save_task_grid(task, context.ways, context.artifacts_dir / "pseudo-task.png")

    def _time_to_quality(
        self, context: MetaTrainContext, per_class: int, settings: PurerSettings
    ) -> dict[str, float]:
        """ECI's per-teacher inversion from a fresh block, on the seed's probe teachers (see
        `dfml_bench.evaluation.recovery_speed`)."""
        if settings.time_to_quality_probes == 0:
            return {}
        teachers = context.zoo.frozen_teachers(context.device)
        generator = probe_generator(context.seed)
        weights = DeepInversionWeights(
            bn=settings.bn_weight, tv=settings.tv_weight, l2=settings.l2_weight
        )
        results: list[TimeToQuality] = []
        records = context.zoo.teachers
        for index in probe_teachers(len(records), settings.time_to_quality_probes, context.seed):
            block = PoolRecovery(
                teachers[index],
                len(records[index].class_ids),
                per_class,
                context.meta_model.image_size,
                weights,
                settings.jitter,
                settings.pool_lr,
                generator,
                context.device,
            )
            results.append(
                time_to_quality(
                    block.step,
                    block.quality,
                    settings.time_to_quality_threshold,
                    settings.time_to_quality_max_steps,
                    context.device,
                )
            )
        return summarise({"eci_pool": results}, settings.time_to_quality_max_steps)


@register_method
class PurerNoEci(Purer):
    """Ablation: plain inversion (the same DeepInversion step each iteration, no curriculum)."""

    name = "purer-no-eci"
    display_name = "PURER w/o ECI"
    ablation_of = "purer"
    curriculum = False


@register_method
class PurerNoIcfil(Purer):
    """Ablation: ECI meta-training, plain fine-tuning at meta-test (no ICFIL)."""

    name = "purer-no-icfil"
    display_name = "PURER w/o ICFIL"
    ablation_of = "purer"
    uses_icfil = False
