import json
from pathlib import Path

import pytest
import torch

from dfml_bench.errors import CheckpointError, ConfigError
from dfml_bench.zoo.manifest import Zoo
from dfml_bench.zoo.recipe import ZooRecipe, load_recipe
from dfml_bench.zoo.train import train_zoo
from tests.conftest import TOY

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(**overrides: object) -> ZooRecipe:
    settings = dict(
        name="tiny",
        datasets=[TOY],
        image_size=32,
        architectures=["conv4"],
        teachers_per_dataset=3,
        classes_per_teacher=4,
        epochs=3,
        batch_size=32,
    )
    return ZooRecipe(**{**settings, **overrides})


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return train_zoo(tiny_recipe(), tmp_path_factory.mktemp("zoo"), progress=False)


def test_zoo_trains_and_manifest_round_trips(tiny_zoo: Zoo) -> None:
    reopened = Zoo.open(tiny_zoo.directory)
    assert reopened.manifest == tiny_zoo.manifest
    assert len(reopened.teachers) == 3
    groups = [set(t.class_ids) for t in reopened.teachers]
    assert all(len(g) == 4 for g in groups)
    assert not (groups[0] & groups[1]) and not (groups[1] & groups[2])  # disjoint policy
    assert all(t.heldout_accuracy > 50 for t in reopened.teachers)  # well above 25% chance
    teacher = reopened.load_teacher(0)
    assert teacher(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_finished_teachers_are_skipped(tiny_zoo: Zoo, monkeypatch: pytest.MonkeyPatch) -> None:
    from dfml_bench.zoo import train

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished teacher was trained again")

    monkeypatch.setattr(train, "_train_teacher", fail)
    again = train_zoo(tiny_recipe(), tiny_zoo.directory, progress=False)
    assert [t.sha256 for t in again.teachers] == [t.sha256 for t in tiny_zoo.teachers]


def test_random_policy_draws_overlapping_subsets(tmp_path: Path) -> None:
    from dfml_bench.data import load_dataset
    from dfml_bench.zoo.train import plan_teachers

    recipe = tiny_recipe(class_policy="random", teachers_per_dataset=10)
    plans = plan_teachers(recipe, {TOY: load_dataset(TOY, 32)})
    assert len(plans) == 10 and all(len(p.dataset_class_indices) == 4 for p in plans)
    assert len({p.dataset_class_indices for p in plans}) > 1


def test_corrupt_teacher_file_names_the_file(tiny_zoo: Zoo, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_zoo.directory, tmp_path / "zoo"))
    weights = copy / tiny_zoo.teachers[1].file
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=r"teacher-001\.safetensors"):
        Zoo.open(copy).load_teacher(1)


def test_manifest_that_disagrees_with_weights(tiny_zoo: Zoo, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_zoo.directory, tmp_path / "zoo"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["teachers"][0]["architecture"] = "resnet10"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not fit its declared architecture"):
        Zoo.open(copy).load_teacher(0)


def test_invalid_recipe_lists_every_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: ../escape\ndatasets: [nope]\nimage_size: 32\narchitectures: [vgg]\nepochs: 0\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert "\n" not in message
    for field in ("name", "datasets", "architectures", "epochs"):
        assert field in message


def test_shipped_recipes_validate() -> None:
    recipes = sorted((REPO / "model_zoo_recipes").glob("*.yaml"))
    assert len(recipes) >= 3
    for path in recipes:
        assert load_recipe(path).name == path.stem
