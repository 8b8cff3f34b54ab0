"""Tasks adapted together under vmap equal tasks adapted one by one, and the harness's speed-ups
leave meta-test results unchanged.

Equality checks between the two strategies run in float64: BatchNorm with batch statistics on
tiny batches amplifies float32 rounding (the sequential float32 loop itself drifts ~1e-3 from
float64 after a few steps), so only float64 separates a real mismatch from rounding.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from dfml_bench.data import load_dataset
from dfml_bench.data.sampler import EpisodeSampler
from dfml_bench.data.task import Task
from dfml_bench.evaluation import harness
from dfml_bench.evaluation.harness import EvaluationSettings, evaluate
from dfml_bench.evaluation.icfil import IcfilSettings, icfil_calibrate
from dfml_bench.meta.adaptation import (
    batched_logits,
    batches_tasks,
    finetune,
    finetune_batched,
    parameters_of,
    use_batch_statistics,
)
from dfml_bench.meta.maml import maml_outer_loss
from dfml_bench.models import build_model

WAYS = 5
SIZE = 16  # Conv4's smallest input: keeps every test fast
CPU = torch.device("cpu")
ICFIL = IcfilSettings(pseudo_per_class=1, inversion_steps=2, calibration_steps=1)


pytestmark = pytest.mark.usefixtures("single_thread")


def _model(dtype: torch.dtype = torch.float64, size: int = SIZE) -> nn.Module:
    torch.manual_seed(0)
    model = use_batch_statistics(build_model("conv4", WAYS, size)).to(dtype)
    return model.to(memory_format=torch.channels_last).train()


def _tasks(count: int, shots: int, queries: int = 3, seed: int = 0) -> list[Task]:
    generator = torch.Generator().manual_seed(seed)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, SIZE, SIZE, generator=generator, dtype=torch.float64)

    labels = torch.arange(WAYS)
    return [
        Task(
            images(WAYS * shots),
            labels.repeat_interleave(shots),
            images(WAYS * queries),
            labels.repeat_interleave(queries),
        )
        for _ in range(count)
    ]


def _settings(**update: object) -> EvaluationSettings:
    return EvaluationSettings(
        ways=WAYS, episodes=5, queries=3, inner_steps=2, inner_lr=0.01, icfil=ICFIL
    ).model_copy(update=update)


def test_auto_batches_on_cuda_only() -> None:
    assert not batches_tasks("auto", "cpu")
    assert batches_tasks("auto", torch.device("cuda"))
    assert batches_tasks("batched", "cpu") and not batches_tasks("sequential", "cuda")


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_finetune_batched_matches_sequential(shots: int, steps: int) -> None:
    model, tasks = _model(), _tasks(3, shots)
    init = parameters_of(model)
    support = torch.stack([task.support_images for task in tasks])
    labels = torch.stack([task.support_labels for task in tasks])
    query = torch.stack([task.query_images for task in tasks])
    adapted = finetune_batched(model, init, support, labels, steps, lr=0.05)
    logits = batched_logits(model, adapted, query)
    for index, task in enumerate(tasks):
        one = finetune(model, init, task.support_images, task.support_labels, steps, lr=0.05)
        for name, value in one.items():
            torch.testing.assert_close(adapted[name][index], value, rtol=1e-9, atol=1e-11)
        expected = functional_call(model, one, (task.query_images,))
        torch.testing.assert_close(logits[index], expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("icfil", [False, True])
def test_evaluate_batched_matches_sequential(
    shots: int, icfil: bool, toy_dataset_name: str
) -> None:
    dataset, model = load_dataset(toy_dataset_name), _model(size=32)
    results = [
        evaluate(model, dataset, "test", shots, settings, 0, CPU, False, icfil=icfil)
        for settings in (
            _settings(task_batching="sequential"),
            _settings(task_batching="batched", task_chunk=2),  # 5 tasks: a ragged last chunk
        )
    ]
    sequential, batched = results
    assert torch.equal(sequential.accuracies, batched.accuracies)
    if icfil:
        assert torch.equal(sequential.plain_accuracies, batched.plain_accuracies)


def test_auto_evaluates_sequentially_on_cpu(
    monkeypatch: pytest.MonkeyPatch, toy_dataset_name: str
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("auto must not batch tasks on CPU")

    monkeypatch.setattr(harness, "finetune_batched", refuse)
    result = evaluate(
        _model(size=32), load_dataset(toy_dataset_name), "test", 1, _settings(), 0, CPU, False
    )
    assert result.episodes == 5


@pytest.mark.parametrize("second_order", [True, False])
def test_maml_meta_gradient_batched_matches_sequential(second_order: bool) -> None:
    model = _model()
    params = dict(model.named_parameters())
    outcomes = []
    for batching in ("sequential", "batched"):
        tasks = _tasks(4, shots=2, seed=1)
        # second order reaches the support images too (PURER's adversarial data step)
        support = [task.support_images.requires_grad_() for task in tasks] if second_order else []
        loss, accuracy = maml_outer_loss(
            model, params, tasks, 2, 0.1, second_order=second_order, batching=batching
        )
        gradients = torch.autograd.grad(loss, [*params.values(), *support])
        outcomes.append((loss, accuracy, gradients))
    (loss, accuracy, gradients), (batched_loss, batched_accuracy, batched_gradients) = outcomes
    torch.testing.assert_close(batched_loss, loss, rtol=1e-10, atol=1e-12)
    assert batched_accuracy == accuracy
    for batched_gradient, gradient in zip(batched_gradients, gradients):
        torch.testing.assert_close(batched_gradient, gradient, rtol=1e-8, atol=1e-11)


def _reference(
    dataset_name: str, model: nn.Module, shots: int, settings: EvaluationSettings, icfil: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The harness's loop written out plainly: one episode at a time, host-side counting."""
    dataset = load_dataset(dataset_name)
    sampler = EpisodeSampler(dataset.split("test"), WAYS, shots, settings.queries, 5, 0)
    model = model.to(memory_format=torch.channels_last).train()
    init = parameters_of(model)
    accuracies, plain = [], []

    def accuracy(params: dict, query: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            logits = functional_call(model, params, (query,))
        return 100.0 * float((logits.argmax(1) == labels).double().mean())

    for index, episode in enumerate(sampler):
        support, query = (
            dataset.normalize(images).contiguous(memory_format=torch.channels_last)
            for images in (episode.support_images, episode.query_images)
        )
        adapted = finetune(
            model, init, support, episode.support_labels, settings.inner_steps, settings.inner_lr
        )
        if icfil:
            plain.append(accuracy(adapted, query, episode.query_labels))
            generator = torch.Generator().manual_seed((0 + 0x1CF1) * 1_000_003 + index)
            adapted = icfil_calibrate(
                model, adapted, support, episode.support_labels, WAYS, settings.icfil, generator
            )
        accuracies.append(accuracy(adapted, query, episode.query_labels))
    as_tensor = torch.tensor(accuracies, dtype=torch.float64)
    return as_tensor, torch.tensor(plain, dtype=torch.float64) if icfil else None


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("icfil", [False, True])
def test_evaluate_matches_plain_reference(shots: int, icfil: bool, toy_dataset_name: str) -> None:
    """float32, as the workflow runs: accuracies equal to the last digit."""
    settings = _settings(inner_steps=1)
    model = _model(torch.float32, size=32)
    result = evaluate(
        model, load_dataset(toy_dataset_name), "test", shots, settings, 0, CPU, False, icfil=icfil
    )
    accuracies, plain = _reference(toy_dataset_name, model, shots, settings, icfil)
    assert torch.equal(result.accuracies, accuracies)
    assert (result.plain_accuracies is None) == (plain is None)
    if plain is not None:
        assert torch.equal(result.plain_accuracies, plain)
