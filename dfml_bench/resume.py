"""Resumable runs: the full training state, saved atomically at intervals and restored on restart.

A state file holds everything needed to continue as if never stopped: the method's own state
(models, optimisers, pseudo-data, curriculum, its torch.Generator), the caller's progress (e.g.
the runner's evaluated checkpoints and timings) and the global RNG states of torch, numpy and
Python. Files are written with `torch.save` into a temp file that is renamed into place, and read
with `weights_only=True`, so a crash never leaves half a state and a state file cannot run code.
The newest two are kept: a corrupt newest file falls back to the one before it.
"""

from __future__ import annotations

import random
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dfml_bench import atomic

STATE_FORMAT = 1
KEEP = 2  # newest state files kept; the older one is the fallback for a corrupt newest
StateFn = Callable[[], dict[str, Any]]


class ResumeWarning(UserWarning):
    """A state file that could not be used (corrupt, or from another configuration)."""


@dataclass(frozen=True)
class SavedState:
    iteration: int
    method: dict[str, Any]
    progress: dict[str, Any]
    path: Path


class StateStore:
    """Saves and restores one job's state in `directory` (one job, one directory).

    `fingerprint` identifies the job's configuration: a state saved under another fingerprint is
    ignored with a warning, so a changed config never continues from a stale state. With
    `interval_s` = 0 every `step` saves (tests); `None` disables saving altogether.
    """

    def __init__(self, directory: Path | str, fingerprint: str, interval_s: float | None) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.interval_s = interval_s
        self.progress_state: StateFn = dict  # set by the caller that owns the job's progress
        if interval_s is not None:
            for leftover in self.directory.glob(".state-*.tmp"):  # a save cut short by a kill
                leftover.unlink(missing_ok=True)
        self.restored = self._load_latest() if interval_s is not None else None
        self._last_save = time.monotonic()

    @classmethod
    def disabled(cls) -> StateStore:
        """Saves and restores nothing (runs driven directly by tests or other tools)."""
        return cls(Path(), "", None)

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None

    @property
    def resuming(self) -> bool:
        return self.restored is not None

    def restore_method(self) -> tuple[int, dict[str, Any]] | None:
        """(iteration, the method's saved state), with the global RNGs put back as they were at
        the save; None for a fresh start. Call it once the method has built its objects (that
        may draw random numbers) and before it draws any random number of the continued run."""
        if self.restored is None:
            return None
        set_rng_states(self.restored.method["rng"])
        return self.restored.iteration, self.restored.method

    def step(self, iteration: int, method_state: StateFn, force: bool = False) -> None:
        """Save when the interval has passed since the last save (always when `force`)."""
        if self.interval_s is None:
            return
        if force or time.monotonic() - self._last_save >= self.interval_s:
            self.save(iteration, method_state())

    def save(self, iteration: int, method_state: dict[str, Any]) -> Path:
        payload = {
            "format": STATE_FORMAT,
            "fingerprint": self.fingerprint,
            "iteration": iteration,
            "method": dict(method_state, rng=rng_states()),
            "progress": self.progress_state(),
        }
        path = self.directory / f"state-{iteration:09d}.pt"
        atomic.write_with(path, lambda tmp: torch.save(payload, tmp))
        for old in self._state_files()[:-KEEP]:
            old.unlink(missing_ok=True)
        self._last_save = time.monotonic()
        return path

    def clear(self) -> None:
        """Drop every state: the job finished and wrote its results."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def _state_files(self) -> list[Path]:
        return sorted(self.directory.glob("state-*.pt"))

    def _load_latest(self) -> SavedState | None:
        for path in reversed(self._state_files()):
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # any unreadable file: fall back to the one before
                kept = path.with_suffix(".corrupt")  # kept for a look, out of the way of saves
                path.replace(kept)
                warnings.warn(
                    f"state file {path} is unreadable ({type(error).__name__}), moved to "
                    f"{kept.name}; trying the previous one",
                    ResumeWarning,
                    stacklevel=3,
                )
                continue
            if payload.get("format") != STATE_FORMAT or payload.get("fingerprint") != (
                self.fingerprint
            ):
                warnings.warn(
                    f"state file {path} was saved by another configuration or version; "
                    "removed its states and starting from scratch",
                    ResumeWarning,
                    stacklevel=3,
                )
                self.clear()  # stale states would otherwise outrank the new run's in pruning
                return None
            return SavedState(payload["iteration"], payload["method"], payload["progress"], path)
        return None


def snapshot(objects: Mapping[str, Any]) -> dict[str, Any]:
    """The states of a loop's objects: `state_dict()` of modules, optimisers and schedulers,
    `get_state()` of torch.Generators."""
    return {
        name: obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()
        for name, obj in objects.items()
    }


def load_snapshot(objects: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Put back what `snapshot` took, into the same (already built) objects."""
    for name, obj in objects.items():
        if isinstance(obj, torch.Generator):
            obj.set_state(saved[name])
        else:
            obj.load_state_dict(saved[name])


def rng_states() -> dict[str, Any]:
    """Global RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
