"""Average: the element-wise mean of the zoo's parameters and BN buffers, heads included."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from dfml_bench.errors import DfmlError
from dfml_bench.evaluation.adaptation import use_batch_statistics
from dfml_bench.methods.base import (
    Checkpoint,
    MetaModelSpec,
    MetaTrainContext,
    Method,
    register_method,
)
from dfml_bench.models import build_model
from dfml_bench.zoo.manifest import Zoo


class AverageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")


def average_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Mean of each tensor over models (integer counters such as num_batches_tracked: the max)."""
    if not states:
        raise ValueError("nothing to average")
    averaged = {}
    for name, first in states[0].items():
        stacked = torch.stack([state[name] for state in states])
        averaged[name] = (
            stacked.float().mean(0).to(first.dtype)
            if first.is_floating_point()
            else stacked.max(0).values
        )
    return averaged


def head_names(model: nn.Module) -> set[str]:
    return {f"head.{name}" for name, _ in model.head.named_parameters()}


@register_method
class Average(Method):
    """Needs one architecture. Teachers whose head size differs from the task's N ways (PURER's
    last disjoint group has 4 classes) contribute their backbone but not their head."""

    name = "average"
    Settings = AverageSettings
    same_architecture_only = True

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        self.check_zoo(context)
        model = average_of_zoo(context.zoo, context.meta_model, context.ways)
        yield Checkpoint(iteration=0, model=use_batch_statistics(model))


def average_of_zoo(zoo: Zoo, spec: MetaModelSpec, ways: int) -> nn.Module:
    """The zoo's element-wise mean as a `ways`-way meta-model (architectures must match)."""
    states = [zoo.load_teacher(index).state_dict() for index in range(len(zoo.teachers))]
    model = build_model(spec.architecture, ways, spec.image_size)
    heads = head_names(model)
    matching = [state for state in states if state["head.weight"].shape[0] == ways]
    if not matching:
        raise DfmlError(
            f"average needs at least one teacher with a {ways}-way head; zoo "
            f"{zoo.manifest.recipe_name!r} has none"
        )
    backbone = average_state_dicts([{k: v for k, v in s.items() if k not in heads} for s in states])
    head = average_state_dicts([{k: v for k, v in s.items() if k in heads} for s in matching])
    model.load_state_dict({**backbone, **head})
    return model
