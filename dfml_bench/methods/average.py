"""Average: the element-wise mean of the zoo's parameters and BN buffers, heads included.

The fusion itself (and the authors' doubled FedAvg under `fidelity: authors`) lives in
`dfml_bench.zoo.fusion`; PURER starts from this Average (`--average`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import ConfigDict, Field

from dfml_bench.fidelity import FidelitySettings
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.methods.base import Checkpoint, MetaTrainContext, NoMetaTraining, register_method
from dfml_bench.zoo.fusion import Accumulation, FusionHeadSettings, average_of_zoo, set_head


class AverageSettings(FusionHeadSettings, FidelitySettings):
    model_config = ConfigDict(extra="forbid")
    accumulation: Accumulation | None = Field(
        None, description="doubled: the authors' FedAvg (conv/BN added twice); mean: true mean"
    )
    PROFILE_VALUES = {"accumulation": {"authors": "doubled", "corrected": "mean"}}


@register_method
class Average(NoMetaTraining):
    """Needs one architecture. Teachers whose head size differs from the task's N ways (PURER's
    last disjoint group has 4 classes) contribute their backbone but not their head."""

    name = "average"
    display_name = "Average"
    table_order = 1
    Settings = AverageSettings
    same_architecture_only = True

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        self.check_zoo(context)
        settings: AverageSettings = self.settings  # type: ignore[assignment]
        torch.manual_seed(context.seed)  # the fresh head of `reinit`
        spec = context.meta_model
        model = average_of_zoo(context.zoo, spec, context.ways, settings.accumulation)
        set_head(model, settings.head, spec, context.ways)
        yield Checkpoint(iteration=0, model=use_batch_statistics(model))
