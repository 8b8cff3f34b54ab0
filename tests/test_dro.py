"""DRO: the fusion network's objective falls and the robust term is never negative."""

import pytest
import torch

from dfml_bench.methods import MetaModelSpec, MetaTrainContext, create_method
from dfml_bench.methods.dro import FusionNetwork, robust_embedding, teacher_loss
from dfml_bench.models import build_model
from dfml_bench.zoo.manifest import Zoo


def test_robust_embedding_never_lowers_the_penalised_objective() -> None:
    from dfml_bench.meta.adaptation import use_batch_statistics

    torch.manual_seed(0)
    model = use_batch_statistics(build_model("conv4", 5, 32))
    fusion = FusionNetwork(model, 3, 4, relative=False)
    with torch.no_grad():
        fusion.projection.normal_(0, 1e-3)
    images = torch.randn(10, 3, 32, 32)
    probs = torch.softmax(torch.randn(10, 5), 1)
    start = fusion.embeddings[0].detach()
    worst = robust_embedding(fusion, model, fusion.embeddings[0], images, probs, 1.0, 3, 0.5)
    with torch.no_grad():
        at_start = teacher_loss(model, fusion(start), images, probs)
        at_worst = teacher_loss(model, fusion(worst), images, probs)
        penalty = (worst - start).square().sum()
    assert float(at_worst - penalty) >= float(at_start) - 1e-6
    assert float(at_worst) >= float(at_start) - 1e-6  # the robust term is non-negative


@pytest.mark.slow
def test_dro_training_reduces_its_objective(toy_zoo: Zoo) -> None:
    settings = {"iterations": 25, "lr": 0.01, "inversion_steps": 5, "images_per_class": 4}
    method = create_method("dro", settings)
    context = MetaTrainContext(toy_zoo, MetaModelSpec(), 5, 1, 0, torch.device("cpu"), False)
    (checkpoint,) = list(method.meta_train(context))
    history = method.history
    assert all(step["robust"] >= -1e-6 for step in history)
    first = sum(step["objective"] for step in history[:5]) / 5
    last = sum(step["objective"] for step in history[-5:]) / 5
    assert last < first
    assert method.recovery_seconds > 0
    out = checkpoint.model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 5) and torch.isfinite(out).all()


@pytest.mark.slow
def test_relative_update_moves_each_layer_by_a_fraction_of_its_scale(toy_zoo: Zoo) -> None:
    """Ten Adam steps at lr 1e-3: the relative (default) update keeps every conv layer within a
    few percent of the Average it starts from; the absolute one moves small-norm layers far."""
    from dfml_bench.zoo.fusion import average_of_zoo

    context = MetaTrainContext(toy_zoo, MetaModelSpec(), 5, 1, 0, torch.device("cpu"), False)
    start = average_of_zoo(toy_zoo, MetaModelSpec(), 5).state_dict()
    moved = {}
    for update in ("relative", "absolute"):
        settings = {"iterations": 10, "inversion_steps": 2, "images_per_class": 2}
        method = create_method("dro", settings | {"update": update, "head": "keep"})
        (checkpoint,) = list(method.meta_train(context))
        state = checkpoint.model.state_dict()
        moved[update] = max(
            float((state[name] - start[name]).norm() / start[name].norm())
            for name in start
            if name.endswith("0.weight") and name.startswith("features.")
        )
    assert moved["relative"] < 0.05
    assert moved["absolute"] > 2 * moved["relative"]
