"""REPORT.md: every table and figure of a results folder, a paragraph per scenario written from
the numbers, the environment they were measured in, and the command that reproduces each one."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from dfml_bench import atomic
from dfml_bench.reporting.figures import FIGURE_KINDS
from dfml_bench.reporting.naming import method_display, method_rank
from dfml_bench.reporting.reference import reference_comparison, reference_markdown
from dfml_bench.reporting.speed import speed_markdown
from dfml_bench.reporting.tables import scenario_markdown

SCENARIO_ORDER = ("ss", "sh", "mh")
FIGURE_CAPTIONS = {
    "pseudo-tasks": "recovered pseudo data per method",
    "curves": "meta-test accuracy during meta-training (95% CI bands)",
    "tradeoff": "accuracy against the seconds until a recovered task reaches the quality",
}


def _scenarios(frame: pd.DataFrame) -> list[str]:
    order = {name: i for i, name in enumerate(SCENARIO_ORDER)}
    return sorted(frame["scenario"].unique(), key=lambda s: (order.get(s, 9), s))


def _values(frame: pd.DataFrame, column: str) -> str:
    values = sorted({str(v) for v in frame[column].dropna().unique() if str(v)})
    return ", ".join(values) or "unknown"


def _cell(frame: pd.DataFrame, method: str, shots: int) -> tuple[float, float] | None:
    """Mean over seeds and datasets of one method's clean accuracy, with the mean CI."""
    rows = frame[(frame["method"] == method) & (frame["shots"] == shots)].dropna(
        subset=["acc_mean"]
    )
    if rows.empty:
        return None
    return float(rows["acc_mean"].mean()), float(rows["acc_ci95"].mean())


def scenario_paragraph(frame: pd.DataFrame, scenario: str) -> str:
    """What a reader should take from one scenario's table, stated from the numbers only."""
    rows = frame[(frame["scenario"] == scenario) & (frame["protocol"] == "clean")]
    shots_values = sorted(int(k) for k in rows["shots"].unique())
    teachers = _values(rows, "zoo_teachers")
    sentences = [
        f"Scenario {scenario.upper()} uses a zoo of {teachers} teachers "
        f"({_values(rows, 'zoo_architectures').replace('+', ', ')}) on "
        f"{_values(rows, 'datasets').replace('+', ', ')}."
    ]
    data_free = rows[rows["data_free"].astype(str) == "True"]
    for shots in shots_values:
        random = _cell(rows, "random", shots)
        cells = {
            m: c
            for m in data_free["method"].unique()
            if (c := _cell(data_free, m, shots)) is not None
        }
        if not cells:
            continue
        best = max(cells, key=lambda m: cells[m][0])
        text = (
            f"At {shots}-shot the best data-free method is {method_display(best)} with "
            f"{cells[best][0]:.2f} ± {cells[best][1]:.2f}%"
        )
        if random is not None and best != "random":
            above = sorted(
                (
                    m
                    for m, c in cells.items()
                    if m != "random" and c[0] - c[1] > random[0] + random[1]
                ),
                key=method_rank,
            )
            below = sorted(
                (m for m, c in cells.items() if c[0] + c[1] < random[0] - random[1]),
                key=method_rank,
            )
            text += f", {cells[best][0] - random[0]:+.2f} points over Random ({random[0]:.2f}%)"
            text += (
                "; CIs clear of Random's: above "
                + (", ".join(map(method_display, above)) or "none")
                + ", below "
                + (", ".join(map(method_display, below)) or "none")
            )
        oracle = [m for m in rows["method"].unique() if m not in set(data_free["method"])]
        for method in oracle:
            value = _cell(rows, method, shots)
            if value is not None:
                text += f"; the {method_display(method)} upper bound reaches {value[0]:.2f}%"
        sentences.append(text + ".")
    inapplicable = sorted(
        set(rows.loc[rows["applicable"].astype(str) == "False", "method"]), key=method_rank
    )
    if inapplicable:
        sentences.append(
            f"{', '.join(map(method_display, inapplicable))} do not apply to this zoo "
            "(— in the table; the reason is in each run record)."
        )
    return " ".join(sentences)


def _reference_sentence(frame: pd.DataFrame, scenario: str) -> str:
    comparison = reference_comparison(frame)
    rows = comparison[comparison["scenario"] == scenario]
    if rows.empty:
        return ""
    verdicts = []
    for shots, group in rows.groupby("shots"):
        published = " > ".join(map(method_display, group.sort_values("published_rank")["method"]))
        measured = " > ".join(map(method_display, group.sort_values("measured_rank")["method"]))
        holds = bool(group["ordering_holds"].all())
        verdicts.append(
            f"at {shots}-shot the published ordering {published} "
            + ("holds" if holds else f"does not hold (measured: {measured})")
        )
    return (
        "Compared with the papers (gain over Random, paper protocol): " + "; ".join(verdicts) + "."
    )


def reproduce_table(frame: pd.DataFrame, command: str) -> str:
    """One line per run: where its record is and the exact command that recomputes it."""
    order = {name: i for i, name in enumerate(SCENARIO_ORDER)}
    rows = sorted(
        frame[frame["protocol"] == "clean"].itertuples(),
        key=lambda r: (order.get(r.scenario, 9), method_rank(r.method), r.shots, r.seed),
    )
    lines = [
        "| scenario | method | shots | seed | record | command |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = f"{row.run_dir}/record-clean.json"
        lines.append(
            f"| {row.scenario.upper()} | {method_display(row.method)} | {row.shots} | {row.seed} "
            f"| `{row.record}` | `{command} --force {target}` |"
        )
    return "\n".join(lines)


def build_report(
    frame: pd.DataFrame,
    tables_dir: Path,
    figures_dir: Path,
    report_path: Path,
    command: str,
    bench_markdown: Path | None = None,
) -> str:
    def link(path: Path) -> str:
        return Path(os.path.relpath(path, report_path.parent)).as_posix()

    scenarios = _scenarios(frame)
    created = sorted(frame["created"].dropna().astype(str))
    parts = [
        "# dfml-bench report\n",
        "Written by `dfml-bench report` from the run records (every number below comes from a "
        "record under `runs/`, listed at the end with the command that recomputes it).\n",
        "| | |\n|---|---|",
        f"| command | `{command}` |",
        f"| commit | {_values(frame, 'git_commit')} |",
        f"| runs | {len(frame[frame['protocol'] == 'clean'])} "
        f"(records dated {created[0] if created else '?'} to {created[-1] if created else '?'}) |",
        f"| machine | {_values(frame, 'machine')} |",
        f"| device | {_values(frame, 'device')} |",
        f"| torch | {_values(frame, 'torch')} |",
        "",
    ]
    for scenario in scenarios:
        parts += [
            scenario_markdown(frame, scenario, heading_level=2),
            scenario_paragraph(frame, scenario) + " " + _reference_sentence(frame, scenario),
            "",
            f"LaTeX: [`{scenario}.tex`]({link(tables_dir / f'{scenario}.tex')}).",
            "",
        ]
        for kind in FIGURE_KINDS:
            png = figures_dir / f"{kind}-{scenario}.png"
            pdf = figures_dir / f"{kind}-{scenario}.pdf"
            parts += [
                f"![{scenario.upper()}: {FIGURE_CAPTIONS[kind]}]({link(png)})",
                f"*{scenario.upper()}: {FIGURE_CAPTIONS[kind]} ([PDF]({link(pdf)})).*",
                "",
            ]
    parts += [
        reference_markdown(frame, heading_level=2),
        speed_markdown(frame).replace("# Data recovery", "## Data recovery", 1),
    ]
    if bench_markdown is not None and bench_markdown.is_file():  # `dfml-bench bench` output
        parts.append(bench_markdown.read_text().replace("# Benchmarks", "## Benchmarks", 1))
    parts += [
        "## Reproduce each number\n",
        "Each run's command reruns it (and builds its zoo if missing) with Snakemake; "
        "`dfml-bench run --from-record RECORD` does the same without Snakemake once the zoo "
        "exists. Both write under the run folder of the record's spec, never over this one.\n",
        reproduce_table(frame, command),
        "",
    ]
    return "\n".join(parts)


def write_report(
    frame: pd.DataFrame,
    tables_dir: Path | str,
    figures_dir: Path | str,
    report_path: Path | str,
    command: str,
    bench_markdown: Path | None = None,
) -> Path:
    report_path = Path(report_path)
    text = build_report(
        frame, Path(tables_dir), Path(figures_dir), report_path, command, bench_markdown
    )
    return atomic.write_text(report_path, text)
