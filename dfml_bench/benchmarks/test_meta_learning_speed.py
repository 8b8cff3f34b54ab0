"""Meta-learning speed: one MAML meta-batch (4 tasks) and a 600-task meta-test, task by task
against batched under torch.func.vmap."""

from __future__ import annotations

import pytest
import torch

from dfml_bench.benchmarks.helpers import measure, random_dataset, sized
from dfml_bench.data.task import Task
from dfml_bench.evaluation.harness import EvaluationSettings, evaluate
from dfml_bench.meta.adaptation import parameters_of, use_batch_statistics
from dfml_bench.meta.maml import maml_outer_loss
from dfml_bench.models import build_model


def _task(ways: int, shots: int, queries: int, device: torch.device, seed: int) -> Task:
    generator = torch.Generator().manual_seed(seed)
    support = torch.randn(ways * shots, 3, 32, 32, generator=generator)
    query = torch.randn(ways * queries, 3, 32, 32, generator=generator)
    return Task(
        support.to(device),
        torch.arange(ways).repeat_interleave(shots).to(device),
        query.to(device),
        torch.arange(ways).repeat_interleave(queries).to(device),
    )


@pytest.mark.parametrize("batching", ["sequential", "batched"])
def test_maml_meta_batch(benchmark, device: torch.device, batching: str) -> None:
    """PURER's meta-learner step: 4 tasks (5-way 1-shot, 15 queries), 1 inner step, second
    order, outer loss + backward."""
    torch.manual_seed(0)
    model = use_batch_statistics(build_model("conv4", 5, 32)).to(device)
    params = {name: value.requires_grad_() for name, value in parameters_of(model).items()}
    tasks = [_task(5, 1, 15, device, seed) for seed in range(4)]

    def step() -> None:
        loss, _ = maml_outer_loss(model, params, tasks, 1, 0.01, True, batching=batching)
        torch.autograd.grad(loss, list(params.values()))

    measure(
        benchmark,
        step,
        device,
        group="MAML meta-batch (4 tasks)",
        variant=batching,
        baseline=batching == "sequential",
        settings="conv4 32px, 5-way 1-shot, 15 queries, 1 inner step, second order",
        rounds=10,
    )


@pytest.mark.parametrize("batching", ["sequential", "batched"])
def test_meta_test(benchmark, device: torch.device, batching: str) -> None:
    """The harness on 600 test tasks (5-way 1-shot, 10 first-order inner steps, batch-statistics
    BN), as FREE evaluates; chunks of 300 tasks when batched. 60 tasks on CPU, where 600 batched
    tasks take minutes per round (the time scales linearly with the tasks)."""
    episodes = sized(600 if device.type == "cuda" else 60, 10)
    settings = EvaluationSettings(
        episodes=episodes,
        inner_steps=10,
        inner_lr=0.01,
        task_batching=batching,
        task_chunk=min(300, episodes),
    )
    dataset = random_dataset()
    torch.manual_seed(0)
    model = use_batch_statistics(build_model("conv4", 5, 32))

    def run() -> None:
        evaluate(model, dataset, "test", 1, settings, 0, device, progress=False)

    measure(
        benchmark,
        run,
        device,
        group=f"meta-test ({episodes} tasks)",
        variant=batching,
        baseline=batching == "sequential",
        settings="conv4 32px, 5-way 1-shot, 15 queries, 10 inner steps, chunks of 300"
        + ("" if episodes == 600 else "; reference scaled from 600 tasks"),
        reference_ms=25_400.0 * episodes / 600,  # the authors' 600 tasks, scaled linearly
        tasks_per_call=episodes,
        rounds=2 if device.type == "cpu" else 5,
    )
