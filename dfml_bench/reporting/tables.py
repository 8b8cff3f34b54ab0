"""Paper-style tables from summary.csv: rows = methods, columns = dataset x shots, mean +- CI.

With several seeds a cell is the mean over seeds with a Student-t 95% CI across seeds; with one
seed it is that run's mean with its CI over test episodes. The layout follows the PURER and FREE
papers: baselines first, then the DFML methods and their ablations, the oracle in its own block,
the best data-free result of each column in bold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from dfml_bench import atomic
from dfml_bench.errors import DfmlError
from dfml_bench.evaluation.stats import mean_ci95_across_seeds
from dfml_bench.reporting.collect import SUMMARY_COLUMNS
from dfml_bench.reporting.naming import method_display, method_rank, remember_variant_names
from dfml_bench.reporting.reference import reference_markdown
from dfml_bench.reporting.speed import speed_markdown

DASH_NOTE = (
    "— : the method does not apply to this zoo (reason in its run record) or no run. "
    "† : not data-free (trained on real meta-train data), an upper bound."
)
INACTIVE_MARK = "‡"
PROTOCOL_NOTES = {
    "clean": "clean protocol: checkpoint chosen on meta-val, reported on meta-test",
    "paper": "paper protocol: maximum meta-test accuracy over periodic evaluations",
}
EMBEDDED_NOTE = (
    "the embedded synthetic dataset (generated offline), standing in for the papers' "
    "CIFAR-FS / MiniImageNet / CUB"
)


def cell_values(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, method, dataset, shots): mean, ci95, seeds, episodes, and what did
    not act in any of its runs (`inactive`, "" when everything did)."""
    rows = []
    keys = ["protocol", "method", "dataset", "stand_in_for", "shots"]
    for key, group in frame.groupby(keys, dropna=False):
        if group["acc_mean"].isna().all():  # method not applicable to this zoo: em dash
            rows.append(
                dict(zip(keys, key), mean=None, ci95=None, seeds=0, episodes=0, inactive="")
            )
            continue
        group = group.dropna(subset=["acc_mean"])
        if len(group) > 1:
            mean, ci95 = mean_ci95_across_seeds(group["acc_mean"].tolist())
        else:
            mean, ci95 = float(group["acc_mean"].iloc[0]), float(group["acc_ci95"].iloc[0])
        rows.append(
            dict(
                zip(keys, key),
                mean=mean,
                ci95=ci95,
                seeds=len(group),
                episodes=int(group["episodes"].iloc[0]),
                inactive=_inactive_text(group),
            )
        )
    return pd.DataFrame(rows)


def _inactive_text(group: pd.DataFrame) -> str:
    """What did not act in any of the group's runs ("" when everything did, or when the frame
    predates the `inactive` column)."""
    if "inactive" not in group:
        return ""
    return "; ".join(sorted(set(group["inactive"].dropna().astype(str)) - {""}))


def dataset_label(dataset: str, stand_in: object) -> str:
    if isinstance(stand_in, str) and stand_in:
        return f"{dataset} (stand-in for {stand_in})"
    return dataset


def scenario_tables(frame: pd.DataFrame, scenario: str) -> dict[str, pd.DataFrame]:
    """Per protocol, a methods x (dataset, "K-shot") frame of (mean, ci95, inactive) tuples (None:
    no value; `inactive` says what did not act in the cell's runs, "" when everything did).

    Methods that are not data-free (the oracle) come last, in `table.attrs["upper_bounds"]`."""
    rows = frame[frame["scenario"] == scenario]
    upper_bounds = set(rows.loc[rows["data_free"].astype(str) == "False", "method"])
    cells = cell_values(rows)
    tables = {}
    for protocol in ("clean", "paper"):
        subset = cells[cells["protocol"] == protocol]
        if subset.empty:
            continue
        column_keys = sorted(
            {(r.dataset, r.stand_in_for, int(r.shots)) for r in subset.itertuples()},
            key=lambda c: (c[0], c[2]),
        )
        columns = pd.MultiIndex.from_tuples(
            [(dataset_label(d, s), f"{k}-shot") for d, s, k in column_keys],
            names=["dataset", "shots"],
        )
        methods = sorted(
            subset["method"].unique(), key=lambda m: (m in upper_bounds, method_rank(m))
        )
        table = pd.DataFrame(index=methods, columns=columns, dtype=object)
        for row in subset.itertuples():
            if row.mean is None or pd.isna(row.mean):
                continue
            column = (dataset_label(row.dataset, row.stand_in_for), f"{int(row.shots)}-shot")
            table.at[row.method, column] = (row.mean, row.ci95, row.inactive)
        table.attrs["upper_bounds"] = upper_bounds & set(methods)
        tables[protocol] = table
    return tables


def best_methods(table: pd.DataFrame, column: object) -> set[str]:
    """The best data-free method(s) of a column at the printed precision (ties all get the bold;
    upper bounds and cells whose mechanism did not act never do)."""
    excluded = table.attrs.get("upper_bounds", set())
    values = {
        m: round(v[0], 2)
        for m, v in table[column].items()
        if isinstance(v, tuple) and m not in excluded and not v[2]
    }
    if not values:
        return set()
    top = max(values.values())
    return {method for method, value in values.items() if value == top}


def _row_label(table: pd.DataFrame, method: str, dagger: str) -> str:
    upper = method in table.attrs.get("upper_bounds", set())
    return method_display(method) + (dagger if upper else "")


def to_markdown(table: pd.DataFrame) -> str:
    """GitHub Markdown: one header row "dataset K-shot" (Markdown has no spanning headers)."""
    flat = [f"{dataset} {shots}" for dataset, shots in table.columns]
    rendered = pd.DataFrame(index=table.index, columns=flat, dtype=object)
    for column, label in zip(table.columns, flat):
        best = best_methods(table, column)
        for method, value in table[column].items():
            if not isinstance(value, tuple):
                rendered.at[method, label] = "—"
                continue
            text = f"{value[0]:.2f} ± {value[1]:.2f}" + (f" {INACTIVE_MARK}" if value[2] else "")
            rendered.at[method, label] = f"**{text}**" if method in best else text
    rendered.index = [_row_label(table, method, " †") for method in rendered.index]
    rendered.index.name = "method"
    return rendered.to_markdown()


def latex_escape(text: str) -> str:
    """Escape the characters LaTeX treats specially, and spell the few non-ASCII ones we print."""
    replacements = {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
        "±": r"$\pm$",
        "—": "---",
        "–": "--",
        "†": r"$^\dagger$",
        "×": r"$\times$",
    }
    return "".join(replacements.get(char, char) for char in text)


def to_latex(table: pd.DataFrame, caption: str, label: str | None = None) -> str:
    """booktabs table in the papers' layout: a dataset header spanning its shots columns."""
    groups: list[tuple[str, int]] = []
    for dataset, _ in table.columns:
        if groups and groups[-1][0] == dataset:
            groups[-1] = (dataset, groups[-1][1] + 1)
        else:
            groups.append((dataset, 1))
    spans, rules, start = [], [], 2
    for dataset, width in groups:
        spans.append(rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(dataset)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        start += width
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(caption)}}}",
        *([rf"\label{{{label}}}"] if label else []),
        r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
        r"\toprule",
        " & ".join(["", *spans]) + r" \\",
        " ".join(rules),
        " & ".join(["Method", *[latex_escape(shots) for _, shots in table.columns]]) + r" \\",
        r"\midrule",
    ]
    best = {column: best_methods(table, column) for column in table.columns}
    upper_bounds = table.attrs.get("upper_bounds", set())
    first_upper = next((m for m in table.index if m in upper_bounds), None)
    for method, row in table.iterrows():
        if method == first_upper:
            lines.append(r"\midrule")  # upper bounds (not data-free) in their own block
        cells = []
        for column, value in row.items():
            if not isinstance(value, tuple):
                cells.append("---")
                continue
            text = f"{value[0]:.2f} $\\pm$ {value[1]:.2f}" + ("$^\\ddagger$" if value[2] else "")
            cells.append(rf"\textbf{{{text}}}" if method in best[column] else text)
        lines.append(" & ".join([latex_escape(_row_label(table, method, "†")), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def dataset_notes(datasets: Iterable[str], stand_ins: dict[str, str]) -> str:
    """Which dataset stands in for which of the papers'; what "mixed" (MH) is made of."""
    notes = []
    for mixture in sorted({name for name in datasets if "+" in name}):
        notes.append(f"mixed = mean over the test splits of {mixture.replace('+', ', ')}")
    names = sorted({part for name in datasets for part in name.split("+")})
    embedded = [name for name in names if name.startswith("glyphs")]
    if embedded:
        verb = "is" if len(embedded) == 1 else "are domains of"
        notes.append(f"{', '.join(embedded)} {verb} {EMBEDDED_NOTE}")
    for name in names:
        if stand_ins.get(name):
            notes.append(f"{name} stands in for {stand_ins[name]}")
        elif name == "omniglot":
            notes.append("omniglot (not in the papers) is a real-data domain of its own")
    return ("Datasets: " + "; ".join(notes) + ".") if notes else ""


def table_note(rows: pd.DataFrame, protocol: str) -> str:
    """Protocol, episodes, seeds, CI kind and dataset stand-ins: what a reader must know."""
    seeds = sorted(int(seed) for seed in rows["seed"].unique())
    episodes = sorted(int(e) for e in rows.loc[rows["episodes"] > 0, "episodes"].unique())
    constituents = [str(value) for value in rows["datasets"]]
    stand_ins = {
        str(d): str(s)
        for d, s in zip(rows["dataset"], rows["stand_in_for"])
        if isinstance(s, str) and s
    }
    seeds_text = f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})"
    ci_text = "Student-t CI across seeds" if len(seeds) > 1 else "CI over test episodes"
    parts = [
        f"{PROTOCOL_NOTES[protocol]}; test episodes per run: {', '.join(map(str, episodes))}; "
        f"{seeds_text}; {ci_text}.",
        method_notes(rows),
        dataset_notes(constituents, stand_ins),
    ]
    return " ".join(part for part in parts if part)


def _grouped(rows: pd.DataFrame, column: str, describe: Callable[[Any], str]) -> list[str]:
    """'<value>: Method, Method' per distinct value of `column` (rows where it is set)."""
    groups: dict[str, list[str]] = {}
    present = rows.dropna(subset=[column]) if column in rows else rows.iloc[0:0]
    for method in sorted(present["method"].unique(), key=method_rank):
        values = present.loc[present["method"] == method, column].unique()
        for value in values:
            groups.setdefault(describe(value), []).append(method_display(method))
    return [f"{label} ({', '.join(methods)})" for label, methods in groups.items()]


def method_notes(rows: pd.DataFrame) -> str:
    """Per-row settings a reader must know: meta-test fine-tuning, fidelity profile, fused head."""
    notes = []
    steps = _grouped(
        rows.assign(
            _adaptation=[
                None if pd.isna(s) else (int(s), float(lr))
                for s, lr in zip(rows.get("test_steps", []), rows.get("test_lr", []))
            ]
        ),
        "_adaptation",
        lambda v: f"{v[0]} step{'s' if v[0] != 1 else ''} at lr {v[1]:g}",
    )
    if steps:
        notes.append("Fine-tuning at meta-test: " + "; ".join(steps) + ".")
    profiles = _grouped(rows, "fidelity", str)
    if profiles:
        notes.append("Fidelity profile: " + "; ".join(profiles) + ".")
    heads = _grouped(rows, "fused_head", lambda v: f"{v} head")
    if heads:
        notes.append("Fused models: " + "; ".join(heads) + ".")
    inactive = _grouped(rows.replace({"inactive": {"": None}}), "inactive", str)
    if inactive:
        notes.append(
            f"{INACTIVE_MARK} : what the row's name stands for did not act in that run, so the "
            "cell is not evidence for it (from the run records): " + "; ".join(inactive) + "."
        )
    return " ".join(notes)


def read_summary(summary_csv: Path | str) -> pd.DataFrame:
    summary_csv = Path(summary_csv)
    if not summary_csv.is_file():
        raise DfmlError(f"{summary_csv} not found; run `dfml-bench collect` first")
    frame = pd.read_csv(summary_csv)
    missing = [column for column in SUMMARY_COLUMNS if column not in frame]
    if missing:
        raise DfmlError(
            f"{summary_csv} lacks columns {', '.join(missing)} (written by an older version?); "
            "rebuild it with `dfml-bench collect`"
        )
    for column in ("stand_in_for", "datasets"):
        frame[column] = frame[column].astype("string").fillna("")
    frame["datasets"] = frame["datasets"].where(frame["datasets"] != "", frame["dataset"])
    named = frame.dropna(subset=["display_name"])
    remember_variant_names(dict(zip(named["method"], named["display_name"])))
    return frame


def scenario_markdown(frame: pd.DataFrame, scenario: str, heading_level: int = 1) -> str:
    """Both protocols' tables of one scenario with their notes, as Markdown."""
    rows = frame[frame["scenario"] == scenario]
    hashes = "#" * heading_level
    parts = [f"{hashes} Scenario {scenario.upper()}: 5-way accuracy (%), mean ± 95% CI\n"]
    for protocol, table in scenario_tables(frame, scenario).items():
        note = table_note(rows[rows["protocol"] == protocol], protocol)
        parts += [
            f"{hashes}# {protocol.capitalize()} protocol\n",
            to_markdown(table),
            "",
            f"*{note} Best data-free result per column in bold. {DASH_NOTE}*",
            "",
        ]
    return "\n".join(parts)


def scenario_latex(frame: pd.DataFrame, scenario: str) -> str:
    rows = frame[frame["scenario"] == scenario]
    tables = []
    for protocol, table in scenario_tables(frame, scenario).items():
        note = table_note(rows[rows["protocol"] == protocol], protocol)
        caption = (
            f"{scenario.upper()}: 5-way accuracy (%), mean ± 95% CI; {note} "
            f"Best data-free result per column in bold; † not data-free (upper bound); "
            f"— not applicable."
        )
        tables.append(to_latex(table, caption, label=f"tab:{scenario}-{protocol}"))
    return "\n".join(tables)


def write_tables(summary_csv: Path | str, out_dir: Path | str) -> list[Path]:
    frame = read_summary(summary_csv)
    out_dir = Path(out_dir)
    written = []
    for scenario in sorted(frame["scenario"].unique()):
        written.append(
            atomic.write_text(out_dir / f"{scenario}.md", scenario_markdown(frame, scenario))
        )
        written.append(
            atomic.write_text(out_dir / f"{scenario}.tex", scenario_latex(frame, scenario))
        )
    written.append(atomic.write_text(out_dir / "speed.md", speed_markdown(frame)))
    written.append(atomic.write_text(out_dir / "reference.md", reference_markdown(frame)))
    return written
