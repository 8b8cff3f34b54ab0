"""The outer loop every iterative method runs: restore a saved state, show progress, hand out
iterations, save the state after each one, and step optimisers only on finite losses.

A method keeps its own body (what one iteration does) and says what its state is; the loop owns
the bookkeeping that used to be copied into each method, so resuming behaves the same for all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from dfml_bench.errors import DfmlError
from dfml_bench.resume import StateStore, load_snapshot, snapshot


def checkpoint_iterations(total: int, interval: int | None) -> set[int]:
    """Iterations (or epochs) to evaluate at: every `interval` and always the last one."""
    if interval is None or interval >= total:
        return {total}
    return {*range(interval, total + 1, interval), total}


class TrainingLoop:
    """Iterations `1..total` of one method's meta-training, resumable.

    `stateful` holds the objects with a `state_dict` (models, optimisers, torch.Generators);
    `extra_state` returns the rest (counters, pseudo-data) and `restore_extra` puts it back.
    Iterating yields the next iteration number; the state is saved when the caller asks for the
    one after it (so after any checkpoint it yielded), always at evaluation iterations.
    """

    def __init__(
        self,
        store: StateStore,
        total: int,
        eval_interval: int | None,
        description: str,
        stateful: Mapping[str, Any],
        extra_state: Callable[[], dict[str, Any]] = dict,
        restore_extra: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = True,
    ) -> None:
        self.store, self.total, self.stateful = store, total, stateful
        self.extra_state = extra_state
        self.evaluate_at = checkpoint_iterations(total, eval_interval)
        self.done = 0
        restored = store.restore_method()
        if restored is not None:
            self.done, saved = restored
            load_snapshot(stateful, saved)
            if restore_extra is not None:
                restore_extra(saved)
        self.bar = tqdm(
            range(self.done + 1, total + 1),
            initial=self.done,
            total=total,
            desc=description,
            disable=not progress,
            leave=False,
        )

    def __iter__(self) -> Iterator[int]:
        for iteration in self.bar:
            yield iteration
            self.store.step(iteration, self._state, force=self.evaluates(iteration))

    def evaluates(self, iteration: int) -> bool:
        """Whether the method yields a checkpoint after `iteration`."""
        return iteration in self.evaluate_at

    def show(self, **values: str) -> None:
        self.bar.set_postfix(**values)

    def _state(self) -> dict[str, Any]:
        return snapshot(self.stateful) | self.extra_state()


def descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor, failure: str) -> None:
    """One optimiser step on `loss`; a non-finite loss stops the run with `failure` (which says
    where and which setting to lower) instead of writing NaN into the weights."""
    if not torch.isfinite(loss):
        raise DfmlError(failure)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
