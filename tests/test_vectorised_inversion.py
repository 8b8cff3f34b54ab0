"""Zoo-vectorised DeepInversion equals the per-teacher loop: loss terms, image gradients, jitter,
the strategy choice, and PURER's data step and FREE's generator adaptation under both."""

from collections.abc import Callable

import pytest
import torch

from dfml_bench.inversion import (
    DeepInversionWeights,
    TeacherWeighting,
    deep_inversion_loss_over_teachers,
    eci_teacher_weights,
)
from dfml_bench.inversion.pool import PseudoImagePool
from dfml_bench.inversion.vectorised import StackedTeachers, resolve_strategy, roll_each
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.methods import MetaModelSpec, MetaTrainContext, create_method
from dfml_bench.methods.purer import Adversary, eci_data_step
from dfml_bench.models import build_model
from dfml_bench.zoo.manifest import Zoo

RTOL = 1e-4


pytestmark = pytest.mark.usefixtures("single_thread", "no_tf32")


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("zoo", ["conv4", "resnet10", "resnet18", "mixed", "mixed-sizes"])
@pytest.mark.parametrize("jitter", [0, 2])
@pytest.mark.parametrize("weighting", ["plain", "cumulative"])
def test_vectorised_loss_and_image_gradients_equal_the_loop(
    zoo: str, jitter: int, weighting: TeacherWeighting, random_teacher_zoo: Callable
) -> None:
    teachers, images, targets = random_teacher_zoo(zoo)
    weights = DeepInversionWeights()
    scales = eci_teacher_weights(len(teachers), weighting)
    results = []
    for stacked in (False, True):
        leaves = [image.clone().requires_grad_() for image in images]
        generator = torch.Generator().manual_seed(3)
        if stacked:
            loss, logits = StackedTeachers(teachers).loss(
                leaves, targets, weights, jitter, generator, teacher_weights=scales
            )
            assert [tuple(x.shape) for x in logits] == [(len(t), t.max() + 1) for t in targets]
        else:
            loss = deep_inversion_loss_over_teachers(
                teachers, leaves, targets, weights, jitter, generator, scales
            )
        gradients = torch.autograd.grad(loss.total, leaves)
        results.append((loss, gradients, generator.get_state()))
    (loop, loop_grads, loop_rng), (vectorised, vectorised_grads, vectorised_rng) = results
    assert loop.total.item() == pytest.approx(vectorised.total.item(), rel=RTOL)
    for term in ("ce", "bn", "tv", "l2"):
        assert getattr(vectorised, term) == pytest.approx(getattr(loop, term), rel=RTOL), term
    for expected, actual in zip(loop_grads, vectorised_grads):
        assert _relative_error(actual, expected) < RTOL
    assert torch.equal(loop_rng, vectorised_rng)  # the same number of draws, in the same order


def test_stacking_groups_by_architecture_and_shapes(random_teacher_zoo: Callable) -> None:
    teachers, _, _ = random_teacher_zoo("mixed")
    stacked = StackedTeachers(teachers)
    assert len(stacked) == 4
    assert sorted(group.members for group in stacked.groups) == [[0, 2], [1], [3]]
    assert (
        len(StackedTeachers(random_teacher_zoo("mixed-sizes")[0]).groups) == 2
    )  # 32 px and 16 px heads


def test_a_subset_of_teachers_in_any_order_equals_the_loop(random_teacher_zoo: Callable) -> None:
    """FREE inverts a few sampled teachers per epoch: the stacks are gathered, not rebuilt."""
    teachers, images, targets = random_teacher_zoo("mixed")
    order = [2, 1, 0]
    stacked = StackedTeachers(teachers)
    loss, _ = stacked.loss(
        [images[i] for i in order], [targets[i] for i in order], jitter=0, indices=order
    )
    expected = deep_inversion_loss_over_teachers(
        [teachers[i] for i in order],
        [images[i] for i in order],
        [targets[i] for i in order],
        jitter=0,
    )
    assert loss.total.item() == pytest.approx(expected.total.item(), rel=RTOL)
    with pytest.raises(ValueError, match="no teacher 9"):
        stacked.loss([images[0]], [targets[0]], jitter=0, indices=[9])


def test_roll_each_is_a_per_teacher_roll() -> None:
    images = torch.randn(3, 2, 1, 5, 6)
    shifts = torch.tensor([[1, -2], [0, 0], [-2, 2]])
    rolled = roll_each(images, shifts)
    for index, (dy, dx) in enumerate(shifts.tolist()):
        assert torch.equal(rolled[index], torch.roll(images[index], (dy, dx), dims=(-2, -1)))


def test_bn_weight_zero_and_refusals(random_teacher_zoo: Callable) -> None:
    teachers, images, targets = random_teacher_zoo("conv4")
    no_stats = [use_batch_statistics(t).eval() for t in teachers]
    weights = DeepInversionWeights(bn=0.0)
    loss, _ = StackedTeachers(no_stats).loss(images, targets, weights, jitter=0)
    expected = deep_inversion_loss_over_teachers(no_stats, images, targets, weights, jitter=0)
    assert loss.bn == 0.0 and loss.total.item() == pytest.approx(expected.total.item(), rel=RTOL)
    with pytest.raises(ValueError, match="no running statistics"):
        StackedTeachers(no_stats).loss(images, targets, jitter=0)
    with pytest.raises(ValueError, match="eval mode"):
        StackedTeachers([teachers[0].train()])


def test_auto_strategy_is_the_loop_on_cpu_and_vectorised_on_cuda() -> None:
    assert resolve_strategy("auto", torch.device("cpu")) == "loop"
    assert resolve_strategy("auto", "cuda") == "vectorised"
    assert resolve_strategy("vectorised", "cpu") == "vectorised"
    assert resolve_strategy("loop", "cuda") == "loop"
    assert create_method("purer").settings.inversion_strategy == "auto"


@pytest.fixture
def plain_sgd(monkeypatch: pytest.MonkeyPatch) -> None:
    """SGD wherever the methods build Adam. Adam's first steps are sign-like (g / |g|), so float
    noise on the many near-zero gradients of pixels and generator weights becomes a +-lr step
    either way, and whole runs drift apart by a few percent whichever strategy computes the loss;
    SGD keeps the runs comparable to float precision, so a wrong shift or teacher is glaring."""

    def sgd(params: object, lr: float, betas: object = None) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.optim, "Adam", sgd)


def _update_difference(
    start: dict[str, torch.Tensor], first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]
) -> float:
    """||second - first|| / ||first - start|| over all tensors: how far two runs from the same
    start disagree, relative to how far they moved."""
    apart = sum(float((second[k] - first[k]).pow(2).sum()) for k in start)
    moved = sum(float((first[k] - start[k]).pow(2).sum()) for k in start)
    return (apart / moved) ** 0.5


@pytest.mark.parametrize("adversarial", [False, True])
def test_purer_data_step_is_the_same_with_either_strategy(
    adversarial: bool, random_teacher: Callable
) -> None:
    teachers = [random_teacher("conv4", 5, 16, seed) for seed in range(3)]
    torch.manual_seed(0)
    meta_model = use_batch_statistics(build_model("conv4", 5, 16))
    pools, losses = [], []
    for inverter in (teachers, StackedTeachers(teachers)):
        generator = torch.Generator().manual_seed(0)
        pool = PseudoImagePool([range(5 * t, 5 * t + 5) for t in range(3)], 4, 16, generator)
        start = {"pool": torch.cat(list(pool.blocks)).detach().clone()}
        optimizer = torch.optim.SGD(pool.parameters(), lr=0.25)  # see plain_sgd
        adversary = Adversary(meta_model, 10.0, 1, 0.01) if adversarial else None
        for _ in range(2):
            loss = eci_data_step(
                inverter,
                pool,
                optimizer,
                DeepInversionWeights(),
                2,
                generator,
                adversary,
                (5, 1, 3),
            )
        pools.append({"pool": torch.cat(list(pool.blocks)).detach()})
        losses.append(loss)
    assert losses[1].ce == pytest.approx(losses[0].ce, rel=RTOL)
    assert _update_difference(start, *pools) < 1e-3  # two steps, the second from moved images


def _context(zoo: Zoo) -> MetaTrainContext:
    return MetaTrainContext(zoo, MetaModelSpec(), 5, 1, 0, torch.device("cpu"), False)


@pytest.mark.usefixtures("plain_sgd")
@pytest.mark.slow
def test_purer_meta_training_is_the_same_with_either_strategy(toy_zoo: Zoo) -> None:
    """The setting reaches the data step: two meta-iterations (the second adversarial) move the
    meta-model the same way."""
    settings = {
        "iterations": 2,
        "eval_interval": None,
        "curriculum_start": 0,
        "curriculum_patience": 1,
    }
    models = []
    for strategy in ("loop", "vectorised"):
        method = create_method("purer-no-icfil", {**settings, "inversion_strategy": strategy})
        models.append(list(method.meta_train(_context(toy_zoo)))[-1].model.state_dict())
    start = method._initial_model(_context(toy_zoo)).state_dict()
    assert _update_difference(start, *models) < 1e-2
