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


def vmap_layout(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in the default layout on CUDA: inside vmap, CUDA's batch_norm cannot query a
    channels_last input (PyTorch raises "NYI: querying is_contiguous inside of vmap"), and a
    channels_last weight or image gives one. CPU tensors keep their (faster) layout."""
    return tensor.contiguous() if tensor.is_cuda else tensor


def vmap_layouts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`vmap_layout` of every tensor of a parameter (or buffer) dict."""
    return {name: vmap_layout(value) for name, value in tensors.items()}
