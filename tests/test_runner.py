import json
from collections.abc import Callable
from pathlib import Path

from dfml_bench.cli import main
from dfml_bench.config import RunSpec
from dfml_bench.reporting.collect import collect
from dfml_bench.reporting.tables import write_tables
from dfml_bench.runner import execute_run
from dfml_bench.zoo.recipe import ZooRecipe
from dfml_bench.zoo.train import train_zoo


def test_run_writes_both_protocol_records(
    toy_zoo_dir: Path, tmp_path: Path, quick_run_spec: Callable[..., RunSpec]
) -> None:
    paths = execute_run(quick_run_spec("average", toy_zoo_dir, tmp_path / "run"), progress=False)
    assert sorted(p.name for p in paths) == ["record-clean.json", "record-paper.json"]
    record = json.loads(paths[0].read_text())
    for key in (
        "scenario",
        "dataset",
        "method",
        "backbone",
        "ways",
        "shots",
        "seed",
        "protocol",
        "acc_mean",
        "acc_ci95",
        "episodes",
        "meta_train_s",
        "recovery_s",
        "spec",
        "environment",
    ):
        assert key in record, key
    assert record["episodes"] == 30 and record["recovery_s"] == 0
    assert 0 <= record["acc_mean"] <= 100 and record["acc_ci95"] >= 0
    assert "torch" in record["environment"]["packages"]
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_runs_are_deterministic_and_paired(
    toy_zoo_dir: Path, tmp_path: Path, quick_run_spec: Callable[..., RunSpec]
) -> None:
    first = execute_run(quick_run_spec("random", toy_zoo_dir, tmp_path / "a"), progress=False)
    second = execute_run(quick_run_spec("random", toy_zoo_dir, tmp_path / "b"), progress=False)
    a, b = (json.loads(p[0].read_text()) for p in (first, second))
    assert a["acc_mean"] == b["acc_mean"] and a["acc_ci95"] == b["acc_ci95"]


def test_rerun_from_a_record_reproduces_it(
    toy_zoo_dir: Path, tmp_path: Path, quick_run_spec: Callable[..., RunSpec]
) -> None:
    first = execute_run(quick_run_spec("average", toy_zoo_dir, tmp_path / "run"), progress=False)[1]
    original = json.loads(first.read_text())
    first.rename(tmp_path / "kept.json")
    assert main(["--quiet", "run", "--from-record", str(tmp_path / "kept.json")]) == 0
    again = json.loads(first.read_text())
    assert again["spec"] == original["spec"] and again["acc_mean"] == original["acc_mean"]
    assert (
        again["curve"]
        == original["curve"]
        == [{key: original[key] for key in ("iteration", "acc_mean", "acc_ci95", "val_acc_mean")}]
    )


def test_collect_and_tables(
    toy_zoo_dir: Path, tmp_path: Path, quick_run_spec: Callable[..., RunSpec]
) -> None:
    results = tmp_path / "results"
    for method in ("random", "average"):
        for shots in (1, 5):
            run_dir = results / "runs" / "ss" / method / f"{shots}shot" / "seed0"
            execute_run(quick_run_spec(method, toy_zoo_dir, run_dir, shots), progress=False)
    summary = collect(results)
    import pandas as pd

    frame = pd.read_csv(summary)
    assert len(frame) == 8 and set(frame["protocol"]) == {"paper", "clean"}
    assert set(frame["method"]) == {"random", "average"}
    written = write_tables(summary, results / "tables")
    markdown = (results / "tables" / "ss.md").read_text()
    assert "Random" in markdown and "Average" in markdown and "**" in markdown
    assert "1-shot" in markdown and "5-shot" in markdown
    latex = (results / "tables" / "ss.tex").read_text()
    assert r"\toprule" in latex and r"\textbf" in latex
    assert len(written) == 4 and (results / "tables" / "speed.md").is_file()


def test_inapplicable_method_gets_an_em_dash_not_a_number(
    tmp_path: Path, toy_dataset_name: str, quick_run_spec: Callable[..., RunSpec]
) -> None:
    mixed = ZooRecipe(
        name="mixed",
        datasets=[toy_dataset_name],
        image_size=32,
        architectures=["conv4", "resnet10"],
        teachers_per_dataset=2,
        classes_per_teacher=5,
        epochs=1,
        batch_size=32,
    )
    zoo_dir = tmp_path / "zoo"
    train_zoo(mixed, zoo_dir, progress=False)
    results = tmp_path / "results"
    for method in ("random", "average"):
        run_dir = results / "runs" / "sh" / method / "1shot" / "seed0"
        spec = quick_run_spec(method, zoo_dir, run_dir).model_copy(
            update={"scenario": "sh", "scenario_label": "SH"}
        )
        execute_run(spec, progress=False)
    record = json.loads((results / "runs/sh/average/1shot/seed0/record-clean.json").read_text())
    assert record["applicable"] is False and record["acc_mean"] is None
    assert "one architecture" in record["reason"]
    write_tables(collect(results), results / "tables")
    rows = {
        line.split("|")[1].strip(): line
        for line in (results / "tables" / "sh.md").read_text().splitlines()
        if line.startswith("| ")
    }
    assert "—" in rows["Average"] and "±" not in rows["Average"]
    assert "±" in rows["Random"]
