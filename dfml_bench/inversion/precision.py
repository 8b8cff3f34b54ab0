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
