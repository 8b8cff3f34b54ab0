"""Paper protocol = max meta-test over checkpoints; clean = the checkpoint best on meta-val."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel

from dfml_bench.config import parse_workflow_config
from dfml_bench.errors import ConfigError
from dfml_bench.evaluation.adaptation import use_batch_statistics
from dfml_bench.methods import Checkpoint, MetaTrainContext, Method, register_method
from dfml_bench.models import build_model
from dfml_bench.runner import execute_run
from tests.test_runner import spec_for, toy_zoo_dir  # noqa: F401  (fixture)


class _NoSettings(BaseModel):
    pass


@register_method
class ThreeSeeds(Method):
    """Three random initialisations as three 'checkpoints' with different accuracies."""

    name = "test-three-checkpoints"
    Settings = _NoSettings

    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        for iteration in range(3):
            torch.manual_seed(100 + iteration)
            model = build_model("conv4", context.ways, 32)
            yield Checkpoint(iteration, use_batch_statistics(model))


def test_protocol_selection(toy_zoo_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    spec = spec_for("test-three-checkpoints", toy_zoo_dir, tmp_path)
    paper, clean = (json.loads(p.read_text()) for p in execute_run(spec, progress=False))
    assert paper["protocol"] == "paper" and clean["protocol"] == "clean"
    assert paper["checkpoints_evaluated"] == 3
    assert paper["acc_mean"] >= clean["acc_mean"]  # test-set selection can only be optimistic
    assert clean["val_acc_mean"] is not None


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
    # 11 methods x 3 scenarios x 2 shots x 1 seed
    assert len(all_runs(default)) == 66
    assert default.scenario_evaluation("mh").episodes == 100
    real = load_workflow_config(repo / "config/real-data.yaml")
    assert len(all_runs(real)) == 88
