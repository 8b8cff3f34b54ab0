"""Fusing a zoo's parameters into one meta-model: the element-wise mean (Average, and the start of
PURER, DRO and OTA) and the fused model's head.

Under `fidelity: authors` the mean is computed as the authors' FedAvg computes it (PURER
tool.py:590-596): it adds state_dicts in place, and their Conv4 registers every conv and BN tensor
under two keys sharing one storage (the block's `C`/`BN` and the same modules in its `trunk`), so
those tensors are accumulated twice and come out as (w_0 + 2 sum_{i>=1} w_i) / N, about 1.9x the
mean; the head is the exact mean.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

from dfml_bench.errors import DfmlError
from dfml_bench.models import build_model
from dfml_bench.zoo.manifest import Zoo

if TYPE_CHECKING:
    from dfml_bench.methods.base import MetaModelSpec

Accumulation = Literal["doubled", "mean"]
FusedHead = Literal["keep", "zero", "reinit"]
# architectures whose conv/BN tensors the authors' FedAvg accumulates twice (their ConvBlock)
DOUBLED_ARCHITECTURES = ("conv4", "conv4-gap", "conv4-gmp")


class FusionHeadSettings(BaseModel):
    """The head of a fused meta-model: the fused teachers' class rows (`keep`), zeros (`zero`),
    or the meta-model's fresh init (`reinit`). Teachers' classes have nothing to do with a test
    task's, and one fine-tuning step at lr 0.01 cannot override a confident fused head."""

    head: FusedHead = Field("zero", description="keep | zero | reinit (see docs/fidelity.md)")


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


def doubled_state_dicts(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """(w_0 + 2 sum_{i>=1} w_i) / N per floating tensor: the authors' FedAvg on aliased keys."""
    averaged = average_state_dicts(states)
    count = len(states)
    for name, first in states[0].items():
        if first.is_floating_point():
            rest = sum((state[name].float() for state in states[1:]), torch.zeros_like(first))
            averaged[name] = ((first.float() + 2 * rest) / count).to(first.dtype)
    return averaged


def head_names(model: nn.Module) -> set[str]:
    return {f"head.{name}" for name, _ in model.head.named_parameters()}


def set_head(model: nn.Module, head: FusedHead, spec: MetaModelSpec, ways: int) -> nn.Module:
    """Replace a fused model's head in place: kept, zeroed, or a fresh meta-model's (`reinit`,
    drawn from the global RNG: seed it first)."""
    with torch.no_grad():
        if head == "zero":
            for parameter in model.head.parameters():
                parameter.zero_()
        elif head == "reinit":
            fresh = build_model(spec.architecture, ways, spec.image_size, spec.init)
            model.head.load_state_dict(fresh.head.state_dict())
    return model


def average_of_zoo(
    zoo: Zoo, spec: MetaModelSpec, ways: int, accumulation: Accumulation = "mean"
) -> nn.Module:
    """The zoo's element-wise mean as a `ways`-way meta-model (architectures must match);
    `doubled` reproduces the authors' FedAvg on the backbone of Conv4 models."""
    states = [zoo.load_teacher(index).state_dict() for index in range(len(zoo.teachers))]
    model = build_model(spec.architecture, ways, spec.image_size, spec.init)
    doubled = accumulation == "doubled" and spec.architecture in DOUBLED_ARCHITECTURES
    combine = doubled_state_dicts if doubled else average_state_dicts
    return fuse_into(model, states, ways, combine, f"zoo {zoo.manifest.recipe_name!r}")


def fuse_into(
    model: nn.Module,
    states: list[dict[str, torch.Tensor]],
    ways: int,
    combine: Callable[[list[dict[str, torch.Tensor]]], dict[str, torch.Tensor]],
    source: str,
) -> nn.Module:
    """Load `combine` of the teachers' backbones and the mean of their `ways`-way heads into
    `model` (teachers with another number of classes give their backbone only)."""
    heads = head_names(model)
    matching = [state for state in states if state["head.weight"].shape[0] == ways]
    if not matching:
        raise DfmlError(
            f"fusion needs at least one teacher with a {ways}-way head; {source} has none"
        )
    backbone = combine([{k: v for k, v in s.items() if k not in heads} for s in states])
    head = average_state_dicts([{k: v for k, v in s.items() if k in heads} for s in matching])
    model.load_state_dict({**backbone, **head})
    return model
