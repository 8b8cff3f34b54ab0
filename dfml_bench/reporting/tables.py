"""Paper-style tables from summary.csv: rows = methods, columns = dataset x shots, mean +- CI.

With several seeds a cell is the mean over seeds with a 95% CI across seeds; with one seed it is
that run's mean with its CI over test episodes.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dfml_bench import atomic
from dfml_bench.errors import DfmlError
from dfml_bench.evaluation.stats import mean_ci95
from dfml_bench.reporting.speed import speed_markdown

METHOD_ORDER = ["random", "average", "ota", "dro", "purer", "free", "oracle"]
DASH_NOTE = (
    "— : the method does not apply to this zoo (reason in its run record) or no run. "
    "† : not data-free (trained on real meta-train data), an upper bound."
)
PROTOCOL_NOTES = {
    "clean": "clean protocol: checkpoint chosen on meta-val, reported on meta-test",
    "paper": "paper protocol: maximum meta-test accuracy over periodic evaluations",
}


def _method_rank(method: str) -> tuple[int, str]:
    base = method.split("-")[0]
    return (METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER), method)


def cell_values(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, method, dataset, shots): mean, ci95, seeds, episodes."""
    rows = []
    keys = ["protocol", "method", "dataset", "stand_in_for", "shots"]
    for key, group in frame.groupby(keys, dropna=False):
        if group["acc_mean"].isna().all():  # method not applicable to this zoo: em dash
            rows.append(dict(zip(keys, key), mean=None, ci95=None, seeds=0, episodes=0))
            continue
        group = group.dropna(subset=["acc_mean"])
        if len(group) > 1:
            mean, ci95 = mean_ci95(group["acc_mean"].tolist())
        else:
            mean, ci95 = float(group["acc_mean"].iloc[0]), float(group["acc_ci95"].iloc[0])
        rows.append(
            dict(
                zip(keys, key),
                mean=mean,
                ci95=ci95,
                seeds=len(group),
                episodes=int(group["episodes"].iloc[0]),
            )
        )
    return pd.DataFrame(rows)


def _column_label(dataset: str, stand_in: object, shots: int) -> str:
    name = (
        f"{dataset} (stand-in for {stand_in})"
        if isinstance(stand_in, str) and stand_in
        else dataset
    )
    return f"{name} {shots}-shot"


def scenario_tables(frame: pd.DataFrame, scenario: str) -> dict[str, pd.DataFrame]:
    """Per protocol, a methods x columns frame of (mean, ci95) tuples; missing cells are None.

    Methods that are not data-free (the oracle) come last, in `table.attrs["upper_bounds"]`."""
    rows = frame[frame["scenario"] == scenario]
    upper_bounds = set(rows.loc[rows["data_free"].astype(str) == "False", "method"])
    cells = cell_values(rows)
    tables = {}
    for protocol in ("clean", "paper"):
        subset = cells[cells["protocol"] == protocol]
        if subset.empty:
            continue
        columns = sorted(
            {(r.dataset, r.stand_in_for, r.shots) for r in subset.itertuples()},
            key=lambda c: (c[0], c[2]),
        )
        methods = sorted(
            subset["method"].unique(), key=lambda m: (m in upper_bounds, _method_rank(m))
        )
        table = pd.DataFrame(
            index=methods, columns=[_column_label(*c) for c in columns], dtype=object
        )
        for row in subset.itertuples():
            if row.mean is None or pd.isna(row.mean):
                continue
            table.loc[row.method, _column_label(row.dataset, row.stand_in_for, row.shots)] = (
                row.mean,
                row.ci95,
            )
        table.attrs["upper_bounds"] = upper_bounds & set(methods)
        tables[protocol] = table
    return tables


def _best(table: pd.DataFrame, column: str) -> str | None:
    """The best data-free method of a column (upper bounds never get the bold)."""
    excluded = table.attrs.get("upper_bounds", set())
    values = {
        m: v[0] for m, v in table[column].items() if isinstance(v, tuple) and m not in excluded
    }
    return max(values, key=values.get) if values else None


def _row_label(table: pd.DataFrame, method: str) -> str:
    return f"{method} †" if method in table.attrs.get("upper_bounds", set()) else method


def to_markdown(table: pd.DataFrame) -> str:
    rendered = pd.DataFrame(index=table.index, columns=table.columns, dtype=object)
    for column in table.columns:
        best = _best(table, column)
        for method, value in table[column].items():
            if not isinstance(value, tuple):
                rendered.loc[method, column] = "—"
                continue
            text = f"{value[0]:.2f} ± {value[1]:.2f}"
            rendered.loc[method, column] = f"**{text}**" if method == best else text
    rendered.index = [_row_label(table, method) for method in rendered.index]
    rendered.index.name = "method"
    return rendered.to_markdown()


def to_latex(table: pd.DataFrame, caption: str) -> str:
    header = " & ".join(["Method", *[c.replace("_", r"\_") for c in table.columns]])
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{caption}}}",
        r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
        r"\toprule",
        header + r" \\",
        r"\midrule",
    ]
    best = {column: _best(table, column) for column in table.columns}
    upper_bounds = table.attrs.get("upper_bounds", set())
    for method, row in table.iterrows():
        if method in upper_bounds and method == next(m for m in table.index if m in upper_bounds):
            lines.append(r"\midrule")  # upper bounds (not data-free) in their own block
        cells = []
        for column, value in row.items():
            if not isinstance(value, tuple):
                cells.append("---")
                continue
            text = f"{value[0]:.2f} $\\pm$ {value[1]:.2f}"
            cells.append(rf"\textbf{{{text}}}" if best[column] == method else text)
        label = method.replace("_", r"\_") + (r"$^\dagger$" if method in upper_bounds else "")
        lines.append(" & ".join([label, *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write_tables(summary_csv: Path | str, out_dir: Path | str) -> list[Path]:
    summary_csv, out_dir = Path(summary_csv), Path(out_dir)
    if not summary_csv.is_file():
        raise DfmlError(f"{summary_csv} not found; run `dfml-bench collect` first")
    frame = pd.read_csv(summary_csv)
    frame["stand_in_for"] = frame["stand_in_for"].astype("string").fillna("")
    written = []
    for scenario in sorted(frame["scenario"].unique()):
        tables = scenario_tables(frame, scenario)
        scenario_rows = frame[frame["scenario"] == scenario]
        seeds = sorted(scenario_rows["seed"].unique())
        episodes = sorted(scenario_rows.loc[scenario_rows["episodes"] > 0, "episodes"].unique())
        markdown = [f"# Scenario {scenario.upper()}: 5-way accuracy (%), mean ± 95% CI\n"]
        latex = []
        for protocol, table in tables.items():
            note = (
                f"{PROTOCOL_NOTES[protocol]}; test episodes per run: "
                f"{', '.join(map(str, episodes))}; seeds: {', '.join(map(str, seeds))}"
                + ("; CI across seeds" if len(seeds) > 1 else "; CI over test episodes")
            )
            markdown += [
                f"## {protocol.capitalize()} protocol\n",
                to_markdown(table),
                "",
                f"*{note}. Best result per column in bold. {DASH_NOTE}*",
                "",
            ]
            latex.append(to_latex(table, f"{scenario.upper()}, {note}."))
        written.append(atomic.write_text(out_dir / f"{scenario}.md", "\n".join(markdown)))
        written.append(atomic.write_text(out_dir / f"{scenario}.tex", "\n".join(latex)))
    written.append(atomic.write_text(out_dir / "speed.md", speed_markdown(frame)))
    return written
