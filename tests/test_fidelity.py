"""Fidelity profiles, the authors' Average, fused heads, DRO's update, per-method protocols and
config variants (docs/fidelity.md)."""

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch

from dfml_bench.config import RunSpec, parse_workflow_config, run_spec
from dfml_bench.errors import ConfigError
from dfml_bench.evaluation.harness import EvaluationSettings
from dfml_bench.methods import MetaModelSpec, MetaTrainContext, create_method, method_class
from dfml_bench.methods.dro import FusionNetwork
from dfml_bench.methods.purer import PurerSettings
from dfml_bench.models import build_model
from dfml_bench.reporting.tables import method_notes
from dfml_bench.runner import execute_run
from dfml_bench.zoo.fusion import average_of_zoo, doubled_state_dicts, head_names
from dfml_bench.zoo.manifest import Zoo


def test_unset_named_settings_follow_the_profile_and_explicit_ones_win() -> None:
    assert PurerSettings().start_accumulation == "doubled"
    assert PurerSettings(fidelity="corrected").start_accumulation == "mean"
    explicit = PurerSettings(fidelity="corrected", start_accumulation="doubled")
    assert explicit.start_accumulation == "doubled"
    assert explicit.departures() == {"start_accumulation": "doubled"}
    assert PurerSettings().departures() == {}
    assert (PurerSettings().start_head, PurerSettings(fidelity="corrected").start_head) == (
        "keep",
        "zero",
    )
    average = create_method("average", {"fidelity": "corrected"}).settings
    assert average.model_dump()["accumulation"] == "mean"  # records store the resolved value


def test_doubled_accumulation_is_the_authors_fedavg_on_aliased_keys() -> None:
    generator = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(4, generator=generator)} for _ in range(3)]
    w0, w1, w2 = (state["w"] for state in states)
    torch.testing.assert_close(doubled_state_dicts(states)["w"], (w0 + 2 * (w1 + w2)) / 3)
    torch.testing.assert_close(doubled_state_dicts(states[:1])["w"], w0)


def test_average_doubles_the_backbone_and_averages_the_head(toy_zoo: Zoo) -> None:
    spec = MetaModelSpec()
    states = [toy_zoo.load_teacher(i).state_dict() for i in range(len(toy_zoo.teachers))]
    doubled = average_of_zoo(toy_zoo, spec, 5, "doubled").state_dict()
    mean = average_of_zoo(toy_zoo, spec, 5, "mean").state_dict()
    heads = head_names(build_model("conv4", 5, 32))
    conv = "features.0.0.weight"
    expected = (states[0][conv] + 2 * states[1][conv]) / 2
    torch.testing.assert_close(doubled[conv], expected)
    torch.testing.assert_close(mean[conv], (states[0][conv] + states[1][conv]) / 2)
    for name in heads:
        torch.testing.assert_close(doubled[name], mean[name])


@pytest.mark.parametrize("method", ["average", "ota"])
def test_fused_head_setting(method: str, toy_zoo: Zoo) -> None:
    context = MetaTrainContext(toy_zoo, MetaModelSpec(), 5, 1, 0, torch.device("cpu"), False)

    def head(setting: str) -> torch.Tensor:
        model = next(create_method(method, {"head": setting}).meta_train(context)).model
        return model.head.weight.detach()

    kept, zero, fresh = head("keep"), head("zero"), head("reinit")
    assert torch.count_nonzero(zero) == 0
    assert kept.abs().sum() > 0 and fresh.abs().sum() > 0
    assert not torch.allclose(kept, fresh)
    torch.testing.assert_close(fresh, head("reinit"))  # seeded


def test_relative_fusion_freezes_the_base_and_scales_steps_per_tensor() -> None:
    base = build_model("conv4", 5, 32)
    relative = FusionNetwork(base, 3, 4, relative=True)
    absolute = FusionNetwork(base, 3, 4, relative=False)
    assert not relative.base.requires_grad and absolute.base.requires_grad
    for fusion in (relative, absolute):
        with torch.no_grad():
            fusion.projection.fill_(1.0)
    embedding = torch.ones(4)
    weights = dict(base.named_parameters())
    for name in ("features.0.0.weight", "head.weight"):
        rms = weights[name].detach().square().mean().sqrt()
        moved = relative(embedding)[name] - weights[name]
        torch.testing.assert_close(moved, torch.full_like(moved, 4 * float(rms)))
        moved = absolute(embedding)[name] - weights[name]
        torch.testing.assert_close(moved, torch.full_like(moved, 4.0))


def test_each_method_is_evaluated_with_its_papers_fine_tuning() -> None:
    assert method_class("free").test_adaptation.steps == 10
    assert method_class("free-no-align").test_adaptation.steps == 10
    for method in ("random", "average", "ota", "dro", "purer", "oracle"):
        assert method_class(method).test_adaptation.steps == 1, method
    raw = {
        "evaluation": {"episodes": 10},
        "method_evaluation": {"free": {"inner_steps": 3}},
        "scenarios": {"ss": {"recipe": "r", "methods": ["free", "purer"]}},
    }
    config = parse_workflow_config(raw)
    assert run_spec(config, "ss", "free", 1, 0).evaluation.inner_steps == 3
    assert run_spec(config, "ss", "purer", 1, 0).evaluation.inner_steps is None  # method's own
    raw["evaluation"]["inner_steps"] = 5  # a global setting applies to every method
    assert run_spec(parse_workflow_config(raw), "ss", "purer", 1, 0).evaluation.inner_steps == 5


def test_records_state_the_protocol_and_profile_they_ran(
    toy_zoo: Zoo, tmp_path: Path, ss_run_spec: Callable[..., RunSpec]
) -> None:
    evaluation = EvaluationSettings(episodes=4, val_episodes=4, queries=3)
    spec = ss_run_spec("average", toy_zoo.directory, tmp_path / "run", evaluation)
    record = json.loads(execute_run(spec, progress=False)[1].read_text())
    assert record["spec"]["evaluation"]["inner_steps"] == 1
    assert record["test_adaptation"]["steps"] == 1
    assert record["fidelity"] == "authors"
    assert record["method_settings"]["accumulation"] == "doubled"


def test_variants_run_a_method_with_changed_settings_as_a_row_of_their_own() -> None:
    raw = {
        "variants": {
            "average-mean": {"method": "average", "settings": {"accumulation": "mean"}},
            "random-pytorch": {"method": "random", "meta_model": {"init": "pytorch"}},
            "free-1": {"method": "free", "evaluation": {"inner_steps": 1}},
        },
        "method_settings": {"average": {"head": "keep"}},
        "scenarios": {
            "ss": {"recipe": "r", "methods": ["average-mean", "random-pytorch", "free-1"]}
        },
    }
    config = parse_workflow_config(raw)
    spec = run_spec(config, "ss", "average-mean", 1, 0)
    assert (spec.method, spec.variant) == ("average", "average-mean")
    assert spec.method_settings == {"head": "keep", "accumulation": "mean"}
    assert spec.run_dir.endswith("runs/ss/average-mean/1shot/seed0")
    assert spec.variant_label == "Average (accumulation=mean)"
    assert run_spec(config, "ss", "random-pytorch", 1, 0).meta_model.init == "pytorch"
    assert run_spec(config, "ss", "free-1", 1, 0).evaluation.inner_steps == 1


@pytest.mark.parametrize(
    ("variants", "fragment"),
    [
        ({"average": {"method": "random"}}, "not a registered method"),
        ({"x": {"method": "nope"}}, "unknown method 'nope'"),
        ({"../x": {"method": "random"}}, "plain name"),
    ],
)
def test_bad_variants_are_one_line_errors(variants: dict, fragment: str) -> None:
    raw = {"variants": variants, "scenarios": {"ss": {"recipe": "r", "methods": ["random"]}}}
    with pytest.raises(ConfigError, match=fragment) as caught:
        parse_workflow_config(raw)
    assert "\n" not in str(caught.value)


def test_unknown_scenario_method_names_variants_too() -> None:
    raw = {
        "variants": {"random-x": {"method": "random"}},
        "scenarios": {"ss": {"recipe": "r", "methods": ["random-y"]}},
    }
    with pytest.raises(
        ConfigError, match=r"unknown methods \['random-y'\].*variants: \['random-x'\]"
    ):
        parse_workflow_config(raw)


def test_table_notes_state_fine_tuning_profile_and_head_per_row() -> None:
    rows = pd.DataFrame(
        {
            "method": ["random", "average", "free", "purer"],
            "test_steps": [1, 1, 10, 1],
            "test_lr": [0.01, 0.01, 0.01, 0.01],
            "fidelity": [None, "authors", None, "authors"],
            "fused_head": [None, "zero", None, None],
        }
    )
    note = method_notes(rows)
    assert "1 step at lr 0.01 (Random, Average, PURER); 10 steps at lr 0.01 (FREE)" in note
    assert "Fidelity profile: authors (Average, PURER)" in note
    assert "Fused models: zero head (Average)" in note


def test_the_former_checkpoints_setting_names_its_replacement() -> None:
    from dfml_bench.errors import DfmlError

    with pytest.raises(DfmlError, match="`checkpoints` was replaced by `eval_interval`"):
        create_method("purer", {"iterations": 10, "checkpoints": 2})


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "config").glob("fidelity-*.yaml"))
)
def test_ledger_configs_build_every_run(path: Path) -> None:
    """Every run of the configs that measure docs/fidelity.md resolves to valid settings."""
    from dfml_bench.config import all_runs, load_workflow_config

    config = load_workflow_config(path)
    for scenario, method, shots, seed in all_runs(config):
        spec = run_spec(config, scenario, method, shots, seed)
        create_method(spec.method, spec.method_settings)
