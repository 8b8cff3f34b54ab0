"""Paper protocol = max meta-test over periodic evaluations, each on freshly drawn test tasks;
clean = the checkpoint best on meta-val, scored on the fixed test tasks (draw 0)."""

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from dfml_bench.config import RunSpec, parse_workflow_config
from dfml_bench.data import load_dataset
from dfml_bench.errors import ConfigError
from dfml_bench.evaluation.harness import evaluate
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.methods import Checkpoint, MetaTrainContext, NoMetaTraining, register_method
from dfml_bench.models import build_model
from dfml_bench.runner import execute_run


class _NoSettings(BaseModel):
    pass


@register_method
class ThreeSeeds(NoMetaTraining):
    """Three random initialisations as three 'checkpoints' with different accuracies."""

    name = "test-three-checkpoints"
    display_name = "Three checkpoints (test)"
    table_order = 0
    Settings = _NoSettings

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        for iteration in range(3):
            yield Checkpoint(iteration, _checkpoint(iteration))


def _checkpoint(iteration: int) -> torch.nn.Module:
    torch.manual_seed(100 + iteration)
    return use_batch_statistics(build_model("conv4", 5, 32))


def test_protocol_selection(
    toy_zoo_dir: Path, tmp_path: Path, quick_run_spec: Callable[..., RunSpec]
) -> None:
    spec = quick_run_spec("test-three-checkpoints", toy_zoo_dir, tmp_path)
    paper, clean = (json.loads(p.read_text()) for p in execute_run(spec, progress=False))
    assert paper["protocol"] == "paper" and clean["protocol"] == "clean"
    assert paper["checkpoints_evaluated"] == 3
    curve = paper["curve"]
    assert paper["acc_mean"] == max(point["acc_mean"] for point in curve)
    assert clean["val_acc_mean"] == max(point["val_acc_mean"] for point in curve)

    # the k-th evaluation draws its own test tasks; the clean protocol uses draw 0
    dataset = load_dataset("test-toy", 32)
    evaluation = spec.evaluation.with_adaptation(1, 0.01)
    for draw, point in enumerate(curve):
        model = _checkpoint(draw)
        fresh = evaluate(
            model, dataset, "test", 1, evaluation, 0, torch.device("cpu"), False, draw=draw
        )
        assert point["acc_mean"] == round(fresh.mean, 4)
    fixed = evaluate(
        _checkpoint(clean["iteration"]),
        dataset,
        "test",
        1,
        evaluation,
        0,
        torch.device("cpu"),
        False,
    )
    assert clean["acc_mean"] == round(fixed.mean, 4)
    draws = [
        evaluate(
            _checkpoint(0), dataset, "test", 1, evaluation, 0, torch.device("cpu"), False, draw=draw
        ).accuracies
        for draw in (0, 1)
    ]
    assert not torch.equal(*draws)  # different tasks, so different per-task accuracies


def test_config_errors_list_every_field() -> None:
    raw = {
        "ways": 1,
        "shots": [0],
        "device": "tpu",
        "scenarios": {"../x": {"recipe": "a/b", "methods": ["nope"]}},
    }
    with pytest.raises(ConfigError) as caught:
        parse_workflow_config(raw)
    message = str(caught.value)
    assert "\n" not in message
    for fragment in ("ways", "shots", "device", "recipe", "nope"):
        assert fragment in message, fragment


def test_shipped_configs_validate() -> None:
    from dfml_bench.config import all_runs, load_workflow_config

    repo = Path(__file__).resolve().parents[1]
    default = load_workflow_config(repo / "config/default.yaml")
    assert {entry.label for entry in default.scenarios.values()} == {"SS", "SH", "MH"}
    # 12 methods (FREE under both profiles) x 3 scenarios x 2 shots x 1 seed
    assert len(all_runs(default)) == 72
    assert default.scenario_evaluation("mh").episodes == 100
    real = load_workflow_config(repo / "config/real-data.yaml")
    assert len(all_runs(real)) == 88
