import json
from pathlib import Path

import pytest
import torch

from dfml_bench.errors import CheckpointError, ConfigError
from dfml_bench.zoo.manifest import Zoo
from dfml_bench.zoo.recipe import ZooRecipe, load_recipe
from dfml_bench.zoo.train import train_zoo

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(dataset: str, **overrides: object) -> ZooRecipe:
    settings = dict(
        name="tiny",
        datasets=[dataset],
        image_size=32,
        architectures=["conv4"],
        teachers_per_dataset=3,
        classes_per_teacher=4,
        epochs=3,
        batch_size=32,
    )
    return ZooRecipe(**{**settings, **overrides})


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory, toy_dataset_name: str) -> Zoo:
    return train_zoo(tiny_recipe(toy_dataset_name), tmp_path_factory.mktemp("zoo"), progress=False)


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


def test_finished_teachers_are_skipped(
    tiny_zoo: Zoo, monkeypatch: pytest.MonkeyPatch, toy_dataset_name: str
) -> None:
    from dfml_bench.zoo import train

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished teacher was trained again")

    monkeypatch.setattr(train, "_train_teacher", fail)
    again = train_zoo(tiny_recipe(toy_dataset_name), tiny_zoo.directory, progress=False)
    assert [t.sha256 for t in again.teachers] == [t.sha256 for t in tiny_zoo.teachers]


def test_random_policy_draws_overlapping_subsets(tmp_path: Path, toy_dataset_name: str) -> None:
    from dfml_bench.data import load_dataset
    from dfml_bench.zoo.train import plan_teachers

    recipe = tiny_recipe(toy_dataset_name, class_policy="random", teachers_per_dataset=10)
    plans = plan_teachers(recipe, {toy_dataset_name: load_dataset(toy_dataset_name, 32)})
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


def _scripted_accuracy(monkeypatch: pytest.MonkeyPatch, accuracies: list[float]) -> list[dict]:
    """Epoch e's held-out accuracy is accuracies[e - 1]; returns the weights each epoch ended
    with (a copy taken where the accuracy is measured, after the epoch's last step)."""
    from dfml_bench.zoo import train

    states: list[dict] = []

    def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return accuracies[len(states) - 1]

    monkeypatch.setattr(train, "_accuracy", accuracy)
    return states


def _same_weights(saved: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    return saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)


@pytest.mark.parametrize(("keep", "kept_epoch", "other_epoch"), [("best", 1, 3), ("last", 3, 1)])
def test_keep_epoch_picks_the_saved_weights(
    keep: str,
    kept_epoch: int,
    other_epoch: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    toy_dataset_name: str,
) -> None:
    from dfml_bench.models.storage import load_state

    accuracies = [80.0, 60.0, 40.0]  # the best epoch (1) is earlier than the last (3)
    states = _scripted_accuracy(monkeypatch, accuracies)
    recipe = tiny_recipe(toy_dataset_name, keep_epoch=keep, teachers_per_dataset=1)
    zoo = train_zoo(recipe, tmp_path, progress=False)
    (record,) = zoo.teachers
    assert len(states) == recipe.epochs == 3
    saved = load_state(tmp_path / record.file, record.sha256)
    assert _same_weights(saved, states[kept_epoch - 1])
    assert not _same_weights(saved, states[other_epoch - 1])
    assert record.kept_epoch == kept_epoch and record.best_epoch == 1
    assert record.heldout_accuracy == accuracies[kept_epoch - 1]
    assert Zoo.open(tmp_path).teachers[0].kept_epoch == kept_epoch


def test_keep_last_resumes_after_the_final_epoch_was_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy_dataset_name: str
) -> None:
    """Killed after the last epoch's state was saved but before the teacher file was written:
    the resumed run trains nothing more and must still know the last epoch's accuracy."""
    from dfml_bench.resume import StateStore

    recipe = tiny_recipe(toy_dataset_name, keep_epoch="last", teachers_per_dataset=1)
    reference = train_zoo(recipe, tmp_path / "reference", progress=False)

    class Killed(Exception):
        pass

    original = StateStore.save

    def save(self: StateStore, iteration: int, state: dict) -> Path:
        path = original(self, iteration, state)
        if iteration == recipe.epochs:
            raise Killed
        return path

    with monkeypatch.context() as patch:
        patch.setattr(StateStore, "save", save)
        with pytest.raises(Killed):
            train_zoo(recipe, tmp_path / "zoo", progress=False, state_interval_s=0)
    assert not (tmp_path / "zoo" / "teacher-000.safetensors").exists()
    resumed = train_zoo(recipe, tmp_path / "zoo", progress=False, state_interval_s=0)
    keys = ("sha256", "heldout_accuracy", "best_epoch", "kept_epoch")
    assert [[getattr(t, k) for k in keys] for t in resumed.teachers] == [
        [getattr(t, k) for k in keys] for t in reference.teachers
    ]
    assert resumed.teachers[0].kept_epoch == recipe.epochs


def test_default_keep_epoch_keeps_existing_fingerprints() -> None:
    recipe = load_recipe(REPO / "model_zoo_recipes" / "ss-glyphs-conv4.yaml")
    assert recipe.keep_epoch == "best"
    assert recipe.fingerprint() == "760de76ff4bd93a9"  # computed before keep_epoch existed
    explicit = recipe.model_copy(update={"keep_epoch": "best"})
    assert explicit.fingerprint() == "760de76ff4bd93a9"
    assert recipe.model_copy(update={"keep_epoch": "last"}).fingerprint() != "760de76ff4bd93a9"


def test_invalid_keep_epoch_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\ndatasets: [glyphs]\nimage_size: 32\narchitectures: [conv4]\nepochs: 1\n"
        "keep_epoch: final\n"
    )
    with pytest.raises(ConfigError, match=r"keep_epoch.*'best'.*'last'"):
        load_recipe(path)


def test_manifest_without_kept_epoch_still_opens(tiny_zoo: Zoo, tmp_path: Path) -> None:
    import shutil

    copy = Path(shutil.copytree(tiny_zoo.directory, tmp_path / "zoo"))
    manifest = json.loads((copy / "manifest.json").read_text())
    for teacher in manifest["teachers"]:
        del teacher["kept_epoch"]  # written before keep_epoch existed
    (copy / "manifest.json").write_text(json.dumps(manifest))
    reopened = Zoo.open(copy)
    assert [t.kept_epoch for t in reopened.teachers] == [None] * 3
    assert reopened.load_teacher(0)(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_authors_recipes_keep_the_last_epoch() -> None:
    """PURER's pretrain.py and FREE's tools.py both save the final epoch (aliased state_dict)."""
    recipes = sorted((REPO / "model_zoo_recipes").glob("paper-*.yaml"))
    assert len(recipes) >= 10
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.keep_epoch == "last", path.name
        assert "best epoch kept" not in recipe.description, path.name


def test_family_milestones_follow_frees_pretraining_and_leave_other_fingerprints() -> None:
    """FREE's tools.py: Conv4 never decays within 60 epochs (milestone 70), ResNets decay at 30
    and 50; recipes without the field keep the fingerprint they had."""
    from dfml_bench.zoo.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "model_zoo_recipes"
    free = load_recipe(root / "paper-free-sh-cifar-fs-mixed.yaml")
    assert free.milestone_epochs("conv4") == []
    assert free.milestone_epochs("resnet18-authors") == [30, 50]
    cub = load_recipe(root / "paper-free-ss-cub-conv4.yaml")
    assert cub.epochs == 100 and cub.milestone_epochs("conv4") == [70]
    default = load_recipe(root / "ss-glyphs-conv4.yaml")
    assert default.fingerprint() == "760de76ff4bd93a9"
    assert default.milestone_epochs("conv4") == [2, 3]
