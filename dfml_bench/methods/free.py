"""FREE (Wei et al., CVPR 2024): a meta-generator for fast data recovery + implicit gradient
alignment of the meta-learner.

Per epoch, `teachers_per_epoch` teachers are sampled. For each one, a fast copy of the
meta-generator and its latents adapt `generator_steps` Adam steps on the DeepInversion loss to
the teacher's classes plus a masked adversarial term (maximise the teacher-student KL where they
agree); the meta-generator then takes a first-order MAML step (mean over teachers of the loss
gradient at the adapted copies). Recovered images of EVERY sampled teacher go to the memory with
absolute class ids (the official code keeps only the last teacher's: a bug we do not reproduce).

After `warmup_epochs`, the meta-learner distils each sampled teacher into a fast copy of itself
(`kd_steps` SGD steps on the teacher's recovered images), moves along the mean difference of the
copies scaled by `alignment_scale` (Reptile-style: aligns the teachers' gradient directions
implicitly), then replays MAML on pseudo tasks from the memory until its accuracy stops improving
for `replay_patience` meta-batches.

Variants: `free`; `free-no-align` (plain multi-teacher KD: the teachers are distilled into the
meta-learner itself, one after the other, then replay); `free-no-metagen` (a freshly initialised
generator per teacher, same step count, no meta step).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Iterator
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from dfml_bench.device import synchronize
from dfml_bench.errors import DfmlError
from dfml_bench.evaluation.adaptation import use_batch_statistics
from dfml_bench.inversion import DeepInversionWeights, deep_inversion_loss, fit_to_teacher
from dfml_bench.inversion.generator import Generator
from dfml_bench.inversion.memory import ImageMemory
from dfml_bench.inversion.pool import save_image_rows, save_task_grid
from dfml_bench.inversion.precision import inversion_autocast
from dfml_bench.inversion.settings import InversionSpeedSettings
from dfml_bench.inversion.vectorised import (
    StackedTeachers,
    draw_jitter_shifts,
)
from dfml_bench.methods.base import (
    Checkpoint,
    MetaTrainContext,
    Method,
    TestAdaptation,
    checkpoint_iterations,
    register_method,
)
from dfml_bench.methods.maml import Params, maml_outer_loss
from dfml_bench.methods.purer import load_teachers
from dfml_bench.models import build_model
from dfml_bench.models.finite import non_finite_parameters
from dfml_bench.resume import load_snapshot, snapshot


class FreeSettings(InversionSpeedSettings):
    """Paper defaults where DESIGN.md gives them; ours (marked) where it does not."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(1000, ge=1)
    warmup_epochs: int = Field(20, ge=0)
    teachers_per_epoch: int = Field(4, ge=1)
    generator_steps: int = Field(5, ge=1)
    generator_lr: float = Field(1e-3, gt=0)
    meta_generator_lr: float = Field(1e-3, gt=0)
    latent_dim: int = Field(256, ge=1)
    generator_width: int = Field(64, ge=1, description="channels of the last block (ngf)")
    per_class: int = Field(20, ge=1, description="images per class per teacher per epoch")
    adversarial_weight: float = Field(1.0, ge=0, description="ours")
    bn_weight: float = Field(0.01, ge=0)
    tv_weight: float = Field(1e-4, ge=0)
    l2_weight: float = Field(1e-5, ge=0)
    jitter: int = Field(2, ge=0)
    kd_steps: int = Field(5, ge=1, description="ours")
    kd_lr: float = Field(0.01, gt=0, description="ours")
    kd_temperature: float = Field(1.0, gt=0, description="ours")
    alignment_scale: float = Field(0.5, gt=0, description="ours")
    meta_batch: int = Field(4, ge=1)
    inner_steps: int = Field(5, ge=1)
    inner_lr: float = Field(0.01, gt=0)
    outer_lr: float = Field(1e-3, gt=0)
    second_order: bool = Field(False, description="ours: first order keeps 5 steps affordable")
    queries: int = Field(15, ge=1)
    replay_patience: int = Field(10, ge=1)
    max_replay_batches: int = Field(100, ge=1, description="cap per epoch (ours)")
    memory_capacity: int | None = Field(None, ge=1, description="None: keep every image")
    eval_interval: int | None = Field(
        20, ge=1, description="epochs between evaluations (authors: 20); None: final only"
    )


def masked_adversarial_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor
) -> torch.Tensor:
    """Minus the teacher-student KL on the samples where both predict the same class (CMI's
    masked term): minimising it makes images the student has not learned yet."""
    mask = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    divergence = F.kl_div(
        F.log_softmax(student_logits, 1), F.softmax(teacher_logits, 1), reduction="none"
    ).sum(1)
    return -(divergence * mask).mean()


def distillation_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float
) -> torch.Tensor:
    log_student = F.log_softmax(student_logits / temperature, 1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def alignment_update(meta: Params, fast_copies: list[Params], scale: float) -> Params:
    """meta + scale * mean_t (fast_t - meta): the Reptile-style step of implicit alignment."""
    return {
        name: value + scale * torch.stack([fast[name] - value for fast in fast_copies]).mean(0)
        for name, value in meta.items()
    }


@register_method
class Free(Method):
    name = "free"
    # the authors' main.py: --test_inner_update_num 10, --inner_lr 0.01
    test_adaptation = TestAdaptation(10, 0.01, "FREE main.py: 10 steps, lr 0.01")
    Settings = FreeSettings
    align: ClassVar[bool] = True
    meta_generator: ClassVar[bool] = True

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        settings: FreeSettings = self.settings  # type: ignore[assignment]
        device = context.device
        torch.manual_seed(context.seed)
        generator = torch.Generator().manual_seed(context.seed)
        teachers = load_teachers(context)
        stacked = None
        if settings.vectorised_on(device):
            stacked = StackedTeachers(teachers, compile=settings.inversion_compile)
        records = context.zoo.teachers
        spec = context.meta_model
        model = use_batch_statistics(
            build_model(spec.architecture, context.ways, spec.image_size, spec.init)
        )
        model = model.to(device, memory_format=torch.channels_last)
        meta_optimizer = torch.optim.Adam(model.parameters(), lr=settings.outer_lr)
        meta_gen = Generator(spec.image_size, settings.latent_dim, settings.generator_width)
        meta_gen = meta_gen.to(device)
        meta_gen_optimizer = torch.optim.Adam(
            meta_gen.parameters(), lr=settings.meta_generator_lr, betas=(0.5, 0.999)
        )
        weights = DeepInversionWeights(
            bn=settings.bn_weight, tv=settings.tv_weight, l2=settings.l2_weight
        )
        memory = ImageMemory(settings.memory_capacity)
        self.memory, self.meta_generator_model = memory, meta_gen  # inspected by tests
        evaluate_at = checkpoint_iterations(settings.epochs, settings.eval_interval)
        images_recovered, replay_batches = 0, 0

        stateful = {
            "model": model,
            "meta_optimizer": meta_optimizer,
            "meta_generator": meta_gen,
            "meta_generator_optimizer": meta_gen_optimizer,
            "generator": generator,
        }

        def state() -> dict[str, object]:
            return snapshot(stateful) | {
                "memory": memory.state_dict(),
                "counts": [images_recovered, replay_batches],
            }

        done = 0
        restored = context.resume.restore_method()
        if restored is not None:
            done, saved = restored
            load_snapshot(stateful, saved)
            memory.load_state_dict(saved["memory"], device)
            images_recovered, replay_batches = saved["counts"]

        progress = tqdm(
            range(done + 1, settings.epochs + 1),
            initial=done,
            total=settings.epochs,
            desc=f"{self.name} {context.shots}-shot",
            disable=not context.progress,
            leave=False,
        )
        for epoch in progress:
            count = min(settings.teachers_per_epoch, len(teachers))
            sampled = torch.randperm(len(teachers), generator=generator)[:count].tolist()
            started = time.perf_counter()
            recovered, meta_gradients = [], []
            counts = [len(records[index].class_ids) for index in sampled]
            results: Iterable[tuple[torch.Tensor, list[torch.Tensor]]]
            if stacked is None:  # lazily, one teacher after the other
                results = (
                    self._recover(
                        meta_gen, teachers[i], model, n, settings, weights, generator, device
                    )
                    for i, n in zip(sampled, counts)
                )
            else:
                results = self._recover_together(
                    meta_gen, stacked, sampled, model, counts, settings, weights, generator, device
                )
            for index, (images, gradients) in zip(sampled, results):
                local = torch.arange(len(records[index].class_ids), device=device)
                local = local.repeat_interleave(settings.per_class)
                absolute = torch.tensor(records[index].class_ids, device=device)[local]
                memory.add(images, absolute, index)
                recovered.append((index, images, local))
                meta_gradients.append(gradients)
                images_recovered += images.shape[0]
            # one check per epoch (one host sync): a NaN generator would fill the memory with NaN
            if not bool(torch.stack([images.isfinite().all() for _, images, _ in recovered]).all()):
                raise DfmlError(
                    f"{self.name}: non-finite recovered images at epoch {epoch} (the generator "
                    "diverged); lower generator_lr or meta_generator_lr"
                )
            if self.meta_generator:
                meta_gen_optimizer.zero_grad(set_to_none=True)
                for param, *per_teacher in zip(meta_gen.parameters(), *meta_gradients):
                    param.grad = torch.stack(per_teacher).mean(0)
                meta_gen_optimizer.step()
            synchronize(device)
            self.timings.recovery_seconds += time.perf_counter() - started

            if epoch > settings.warmup_epochs:
                self._learn_from_teachers(model, teachers, recovered, settings)
                if non_finite_parameters(model):
                    raise DfmlError(
                        f"{self.name}: non-finite meta-learner after distillation at epoch "
                        f"{epoch}; lower kd_lr"
                    )
                replay_batches += self._replay(
                    model, meta_optimizer, memory, context, generator, epoch
                )
            progress.set_postfix(memory=len(memory))

            if epoch in evaluate_at:
                if epoch == settings.epochs:
                    self._finish(context, recovered, images_recovered, replay_batches)
                yield Checkpoint(iteration=epoch, model=copy.deepcopy(model))
            context.resume.step(epoch, state, force=epoch in evaluate_at)

    def _recover(
        self,
        meta_gen: Generator,
        teacher: nn.Module,
        student: nn.Module,
        num_classes: int,
        settings: FreeSettings,
        weights: DeepInversionWeights,
        generator: torch.Generator,
        device: torch.device,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Adapt a fast generator (and its latents) to one teacher; return its images and the
        first-order meta-gradient (the loss gradient at the adapted generator)."""
        if self.meta_generator:
            fast = copy.deepcopy(meta_gen)
        else:  # ablation: a fresh generator for every teacher
            fast = Generator(meta_gen.image_size, meta_gen.latent_dim, meta_gen.width).to(device)
        count = num_classes * settings.per_class
        latent = torch.randn(count, settings.latent_dim, generator=generator).to(device)
        latent.requires_grad_()
        targets = torch.arange(num_classes, device=device).repeat_interleave(settings.per_class)
        optimizer = torch.optim.Adam(
            [*fast.parameters(), latent], lr=settings.generator_lr, betas=(0.5, 0.999)
        )
        student_params = {k: v.detach() for k, v in student.named_parameters()}
        for _ in range(settings.generator_steps):
            optimizer.zero_grad(set_to_none=True)
            images = fast(latent)
            self._generator_loss(
                teacher, student, student_params, images, targets, settings, weights, generator
            ).backward()
            optimizer.step()
        images = fast(latent)
        gradients: list[torch.Tensor] = []
        if self.meta_generator:
            loss = self._generator_loss(
                teacher, student, student_params, images, targets, settings, weights, generator
            )
            gradients = list(torch.autograd.grad(loss, list(fast.parameters())))
        return images.detach().contiguous(memory_format=torch.channels_last), gradients

    def _recover_together(
        self,
        meta_gen: Generator,
        stacked: StackedTeachers,
        sampled: list[int],
        student: nn.Module,
        class_counts: list[int],
        settings: FreeSettings,
        weights: DeepInversionWeights,
        generator: torch.Generator,
        device: torch.device,
    ) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """`_recover` for all sampled teachers at once: one fast generator and optimizer each, but
        one vmapped DeepInversion loss per step. Latents and jitter shifts are drawn up front in
        `_recover`'s order (per teacher: latents, then one shift per loss), so both strategies see
        the same random numbers; the losses are independent, so one backward of their sum gives
        each generator its own gradient."""
        losses_per_teacher = settings.generator_steps + int(self.meta_generator)
        fasts, latents, targets, optimizers, shifts = [], [], [], [], []
        for num_classes in class_counts:
            if self.meta_generator:
                fast = copy.deepcopy(meta_gen)
            else:
                fast = Generator(meta_gen.image_size, meta_gen.latent_dim, meta_gen.width)
                fast = fast.to(device)
            count = num_classes * settings.per_class
            latent = torch.randn(count, settings.latent_dim, generator=generator).to(device)
            latent.requires_grad_()
            shifts.append(draw_jitter_shifts(losses_per_teacher, settings.jitter, generator))
            fasts.append(fast)
            latents.append(latent)
            targets.append(
                torch.arange(num_classes, device=device).repeat_interleave(settings.per_class)
            )
            optimizers.append(
                torch.optim.Adam(
                    [*fast.parameters(), latent], lr=settings.generator_lr, betas=(0.5, 0.999)
                )
            )
        student_params = {k: v.detach() for k, v in student.named_parameters()}

        def loss(step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
            images = [fast(latent) for fast, latent in zip(fasts, latents)]
            step_shifts = None if settings.jitter == 0 else torch.stack([s[step] for s in shifts])
            with inversion_autocast(settings.inversion_precision, device):
                inversion, logits = stacked.loss(
                    images, targets, weights, settings.jitter, generator, sampled, step_shifts
                )
            objective = inversion.total
            if settings.adversarial_weight != 0:
                for teacher_logits, teacher_images in zip(logits, images):
                    student_logits = functional_call(student, student_params, (teacher_images,))
                    adversarial = masked_adversarial_loss(
                        teacher_logits, student_logits[:, : teacher_logits.shape[1]]
                    )
                    objective = objective + settings.adversarial_weight * adversarial
            return images, objective

        for step in range(settings.generator_steps):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            loss(step)[1].backward()
            for optimizer in optimizers:
                optimizer.step()
        gradients: list[list[torch.Tensor]] = [[] for _ in fasts]
        if self.meta_generator:
            images, objective = loss(settings.generator_steps)
            params = [list(fast.parameters()) for fast in fasts]
            flat = iter(torch.autograd.grad(objective, [p for ps in params for p in ps]))
            gradients = [[next(flat) for _ in ps] for ps in params]
        else:
            images = [fast(latent) for fast, latent in zip(fasts, latents)]
        return [
            (image.detach().contiguous(memory_format=torch.channels_last), grads)
            for image, grads in zip(images, gradients)
        ]

    @staticmethod
    def _generator_loss(
        teacher: nn.Module,
        student: nn.Module,
        student_params: Params,
        images: torch.Tensor,
        targets: torch.Tensor,
        settings: FreeSettings,
        weights: DeepInversionWeights,
        generator: torch.Generator,
    ) -> torch.Tensor:
        with inversion_autocast(settings.inversion_precision, images.device):
            inversion = deep_inversion_loss(
                teacher, images, targets, weights, settings.jitter, generator
            )
        if settings.adversarial_weight == 0:
            return inversion.total
        assert inversion.logits is not None
        student_logits = functional_call(student, student_params, (images,))
        adversarial = masked_adversarial_loss(
            inversion.logits, student_logits[:, : inversion.logits.shape[1]]
        )
        return inversion.total + settings.adversarial_weight * adversarial

    def _learn_from_teachers(
        self,
        model: nn.Module,
        teachers: list[nn.Module],
        recovered: list[tuple[int, torch.Tensor, torch.Tensor]],
        settings: FreeSettings,
    ) -> None:
        meta = {k: v.detach() for k, v in model.named_parameters()}
        current = meta
        copies = []
        for index, images, _ in recovered:
            with torch.no_grad():
                logits = teachers[index](fit_to_teacher(teachers[index], images))
                probs = F.softmax(logits / settings.kd_temperature, 1)
            start = meta if self.align else current
            fast = {k: v.clone().requires_grad_() for k, v in start.items()}
            for _ in range(settings.kd_steps):
                student = functional_call(model, fast, (images,))[:, : probs.shape[1]]
                loss = distillation_loss(student, probs, settings.kd_temperature)
                gradients = torch.autograd.grad(loss, list(fast.values()))
                fast = {
                    k: (v - settings.kd_lr * g).detach().requires_grad_()
                    for (k, v), g in zip(fast.items(), gradients)
                }
            copies.append({k: v.detach() for k, v in fast.items()})
            current = copies[-1]
        new = alignment_update(meta, copies, settings.alignment_scale) if self.align else current
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(new[name])

    def _replay(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        memory: ImageMemory,
        context: MetaTrainContext,
        generator: torch.Generator,
        epoch: int,
    ) -> int:
        """MAML on memory tasks until the accuracy has not improved for `replay_patience`."""
        settings: FreeSettings = self.settings  # type: ignore[assignment]
        best, stale, batches = float("-inf"), 0, 0
        while stale < settings.replay_patience and batches < settings.max_replay_batches:
            tasks = [
                memory.sample_task(context.ways, context.shots, settings.queries, generator)
                for _ in range(settings.meta_batch)
            ]
            loss, accuracy = maml_outer_loss(
                model,
                dict(model.named_parameters()),
                tasks,
                settings.inner_steps,
                settings.inner_lr,
                settings.second_order,
            )
            if not torch.isfinite(loss):
                raise DfmlError(
                    f"{self.name}: non-finite meta-loss in replay at epoch {epoch}, meta-batch "
                    f"{batches + 1}; lower outer_lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batches += 1
            best, stale = (accuracy, 0) if accuracy > best else (best, stale + 1)
        return batches

    def _finish(
        self,
        context: MetaTrainContext,
        recovered: list[tuple[int, torch.Tensor, torch.Tensor]],
        images_recovered: int,
        replay_batches: int,
    ) -> None:
        settings: FreeSettings = self.settings  # type: ignore[assignment]
        tasks = images_recovered / (context.ways * settings.per_class)
        self.timings.extra.update(
            images_recovered=float(images_recovered),
            recovery_s_per_task=self.timings.recovery_seconds / tasks,
            replay_batches=float(replay_batches),
        )
        if context.artifacts_dir is not None:
            # a pseudo task as meta-training replays them (one row per class), drawn with its own
            # generator so the picture never shifts the training's random stream
            task = self.memory.sample_task(
                context.ways,
                context.shots,
                settings.queries,
                torch.Generator().manual_seed(context.seed),
            )
            save_task_grid(task, context.ways, context.artifacts_dir / "pseudo-task.png")
            rows = []  # and the last epoch's images, one row per teacher
            for _, images, local in recovered:
                keep = torch.cat([torch.nonzero(local == c).flatten()[:4] for c in local.unique()])
                rows.append(images[keep])
            save_image_rows(rows, context.artifacts_dir / "recovered.png")


@register_method
class FreeNoAlign(Free):
    """Ablation: plain multi-teacher KD into the meta-learner (no fast copies), then replay."""

    name = "free-no-align"
    align = False


@register_method
class FreeNoMetaGenerator(Free):
    """Ablation: a freshly initialised generator per teacher (same steps), no meta-generator."""

    name = "free-no-metagen"
    meta_generator = False
