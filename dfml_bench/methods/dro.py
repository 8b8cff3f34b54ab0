"""DRO: Wasserstein distributionally-robust model fusion (Wang et al., UAI 2022), reimplemented
from its description (no public code was available to us).

What we implement:
- every teacher t gets a learnable embedding e_t (`embedding_dim`); a fusion network maps an
  embedding to a full set of meta-model parameters, theta(e) = theta_0 + s * (W e) (theta_0 is
  the zoo Average, W starts at zero: a linear hypernetwork). By default (`update: relative`,
  "DRO-style") theta_0 is frozen and s is each tensor's RMS, so steps respect the scale of the
  weights; `absolute` learns theta_0 and adds W e as is, which at Adam's lr 1e-3 moves the conv
  layers by a third of their norm in ten steps and destroys the Average it starts from;
- without data, theta(e_t) must reproduce teacher t on its own classes: a KL distillation loss
  L_t on inputs inverted from teacher t once before training (DeepInversion, `inversion_steps`);
- the objective is distributionally robust in a Wasserstein ball around the empirical
  distribution of embeddings, in the Lagrangian form of Sinha et al. (2018): for each sampled
  teacher the embedding is moved by `ascent_steps` of gradient ascent on
  L_t(theta(e')) - gamma * ||e' - e_t||^2 (the best iterate is kept, the start included), and the
  fusion network and embeddings minimise L_t(theta(e'_t)). The robust term
  L_t(theta(e'_t)) - L_t(theta(e_t)) is therefore never negative; it is logged;
- the meta-initialisation is theta(mean_t e_t), the network's output at the embeddings' centre.

Where it may differ from the paper (so tables call it DRO-style): the fusion network and its
relative update, the transport cost
(squared Euclidean on embeddings), the Lagrangian relaxation instead of an explicit radius, and
inverted inputs as the data-free stand-in for the teachers' tasks. Same-architecture zoos only.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from dfml_bench.cost import RunShape, WorkRates
from dfml_bench.device import synchronize
from dfml_bench.errors import DfmlError
from dfml_bench.inversion import DeepInversionWeights, deep_inversion_loss
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.meta.loop import TrainingLoop
from dfml_bench.methods.base import Checkpoint, MetaTrainContext, Method, register_method
from dfml_bench.zoo.fusion import FusionHeadSettings, average_of_zoo, set_head


class DroSettings(FusionHeadSettings):
    model_config = ConfigDict(extra="forbid")
    iterations: int = Field(500, ge=1)
    teachers_per_step: int = Field(4, ge=1)
    embedding_dim: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    gamma: float = Field(1.0, gt=0, description="Wasserstein penalty (inverse ball radius)")
    ascent_steps: int = Field(3, ge=0)
    ascent_lr: float = Field(0.1, gt=0)
    images_per_class: int = Field(8, ge=1)
    inversion_steps: int = Field(20, ge=0)
    inversion_lr: float = Field(0.25, gt=0)
    eval_interval: int | None = Field(None, ge=1, description="None: the final model only")
    update: Literal["relative", "absolute"] = Field(
        "relative",
        description="relative (DRO-style): theta_0 frozen, W e scaled per tensor by theta_0's "
        "RMS; absolute: theta_0 learnt too, W e added as is",
    )


class FusionNetwork(nn.Module):
    """theta(e) = theta_0 + s * (W e) over the flattened meta-model parameters.

    `relative`: theta_0 (the zoo Average) is frozen and s is each tensor's RMS in theta_0, so an
    Adam step moves every tensor by a fraction of its own scale. `absolute` (s = 1, theta_0
    learnt): an Adam step of lr 1e-3 moves every weight by about 1e-3 whatever its scale, which
    destroys small-norm layers within ten steps."""

    def __init__(
        self, base: nn.Module, num_teachers: int, embedding_dim: int, relative: bool
    ) -> None:
        super().__init__()
        params = dict(base.named_parameters())
        self.names = list(params)
        self.shapes = [params[name].shape for name in self.names]
        flat = torch.cat([params[name].detach().flatten() for name in self.names])
        self.base = nn.Parameter(flat.clone(), requires_grad=not relative)
        scales = [
            params[name].detach().square().mean().sqrt().clamp_min(1e-3).expand(shape.numel())
            if relative
            else torch.ones(shape.numel())
            for name, shape in zip(self.names, self.shapes)
        ]
        self.register_buffer("scale", torch.cat(scales).to(flat))
        self.projection = nn.Parameter(torch.zeros(flat.numel(), embedding_dim))
        self.embeddings = nn.Parameter(0.1 * torch.randn(num_teachers, embedding_dim))

    def forward(self, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
        flat = self.base + self.scale * (self.projection @ embedding)
        pieces = torch.split(flat, [shape.numel() for shape in self.shapes])
        return {n: p.view(s) for n, p, s in zip(self.names, pieces, self.shapes)}

    def centre(self) -> dict[str, torch.Tensor]:
        return self(self.embeddings.mean(0))


def teacher_loss(
    model: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor, probs: torch.Tensor
) -> torch.Tensor:
    """KL from the teacher's outputs to the fused model's (first classes of its head)."""
    logits = functional_call(model, params, (images,))[:, : probs.shape[1]]
    return F.kl_div(F.log_softmax(logits, 1), probs, reduction="batchmean")


def robust_embedding(
    fusion: FusionNetwork,
    model: nn.Module,
    embedding: torch.Tensor,
    images: torch.Tensor,
    probs: torch.Tensor,
    gamma: float,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """argmax over a few ascent iterates (start included) of L(theta(e')) - gamma ||e' - e||^2."""
    anchor = embedding.detach()
    best, best_value = anchor, None
    current = anchor.clone().requires_grad_()
    for step in range(steps + 1):
        value = teacher_loss(model, fusion(current), images, probs) - gamma * (
            (current - anchor).square().sum()
        )
        if best_value is None or float(value.detach()) > best_value:
            best, best_value = current.detach().clone(), float(value.detach())
        if step == steps:
            break
        (gradient,) = torch.autograd.grad(value, current)
        current = (current + lr * gradient).detach().requires_grad_()
    return best


@register_method
class Dro(Method):
    name = "dro"
    display_name = "DRO-style"
    table_order = 3
    Settings = DroSettings
    same_architecture_only = True
    smoke_settings: ClassVar[dict[str, Any]] = {
        "iterations": 6,
        "eval_interval": 2,
        "inversion_steps": 3,
    }
    cost_assumption = (
        "DRO: inversion (images x steps, at the ECI data step's cost per image-step) + "
        "iterations x teachers_per_step x (ascent_steps + 1) distillation passes"
    )

    @classmethod
    def meta_training_seconds(cls, settings: BaseModel, run: RunShape, rates: WorkRates) -> float:
        s: DroSettings = settings  # type: ignore[assignment]
        inversion = s.inversion_steps * s.images_per_class * run.teacher_load
        passes = s.teachers_per_step * (s.ascent_steps + 1)
        fusion = passes * run.ways * s.images_per_class * rates.maml_image * run.meta_flops
        return rates.eci_image * inversion + s.iterations * fusion

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        self.check_zoo(context)
        settings: DroSettings = self.settings  # type: ignore[assignment]
        torch.manual_seed(context.seed)
        generator = torch.Generator().manual_seed(context.seed)
        teachers = context.zoo.frozen_teachers(context.device)
        spec = context.meta_model
        model = use_batch_statistics(average_of_zoo(context.zoo, spec, context.ways))
        model = model.to(context.device)
        data: list[tuple[torch.Tensor, torch.Tensor]] = []
        if not context.resume.resuming:  # a resumed run takes the inverted data from its state
            started = time.perf_counter()
            data = [self._invert(t, spec.image_size, settings, generator) for t in teachers]
            synchronize(context.device)
            self.recovery_seconds = time.perf_counter() - started
        fusion = FusionNetwork(
            model, len(teachers), settings.embedding_dim, settings.update == "relative"
        ).to(context.device)
        trainable = [parameter for parameter in fusion.parameters() if parameter.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=settings.lr)
        self.history: list[dict[str, float]] = []

        def restore_extra(saved: dict[str, Any]) -> None:
            nonlocal data
            data = [
                (images.to(context.device), probs.to(context.device))
                for images, probs in saved["data"]
            ]
            self.history = saved["history"]

        loop = TrainingLoop(
            context.resume,
            settings.iterations,
            settings.eval_interval,
            f"{self.name} {context.shots}-shot",
            {"fusion": fusion, "optimizer": optimizer, "generator": generator},
            lambda: {"data": [list(pair) for pair in data], "history": self.history},
            restore_extra,
            context.progress,
        )
        for iteration in loop:
            count = min(settings.teachers_per_step, len(teachers))
            sampled = torch.randperm(len(teachers), generator=generator)[:count].tolist()
            objective, robust, nominal = 0.0, 0.0, 0.0
            optimizer.zero_grad(set_to_none=True)
            for index in sampled:
                images, probs = data[index]
                worst = robust_embedding(
                    fusion,
                    model,
                    fusion.embeddings[index],
                    images,
                    probs,
                    settings.gamma,
                    settings.ascent_steps,
                    settings.ascent_lr,
                )
                shift = worst - fusion.embeddings[index].detach()
                loss = teacher_loss(model, fusion(fusion.embeddings[index] + shift), images, probs)
                (loss / count).backward()
                with torch.no_grad():
                    clean = teacher_loss(model, fusion(fusion.embeddings[index]), images, probs)
                loss_value, clean_value = float(loss.detach()), float(clean)
                objective += loss_value / count
                nominal += clean_value / count
                robust += (loss_value - clean_value) / count
            if not math.isfinite(objective):
                raise DfmlError(
                    f"dro: non-finite objective at iteration {iteration}; lower lr or ascent_lr"
                )
            optimizer.step()
            self.history.append({"objective": objective, "nominal": nominal, "robust": robust})
            loop.show(objective=f"{objective:.3f}", robust=f"{robust:.3f}")
            if loop.evaluates(iteration):
                fused = copy.deepcopy(model)
                with torch.no_grad():
                    for name, value in fusion.centre().items():
                        fused.get_parameter(name).copy_(value)
                torch.manual_seed(context.seed)  # `reinit`: the same fresh head every time
                set_head(fused, settings.head, spec, context.ways)
                self.timings.final_objective = objective
                yield Checkpoint(iteration=iteration, model=fused)

    def _invert(
        self,
        teacher: nn.Module,
        image_size: int,
        settings: DroSettings,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs inverted from one teacher (its data-free stand-in) and its soft outputs."""
        device = next(teacher.parameters()).device
        classes = teacher.head.out_features
        targets = torch.arange(classes, device=device).repeat_interleave(settings.images_per_class)
        noise = torch.randn(targets.numel(), 3, image_size, image_size, generator=generator)
        images = noise.to(device).requires_grad_()
        optimizer = torch.optim.Adam([images], lr=settings.inversion_lr)
        for _ in range(settings.inversion_steps):
            optimizer.zero_grad(set_to_none=True)
            loss = deep_inversion_loss(
                teacher, images, targets, DeepInversionWeights(), 2, generator
            )
            loss.total.backward()
            optimizer.step()
        with torch.no_grad():
            probs = F.softmax(teacher(images), 1)
        if not bool(images.isfinite().all() & probs.isfinite().all()):
            raise DfmlError("dro: inversion produced non-finite images; lower inversion_lr")
        return images.detach(), probs
