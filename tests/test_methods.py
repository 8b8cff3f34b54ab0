from pathlib import Path

import pytest
import torch

from dfml_bench.errors import DfmlError
from dfml_bench.methods import MetaModelSpec, MetaTrainContext, create_method, method_names
from dfml_bench.models import build_model
from dfml_bench.zoo.fusion import average_state_dicts
from dfml_bench.zoo.recipe import ZooRecipe
from dfml_bench.zoo.train import train_zoo


def test_average_of_identical_models_is_the_model() -> None:
    model = build_model("conv4", 5, 32)
    state = model.state_dict()
    averaged = average_state_dicts([state, {k: v.clone() for k, v in state.items()}, state])
    for name, tensor in state.items():  # equal up to float rounding of (a + a + a) / 3
        torch.testing.assert_close(averaged[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_average_is_elementwise_mean() -> None:
    a, b = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 5.0])}
    assert torch.equal(average_state_dicts([a, b])["w"], torch.tensor([2.0, 4.0]))


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(
        DfmlError, match="unknown method 'maml'; registered methods: average, dro, free"
    ):
        create_method("maml")
    assert {"random", "average"} <= set(method_names())


@pytest.mark.slow
def test_average_refuses_mixed_architectures(tmp_path: Path, toy_dataset_name: str) -> None:
    recipe = ZooRecipe(
        name="mixed",
        datasets=[toy_dataset_name],
        image_size=32,
        architectures=["conv4", "resnet10"],
        teachers_per_dataset=2,
        classes_per_teacher=5,
        epochs=1,
    )
    zoo = train_zoo(recipe, tmp_path, progress=False)
    context = MetaTrainContext(zoo, MetaModelSpec(), 5, 1, 0, torch.device("cpu"), False)
    with pytest.raises(DfmlError, match="one architecture.*conv4, resnet10"):
        next(create_method("average").meta_train(context))
