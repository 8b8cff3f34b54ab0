"""How inversion runs (strategy, precision, compilation): settings PURER and FREE share.

They change speed and float rounding only, never the objective, so a config can switch them per
device without changing what a run measures.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field, model_validator

from dfml_bench.inversion.precision import InversionPrecision
from dfml_bench.inversion.vectorised import InversionStrategy, resolve_strategy


class InversionSpeedSettings(BaseModel):
    """Mixed into a method's settings; the method passes them to `StackedTeachers` and autocast."""

    inversion_strategy: InversionStrategy = Field(
        "auto", description="teachers one by one (loop) or vmapped; auto: vectorised on CUDA"
    )
    inversion_precision: InversionPrecision = Field(
        "float32", description="bfloat16: teacher passes under autocast (for GPUs)"
    )
    inversion_compile: bool = Field(
        False,
        description="torch.compile the vectorised loss (for GPUs; tens of seconds to compile)",
    )

    @model_validator(mode="after")
    def _compile_needs_vectorised(self) -> InversionSpeedSettings:
        if self.inversion_compile and self.inversion_strategy == "loop":
            raise ValueError(
                "inversion_compile compiles the vectorised inversion only; set "
                "inversion_strategy to auto or vectorised, or inversion_compile to false"
            )
        return self

    def vectorised_on(self, device: torch.device) -> bool:
        """Whether teachers are stacked for one vmapped call per group on `device`."""
        strategy = resolve_strategy(self.inversion_strategy, device, self.inversion_compile)
        return strategy == "vectorised"
