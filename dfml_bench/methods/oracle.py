"""Oracle: MAML on the REAL meta-train split, same meta-model, budget and evaluation. It is not
data-free: an upper bound, shown apart (dagger) in every table."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from dfml_bench.cost import RunShape, WorkRates
from dfml_bench.data.base import FewShotDataset
from dfml_bench.data.sampler import EpisodeSampler
from dfml_bench.data.task import Task
from dfml_bench.errors import DfmlError
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.meta.loop import TrainingLoop, descend
from dfml_bench.meta.maml import meta_batch_loss
from dfml_bench.methods.base import Checkpoint, MetaTrainContext, Method, register_method
from dfml_bench.models import build_model

TRAIN_SEED_OFFSET = 20_011  # meta-train episodes: a stream apart from val and test


class OracleSettings(BaseModel):
    """MAML as PURER's meta-learner runs it (1 inner step, second order, 4 tasks per batch)."""

    model_config = ConfigDict(extra="forbid")
    iterations: int = Field(60_000, ge=1)
    meta_batch: int = Field(4, ge=1)
    inner_steps: int = Field(1, ge=1)
    inner_lr: float = Field(0.01, gt=0)
    outer_lr: float = Field(1e-3, gt=0)
    second_order: bool = True
    queries: int = Field(15, ge=1)
    eval_interval: int | None = Field(500, ge=1, description="as PURER; None: final only")


@register_method
class Oracle(Method):
    name = "oracle"
    display_name = "Oracle (real data)"
    table_order = 6
    Settings = OracleSettings
    data_free = False
    smoke_settings: ClassVar[dict[str, Any]] = {
        "iterations": 6,
        "eval_interval": 2,
        "meta_batch": 2,
        "queries": 3,
    }
    cost_assumption = "Oracle: iterations x a MAML meta-batch on real tasks"

    @classmethod
    def meta_training_seconds(cls, settings: BaseModel, run: RunShape, rates: WorkRates) -> float:
        s: OracleSettings = settings  # type: ignore[assignment]
        task = run.task(s.queries, s.inner_steps)
        return s.iterations * rates.maml_image * s.meta_batch * task * run.meta_flops

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        settings: OracleSettings = self.settings  # type: ignore[assignment]
        if not context.training_data:
            raise DfmlError("oracle trains on real meta-train data; the runner passes none")
        torch.manual_seed(context.seed)
        generator = torch.Generator().manual_seed(context.seed)
        spec = context.meta_model
        model = use_batch_statistics(
            build_model(spec.architecture, context.ways, spec.image_size, spec.init)
        )
        model = model.to(context.device, memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.outer_lr)
        samplers = [
            EpisodeSampler(
                dataset.split("train"),
                context.ways,
                context.shots,
                settings.queries,
                settings.iterations * settings.meta_batch,
                context.seed + TRAIN_SEED_OFFSET,
            )
            for dataset in context.training_data
        ]
        loop = TrainingLoop(
            context.resume,
            settings.iterations,
            settings.eval_interval,
            f"{self.name} {context.shots}-shot",
            {"model": model, "optimizer": optimizer, "generator": generator},
            progress=context.progress,
        )
        for iteration in loop:
            tasks = []
            for slot in range(settings.meta_batch):
                which = int(torch.randint(len(samplers), (1,), generator=generator))
                episode = samplers[which].episode((iteration - 1) * settings.meta_batch + slot)
                dataset = context.training_data[which]
                tasks.append(
                    Task(
                        _prepare(dataset, episode.support_images, spec.image_size, context),
                        episode.support_labels.to(context.device),
                        _prepare(dataset, episode.query_images, spec.image_size, context),
                        episode.query_labels.to(context.device),
                    )
                )
            loss, accuracy = meta_batch_loss(model, tasks, settings)
            descend(
                optimizer,
                loss,
                f"{self.name}: non-finite meta-loss at meta-iteration {iteration}; lower outer_lr",
            )
            loop.show(acc=f"{accuracy:.1f}")
            if loop.evaluates(iteration):
                yield Checkpoint(iteration=iteration, model=copy.deepcopy(model))


def _prepare(
    dataset: FewShotDataset, images: torch.Tensor, size: int, context: MetaTrainContext
) -> torch.Tensor:
    images = dataset.normalize(images.to(context.device))
    if images.shape[-1] != size:
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
    return images.contiguous(memory_format=torch.channels_last)
