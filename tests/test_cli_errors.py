"""Bad input must exit non-zero with one line on stderr, no traceback, no partial file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dfml_bench", "--quiet", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,  # a hang guard only: each call takes seconds, more on a busy machine
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dfml-bench: error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_help_lists_subcommands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("datasets", "zoo", "run", "collect", "table", "methods"):
        assert command in result.stdout


def test_missing_dataset_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = run_cli("datasets", "prepare", "tiny-imagenet", "--data-root", str(missing))
    assert_one_line_error(result, str(missing))


def test_invalid_recipe(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: bad\ndatasets: [glyphs]\nimage_size: 8\narchitectures: [conv4]\n")
    result = run_cli("zoo", "train", str(recipe), "--out", str(tmp_path / "zoo"))
    assert_one_line_error(result, "image_size", "epochs")
    assert not (tmp_path / "zoo").exists()


def test_unknown_method(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("scenarios:\n  ss: {recipe: ss-glyphs-conv4, methods: [random, nope]}\n")
    result = run_cli(
        "run", "--config", str(config), "--scenario", "ss", "--method", "nope", "--shots", "1"
    )
    assert_one_line_error(result, "nope", "random")


@pytest.mark.slow
def test_corrupt_checkpoint(tmp_path: Path) -> None:
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    teacher = {
        "index": 0,
        "file": "teacher-000.safetensors",
        "sha256": "0" * 64,
        "architecture": "conv4",
        "dataset": "glyphs",
        "image_size": 32,
        "class_ids": [0, 1, 2, 3, 4],
        "dataset_class_indices": [0, 1, 2, 3, 4],
        "class_names": list("abcde"),
        "heldout_accuracy": 90.0,
        "best_epoch": 1,
        "train_images": 10,
        "seed": 0,
        "recipe_hash": "x",
        "train_seconds": 1.0,
    }
    manifest = {
        "recipe_name": "x",
        "recipe_hash": "x",
        "recipe": {},
        "class_offsets": {"glyphs": 0},
        "teachers": [teacher],
        "environment": {},
    }
    (zoo / "manifest.json").write_text(json.dumps(manifest))
    (zoo / "teacher-000.safetensors").write_bytes(b"\x00garbage")
    spec = {
        "scenario": "ss",
        "scenario_label": "SS",
        "method": "average",
        "method_settings": {},
        "ways": 5,
        "shots": 1,
        "seed": 0,
        "zoo_dir": str(zoo),
        "run_dir": str(tmp_path / "run"),
        "meta_model": {"architecture": "conv4", "image_size": 32},
        "evaluation": {"episodes": 5},
        "data_root": None,
        "cache_dir": None,
        "device": "cpu",
    }
    result = run_cli("run", "--spec", json.dumps(spec))
    assert_one_line_error(result, "teacher-000.safetensors")
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())


@pytest.mark.parametrize("args", [("table", "--summary", "missing.csv"), ("collect",)])
def test_reporting_without_runs(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = run_cli(*args, "--results-dir", str(tmp_path))
    assert_one_line_error(result)
