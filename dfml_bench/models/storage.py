"""Models on disk as safetensors (plain tensors only: loading can never run code)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dfml_bench import atomic
from dfml_bench.errors import CheckpointError


def save_state(module_or_state: nn.Module | dict[str, torch.Tensor], path: Path) -> str:
    """Write a state dict atomically; returns the file's sha256 for the manifest."""
    state = (
        module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    )
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
    atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp)))
    return file_sha256(path)


def load_state(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict, failing with the file's name if it is missing, truncated or altered."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} is missing; retrain it (dfml-bench zoo train)")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise CheckpointError(
            f"model file {path} does not match the checksum in its manifest (corrupt or replaced);"
            " delete it and retrain the zoo"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"model file {path} is corrupt or not a safetensors file ({error}); delete and retrain"
        ) from None


def load_into(module: nn.Module, path: Path, expected_sha256: str | None = None) -> nn.Module:
    """Load weights into an already-built module, naming the file if shapes or keys disagree."""
    state = load_state(path, expected_sha256)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        # torch lists every bad key on its own line; the first one is enough to diagnose
        lines = str(error).splitlines()
        detail = (lines[1] if len(lines) > 1 else lines[0]).strip()
        detail = detail if len(detail) <= 240 else detail[:240] + "..."
        raise CheckpointError(
            f"model file {path} does not fit its declared architecture"
            f" ({type(module).__name__}): {detail}"
        ) from None
    return module


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
