"""Confidence intervals as the DFML papers compute them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def mean_ci95(values: Sequence[float] | torch.Tensor) -> tuple[float, float]:
    """Mean and 95% half-width 1.96 * std / sqrt(n) (population std, as the authors' numpy code)."""
    data = torch.as_tensor(values, dtype=torch.float64).flatten()
    if data.numel() == 0:
        raise ValueError("no values to summarise")
    std = data.std(unbiased=False).item() if data.numel() > 1 else 0.0
    return data.mean().item(), 1.96 * std / math.sqrt(data.numel())


def combine_ci95(half_widths: Sequence[float]) -> float:
    """Half-width of the mean of k independent means (MH reports the mean over datasets)."""
    return math.sqrt(sum(width * width for width in half_widths)) / len(half_widths)
