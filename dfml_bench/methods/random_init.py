"""Random: a freshly initialised meta-model, no meta-training (the floor every method must beat)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import BaseModel, ConfigDict

from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.methods.base import Checkpoint, MetaTrainContext, NoMetaTraining, register_method
from dfml_bench.models import build_model


class RandomSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


@register_method
class RandomInit(NoMetaTraining):
    name = "random"
    display_name = "Random"
    table_order = 0
    Settings = RandomSettings

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        torch.manual_seed(context.seed)
        spec = context.meta_model
        model = build_model(spec.architecture, context.ways, spec.image_size, spec.init)
        yield Checkpoint(iteration=0, model=use_batch_statistics(model))
