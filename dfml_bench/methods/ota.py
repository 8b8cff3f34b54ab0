"""OTA: optimal-transport model fusion (Singh & Jaggi, NeurIPS 2020) of a same-architecture zoo.

Layer by layer, the neurons (conv channels, hidden units) of each teacher are matched to those
of a reference teacher by an exact OT plan (POT's EMD, uniform marginals) on a ground cost between
neurons: their incoming weights (after the previous layer's alignment was applied to their inputs)
or, optionally, their activations on generated inputs (Gaussian noise: no data). The plan, scaled
to a permutation-like matrix, reorders the layer's outputs, its BatchNorm parameters and buffers,
and the next layer's inputs. The aligned teachers are then averaged like `average`. The head's
outputs (classes) are never permuted. Conv4-style models only (conv -> BN blocks then a linear
head): residual networks would need the shortcut alignment the paper leaves open.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import nn

from dfml_bench.errors import DfmlError
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.methods.base import Checkpoint, MetaTrainContext, NoMetaTraining, register_method
from dfml_bench.models import build_model
from dfml_bench.zoo.fusion import FusionHeadSettings, average_state_dicts, fuse_into, set_head

State = dict[str, torch.Tensor]
SUPPORTED = ("conv4", "conv4-gap", "conv4-gmp")


class OtaSettings(FusionHeadSettings):
    model_config = ConfigDict(extra="forbid")
    reference: int = Field(0, ge=0, description="index of the teacher others are aligned to")
    cost: Literal["weight", "activation"] = "weight"
    activation_samples: int = Field(64, ge=2, description="noise inputs for the activation cost")


def conv_layers(state: State) -> list[str]:
    """Prefixes of the conv -> BN blocks in forward order (`features.{i}`)."""
    blocks = sorted(
        {key.rsplit(".", 2)[0] for key in state if key.startswith("features.")},
        key=lambda prefix: int(prefix.split(".")[1]),
    )
    return blocks


def transport_matrix(cost: torch.Tensor) -> torch.Tensor:
    """Exact OT plan with uniform marginals, scaled by n so that rows/columns sum to 1 (a
    permutation when the optimum is unique); rows = the model's neurons, cols = the reference's."""
    n = cost.shape[0]
    uniform = np.full(n, 1.0 / n)
    import ot  # POT pulls in scipy: imported only by the runs that align

    plan = ot.emd(uniform, uniform, cost.detach().double().cpu().numpy())
    return torch.as_tensor(plan * n, dtype=torch.float32)


def align_to(
    state: State,
    reference: State,
    costs: list[torch.Tensor] | None = None,
) -> State:
    """`state` with every block's output neurons transported onto `reference`'s.

    `costs[l]` overrides the weight-based ground cost of block l (e.g. activation distances)."""
    aligned = {k: v.clone() for k, v in state.items()}
    previous: torch.Tensor | None = None  # transport of the previous block's outputs
    for index, block in enumerate(conv_layers(state)):
        weight = aligned[f"{block}.0.weight"]  # [out, in, k, k]
        if previous is not None:  # inputs first: they follow the previous block's alignment
            weight = torch.einsum("oikl,ij->ojkl", weight, previous)
        bias = aligned[f"{block}.0.bias"]
        if costs is not None:
            cost = costs[index]
        else:
            mine = torch.cat([weight.flatten(1), bias[:, None]], 1)
            theirs = torch.cat(
                [reference[f"{block}.0.weight"].flatten(1), reference[f"{block}.0.bias"][:, None]],
                1,
            )
            cost = torch.cdist(mine, theirs) ** 2
        transport = transport_matrix(cost)  # [mine, reference]
        aligned[f"{block}.0.weight"] = torch.einsum("oikl,oj->jikl", weight, transport)
        for name in ("0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
            key = f"{block}.{name}"
            if key in aligned:
                aligned[key] = transport.T @ aligned[key]
        previous = transport
    if previous is not None:  # the head reads the last block's channels (times spatial cells)
        head = aligned["head.weight"]
        channels = previous.shape[0]
        cells = head.shape[1] // channels
        head = head.view(head.shape[0], channels, cells)
        aligned["head.weight"] = torch.einsum("kcs,cd->kds", head, previous).reshape(
            head.shape[0], -1
        )
    return aligned


def activation_costs(
    model: nn.Module, reference: nn.Module, samples: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Per block, squared distances between the channels' pre-activation maps (conv outputs,
    before BN and ReLU, so no channel is dead) on the same Gaussian-noise inputs: which channel of
    the model responds like which of the reference."""
    size = getattr(model, "image_size", 32)
    noise = torch.randn(samples, 3, size, size, generator=generator)

    def responses(net: nn.Module) -> list[torch.Tensor]:
        outputs, x = [], noise
        with torch.no_grad():
            for block in net.features:
                outputs.append(block[0](x).transpose(0, 1).flatten(1))  # [channels, values]
                x = block(x)
        return outputs

    return [torch.cdist(a, b) ** 2 for a, b in zip(responses(model.eval()), responses(reference))]


@register_method
class Ota(NoMetaTraining):
    name = "ota"
    display_name = "OTA"
    table_order = 2
    Settings = OtaSettings
    same_architecture_only = True

    def inapplicable_reason(self, context: MetaTrainContext) -> str | None:
        reason = super().inapplicable_reason(context)
        if reason is None and context.meta_model.architecture not in SUPPORTED:
            reason = (
                f"ota aligns conv -> BN blocks ({', '.join(SUPPORTED)}); "
                f"{context.meta_model.architecture} is not supported"
            )
        return reason

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        self.check_zoo(context)
        settings: OtaSettings = self.settings  # type: ignore[assignment]
        zoo = context.zoo
        if settings.reference >= len(zoo.teachers):
            raise DfmlError(
                f"ota reference teacher {settings.reference} does not exist; the zoo has "
                f"{len(zoo.teachers)}"
            )
        teachers = [zoo.load_teacher(index) for index in range(len(zoo.teachers))]
        reference = teachers[settings.reference]
        generator = torch.Generator().manual_seed(context.seed)
        aligned = []
        for teacher in teachers:
            costs = (
                activation_costs(teacher, reference, settings.activation_samples, generator)
                if settings.cost == "activation"
                else None
            )
            aligned.append(align_to(teacher.state_dict(), reference.state_dict(), costs))
        spec = context.meta_model
        model = build_model(spec.architecture, context.ways, spec.image_size, spec.init)
        fuse_into(
            model, aligned, context.ways, average_state_dicts, f"zoo {zoo.manifest.recipe_name!r}"
        )
        torch.manual_seed(context.seed)  # the fresh head of `reinit`
        set_head(model, settings.head, spec, context.ways)
        yield Checkpoint(iteration=0, model=use_batch_statistics(model))
