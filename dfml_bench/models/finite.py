"""Whether a model's weights are still numbers: a NaN model still predicts some class, so its
accuracy would look like a result. Training loops and the runner check before going on."""

from __future__ import annotations

import torch
from torch import nn


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf; one host sync when all are finite."""
    named = list(model.named_parameters())
    finite = torch.stack([param.isfinite().all() for _, param in named])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]
