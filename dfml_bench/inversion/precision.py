"""Reduced-precision teacher passes for inversion: bfloat16 autocast behind a setting.

Inversion spends nearly all its time in the teachers' convolutions, which bfloat16 runs about
twice as fast on recent GPUs. Only the teacher forward passes are cast: BatchNorm statistics, the
cross-entropy and the image priors stay in float32 (see `_bn_matching_loss`), and the pseudo
images and their optimiser are float32 throughout, so the setting changes rounding, not the loss.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch

InversionPrecision = Literal["float32", "bfloat16"]


def inversion_autocast(
    precision: InversionPrecision, device: torch.device
) -> AbstractContextManager[object]:
    """The autocast context for `precision` on `device` (a no-op for float32)."""
    if precision == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def at_least_float32(values: torch.Tensor) -> torch.Tensor:
    """Half-precision results of an autocast region back in float32 for losses and statistics;
    float32 and float64 pass unchanged (a plain `.float()` would round float64 down)."""
    return values.float() if values.dtype in (torch.float16, torch.bfloat16) else values
