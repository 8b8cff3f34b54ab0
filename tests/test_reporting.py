"""Paper-style reporting from hand-written summaries and records: tables, seeds, the comparison
with the published numbers, figures, LaTeX that compiles, REPORT.md."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from torchvision.utils import save_image

from dfml_bench.cli import main
from dfml_bench.evaluation.stats import mean_ci95_across_seeds
from dfml_bench.records import RunRecord
from dfml_bench.reporting.collect import SUMMARY_COLUMNS
from dfml_bench.reporting.figures import figure_paths, write_figures
from dfml_bench.reporting.reference import reference_comparison, reference_markdown
from dfml_bench.reporting.report import write_report
from dfml_bench.reporting.tables import read_summary, write_tables

REFERENCE_PURER_RECORD = (
    Path(__file__).parents[1] / "results/reference/runs/ss/purer/1shot/seed0/record-clean.json"
)


def _row(method: str, shots: int, acc: float | None, **overrides: object) -> dict:
    row = {column: None for column in SUMMARY_COLUMNS}
    row.update(
        scenario="ss",
        dataset="glyphs",
        datasets="glyphs",
        method=method,
        backbone="conv4",
        zoo_teachers=13,
        zoo_architectures="conv4",
        ways=5,
        shots=shots,
        seed=0,
        protocol="clean",
        applicable=acc is not None,
        acc_mean=acc,
        acc_ci95=None if acc is None else 1.0,
        episodes=0 if acc is None else 300,
        data_free=method != "oracle",
        stand_in_for="",
        device="cpu (test)",
        torch="2.x",
        git_commit="abc123",
        machine="test machine",
        created="2026-11-24T10:00:00+00:00",
        run_dir=f"results/runs/ss/{method}/{shots}shot/seed0",
        record=f"runs/ss/{method}/{shots}shot/seed0/record-clean.json",
    )
    row.update(overrides)
    return row


def _write_summary(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows, columns=SUMMARY_COLUMNS).to_csv(path, index=False)
    return path


SMALL = [
    _row("purer", 1, 40.0),
    _row("random", 1, 30.0),
    _row("oracle", 1, 60.0),
    _row("average", 1, None),
]

EXPECTED_SMALL_MARKDOWN = """\
| method               | glyphs 1-shot    |
|:---------------------|:-----------------|
| Random               | 30.00 ± 1.00     |
| Average              | —                |
| PURER                | **40.00 ± 1.00** |
| Oracle (real data) † | 60.00 ± 1.00     |"""


def test_markdown_table_is_exactly_the_papers_layout(tmp_path: Path) -> None:
    """Fixed order (baselines first), bold on the best data-free cell (not the oracle's), an em
    dash for the inapplicable method, the oracle last with a dagger."""
    summary = _write_summary(tmp_path / "summary.csv", SMALL)
    write_tables(summary, tmp_path / "tables")
    markdown = (tmp_path / "tables" / "ss.md").read_text()
    assert EXPECTED_SMALL_MARKDOWN in markdown
    note = markdown.split(EXPECTED_SMALL_MARKDOWN)[1]
    assert "clean protocol" in note and "test episodes per run: 300" in note
    assert "1 seed (0)" in note and "embedded synthetic dataset" in note


def test_bold_goes_to_the_best_data_free_cell_of_each_column(tmp_path: Path) -> None:
    rows = [
        _row("random", 1, 30.0),
        _row("random", 5, 35.0),
        _row("purer", 1, 41.0),
        _row("purer", 5, 44.0),
        _row("free", 1, 39.0),
        _row("free", 5, 47.5),
    ]
    write_tables(_write_summary(tmp_path / "summary.csv", rows), tmp_path / "tables")
    lines = {
        line.split("|")[1].strip(): line
        for line in (tmp_path / "tables" / "ss.md").read_text().splitlines()
        if line.startswith("| ") and "±" in line
    }
    assert "**41.00 ± 1.00**" in lines["PURER"] and "**44.00" not in lines["PURER"]
    assert "**47.50 ± 1.00**" in lines["FREE"] and "**39.00" not in lines["FREE"]
    assert "**" not in lines["Random"]
    latex = (tmp_path / "tables" / "ss.tex").read_text()
    assert r"\textbf{41.00 $\pm$ 1.00}" in latex and r"\textbf{47.50 $\pm$ 1.00}" in latex
    assert r"\multicolumn{2}{c}{glyphs}" in latex and r"\cmidrule(lr){2-3}" in latex


def test_several_seeds_give_the_mean_and_a_t_interval_across_seeds(tmp_path: Path) -> None:
    accuracies = [40.0, 44.0, 45.0]
    rows = [_row("random", 1, 30.0, seed=seed) for seed in range(3)] + [
        _row("purer", 1, acc, seed=seed, acc_ci95=0.5) for seed, acc in enumerate(accuracies)
    ]
    write_tables(_write_summary(tmp_path / "summary.csv", rows), tmp_path / "tables")
    mean, ci95 = mean_ci95_across_seeds(accuracies)
    assert ci95 > 4.0  # t(0.975, 2) = 4.30: far wider than the per-episode CIs of 0.5
    markdown = (tmp_path / "tables" / "ss.md").read_text()
    assert f"{mean:.2f} ± {ci95:.2f}" in markdown
    assert "3 seeds (0, 1, 2)" in markdown and "CI across seeds" in markdown
    assert len(pd.read_csv(tmp_path / "summary.csv")) == 6  # per-seed numbers stay


def _paper(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([dict(row, protocol="paper") for row in rows], columns=SUMMARY_COLUMNS)


def test_reference_ordering_holds_when_measured_gains_rank_like_the_papers() -> None:
    # published SS 1-shot gains over Random (stand-in for CIFAR-FS): PURER 17.0 > DRO 2.3
    rows = [
        _row(m, 1, acc, stand_in_for="CIFAR-FS", dataset="tiny-imagenet")
        for m, acc in (("random", 20.0), ("dro", 21.0), ("purer", 30.0))
    ]
    comparison = reference_comparison(_paper(rows)).set_index("method")
    assert comparison["ordering_holds"].all()
    assert comparison.loc["purer", "published_gain"] == pytest.approx(38.66 - 21.65)
    assert list(comparison["measured_rank"]) == list(comparison["published_rank"])
    assert "holds" in reference_markdown(_paper(rows)) and "does not hold" not in (
        reference_markdown(_paper(rows))
    )


def test_reference_ordering_fails_and_names_the_flipped_pair() -> None:
    rows = [
        _row(m, 1, acc, stand_in_for="CIFAR-FS", dataset="tiny-imagenet")
        for m, acc in (("random", 20.0), ("dro", 35.0), ("purer", 30.0))
    ]
    comparison = reference_comparison(_paper(rows)).set_index("method")
    assert not comparison.loc["purer", "ordering_holds"]
    assert comparison.loc["purer", "flipped_against"] == "DRO-style"
    assert comparison.loc["random", "ordering_holds"]  # Random is still last
    assert "does not hold" in reference_markdown(_paper(rows))


def _fake_run(results: Path, method: str, shots: int, curve: list[tuple[int, float]]) -> None:
    run_dir = results / "runs" / "ss" / method / f"{shots}shot" / "seed0"
    run_dir.mkdir(parents=True)
    record = dict(
        scenario="ss",
        method=method,
        shots=shots,
        seed=0,
        applicable=True,
        iteration=curve[-1][0],
        acc_mean=curve[-1][1],
        acc_ci95=1.0,
        spec={"meta_model": {"image_size": 8}, "run_dir": str(run_dir)},
        curve=[dict(iteration=i, acc_mean=a, acc_ci95=1.0, val_acc_mean=None) for i, a in curve],
    )
    (run_dir / "record-clean.json").write_text(json.dumps(record))
    if method == "purer":
        save_image(torch.rand(10, 3, 8, 8), run_dir / "pseudo-task.png", nrow=2)


def test_figures_are_written_for_every_scenario_and_are_not_empty(tmp_path: Path) -> None:
    _fake_run(tmp_path, "random", 1, [(0, 30.0)])
    _fake_run(tmp_path, "purer", 1, [(2, 35.0), (4, 38.0), (6, 41.0)])
    rows = [
        _row("random", 1, 30.0),
        _row("purer", 1, 41.0, recovery_s_per_task=0.5, recovered_images=100, recovery_s=10),
    ]
    written = write_figures(tmp_path, pd.DataFrame(rows), tmp_path / "figures")
    assert sorted(written) == sorted(figure_paths(tmp_path / "figures", "ss"))
    for path in written:
        assert path.stat().st_size > 1000, path
    assert written[0].read_bytes().startswith(b"\x89PNG")
    assert written[1].read_bytes().startswith(b"%PDF")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_generated_latex_compiles_with_pdflatex(tmp_path: Path) -> None:
    rows = [
        *SMALL,
        _row("purer", 5, 44.0),
        _row("random", 5, 33.0),
        _row("free-no-metagen", 1, 35.0),
        _row("purer", 1, 27.0, scenario="mh", dataset="mixed", datasets="a_b+c_d"),
        _row("random", 1, 25.0, scenario="mh", dataset="mixed", datasets="a_b+c_d"),
    ]
    written = write_tables(_write_summary(tmp_path / "summary.csv", rows), tmp_path / "tables")
    for table in (path for path in written if path.suffix == ".tex"):
        document = tmp_path / f"doc-{table.stem}.tex"
        document.write_text(
            "\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
            f"\\input{{{table.as_posix()}}}\n\\end{{document}}\n"
        )
        result = subprocess.run(
            ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", document.name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout[-2000:]
        assert (tmp_path / f"doc-{table.stem}.pdf").stat().st_size > 1000


def test_report_has_tables_paragraphs_figures_environment_and_commands(tmp_path: Path) -> None:
    rows = [*SMALL, _row("purer", 5, 44.0), _row("random", 5, 33.0)]
    summary = _write_summary(tmp_path / "summary.csv", rows)
    path = write_report(
        read_summary(summary),
        tmp_path / "tables",
        tmp_path / "figures",
        tmp_path / "REPORT.md",
        "snakemake --cores all --configfile config/x.yaml",
    )
    report = path.read_text()
    assert "| Random               | 30.00 ± 1.00     | 33.00 ± 1.00     |" in report
    assert "best data-free method is PURER with 40.00 ± 1.00%, +10.00 points over Random" in report
    assert "Average do not apply" in report
    assert "| commit | abc123 |" in report and "| torch | 2.x |" in report
    assert "](figures/curves-ss.png)" in report
    assert (
        "`snakemake --cores all --configfile config/x.yaml --force "
        "results/runs/ss/purer/1shot/seed0/record-clean.json`" in report
    )
    assert "## Published vs measured" in report and "## Data recovery speed" in report


def test_report_from_an_outdated_summary_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pd.DataFrame([{"scenario": "ss", "method": "random"}]).to_csv(tmp_path / "summary.csv")
    assert main(["report", "--results-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "lacks columns" in error and "dfml-bench collect" in error and "\n" not in error
    assert not (tmp_path / "REPORT.md").exists() and not (tmp_path / "tables").exists()


def test_a_cell_whose_mechanism_did_not_act_is_flagged_not_bold(tmp_path: Path) -> None:
    """purer and purer-no-eci equal to the last digit because the curriculum never fired: the
    purer cell carries the mark and no bold, and the note says why, from the record."""
    inactive = "ECI's curriculum never fired (0 adversarial steps)"
    rows = [
        _row("purer", 1, 45.0, inactive=inactive),
        _row("purer-no-eci", 1, 45.0),
        _row("random", 1, 30.0),
    ]
    summary = _write_summary(tmp_path / "summary.csv", rows)
    write_tables(summary, tmp_path / "tables")
    markdown = (tmp_path / "tables" / "ss.md").read_text()
    assert "| 45.00 ± 1.00 ‡ " in markdown
    assert "**45.00 ± 1.00**" in markdown  # purer-no-eci keeps the bold: its own result
    assert markdown.count("**") == 2
    assert "‡ : what the row's name stands for did not act in that run" in markdown
    assert f"{inactive} (PURER)" in markdown
    latex = (tmp_path / "tables" / "ss.tex").read_text()
    assert r"45.00 $\pm$ 1.00$^\ddagger$" in latex


def test_purer_records_say_what_did_not_act() -> None:
    from dfml_bench.methods import method_class
    from dfml_bench.records import MethodTimings, read_record

    template = read_record(REFERENCE_PURER_RECORD)

    def record(**timings: float) -> RunRecord:
        icfil = {"calibration_steps": 1, "inversion_steps": 2}
        return template.model_copy(
            update={
                "icfil": True,
                "acc_mean": 50.0,
                "acc_mean_without_icfil": 49.0,
                "iteration": 6,
                "spec": {"evaluation": {"icfil": icfil}},
                "method_timings": MethodTimings(**timings),
            },
            deep=True,
        )

    purer = method_class("purer")
    assert (
        purer.inactive_mechanisms(record(adversarial_steps=2, first_adversarial_iteration=3)) == []
    )
    assert purer.inactive_mechanisms(record(adversarial_steps=0)) == [
        "ECI's curriculum never fired (0 adversarial steps)"
    ]
    late = record(adversarial_steps=1, first_adversarial_iteration=8)
    assert purer.inactive_mechanisms(late) == [
        "the scored checkpoint precedes ECI's first adversarial step (8)"
    ]
    assert method_class("purer-no-eci").inactive_mechanisms(record(adversarial_steps=0)) == []
    unchanged = record(adversarial_steps=2).model_copy(update={"acc_mean_without_icfil": 50.0})
    assert purer.inactive_mechanisms(unchanged) == ["ICFIL changed no test accuracy"]
    no_steps = record(adversarial_steps=2)
    no_steps.spec["evaluation"]["icfil"]["calibration_steps"] = 0
    no_icfil = no_steps.model_copy(update={"icfil": False})
    assert method_class("purer-no-icfil").inactive_mechanisms(no_icfil) == []
    assert purer.inactive_mechanisms(no_steps) == ["ICFIL took no calibration step"]
