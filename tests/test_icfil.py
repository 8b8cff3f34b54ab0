import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torch.func import functional_call

from dfml_bench.data import load_dataset
from dfml_bench.evaluation.harness import EvaluationSettings, evaluate
from dfml_bench.evaluation.icfil import (
    IcfilSettings,
    contrastive_calibration_loss,
    icfil_calibrate,
    invert_adapted,
)
from dfml_bench.inversion.deepinversion import channel_statistics
from dfml_bench.meta.adaptation import finetune, parameters_of, use_batch_statistics
from dfml_bench.models import build_model

WAYS = 5


pytestmark = pytest.mark.usefixtures("single_thread")


def _meta_model(architecture: str = "conv4") -> nn.Module:
    torch.manual_seed(0)
    model = build_model(architecture, WAYS, 32)
    return use_batch_statistics(model).to(memory_format=torch.channels_last).train()


def _task(shots: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(WAYS * shots, 3, 32, 32, generator=generator)
    labels = torch.arange(WAYS).repeat_interleave(shots)
    return images.contiguous(memory_format=torch.channels_last), labels


def _adapted(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    return finetune(model, parameters_of(model), images, labels, steps=2, lr=0.01)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_model_and_inputs_untouched() -> None:
    model = _meta_model()
    images, labels = _task()
    adapted = _adapted(model, images, labels)
    model_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapted_before = {name: value.clone() for name, value in adapted.items()}
    images_before = images.clone()
    icfil_calibrate(model, adapted, images, labels, WAYS, IcfilSettings(), _generator())
    for name, param in model.named_parameters():
        assert torch.equal(param, model_before[name]), name
        assert param.grad is None, name
    for name, value in adapted.items():
        assert torch.equal(value, adapted_before[name]), name
        assert not value.requires_grad, name
    assert torch.equal(images, images_before)
    assert not any(module._forward_hooks for module in model.modules())  # hooks removed


@pytest.mark.parametrize("architecture", ["conv4", "resnet10"])
def test_only_backbone_changes(architecture: str) -> None:
    model = _meta_model(architecture)
    images, labels = _task()
    adapted = _adapted(model, images, labels)
    settings = IcfilSettings(inversion_steps=2, calibration_steps=2, calibration_lr=0.1)
    calibrated = icfil_calibrate(model, adapted, images, labels, WAYS, settings, _generator())
    assert list(calibrated) == list(adapted)
    changed = []
    for name, value in calibrated.items():
        assert value.shape == adapted[name].shape and value.dtype == adapted[name].dtype, name
        assert not value.requires_grad, name
        if name.startswith("head."):
            assert torch.equal(value, adapted[name]), name
        elif not torch.equal(value, adapted[name]):
            changed.append(name)
    assert any("weight" in name for name in changed)  # the backbone did move


def test_deterministic_under_the_same_seed() -> None:
    model = _meta_model()
    images, labels = _task(shots=2)
    adapted = _adapted(model, images, labels)
    settings = IcfilSettings(inversion_steps=3, calibration_steps=2)
    first = icfil_calibrate(model, adapted, images, labels, WAYS, settings, _generator(7))
    second = icfil_calibrate(model, adapted, images, labels, WAYS, settings, _generator(7))
    other = icfil_calibrate(model, adapted, images, labels, WAYS, settings, _generator(8))
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def _support_cross_entropy(model: nn.Module, params: dict, images, labels) -> float:
    with torch.no_grad():
        return F.cross_entropy(functional_call(model, params, (images,)), labels).item()


HEAD_TEST = {"inversion_steps": 2, "calibration_steps": 2, "calibration_lr": 0.1}


@pytest.mark.parametrize("architecture", ["conv4", "resnet10"])
def test_keep_leaves_the_adapted_head(architecture: str) -> None:
    model = _meta_model(architecture)
    images, labels = _task(shots=2)
    adapted = _adapted(model, images, labels)
    settings = IcfilSettings(head="keep", **HEAD_TEST)
    assert IcfilSettings().head == settings.head  # keep is the default
    calibrated = icfil_calibrate(model, adapted, images, labels, WAYS, settings, _generator())
    heads = [name for name in adapted if name.startswith("head.")]
    assert heads == ["head.weight", "head.bias"]
    for name in heads:
        assert torch.equal(calibrated[name], adapted[name]), name


@pytest.mark.parametrize("architecture", ["conv4", "resnet10"])
def test_refit_moves_only_the_head_and_lowers_the_support_loss(architecture: str) -> None:
    model = _meta_model(architecture)
    images, labels = _task(shots=2)
    adapted = _adapted(model, images, labels)
    adapted_before = {name: value.clone() for name, value in adapted.items()}
    keep = icfil_calibrate(
        model, adapted, images, labels, WAYS, IcfilSettings(head="keep", **HEAD_TEST), _generator()
    )
    refit_settings = IcfilSettings(head="refit", head_steps=5, head_lr=0.1, **HEAD_TEST)
    refit = icfil_calibrate(model, adapted, images, labels, WAYS, refit_settings, _generator())
    assert list(refit) == list(adapted)
    for name, value in refit.items():
        assert value.shape == adapted[name].shape and value.dtype == adapted[name].dtype, name
        assert not value.requires_grad, name
        if name.startswith("head."):
            assert not torch.equal(value, keep[name]), name
        else:  # the same calibration: the backbone is keep's, bit for bit
            assert torch.equal(value, keep[name]), name
    assert all(torch.equal(adapted[name], adapted_before[name]) for name in adapted)
    assert _support_cross_entropy(model, refit, images, labels) < _support_cross_entropy(
        model, keep, images, labels
    )
    # the default budget (one step at lr 0.01) still lowers it, if less
    default = IcfilSettings(head="refit", **HEAD_TEST)
    assert (default.head_steps, default.head_lr) == (1, 0.01)
    small = icfil_calibrate(model, adapted, images, labels, WAYS, default, _generator())
    assert _support_cross_entropy(model, small, images, labels) < _support_cross_entropy(
        model, keep, images, labels
    )


def test_refit_head_matches_plain_sgd_through_the_full_model() -> None:
    model = _meta_model()
    images, labels = _task(shots=2)
    adapted = _adapted(model, images, labels)
    settings = IcfilSettings(head="refit", head_steps=3, head_lr=0.05, **HEAD_TEST)
    result = icfil_calibrate(model, adapted, images, labels, WAYS, settings, _generator())
    # the reference: SGD on the head through the whole model, the backbone held at the result's
    params = {name: value.clone() for name, value in result.items()}
    params |= {name: adapted[name].clone() for name in ("head.weight", "head.bias")}
    for _ in range(settings.head_steps):
        head = {name: params[name].requires_grad_() for name in ("head.weight", "head.bias")}
        loss = F.cross_entropy(functional_call(model, params, (images,)), labels)
        gradients = torch.autograd.grad(loss, list(head.values()))
        params |= {
            name: (value - settings.head_lr * gradient).detach()
            for (name, value), gradient in zip(head.items(), gradients)
        }
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(result[name], params[name], rtol=1e-5, atol=1e-6)


def test_refit_is_deterministic_under_the_same_seed() -> None:
    model = _meta_model()
    images, labels = _task(shots=2)
    adapted = _adapted(model, images, labels)
    settings = IcfilSettings(head="refit", head_steps=3, head_lr=0.1, inversion_steps=3)
    first = icfil_calibrate(model, adapted, images, labels, WAYS, settings, _generator(7))
    second = icfil_calibrate(model, adapted, images, labels, WAYS, settings, _generator(7))
    other = icfil_calibrate(model, adapted, images, labels, WAYS, settings, _generator(8))
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["head.weight"], other["head.weight"])


def test_refit_with_zero_steps_is_keep() -> None:
    model = _meta_model()
    images, labels = _task()
    adapted = _adapted(model, images, labels)
    keep = icfil_calibrate(model, adapted, images, labels, WAYS, IcfilSettings(), _generator())
    none = IcfilSettings(head="refit", head_steps=0)
    refit = icfil_calibrate(model, adapted, images, labels, WAYS, none, _generator())
    assert all(torch.equal(keep[name], refit[name]) for name in keep)


def test_invalid_head_is_rejected_by_name() -> None:
    with pytest.raises(ValidationError, match=r"head\n.*'keep' or 'refit'"):
        IcfilSettings(head="reinit")
    with pytest.raises(ValidationError, match=r"icfil\.head\n.*'keep' or 'refit'"):
        EvaluationSettings(icfil={"head": "zero"})


def test_inversion_lowers_the_adapted_models_cross_entropy() -> None:
    model = _meta_model()
    images, labels = _task()
    adapted = _adapted(model, images, labels)

    def cross_entropy(steps: int) -> float:
        settings = IcfilSettings(inversion_steps=steps)
        pseudo, targets = invert_adapted(model, adapted, images, WAYS, settings, _generator(3))
        assert pseudo.shape == (WAYS * settings.pseudo_per_class, 3, 32, 32)
        assert targets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        assert not pseudo.requires_grad
        with torch.no_grad():
            return F.cross_entropy(functional_call(model, adapted, (pseudo,)), targets).item()

    initial, inverted = cross_entropy(0), cross_entropy(20)
    assert inverted < 0.5 * initial


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_bn_target_statistics_are_per_channel_biased(memory_format: torch.memory_format) -> None:
    features = (torch.randn(4, 6, 5, 5) * 3 + 2).contiguous(memory_format=memory_format)
    mean, variance = channel_statistics(features)
    torch.testing.assert_close(mean, features.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(variance, features.var(dim=(0, 2, 3), correction=0))


def test_contrastive_loss_matches_a_hand_computed_example() -> None:
    # two anchors (labels 0, 1), three pseudo features (labels 0, 0, 1); unnormalised inputs
    anchors = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    pseudo = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -5.0]])
    tau = 0.5
    # cosine similarities: anchor 0 -> (1, 1/sqrt2, 0); anchor 1 -> (0, 1/sqrt2, -1)
    s = 1 / math.sqrt(2)
    sims = [[1.0, s, 0.0], [0.0, s, -1.0]]
    log_z = [math.log(sum(math.exp(v / tau) for v in row)) for row in sims]
    pairs = [(0, 0), (0, 1), (1, 2)]  # (anchor, positive)
    expected = -sum(sims[a][p] / tau - log_z[a] for a, p in pairs) / len(pairs)
    loss = contrastive_calibration_loss(
        anchors, torch.tensor([0, 1]), pseudo, torch.tensor([0, 0, 1]), tau
    )
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="no anchor"):
        contrastive_calibration_loss(
            anchors, torch.tensor([2, 2]), pseudo, torch.tensor([0, 0, 1]), tau
        )


def test_evaluate_with_and_without_icfil(toy_dataset_name: str) -> None:
    dataset = load_dataset(toy_dataset_name)
    model = _meta_model()
    settings = EvaluationSettings(ways=WAYS, episodes=3, queries=3, inner_steps=2, inner_lr=0.01)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    on = evaluate(model, dataset, "test", 1, settings, 0, torch.device("cpu"), False, icfil=True)
    assert on.episodes == 3
    assert ((on.accuracies >= 0) & (on.accuracies <= 100)).all()
    assert on.icfil_seconds_per_task is not None and on.icfil_seconds_per_task > 0
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())

    off = evaluate(model, dataset, "test", 1, settings, 0, torch.device("cpu"), False)
    assert off.icfil_seconds_per_task is None
    enabled = settings.model_copy(update={"icfil": IcfilSettings(enabled=True)})
    assert evaluate(model, dataset, "test", 1, enabled, 0, "cpu", False).icfil_seconds_per_task
    forced_off = evaluate(model, dataset, "test", 1, enabled, 0, "cpu", False, icfil=False)
    assert forced_off.icfil_seconds_per_task is None
    assert torch.equal(forced_off.accuracies, off.accuracies)


def test_running_statistics_are_refused() -> None:
    torch.manual_seed(0)
    model = build_model("conv4", WAYS, 32).train()  # BatchNorm keeps running statistics
    images, labels = _task()
    with pytest.raises(ValueError, match="batch-statistics"):
        icfil_calibrate(
            model, parameters_of(model), images, labels, WAYS, IcfilSettings(), _generator()
        )


@pytest.mark.parametrize(
    "field, value",
    [
        ("tau", 0.0),
        ("tau", -1.0),
        ("pseudo_per_class", 0),
        ("inversion_steps", -1),
        ("inversion_lr", 0.0),
        ("calibration_steps", -1),
        ("calibration_lr", 0.0),
        ("bn_weight", -0.1),
        ("jitter", -1),
        ("head", "reinit"),
        ("head_steps", -1),
        ("head_lr", 0.0),
        ("unknown", 1),
    ],
)
def test_invalid_settings_are_rejected(field: str, value: float) -> None:
    with pytest.raises(ValidationError):
        IcfilSettings(**{field: value})
    with pytest.raises(ValidationError):
        EvaluationSettings(icfil={field: value})
