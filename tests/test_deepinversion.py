import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfml_bench.inversion import (
    DeepInversionWeights,
    bn_feature_statistics,
    deep_inversion_loss,
    deep_inversion_loss_over_teachers,
    l2_prior,
    random_jitter,
    total_variation,
)
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.models import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _teacher(architecture: str = "conv4", image_size: int = 32, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return build_model(architecture, classes, image_size).eval()


def _batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]


def _set_running_stats_to_batch(model: nn.Module, images: torch.Tensor) -> None:
    """One train-mode pass with momentum 1 copies each layer's batch statistics into its running
    ones; running_var then holds the UNBIASED variance, which is rescaled to the biased one the
    loss compares with, so eval mode normalises exactly as that train pass did."""
    counts: dict[nn.Module, int] = {}

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        counts[module] = inputs[0].numel() // inputs[0].shape[1]

    layers = _batch_norms(model)
    handles = [layer.register_forward_hook(count) for layer in layers]
    for layer in layers:
        layer.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    for layer in layers:
        n = counts[layer]
        layer.running_var.mul_((n - 1) / n)
    model.eval()


def test_bn_term_vanishes_when_batch_matches_running_statistics() -> None:
    teacher = _teacher().double()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    _set_running_stats_to_batch(teacher, images)
    with torch.no_grad(), bn_feature_statistics(teacher) as statistics:
        teacher(images)
    assert len(statistics.losses) == 4
    assert statistics.total().item() < 1e-5
    with torch.no_grad(), bn_feature_statistics(teacher) as statistics:
        teacher(images * 2 + 1)
    assert statistics.total().item() > 1.0


def test_gradients_reach_the_images_only() -> None:
    teacher = _teacher("resnet10")
    buffers = {name: buffer.clone() for name, buffer in teacher.named_buffers()}
    images = torch.randn(3, 3, 32, 32, requires_grad=True)
    loss = deep_inversion_loss(teacher, images, torch.tensor([0, 1, 2]))
    loss.total.backward()
    for name, buffer in teacher.named_buffers():  # eval mode: running statistics untouched
        torch.testing.assert_close(buffer, buffers[name])
    assert images.grad is not None
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(param.grad is None for param in teacher.parameters())
    assert all(param.requires_grad for param in teacher.parameters())  # flags restored


@pytest.mark.parametrize("architecture", ["conv4", "resnet10", "resnet18"])
@pytest.mark.parametrize("image_size", [32, 84])
@pytest.mark.parametrize("pool_size", [None, 48])
def test_every_architecture_and_size(architecture: str, image_size: int, pool_size: int) -> None:
    teacher = _teacher(architecture, image_size)
    side = pool_size or image_size
    images = torch.randn(2, 3, side, side, requires_grad=True)
    loss = deep_inversion_loss(teacher, images, torch.tensor([0, 4]))
    loss.total.backward()
    assert images.grad is not None and images.grad.shape == images.shape
    for value in (loss.ce, loss.bn, loss.tv, loss.l2):
        assert isinstance(value, float) and value > 0
    weights = DeepInversionWeights()
    expected = weights.ce * loss.ce + weights.bn * loss.bn + weights.tv * loss.tv
    expected += weights.l2 * loss.l2
    assert loss.total.item() == pytest.approx(expected, rel=1e-5)


def _trained_tiny_teacher() -> nn.Module:
    """A 16 px Conv4 fitted in 10 Adam steps to 5 noisy fixed patterns (perfect on them)."""
    torch.manual_seed(0)
    teacher = build_model("conv4", 5, 16)
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(5, 3, 16, 16, generator=generator)
    labels = torch.arange(5).repeat(4)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=0.01)
    for _ in range(10):
        images = patterns[labels] + 0.5 * torch.randn(20, 3, 16, 16, generator=generator)
        loss = F.cross_entropy(teacher(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return teacher.eval()


def test_optimising_images_lowers_cross_entropy() -> None:
    teacher = _trained_tiny_teacher()
    torch.manual_seed(2)
    images = torch.randn(10, 3, 16, 16, requires_grad=True)
    targets = torch.arange(5).repeat(2)
    optimizer = torch.optim.Adam([images], lr=0.1)
    generator = torch.Generator().manual_seed(3)
    history = []
    for _ in range(30):
        loss = deep_inversion_loss(teacher, images, targets, generator=generator)
        optimizer.zero_grad()
        loss.total.backward()
        optimizer.step()
        history.append(loss.ce)
    assert history[-1] < 0.25 * history[0]


def test_sum_over_teachers() -> None:
    teachers = [_teacher("conv4", 32, 5), _teacher("resnet10", 84, 3)]
    images = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    targets = [torch.tensor([0, 4]), torch.tensor([0, 1, 2])]
    each = [
        deep_inversion_loss(teacher, pool, local, jitter=0)
        for teacher, pool, local in zip(teachers, images, targets)
    ]
    summed = deep_inversion_loss_over_teachers(teachers, images, targets, jitter=0)
    assert summed.total.item() == pytest.approx(sum(loss.total.item() for loss in each))
    assert summed.bn == pytest.approx(each[0].bn + each[1].bn)
    with pytest.raises(ValueError, match="2 teachers but 1 image tensors"):
        deep_inversion_loss_over_teachers(teachers, images[:1], targets)


def test_hooks_are_removed_even_on_error() -> None:
    teacher = _teacher("resnet10")
    deep_inversion_loss(teacher, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="boom"), bn_feature_statistics(teacher):
        raise RuntimeError("boom")
    assert all(len(layer._forward_hooks) == 0 for layer in _batch_norms(teacher))


def test_teacher_in_train_mode_is_refused() -> None:
    teacher = _teacher().train()
    with pytest.raises(ValueError, match="eval mode"):
        deep_inversion_loss(teacher, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_model_without_running_statistics_needs_bn_weight_zero() -> None:
    model = use_batch_statistics(_teacher()).eval()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="no running statistics"):
        deep_inversion_loss(model, images, torch.tensor([0, 1]))
    loss = deep_inversion_loss(model, images, torch.tensor([0, 1]), DeepInversionWeights(bn=0.0))
    assert loss.bn == 0.0 and loss.ce > 0


def test_total_variation_and_l2_prior() -> None:
    constant = torch.full((2, 3, 8, 8), 0.7)
    assert total_variation(constant).item() == 0.0
    assert total_variation(torch.randn(2, 3, 8, 8)).item() > 0
    ramp = torch.arange(4.0).expand(1, 1, 4, 4)  # +1 per column: 12 horizontal, 9 per diagonal
    assert total_variation(ramp).item() == pytest.approx(12**0.5 + 0 + 2 * 9**0.5)
    assert l2_prior(torch.full((2, 2), 3.0)).item() == pytest.approx(6.0)


def test_jitter_keeps_shape_and_is_deterministic_with_a_seed() -> None:
    images = torch.randn(2, 3, 16, 16)
    first = random_jitter(images, 2, torch.Generator().manual_seed(5))
    second = random_jitter(images, 2, torch.Generator().manual_seed(5))
    assert first.shape == images.shape
    torch.testing.assert_close(first, second)
    shifted = [random_jitter(images, 2, torch.Generator().manual_seed(seed)) for seed in range(10)]
    assert any(not torch.equal(image, images) for image in shifted)
    for image in shifted:  # a roll: same pixels, and every shift within +-2
        assert any(
            torch.equal(image, torch.roll(images, (dy, dx), dims=(2, 3)))
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )
    assert random_jitter(images, 0) is images
