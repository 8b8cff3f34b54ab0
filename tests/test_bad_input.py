"""Bad configs, names and zoos: one clear line naming what is wrong, and no output written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dfml_bench.cli import main
from dfml_bench.config import RunSpec, parse_workflow_config
from dfml_bench.errors import CheckpointError, ConfigError
from dfml_bench.evaluation.harness import EvaluationSettings
from dfml_bench.methods.base import MetaModelSpec
from dfml_bench.zoo.manifest import Zoo
from dfml_bench.zoo.recipe import load_recipe

GOOD_SCENARIO = {"recipe": "tiny-ss", "methods": ["random"]}


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI in-process; it must fail with exactly one line on stderr."""
    assert main(["--quiet", *argv]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dfml-bench: error:"), lines
    return lines[0]


def files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


def test_config_with_many_bad_fields_gets_one_message_naming_all(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.yaml"
    raw = {
        "results_dir": str(tmp_path / "results"),
        "ways": 1,
        "shots": [0],
        "seeds": [],
        "device": "tpu",
        "evaluation": {"episodes": 1, "queries": 0},
        "colour": "blue",
        "scenarios": {"ss": {"recipe": "tiny-ss", "methods": ["random", "nope"]}},
    }
    config.write_text(yaml.safe_dump(raw))
    argv = ("run", "--config", str(config), "--scenario", "ss", "--method", "random")
    line = cli_error(capsys, *argv, "--shots", "1")
    for field in (
        "ways", "shots", "seeds", "device", "evaluation.episodes", "evaluation.queries",
        "colour", "scenarios.ss.methods", "'nope'",
    ):  # fmt: skip
        assert field in line, (field, line)
    assert files_under(tmp_path) == [config]


@pytest.mark.parametrize(
    ("scenarios", "field"),
    [
        ({"../../etc": GOOD_SCENARIO}, "scenarios"),
        ({"ss/../../x": GOOD_SCENARIO}, "scenarios"),
        ({"/abs": GOOD_SCENARIO}, "scenarios"),
        ({"ss\n": GOOD_SCENARIO}, "scenarios"),
        ({"ss": {"recipe": "../x", "methods": ["random"]}}, "scenarios.ss.recipe"),
        ({"ss": {"recipe": "a/../../x", "methods": ["random"]}}, "scenarios.ss.recipe"),
        ({"ss": {"recipe": "x\n", "methods": ["random"]}}, "scenarios.ss.recipe"),
        ({"ss": {"recipe": "tiny-ss", "methods": ["../random"]}}, "scenarios.ss.methods"),
    ],
)
def test_names_that_would_escape_the_results_folder(scenarios: dict, field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_workflow_config({"scenarios": scenarios})
    message = str(caught.value)
    assert "\n" not in message and f"{field}:" in message, message


@pytest.mark.parametrize("name", ["../x", "..", "a/b", "/tmp/x", ".hidden", "x\n"])
def test_recipe_named_like_a_path_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    recipe = tmp_path / "recipes" / "bad.yaml"
    recipe.parent.mkdir()
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "datasets": ["glyphs"],
                "image_size": 32,
                "architectures": ["conv4"],
                "epochs": 1,
            }
        )
    )
    with pytest.raises(ConfigError, match="name: .*names a folder"):
        load_recipe(recipe)
    results = tmp_path / "deep" / "results"
    line = cli_error(capsys, "zoo", "train", str(recipe), "--results-dir", str(results))
    assert str(recipe) in line
    assert files_under(tmp_path) == [recipe]


# A manifest that disagrees with its teacher files ------------------------------------------


def broken_zoo(zoo: Zoo, tmp_path: Path, **claims: object) -> Path:
    """A copy of `zoo` whose manifest says `claims` about every teacher."""
    copy = Path(shutil.copytree(zoo.directory, tmp_path / "zoo"))
    manifest = json.loads((copy / "manifest.json").read_text())
    for teacher in manifest["teachers"]:
        teacher.update(claims)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def run_spec_json(
    ss_run_spec: Callable[..., RunSpec], zoo_dir: Path, run_dir: Path, architecture: str
) -> str:
    """Average over the zoo: it loads every teacher into a meta-model of `architecture`."""
    evaluation = EvaluationSettings(episodes=2, val_episodes=2, queries=2, inner_steps=0)
    meta_model = MetaModelSpec(architecture=architecture)
    return ss_run_spec(
        "average", zoo_dir, run_dir, evaluation, meta_model=meta_model
    ).model_dump_json()


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"class_ids": [0, 1, 2, 3]}, "size mismatch for head"),  # 5-way head, 4 classes said
        ({"architecture": "resnet10"}, "FewShotResNet"),
    ],
)
def test_manifest_disagreeing_with_teacher_file(
    toy_zoo: Zoo,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    claims: dict,
    expected: str,
    ss_run_spec: Callable[..., RunSpec],
) -> None:
    copy = broken_zoo(toy_zoo, tmp_path, **claims)
    teacher_file = copy / toy_zoo.teachers[0].file
    with pytest.raises(CheckpointError) as caught:
        Zoo.open(copy).load_teacher(0)
    message = str(caught.value)
    assert "\n" not in message and str(teacher_file) in message and expected in message
    run_dir = tmp_path / "run"
    line = cli_error(
        capsys,
        "run",
        "--spec",
        run_spec_json(ss_run_spec, copy, run_dir, claims.get("architecture", "conv4")),
    )
    assert str(teacher_file) in line
    assert not run_dir.exists() or not files_under(run_dir)  # no record, no partial record


@pytest.mark.parametrize("file", ["../teacher-000.safetensors", "/etc/passwd", "sub/t.st"])
def test_manifest_pointing_outside_its_zoo_is_refused(
    toy_zoo: Zoo, tmp_path: Path, file: str
) -> None:
    copy = broken_zoo(toy_zoo, tmp_path, file=file)
    with pytest.raises(CheckpointError) as caught:
        Zoo.open(copy)
    message = str(caught.value)
    assert "\n" not in message and str(copy / "manifest.json") in message
    assert "teachers.0.file" in message, message
