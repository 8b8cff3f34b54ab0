"""FREE (Wei et al., CVPR 2024): a meta-generator for fast task recovery + implicit gradient
alignment of the meta-learner, as the authors' code (WalkerWorldPeace/FREE at 7767d42) runs it.

Per epoch, `teachers_per_epoch` teachers are sampled (with replacement). For each one a fast copy
of the meta-generator and a fresh latent take `generator_steps` Adam steps on the teacher's
cross-entropy for its classes (images: sigmoid pixels, cropped and flipped, then normalised as the
teacher's dataset) plus, after warm-up, a masked adversarial term against the meta-learner; the
gradient of the last step's loss at the fast copy is summed over teachers into one Adam step of
the meta-generator (a first-order meta step). Each teacher's images of that last step are kept.

After warm-up the memory receives recovered images; then ONE fast copy of the meta-learner
distils the sampled teachers one after another (one Adam step each), and the meta-learner's own
Adam steps along `alignment_scale` x (meta - fast) (Reptile): the sequential chain carries the
cross-teacher gradient products of the paper's implicit alignment. Finally MAML replays pseudo
tasks from the memory (second order, `meta_batch` tasks summed) until its training accuracy has
not improved for `replay_patience` meta-batches.

`fidelity: authors` keeps the code's quirks; `corrected` fixes what is a bug (docs/fidelity.md,
rows F1-F12). Variants: `free`; `free-no-align` (no fast chain: the teachers' distillation
gradients are all taken at the meta-learner's weights and summed into one Adam step, so no
cross-teacher products); `free-no-metagen` (a freshly initialised generator per teacher, same
steps, no meta step).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from dfml_bench.cost import RunShape, WorkRates
from dfml_bench.data.task import Task
from dfml_bench.device import synchronize
from dfml_bench.errors import DfmlError
from dfml_bench.evaluation.recovery_speed import (
    TimeToQuality,
    TimeToQualitySettings,
    probe_generator,
    probe_teachers,
    speedup,
    summarise,
    teacher_agreement,
    time_to_quality,
)
from dfml_bench.fidelity import FidelitySettings
from dfml_bench.inversion import DeepInversionWeights, deep_inversion_loss, fit_to_teacher
from dfml_bench.inversion.generator import Generator
from dfml_bench.inversion.memory import ImageMemory
from dfml_bench.inversion.pixels import CropFlip, Normalisation
from dfml_bench.inversion.pool import save_image_rows, save_task_grid
from dfml_bench.meta.adaptation import Params, finetune, use_batch_statistics
from dfml_bench.meta.loop import TrainingLoop, descend
from dfml_bench.meta.maml import Reduction, meta_batch_loss
from dfml_bench.methods.base import (
    Checkpoint,
    MetaTrainContext,
    Method,
    TestAdaptation,
    register_method,
)
from dfml_bench.models import build_model
from dfml_bench.models.finite import non_finite_parameters

Divergence = Literal["probabilities", "kl"]
AdversarialStudent = Literal["last-replay-task", "meta-model"]
MemorySource = Literal["last-teacher", "every-teacher"]
ShTeachers = Literal["last-loaded", "as-sampled"]
TeacherSampling = Literal["with-replacement", "without-replacement"]
RecoveryLoss = Literal["ce", "deepinversion"]
MetaGeneratorOptimizer = Literal["fresh-per-epoch", "persistent"]

BETAS = (0.5, 0.999)  # the generators' Adam (the authors' Synthesizer)
PROBE_INIT_OFFSET = 5_000_011  # seeds the from-scratch generators of the speed probes


class FreeSettings(TimeToQualitySettings, FidelitySettings):
    """Defaults are the authors' main.py and scripts; budgets are reduced in configs, not here."""

    model_config = ConfigDict(extra="forbid")
    PROFILE_VALUES = {
        "kd_loss": {"authors": "probabilities", "corrected": "kl"},
        "adversarial_divergence": {"authors": "probabilities", "corrected": "kl"},
        "adversarial_student": {"authors": "last-replay-task", "corrected": "meta-model"},
        "memory_source": {"authors": "last-teacher", "corrected": "every-teacher"},
        "sh_teachers": {"authors": "last-loaded", "corrected": "as-sampled"},
    }
    epochs: int = Field(1000, ge=1)
    warmup_epochs: int = Field(
        20, ge=0, description="epochs that only train the meta-generator (no student, no memory)"
    )
    teachers_per_epoch: int = Field(4, ge=1)
    teacher_sampling: TeacherSampling = "with-replacement"
    sh_teachers: ShTeachers | None = Field(
        None,
        description="zoos of several architectures: one architecture per epoch; last-loaded: "
        "every teacher of the epoch has the last sampled one's weights (the authors' code), "
        "as-sampled: each its own",
    )
    generator_steps: int = Field(5, ge=1)
    generator_lr: float = Field(1e-3, gt=0)
    latent_lr: float = Field(1e-3, gt=0)
    meta_generator_lr: float = Field(1e-3, gt=0)
    meta_generator_optimizer: MetaGeneratorOptimizer = Field(
        "fresh-per-epoch", description="the authors build a new Adam at every synthesis"
    )
    latent_dim: int = Field(256, ge=1)
    generator_width: int = Field(64, ge=1, description="channels of the last block (ngf)")
    per_class: int = Field(20, ge=1, description="images per class per teacher (num_qur_kd)")
    augmentation_padding: int = Field(
        4, ge=0, description="crop after zero padding, and flip; 0: no augmentation"
    )
    recovery_loss: RecoveryLoss = Field(
        "ce", description="ce: the authors' (no BN prior); deepinversion: + BN, TV and L2 priors"
    )
    bn_weight: float = Field(0.01, ge=0, description="recovery_loss deepinversion only")
    tv_weight: float = Field(1e-4, ge=0, description="recovery_loss deepinversion only")
    l2_weight: float = Field(1e-5, ge=0, description="recovery_loss deepinversion only")
    adversarial_weight: float = Field(1.0, ge=0)
    adversarial_divergence: Divergence | None = Field(
        None, description="probabilities: the authors' kl_div on probabilities; kl: KL(s || t)"
    )
    adversarial_student: AdversarialStudent | None = Field(
        None, description="the last replay task's adapted weights (authors) or the meta-model"
    )
    memory_source: MemorySource | None = Field(
        None, description="whose images the memory stores: the last sampled teacher (authors)"
    )
    memory_batches_per_class: int | None = Field(
        20, ge=1, description="ring of writes per class (the authors' max_batch_per_class)"
    )
    kd_loss: Divergence | None = Field(
        None, description="probabilities: the authors' kl_div on probabilities; kl: KL(t || s)"
    )
    kd_lr: float = Field(1e-3, gt=0, description="Adam of the fast copy (the authors' outer_lr)")
    alignment_scale: float = Field(67.0, gt=0, description="Reptile gradient factor")
    meta_batch: int = Field(10, ge=1, description="replay tasks per meta-step (episode_batch)")
    replay_reduction: Reduction = "sum"
    inner_steps: int = Field(5, ge=1)
    inner_lr: float = Field(0.01, gt=0)
    outer_lr: float = Field(1e-3, gt=0)
    second_order: bool = True
    queries: int = Field(15, ge=1)
    replay_patience: int = Field(10, ge=1, description="meta-batches without a new best accuracy")
    max_replay_batches: int | None = Field(
        None, ge=1, description="cap per epoch (ours); None: none"
    )
    eval_interval: int | None = Field(
        20, ge=1, description="epochs between evaluations (authors: 20); None: final only"
    )


def adversarial_divergence(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, divergence: Divergence
) -> torch.Tensor:
    """Per-sample divergence the recovery maximises where teacher and student agree.

    `probabilities` is the authors' call: PyTorch's kl_div given the teacher's probabilities where
    it expects log-probabilities, i.e. sum_c p_s (log p_s - p_t); `kl` is KL(p_s || p_t)."""
    teacher = F.softmax(teacher_logits, 1)
    if divergence == "kl":
        teacher = F.log_softmax(teacher_logits, 1)
    return F.kl_div(teacher, F.softmax(student_logits, 1), reduction="none").sum(1)


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: Divergence
) -> torch.Tensor:
    """`probabilities`: the authors' kl_div(softmax(s), softmax(t)), mean over all entries,
    i.e. mean p_t (log p_t - p_s); `kl`: KL(p_t || p_s), mean over samples."""
    teacher = F.softmax(teacher_logits, 1)
    if divergence == "kl":
        return F.kl_div(F.log_softmax(student_logits, 1), teacher, reduction="batchmean")
    # reduction "none" then mean: the same as "mean", without PyTorch's deprecation warning
    return F.kl_div(F.softmax(student_logits, 1), teacher, reduction="none").mean()


@dataclass(frozen=True)
class RecoveryTarget:
    """One sampled teacher: the module inverted, its normalisation, and the classes its images
    are stored under (absolute ids, in the teacher's local order)."""

    teacher: nn.Module
    normalisation: Normalisation
    class_ids: list[int]
    dataset: int
    index: int  # zoo index of the class list's teacher


@dataclass(frozen=True)
class Student:
    """The model the adversarial term plays against (used without gradient)."""

    model: nn.Module
    params: Params


@dataclass
class Recovery:
    pixels: torch.Tensor  # the last step's images in [0, 1], detached
    meta_gradient: list[torch.Tensor]  # the last step's loss gradient at the fast generator
    trace: list[dict[str, torch.Tensor]] = field(default_factory=list)


class TaskRecovery:
    """One teacher's recovery, one generator update at a time (the authors' synthesize for one
    teacher): `recover_task` runs it `generator_steps` times; the time-to-quality measurement
    runs it until the teacher recognises the images."""

    def __init__(
        self,
        source: Generator,
        target: RecoveryTarget,
        latent: torch.Tensor,
        settings: FreeSettings,
        student: Student | None,
        draw_augmentation: Callable[[], CropFlip | None],
    ) -> None:
        classes = len(target.class_ids)
        self.target, self.settings, self.student = target, settings, student
        self.draw_augmentation = draw_augmentation
        self.targets = torch.arange(classes, device=latent.device)
        self.targets = self.targets.repeat(latent.shape[0] // classes)  # 0, 1, ..., C-1, 0, ...
        with torch.no_grad():
            source(latent)  # the authors' discarded forward: it moves the source's BN statistics
        self.fast = copy.deepcopy(source)
        self.latent = latent.detach().clone().requires_grad_()
        self.optimizer = torch.optim.Adam(
            [
                {"params": list(self.fast.parameters())},
                {"params": [self.latent], "lr": settings.latent_lr},
            ],
            lr=settings.generator_lr,
            betas=BETAS,
        )
        self.weights = DeepInversionWeights(
            bn=settings.bn_weight, tv=settings.tv_weight, l2=settings.l2_weight
        )
        self.gradient: list[torch.Tensor] = []  # set by the step that keeps it

    def pixels(self) -> torch.Tensor:
        with torch.no_grad():
            return self.fast(self.latent)

    def quality(self) -> float:
        """Share of the current images (no augmentation) the teacher assigns to their class."""
        inputs = self.target.normalisation.apply(self.pixels())
        return teacher_agreement(self.target.teacher, inputs, self.targets)

    def step(self, keep_gradient: bool = False) -> dict[str, torch.Tensor]:
        """One update of the fast generator and the latent; with `keep_gradient`, the loss
        gradient at the generator's current weights is kept as `gradient` (the meta-gradient:
        taken before the update). Returns what the step saw, for traces."""
        settings, teacher = self.settings, self.target.teacher
        pixels = self.fast(self.latent)
        augmentation = self.draw_augmentation()
        shown = pixels
        if augmentation is not None:
            shown = augmentation.apply(pixels, settings.augmentation_padding)
        inputs = self.target.normalisation.apply(shown)
        if settings.recovery_loss == "ce":
            logits = teacher(fit_to_teacher(teacher, inputs))
            inversion = F.cross_entropy(logits, self.targets)
        else:
            result = deep_inversion_loss(teacher, inputs, self.targets, self.weights, 0)
            assert result.logits is not None
            logits, inversion = result.logits, result.total
        loss, adversarial = inversion, torch.zeros(())
        mask = torch.zeros(len(self.targets))
        if self.student is not None and settings.adversarial_weight != 0:
            with torch.no_grad():
                student_logits = functional_call(
                    self.student.model, self.student.params, (inputs,)
                )[:, : logits.shape[1]]
            mask = (student_logits.argmax(1) == logits.argmax(1)).to(logits.dtype)
            divergence = adversarial_divergence(
                logits, student_logits, settings.adversarial_divergence or "probabilities"
            )
            adversarial = -(divergence * mask).mean()
            loss = inversion + settings.adversarial_weight * adversarial
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if keep_gradient:
            self.gradient = [p.grad.detach().clone() for p in self.fast.parameters()]  # type: ignore[union-attr]
        self.optimizer.step()
        return {
            "pixels": pixels.detach(),
            "inputs": inputs.detach(),
            "ce": inversion.detach(),
            "adversarial": adversarial.detach(),
            "total": loss.detach(),
            "mask": mask.detach(),
        }


def recover_task(
    source: Generator,
    target: RecoveryTarget,
    latent: torch.Tensor,
    settings: FreeSettings,
    student: Student | None,
    draw_augmentation: Callable[[], CropFlip | None],
    keep_trace: bool = False,
) -> Recovery:
    """Adapt a copy of `source` and `latent` to one teacher for `generator_steps` updates;
    the images kept are those the last update saw (made before it, as the authors keep)."""
    recovery = TaskRecovery(source, target, latent, settings, student, draw_augmentation)
    trace = []
    for step in range(settings.generator_steps):
        seen = recovery.step(keep_gradient=step == settings.generator_steps - 1)
        if keep_trace:
            trace.append(seen)
    return Recovery(seen["pixels"], recovery.gradient, trace)


def meta_generator_step(
    meta_generator: Generator,
    optimizer: torch.optim.Optimizer,
    gradients: Sequence[list[torch.Tensor]],
) -> None:
    """One Adam step on the SUM over teachers of their fast generators' meta-gradients."""
    optimizer.zero_grad(set_to_none=True)
    for param, *per_teacher in zip(meta_generator.parameters(), *gradients):
        param.grad = torch.stack(per_teacher).sum(0)
    optimizer.step()


def distil_and_align(
    model: nn.Module,
    meta_optimizer: torch.optim.Optimizer,
    teachers: Sequence[nn.Module],
    inputs: Sequence[torch.Tensor],
    settings: FreeSettings,
    align: bool = True,
    keep_trace: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Move the meta-learner towards the teachers on their recovered `inputs` (normalised).

    With `align`: one fast copy takes one fresh-Adam step per teacher, in order; the meta
    gradient is `alignment_scale` x (meta - fast) and the meta-learner's own Adam steps (the
    authors' reptile_grad). Without: every teacher's loss at the meta weights, summed, one step.
    """
    meta = dict(model.named_parameters())
    divergence = settings.kd_loss or "probabilities"
    trace: list[dict[str, torch.Tensor]] = []

    def loss_and_accuracy(params: Params, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(fit_to_teacher(teacher, x))
        student_logits = functional_call(model, params, (x,))[:, : teacher_logits.shape[1]]
        return distillation_loss(student_logits, teacher_logits, divergence)

    meta_optimizer.zero_grad(set_to_none=True)
    if align:
        fast = {k: v.detach().clone().requires_grad_() for k, v in meta.items()}
        optimizer = torch.optim.Adam(list(fast.values()), lr=settings.kd_lr)
        for teacher, x in zip(teachers, inputs):
            loss = loss_and_accuracy(fast, teacher, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if keep_trace:
                trace.append(
                    {"loss": loss.detach()} | {k: v.detach().clone() for k, v in fast.items()}
                )
        for name, param in meta.items():
            param.grad = settings.alignment_scale * (param.detach() - fast[name].detach())
    else:
        total = sum(loss_and_accuracy(meta, teacher, x) for teacher, x in zip(teachers, inputs))
        total.backward()  # type: ignore[union-attr]
    meta_optimizer.step()
    return trace


@register_method
class Free(Method):
    name = "free"
    display_name = "FREE"
    table_order = 5
    # the authors' main.py: --test_inner_update_num 10, --inner_lr 0.01
    test_adaptation = TestAdaptation(10, 0.01, "FREE main.py: 10 steps, lr 0.01")
    Settings = FreeSettings
    align: ClassVar[bool] = True
    meta_generator: ClassVar[bool] = True
    smoke_settings: ClassVar[dict[str, Any]] = {
        "epochs": 6,
        "eval_interval": 2,
        "warmup_epochs": 1,
        "per_class": 6,
        "queries": 3,
        "generator_width": 8,
        "latent_dim": 16,
        "teachers_per_epoch": 2,
        "generator_steps": 2,
        "max_replay_batches": 3,
        "replay_patience": 2,
        "inner_steps": 1,
        "meta_batch": 2,
        "time_to_quality_probes": 1,
        "time_to_quality_max_steps": 3,
    }
    cost_assumption = (
        "FREE: warm-up epochs x synthesis + other epochs x epoch without replay, both scaled to "
        "teachers per epoch x generator steps x images; replay = replay_patience meta-batches "
        "per epoch (the least it can do; max_replay_batches is the cap), at the benchmark's "
        "second-order cost per image"
    )

    @classmethod
    def meta_training_seconds(cls, settings: BaseModel, run: RunShape, rates: WorkRates) -> float:
        s: FreeSettings = settings  # type: ignore[assignment]
        per_epoch = s.teachers_per_epoch * s.generator_steps * s.per_class
        per_epoch *= run.teacher_load / run.teachers
        replay = rates.replay_image * s.meta_batch * run.meta_flops * s.replay_patience
        replay *= run.task(s.queries, s.inner_steps)
        warmup = min(s.warmup_epochs, s.epochs)
        train = warmup * rates.generator_image * per_epoch
        return train + (s.epochs - warmup) * (rates.free_epoch_image * per_epoch + replay)

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        settings: FreeSettings = self.settings  # type: ignore[assignment]
        device = context.device
        torch.manual_seed(context.seed)
        generator = torch.Generator().manual_seed(context.seed)
        teachers = context.zoo.frozen_teachers(context.device)
        records = context.zoo.teachers
        datasets = context.zoo.datasets
        normalisations = [context.normalisation(name) for name in datasets]
        spec = context.meta_model
        model = use_batch_statistics(
            build_model(spec.architecture, context.ways, spec.image_size, spec.init)
        )
        model = model.to(device, memory_format=torch.channels_last)
        meta_optimizer = torch.optim.Adam(model.parameters(), lr=settings.outer_lr)
        meta_gen = Generator(spec.image_size, settings.latent_dim, settings.generator_width)
        meta_gen = meta_gen.to(device)
        meta_gen_optimizer = self._meta_generator_optimizer(meta_gen)
        memory = ImageMemory(settings.memory_batches_per_class, normalisations)
        self.memory, self.meta_generator_model = memory, meta_gen  # inspected by tests
        images_recovered, replay_batches, adversarial_epochs = 0, 0, 0
        fast_student: Params | None = None  # adapted weights of the last replay task

        stateful = {
            "model": model,
            "meta_optimizer": meta_optimizer,
            "meta_generator": meta_gen,
            "meta_generator_optimizer": meta_gen_optimizer,
            "generator": generator,
        }

        def extra_state() -> dict[str, object]:
            return {
                "memory": memory.state_dict(),
                "counts": [images_recovered, replay_batches, adversarial_epochs],
                "fast_student": fast_student,
            }

        def restore_extra(saved: dict[str, Any]) -> None:
            nonlocal images_recovered, replay_batches, adversarial_epochs, fast_student
            memory.load_state_dict(saved["memory"], device)
            images_recovered, replay_batches, adversarial_epochs = saved["counts"]
            fast_student = saved["fast_student"]

        loop = TrainingLoop(
            context.resume,
            settings.epochs,
            settings.eval_interval,
            f"{self.name} {context.shots}-shot",
            stateful,  # the optimiser entry is replaced when it is fresh per epoch
            extra_state,
            restore_extra,
            context.progress,
        )
        recoveries: list[tuple[RecoveryTarget, Recovery]] = []
        for epoch in loop:
            warm_up = epoch <= settings.warmup_epochs
            started = time.perf_counter()
            targets = [
                RecoveryTarget(
                    teachers[weights],
                    normalisations[datasets.index(records[classes].dataset)],
                    records[classes].class_ids,
                    datasets.index(records[classes].dataset),
                    classes,
                )
                for weights, classes in self._sample_teachers(context, generator)
            ]
            student = None
            if not warm_up and settings.adversarial_weight != 0:
                student = Student(model, self._student_params(model, fast_student))
                adversarial_epochs += 1
            if settings.meta_generator_optimizer == "fresh-per-epoch":
                meta_gen_optimizer = self._meta_generator_optimizer(meta_gen)
                stateful["meta_generator_optimizer"] = meta_gen_optimizer

            def draw() -> CropFlip | None:
                if settings.augmentation_padding == 0:
                    return None
                return CropFlip.draw(settings.augmentation_padding, generator)

            recoveries = []
            for target in targets:
                count = len(target.class_ids) * settings.per_class
                latent = torch.randn(count, settings.latent_dim, generator=generator).to(device)
                source = meta_gen if self.meta_generator else self._fresh_generator(meta_gen)
                recoveries.append(
                    (target, recover_task(source, target, latent, settings, student, draw))
                )
            # one check per epoch (one host sync): a NaN generator would fill the memory with NaN
            if not bool(torch.stack([r.pixels.isfinite().all() for _, r in recoveries]).all()):
                raise DfmlError(
                    f"{self.name}: non-finite recovered images at epoch {epoch} (the generator "
                    "diverged); lower generator_lr or meta_generator_lr"
                )
            if self.meta_generator:
                meta_generator_step(
                    meta_gen, meta_gen_optimizer, [r.meta_gradient for _, r in recoveries]
                )
            if not warm_up:
                stored = (
                    recoveries if settings.memory_source == "every-teacher" else recoveries[-1:]
                )
                for target, recovery in stored:
                    labels = torch.tensor(target.class_ids, device=device)
                    labels = labels.repeat(recovery.pixels.shape[0] // len(target.class_ids))
                    memory.add(recovery.pixels, labels, target.dataset, target.index)
                images_recovered += sum(r.pixels.shape[0] for _, r in recoveries)
            synchronize(device)
            self.recovery_seconds += time.perf_counter() - started

            if not warm_up:
                self._distil(model, meta_optimizer, recoveries, settings, generator)
                if non_finite_parameters(model):
                    raise DfmlError(
                        f"{self.name}: non-finite meta-learner after distillation at epoch "
                        f"{epoch}; lower kd_lr or outer_lr"
                    )
                batches, fast_student = self._replay(
                    model, meta_optimizer, memory, context, generator, epoch
                )
                replay_batches += batches
            loop.show(memory=str(len(memory)))

            if loop.evaluates(epoch):
                if epoch == settings.epochs:
                    self._finish(context, recoveries, images_recovered, replay_batches)
                    self.timings.adversarial_epochs = adversarial_epochs
                    self.timings.set(
                        **self._time_to_quality(context, teachers, normalisations, meta_gen)
                    )
                yield Checkpoint(iteration=epoch, model=copy.deepcopy(model))

    def _time_to_quality(
        self,
        context: MetaTrainContext,
        teachers: list[nn.Module],
        normalisations: list[Normalisation],
        meta_gen: Generator,
    ) -> dict[str, float]:
        """Recovery of each probe teacher's task from the meta-generator and from a freshly
        initialised generator, the same updates (no adversary: recovery alone), until the
        teacher recognises the images (see `dfml_bench.evaluation.recovery_speed`)."""
        settings: FreeSettings = self.settings  # type: ignore[assignment]
        if settings.time_to_quality_probes == 0:
            return {}
        records, datasets = context.zoo.teachers, context.zoo.datasets
        generator = probe_generator(context.seed)
        padding = settings.augmentation_padding

        def draw() -> CropFlip | None:
            return CropFlip.draw(padding, generator) if padding else None

        results: dict[str, list[TimeToQuality]] = {"meta_generator": [], "scratch": []}
        for index in probe_teachers(len(records), settings.time_to_quality_probes, context.seed):
            dataset = datasets.index(records[index].dataset)
            target = RecoveryTarget(
                teachers[index], normalisations[dataset], records[index].class_ids, dataset, index
            )
            count = len(target.class_ids) * settings.per_class
            latent = torch.randn(count, settings.latent_dim, generator=generator)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(context.seed + PROBE_INIT_OFFSET + index)
                scratch = self._fresh_generator(meta_gen)
            for name, source in (("meta_generator", copy.deepcopy(meta_gen)), ("scratch", scratch)):
                recovery = TaskRecovery(
                    source, target, latent.to(context.device), settings, None, draw
                )
                results[name].append(
                    time_to_quality(
                        recovery.step,
                        recovery.quality,
                        settings.time_to_quality_threshold,
                        settings.time_to_quality_max_steps,
                        context.device,
                    )
                )
        fields = summarise(results, settings.time_to_quality_max_steps)
        return fields | speedup(results["scratch"], results["meta_generator"], "vs_scratch")

    def _meta_generator_optimizer(self, meta_gen: Generator) -> torch.optim.Optimizer:
        settings: FreeSettings = self.settings  # type: ignore[assignment]
        return torch.optim.Adam(meta_gen.parameters(), lr=settings.meta_generator_lr, betas=BETAS)

    @staticmethod
    def _fresh_generator(meta_gen: Generator) -> Generator:
        """The no-meta-generator ablation: a newly initialised generator for every teacher."""
        fresh = Generator(meta_gen.image_size, meta_gen.latent_dim, meta_gen.width)
        return fresh.to(next(meta_gen.parameters()).device)

    def _sample_teachers(
        self, context: MetaTrainContext, generator: torch.Generator
    ) -> list[tuple[int, int]]:
        """(teacher whose weights run, teacher whose classes label the images) per draw.

        A zoo of several architectures draws one architecture per epoch and its teachers (the
        authors' SH loop); under `sh_teachers: last-loaded` all of them then run the last drawn
        teacher's weights, because their loop reloads one module (each keeps its class list)."""
        settings: FreeSettings = self.settings  # type: ignore[assignment]
        records = context.zoo.teachers
        candidates = list(range(len(records)))
        architectures = sorted({r.architecture for r in records})
        if len(architectures) > 1:
            chosen = architectures[
                int(torch.randint(len(architectures), (1,), generator=generator))
            ]
            candidates = [i for i in candidates if records[i].architecture == chosen]
        count = settings.teachers_per_epoch
        if settings.teacher_sampling == "with-replacement":
            picks = torch.randint(len(candidates), (count,), generator=generator).tolist()
        else:
            picks = torch.randperm(len(candidates), generator=generator)[:count].tolist()
        drawn = [candidates[p] for p in picks]
        if len(architectures) > 1 and settings.sh_teachers == "last-loaded":
            return [(drawn[-1], classes) for classes in drawn]
        return [(index, index) for index in drawn]

    def _student_params(self, model: nn.Module, fast_student: Params | None) -> Params:
        settings: FreeSettings = self.settings  # type: ignore[assignment]
        if settings.adversarial_student == "last-replay-task" and fast_student is not None:
            return fast_student
        return {k: v.detach() for k, v in model.named_parameters()}

    def _distil(
        self,
        model: nn.Module,
        meta_optimizer: torch.optim.Optimizer,
        recoveries: list[tuple[RecoveryTarget, Recovery]],
        settings: FreeSettings,
        generator: torch.Generator,
    ) -> None:
        """One crop and flip for all teachers' images (the authors' one transform call on the
        stacked images; applied per teacher, so teachers with fewer classes fit too)."""
        pixels = [r.pixels for _, r in recoveries]
        if settings.augmentation_padding:
            augmentation = CropFlip.draw(settings.augmentation_padding, generator)
            pixels = [augmentation.apply(p, settings.augmentation_padding) for p in pixels]
        inputs = [t.normalisation.apply(p) for (t, _), p in zip(recoveries, pixels)]
        teachers = [t.teacher for t, _ in recoveries]
        distil_and_align(model, meta_optimizer, teachers, inputs, settings, self.align)

    def _replay(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        memory: ImageMemory,
        context: MetaTrainContext,
        generator: torch.Generator,
        epoch: int,
    ) -> tuple[int, Params]:
        """MAML on memory tasks until the accuracy has not improved for `replay_patience`
        meta-batches; also returns the last task's adapted weights (the authors' student)."""
        settings: FreeSettings = self.settings  # type: ignore[assignment]
        best, stale, batches = float("-inf"), 0, 0
        last_task: Task | None = None
        before_step: Params = {}
        cap = settings.max_replay_batches
        while stale < settings.replay_patience and (cap is None or batches < cap):
            tasks = [
                memory.sample_task(context.ways, context.shots, settings.queries, generator)
                for _ in range(settings.meta_batch)
            ]
            loss, accuracy = meta_batch_loss(model, tasks, settings, settings.replay_reduction)
            last_task = tasks[-1]
            before_step = {k: v.detach().clone() for k, v in model.named_parameters()}
            descend(
                optimizer,
                loss,
                f"{self.name}: non-finite meta-loss in replay at epoch {epoch}, meta-batch "
                f"{batches + 1}; lower outer_lr",
            )
            batches += 1
            best, stale = (accuracy, 0) if accuracy > best else (best, stale + 1)
        assert last_task is not None
        adapted = finetune(
            model,
            before_step,
            last_task.support_images,
            last_task.support_labels,
            settings.inner_steps,
            settings.inner_lr,
        )
        return batches, adapted

    def _finish(
        self,
        context: MetaTrainContext,
        recoveries: list[tuple[RecoveryTarget, Recovery]],
        images_recovered: int,
        replay_batches: int,
    ) -> None:
        settings: FreeSettings = self.settings  # type: ignore[assignment]
        tasks = max(images_recovered, 1) / (context.ways * settings.per_class)
        self.timings.set(
            images_recovered=images_recovered,
            recovery_s_per_task=self.recovery_seconds / tasks,
            replay_batches=replay_batches,
        )
        if context.artifacts_dir is not None and len(self.memory.rings) >= context.ways:
            # a pseudo task as meta-training replays them (one row per class), drawn with its own
            # generator so the picture never shifts the training's random stream
            task = self.memory.sample_task(
                context.ways,
                context.shots,
                settings.queries,
                torch.Generator().manual_seed(context.seed),
            )
            save_task_grid(task, context.ways, context.artifacts_dir / "pseudo-task.png")
        if context.artifacts_dir is not None:
            rows = []  # and the last epoch's images, one row per teacher, 4 per class
            for target, recovery in recoveries:
                classes = len(target.class_ids)
                rows.append(recovery.pixels[: 4 * classes])
            save_image_rows(rows, context.artifacts_dir / "recovered.png")


@register_method
class FreeNoAlign(Free):
    """Ablation: no fast chain; all teachers' distillation gradients at the meta weights."""

    name = "free-no-align"
    display_name = "FREE w/o alignment"
    ablation_of = "free"
    align = False


@register_method
class FreeNoMetaGenerator(Free):
    """Ablation: a freshly initialised generator per teacher (same steps), no meta-generator."""

    name = "free-no-metagen"
    display_name = "FREE w/o meta-generator"
    ablation_of = "free"
    meta_generator = False
