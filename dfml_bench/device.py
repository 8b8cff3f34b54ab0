"""Device choice and timing hygiene: CUDA work is asynchronous, so timers synchronise first."""

from __future__ import annotations

import torch

from dfml_bench.errors import DfmlError


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DfmlError("device 'cuda' requested but no CUDA GPU is visible; use device: auto")
    return torch.device(choice)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA kernels (no-op on CPU), so wall-clock timings are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
