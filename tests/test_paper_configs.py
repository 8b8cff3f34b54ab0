"""Paper-scale configs (issue 9): they validate, name only registered datasets and methods, resolve
to the expected DAG in a dry run, and `dfml-bench estimate` adds up and scales with the budget."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dfml_bench.cli import main
from dfml_bench.config import all_runs, load_workflow_config, run_spec
from dfml_bench.data import dataset_names
from dfml_bench.estimate import BenchMedians, estimate
from dfml_bench.methods import create_method, method_class, method_names
from dfml_bench.zoo.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
# config -> jobs of `snakemake -n`: zoos + runs + collect, report, all
EXPECTED_JOBS = {
    "paper-ss": 96,
    "paper-sh": 42,
    "paper-mh": 16,
    "paper-free": 94,
    "paper-standin-ss": 96,
    "paper-standin-sh": 42,
    "paper-standin-mh": 16,
    "paper-standin-free": 94,
}
CONFIGS = sorted(EXPECTED_JOBS)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # configs name recipes_dir relative to the repository


def test_every_paper_config_is_listed() -> None:
    assert sorted(path.stem for path in (REPO / "config").glob("paper-*.yaml")) == CONFIGS


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_names_what_exists(name: str) -> None:
    config = load_workflow_config(f"config/{name}.yaml")
    assert config.seeds == [0, 1, 2] and config.evaluation.episodes == 600
    for entry in config.scenarios.values():
        assert set(entry.methods) <= set(method_names())
        recipe = load_recipe(REPO / config.recipes_dir / f"{entry.recipe}.yaml")
        assert set(recipe.datasets) <= set(dataset_names())
        # 60 epochs; FREE's tools.py trains its CUB-only zoos 100
        cub_only_free = name == "paper-free" and recipe.datasets == ["cub"]
        assert recipe.epochs == (100 if cub_only_free else 60)
    assert set(config.method_settings) <= set(method_names())
    purer = config.method_settings.get("purer")
    if purer:
        assert purer["iterations"] * purer["meta_batch"] == 240_000
    free = config.method_settings.get("free")
    if free:
        assert (free["epochs"], free["teachers_per_epoch"], free["generator_steps"]) == (1000, 4, 5)
        # FREE is scored with its own 10 steps, and Random like it
        scenario = next(iter(config.scenarios))
        for method in ("free", "random"):
            evaluation = run_spec(config, scenario, method, 1, 0).evaluation
            adaptation = method_class(method).test_adaptation
            assert evaluation.with_adaptation(adaptation.steps, adaptation.lr).inner_steps == 10
    if purer:  # PURER's cadence: --val_interval 2000 tasks = 500 meta-iterations
        assert create_method("purer", purer).settings.eval_interval == 500


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.slow
def test_dry_run_resolves_dag(name: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-n", "--cores", "1"]
        + ["--configfile", str(REPO / f"config/{name}.yaml"), "--directory", str(tmp_path)]
        + ["--config", f"data_root={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard only: a dry run takes seconds, more on a busy machine
    )
    assert result.returncode == 0, result.stderr[-3000:]
    total = re.search(r"^total\s+(\d+)", result.stdout + result.stderr, re.MULTILINE)
    assert total and int(total.group(1)) == EXPECTED_JOBS[name]
    config = load_workflow_config(f"config/{name}.yaml")
    recipes = {entry.recipe for entry in config.scenarios.values()}
    assert EXPECTED_JOBS[name] == len(all_runs(config)) + len(recipes) + 3


@pytest.mark.parametrize("name", ["paper-ss", "paper-free"])
def test_estimate_adds_up_and_scales_with_the_budget(name: str, tmp_path: Path) -> None:
    """Doubling every training budget (DRO's one-off inversion too) doubles each run's
    training estimate; zoos stay as they are, and evaluation grows only with the number of
    periodic evaluations (a fixed `eval_interval` over a longer run)."""
    raw = yaml.safe_load((REPO / f"config/{name}.yaml").read_text())
    base = estimate(f"config/{name}.yaml")
    assert base.total_s == pytest.approx(sum(job.seconds for job in base.jobs))
    for settings in raw["method_settings"].values():
        for budget in ("iterations", "epochs", "warmup_epochs", "inversion_steps"):
            if budget in settings:
                settings[budget] *= 2
    doubled_path = tmp_path / "doubled.yaml"
    doubled_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    doubled = estimate(doubled_path)
    assert [job.name for job in doubled.jobs] == [job.name for job in base.jobs]
    for before, after in zip(base.jobs, doubled.jobs, strict=True):
        assert after.train_s == pytest.approx(
            2 * before.train_s if before.rule == "run_method" else before.train_s
        )
        assert after.evaluation_s >= before.evaluation_s
    trained = sum(job.train_s for job in base.jobs if job.rule == "run_method")
    assert trained > 0
    assert doubled.total_s == pytest.approx(sum(job.seconds for job in doubled.jobs))


def test_estimate_cli_prints_jobs_and_total(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "config/paper-mh.yaml"]) == 0
    out = capsys.readouterr().out
    assert "AMD EPYC" in out and "train_zoo" in out and "mh/purer/5shot/seed2" in out
    assert re.search(r"^total: 13 jobs, [\d.]+ h", out, re.MULTILINE)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["estimate", "config/missing.yaml"], "config config/missing.yaml not found"),
        (["estimate", "config/paper-ss.yaml", "--bench", "nope.json"], "nope.json not found"),
    ],
)
def test_estimate_errors_are_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_estimate_leaves_out_opt_in_variants(tmp_path: Path) -> None:
    """A bf16 or compiled variant runs only when a config asks for it, so however fast it is the
    estimate for a default config uses the fastest variant `auto` may pick."""

    def entry(variant: str, median: float, opt_in: str | None) -> dict:
        extra = {"variant": variant, "device": "cpu (test)", "opt_in": opt_in}
        return {"group": "PURER ECI data step", "stats": {"median": median}, "extra_info": extra}

    path = tmp_path / "bench.json"
    benchmarks = [
        entry("loop", 0.8, None),
        entry("vectorised", 2.0, None),
        entry("loop bf16", 0.5, "inversion_precision: bfloat16"),
        entry("vectorised compiled", 0.1, "inversion_compile: true"),
    ]
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    assert BenchMedians(path)["PURER ECI data step"] == pytest.approx(0.8)
