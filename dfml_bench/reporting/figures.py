"""Figures (PNG and PDF) from the run records: pseudo tasks, learning curves, speed vs accuracy.

Every figure is written for every scenario, also when it has nothing to show (it then says so),
so the workflow's outputs do not depend on which methods a config runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dfml_bench import atomic  # noqa: E402
from dfml_bench.evaluation.stats import mean_ci95_across_seeds  # noqa: E402
from dfml_bench.layout import ResultsLayout
from dfml_bench.reporting.naming import method_display, method_rank  # noqa: E402

FIGURE_KINDS = ("pseudo-tasks", "curves", "tradeoff")
FORMATS = ("png", "pdf")
# a pseudo task (one row per class) where the method draws one, else its recovered images
SAMPLE_IMAGES = ("pseudo-task.png", "recovered.png")
SAMPLE_COLUMNS = 5


def figure_paths(out_dir: Path | str, scenario: str) -> list[Path]:
    return [Path(out_dir) / f"{kind}-{scenario}.{fmt}" for kind in FIGURE_KINDS for fmt in FORMATS]


def _save(figure: Figure, out_dir: Path, stem: str) -> list[Path]:
    written = []
    for fmt in FORMATS:
        target = out_dir / f"{stem}.{fmt}"
        written.append(
            atomic.write_with(
                target,
                lambda tmp, fmt=fmt: figure.savefig(
                    tmp,
                    format=fmt,
                    dpi=120,
                    bbox_inches="tight",
                    bbox_extra_artists=figure.legends,  # legends placed outside the axes
                    # no creation date: a rebuilt PDF is byte-identical to the committed one
                    metadata={"CreationDate": None} if fmt == "pdf" else None,
                ),
            )
        )
    plt.close(figure)
    return written


def _empty(figure: Figure, message: str) -> None:
    figure.text(0.5, 0.5, message, ha="center", va="center", wrap=True)


def _records(results_dir: Path, scenario: str, protocol: str = "clean") -> list[dict]:
    records = []
    for path in ResultsLayout(str(results_dir)).records(protocol):
        record = json.loads(path.read_text())
        if record.get("scenario") == scenario and record.get("applicable", True):
            record["_dir"] = path.parent
            records.append(record)
    return records


def pseudo_task_figure(results_dir: Path, scenario: str, out_dir: Path) -> list[Path]:
    """One panel per method that synthesises data: the pseudo task it saved (seed 0, most
    shots), one row per class."""
    chosen: dict[str, Path] = {}
    cell_size: dict[str, int] = {}
    for record in sorted(_records(results_dir, scenario), key=lambda r: (r["seed"], -r["shots"])):
        for name in SAMPLE_IMAGES:
            image = record["_dir"] / name
            if image.is_file() and record["method"] not in chosen:
                chosen[record["method"]] = image
                cell_size[record["method"]] = record["spec"]["meta_model"]["image_size"] + 1
    methods = sorted(chosen, key=method_rank)
    # the grids hold a padding of 1 px around images of the meta-model's size: keep the first
    # columns only (noise-like pseudo images compress badly, and a few per class show enough)
    images = {
        method: mpimg.imread(chosen[method])[:, : SAMPLE_COLUMNS * cell_size[method] + 1]
        for method in methods
    }
    aspect = max((image.shape[0] / image.shape[1] for image in images.values()), default=0.5)
    columns = min(3, max(1, len(methods)))
    rows = max(1, -(-len(methods) // columns))
    figure, axes = plt.subplots(
        rows, columns, figsize=(3 * columns, (3 * aspect + 0.4) * rows + 0.4), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for axis, method in zip(axes.flat, methods):
        axis.imshow(images[method], interpolation="nearest")
        kind = "rows = classes" if chosen[method].name == SAMPLE_IMAGES[0] else "rows = teachers"
        axis.set_title(f"{method_display(method)} ({kind})", fontsize=9)
    if not methods:
        _empty(figure, f"{scenario.upper()}: no method in this run synthesised data")
    figure.suptitle(f"{scenario.upper()}: recovered pseudo data (each image min-max scaled)")
    figure.tight_layout()
    return _save(figure, out_dir, f"pseudo-tasks-{scenario}")


def _final_point(record: dict) -> dict:
    """Records written before per-checkpoint curves were kept: the reported checkpoint only."""
    return {key: record[key] for key in ("iteration", "acc_mean", "acc_ci95")}


def curve_frame(results_dir: Path, scenario: str) -> pd.DataFrame:
    """Meta-test accuracy per checkpoint, averaged over seeds (Student-t CI across seeds; with
    one seed, the CI over test episodes)."""
    points = [
        dict(method=r["method"], shots=r["shots"], seed=r["seed"], **point)
        for r in _records(results_dir, scenario)
        for point in r.get("curve") or [_final_point(r)]
    ]
    if not points:
        return pd.DataFrame(columns=["method", "shots", "iteration", "acc_mean", "acc_ci95"])
    frame = pd.DataFrame(points)
    rows = []
    for (method, shots, iteration), group in frame.groupby(["method", "shots", "iteration"]):
        if len(group) > 1:
            mean, ci95 = mean_ci95_across_seeds(group["acc_mean"].tolist())
        else:
            mean, ci95 = float(group["acc_mean"].iloc[0]), float(group["acc_ci95"].iloc[0])
        rows.append(
            dict(method=method, shots=shots, iteration=iteration, acc_mean=mean, acc_ci95=ci95)
        )
    return pd.DataFrame(rows)


def method_colours(methods: list[str]) -> dict[str, object]:
    """One stable colour per method (tab20 has room for every method and ablation)."""
    palette = plt.get_cmap("tab20").colors
    return {
        method: palette[i % len(palette)]
        for i, method in enumerate(sorted(methods, key=method_rank))
    }


def curves_figure(results_dir: Path, scenario: str, out_dir: Path) -> list[Path]:
    """Meta-test accuracy against meta-training progress with 95% CI bands, one panel per shots.

    Methods count progress in different units (PURER iterations, FREE epochs, DRO fusion steps),
    so the x axis is the fraction of each method's own budget; methods without meta-training
    (Random, Average, OTA: one checkpoint at iteration 0) are horizontal dashed lines."""
    frame = curve_frame(results_dir, scenario)
    shots_values = sorted(frame["shots"].unique()) or [1]
    colours = method_colours(list(frame["method"].unique()))
    figure, axes = plt.subplots(
        1, len(shots_values), figsize=(6 * len(shots_values), 4.2), squeeze=False
    )
    if frame.empty:
        _empty(figure, f"{scenario.upper()}: no run record with accuracy")
    for axis, shots in zip(axes[0], shots_values):
        subset = frame[frame["shots"] == shots]
        for method in sorted(subset["method"].unique(), key=method_rank):
            curve = subset[subset["method"] == method].sort_values("iteration")
            label, colour = method_display(method), colours[method]
            budget = int(curve["iteration"].max())
            if budget == 0:
                level = curve["acc_mean"].iloc[0]
                axis.axhline(level, linestyle="--", linewidth=1, color=colour, label=label)
                continue
            x = curve["iteration"] / budget
            y, ci = curve["acc_mean"], curve["acc_ci95"]
            axis.plot(x, y, marker="o", markersize=4, color=colour, label=label)
            axis.fill_between(x, y - ci, y + ci, alpha=0.2, color=colour)
        axis.set_xlim(-0.02, 1.05)
        axis.set_xlabel("fraction of the method's meta-training budget")
        axis.set_ylabel("meta-test accuracy (%)")
        axis.set_title(f"{scenario.upper()}, 5-way {shots}-shot (clean records)")
        axis.grid(alpha=0.3)
    if not frame.empty:
        handles, labels = axes[0][0].get_legend_handles_labels()
        figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    figure.tight_layout()
    return _save(figure, out_dir, f"curves-{scenario}")


# the recoverer that is each method's own data recovery in the speed probes
OWN_RECOVERER = {"free": "meta_generator", "purer": "eci_pool"}


def tradeoff_figure(frame: pd.DataFrame, scenario: str, out_dir: Path) -> list[Path]:
    """Accuracy against seconds until a recovered task reaches the quality (time to quality,
    FREE's speed claim), FREE's meta-generator and PURER's ECI pool block."""
    runs = frame[
        (frame["scenario"] == scenario) & (frame["protocol"] == "clean") & frame["acc_mean"].notna()
    ].copy()
    seconds = []
    for row in runs.to_dict("records"):
        family = next((f for f in OWN_RECOVERER if str(row["method"]).startswith(f)), None)
        seconds.append(None if family is None else row.get(f"ttq_{OWN_RECOVERER[family]}_s"))
    runs["seconds"] = pd.Series(seconds, index=runs.index, dtype="float64")
    runs = runs[runs["seconds"].notna()]
    figure, axis = plt.subplots(figsize=(6, 4.5))
    if runs.empty:
        _empty(figure, f"{scenario.upper()}: no run in this scenario measured time to quality")
    grouped = runs.groupby(["method", "shots"], as_index=False).agg(
        seconds=("seconds", "mean"),
        acc=("acc_mean", "mean"),
        ci=("acc_ci95", "mean"),
    )
    colours = method_colours(list(grouped["method"].unique()))
    markers = dict(zip(sorted(grouped["shots"].unique()), "os^D"))
    for row in grouped.itertuples():
        axis.errorbar(
            row.seconds,
            row.acc,
            yerr=row.ci,
            fmt=markers[row.shots],
            color=colours[row.method],
            capsize=3,
            label=f"{method_display(row.method)}, {row.shots}-shot",
        )
    if not runs.empty:
        axis.set_xscale("log")
        figure.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    axis.set_xlabel("seconds until a recovered task reaches the quality (log)")
    axis.set_ylabel("meta-test accuracy (%), clean")
    axis.set_title(f"{scenario.upper()}: accuracy vs time to quality")
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    return _save(figure, out_dir, f"tradeoff-{scenario}")


def write_figures(results_dir: Path | str, frame: pd.DataFrame, out_dir: Path | str) -> list[Path]:
    """All figures for every scenario of the summary."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    written = []
    for scenario in sorted(frame["scenario"].unique()):
        written += pseudo_task_figure(results_dir, scenario, out_dir)
        written += curves_figure(results_dir, scenario, out_dir)
        written += tradeoff_figure(frame, scenario, out_dir)
    return written
