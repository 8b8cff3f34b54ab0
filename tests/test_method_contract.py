"""The contract every registered method keeps, checked for each one without listing them: a new
method is covered as soon as it is registered (its `smoke_settings` size the run)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from dfml_bench.cost import RunShape, WorkRates
from dfml_bench.data import load_dataset
from dfml_bench.methods import (
    Checkpoint,
    MetaTrainContext,
    create_method,
    method_class,
    method_names,
    method_rank,
)
from dfml_bench.resume import StateStore
from dfml_bench.zoo.manifest import Zoo

Weights = dict[str, torch.Tensor]


def _weights(model: nn.Module) -> Weights:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _iterative(name: str) -> bool:
    """Methods evaluated periodically train in a loop that saves and restores its state."""
    return "eval_interval" in method_class(name).Settings.model_fields


@pytest.fixture
def context_for(
    toy_zoo: Zoo, free_context: Callable[..., MetaTrainContext]
) -> Callable[[str, StateStore], MetaTrainContext]:
    def make(name: str, store: StateStore) -> MetaTrainContext:
        context = free_context(toy_zoo)
        context.resume = store
        if not method_class(name).data_free:
            context.training_data = [load_dataset(dataset, 32) for dataset in toy_zoo.datasets]
        return context

    return make


def _run(name: str, context: MetaTrainContext) -> list[Checkpoint]:
    method = create_method(name, method_class(name).smoke_settings)
    return list(method.meta_train(context))


@pytest.mark.parametrize("name", method_names())
def test_method_keeps_the_contract(
    name: str, context_for: Callable[[str, StateStore], MetaTrainContext], tmp_path: Path
) -> None:
    checkpoints = _run(name, context_for(name, StateStore.disabled()))

    assert checkpoints, f"{name} yielded no checkpoint"
    iterations = [checkpoint.iteration for checkpoint in checkpoints]
    assert iterations == sorted(set(iterations)), "checkpoints come in training order, once each"
    for checkpoint in checkpoints:
        for module in checkpoint.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                assert not module.track_running_stats and module.running_mean is None, (
                    f"{name}: BatchNorm must normalise by the batch (use_batch_statistics)"
                )
        assert all(torch.isfinite(p).all() for p in checkpoint.model.parameters())
    final = _weights(checkpoints[-1].model)

    # the same seed gives the same model; an iterative method stopped part-way (after saving its
    # state each iteration) and started again ends where the uninterrupted run ended
    store = StateStore(tmp_path / "state", "contract", 0)
    if _iterative(name):
        stream = create_method(name, method_class(name).smoke_settings).meta_train(
            context_for(name, store)
        )
        assert len(iterations) >= 3, "the smoke settings must evaluate at least three times"
        for _ in iterations[:-1]:  # all but the last checkpoint, so most state has been built
            next(stream)
        stream.close()  # a kill: the last yielded checkpoint's own iteration was not saved yet
        store = StateStore(tmp_path / "state", "contract", 0)
        assert store.resuming, f"{name} saved no state through context.resume"
    again = _run(name, context_for(name, store))
    assert again[-1].iteration == iterations[-1]
    for key, value in _weights(again[-1].model).items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0, msg=f"{name}: {key}")


@pytest.mark.parametrize("name", method_names())
def test_method_describes_itself_for_tables_and_estimates(name: str) -> None:
    cls = method_class(name)
    assert cls.display_name and cls.display_name != name
    if cls.ablation_of is not None:
        parent = method_class(cls.ablation_of)
        assert cls.table_order == parent.table_order
        assert method_rank(parent.name) < method_rank(name)
    settings = create_method(name, cls.smoke_settings).settings
    run = RunShape(ways=5, shots=1, meta_flops=1.0, teacher_load=10.0, teachers=2)
    seconds = cls.meta_training_seconds(settings, run, WorkRates(1e-3, 1e-3, 1e-3, 1e-3, 1e-3))
    assert math.isfinite(seconds) and seconds >= 0
    if _iterative(name):
        assert seconds > 0, f"{name} trains, so its cost model cannot be 0 s"
