"""Published vs measured: per scenario and shots, each method's gain over Random and its rank.

Absolute accuracies are not comparable across datasets (our stand-ins are not the papers'
datasets), but the gain over Random and the ordering of the methods should transfer if the
papers' conclusions do. The published side uses the paper protocol's numbers (test-set selection),
so the measured side does too. A measured dataset that stands in for a published one (e.g. Tiny
ImageNet 32 px for CIFAR-FS) is compared with that dataset's gains; otherwise with the mean gain
over the scenario's published datasets.
"""

from __future__ import annotations

import pandas as pd

from dfml_bench.reporting.naming import method_display, method_rank
from dfml_bench.reporting.published import CITATION, published_frame

SCENARIO_ORDER = ("ss", "sh", "mh")
COLUMNS = [
    "scenario",
    "shots",
    "method",
    "published_gain",
    "published_rank",
    "measured_gain",
    "measured_rank",
    "ordering_holds",
    "flipped_against",
]


def _published_gains(published: pd.DataFrame, scenario: str, shots: int, stand_in: str) -> dict:
    """Mean over matching published datasets of (method - Random), per method."""
    cells = published[(published["scenario"] == scenario) & (published["shots"] == shots)]
    matching = [d for d in cells["dataset"].unique() if d and d in stand_in]
    if matching:
        cells = cells[cells["dataset"].isin(matching)]
    random = cells[cells["method"] == "random"].set_index("dataset")["mean"]
    gains: dict[str, list[float]] = {}
    for row in cells.itertuples():
        if row.dataset in random.index:
            gains.setdefault(row.method, []).append(row.mean - random[row.dataset])
    return {method: float(sum(values) / len(values)) for method, values in gains.items()}


def _measured_gains(rows: pd.DataFrame) -> dict[str, float]:
    """Mean over seeds and datasets of (method - Random), per method with an accuracy."""
    means = rows.dropna(subset=["acc_mean"]).groupby(["method", "dataset"])["acc_mean"].mean()
    if "random" not in means.index.get_level_values("method"):
        return {}
    random = means.loc["random"]
    gains: dict[str, list[float]] = {}
    for (method, dataset), value in means.items():
        if dataset in random.index:
            gains.setdefault(method, []).append(value - random[dataset])
    return {method: float(sum(values) / len(values)) for method, values in gains.items()}


def _ranks(gains: dict[str, float]) -> dict[str, int]:
    ordered = sorted(gains, key=lambda m: (-round(gains[m], 2), method_rank(m)))
    return {method: position + 1 for position, method in enumerate(ordered)}


def _sign(value: float) -> int:
    return int(value > 0) - int(value < 0)


def reference_comparison(frame: pd.DataFrame, protocol: str = "paper") -> pd.DataFrame:
    """One row per (scenario, shots, method) present both in the papers and in our records."""
    published = published_frame()
    rows = []
    measured_all = frame[frame["protocol"] == protocol]
    for (scenario, shots), group in measured_all.groupby(["scenario", "shots"]):
        stand_in = " ".join(str(s) for s in group["stand_in_for"].dropna().unique())
        published_gains = _published_gains(published, scenario, int(shots), stand_in)
        measured_gains = _measured_gains(group)
        common = sorted(set(published_gains) & set(measured_gains), key=method_rank)
        if len(common) < 2:
            continue
        published_ranks = _ranks({m: published_gains[m] for m in common})
        measured_ranks = _ranks({m: measured_gains[m] for m in common})
        for method in common:
            flipped = [
                other
                for other in common
                if other != method
                and _sign(round(published_gains[method] - published_gains[other], 2))
                != _sign(round(measured_gains[method] - measured_gains[other], 2))
            ]
            rows.append(
                dict(
                    scenario=scenario,
                    shots=int(shots),
                    method=method,
                    published_gain=published_gains[method],
                    published_rank=published_ranks[method],
                    measured_gain=measured_gains[method],
                    measured_rank=measured_ranks[method],
                    ordering_holds=not flipped,
                    flipped_against=", ".join(method_display(m) for m in flipped),
                )
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def ordering_summary(comparison: pd.DataFrame) -> dict[tuple[str, int], bool]:
    """Whether the whole published ordering holds, per (scenario, shots)."""
    return {
        (scenario, int(shots)): bool(group["ordering_holds"].all())
        for (scenario, shots), group in comparison.groupby(["scenario", "shots"])
    }


def reference_markdown(frame: pd.DataFrame, protocol: str = "paper", heading_level: int = 1) -> str:
    comparison = reference_comparison(frame, protocol)
    header = (
        f"{'#' * heading_level} Published vs measured: gain over Random and ranking\n\n"
        f"Published: {CITATION}. Measured: our records ({protocol} protocol, as the papers "
        "select).\n\n"
        "- Gain = accuracy − Random's accuracy in points, averaged over the datasets where the "
        "method has a cell; a measured dataset that stands in for a published one is compared "
        "with that one only; unconfirmed published cells are left out.\n"
        "- Rank 1 = largest gain among the methods present on both sides.\n"
        "- *Ordering holds*: the method's order against every other method is the same in both; "
        "*flipped against* lists the exceptions.\n"
        "- Point estimates only: differences smaller than the CIs of the scenario tables are "
        "noise.\n"
    )
    if comparison.empty:
        return header + "\nNo scenario has two or more methods with published numbers.\n"
    parts = [header]
    verdicts = ordering_summary(comparison)
    order = {name: position for position, name in enumerate(SCENARIO_ORDER)}
    groups = sorted(
        comparison.groupby(["scenario", "shots"]),
        key=lambda item: (order.get(item[0][0], 9), item[0]),
    )
    for (scenario, shots), group in groups:
        verdict = "holds" if verdicts[(scenario, int(shots))] else "does not hold"
        published_order = " > ".join(
            method_display(m) for m in group.sort_values("published_rank")["method"]
        )
        shown = pd.DataFrame(
            {
                "method": [method_display(m) for m in group["method"]],
                "published gain": group["published_gain"].map("{:+.2f}".format),
                "published rank": group["published_rank"],
                "measured gain": group["measured_gain"].map("{:+.2f}".format),
                "measured rank": group["measured_rank"],
                "ordering holds": group["ordering_holds"].map({True: "yes", False: "no"}),
                "flipped against": group["flipped_against"].replace("", "—"),
            }
        )
        parts += [
            f"{'#' * (heading_level + 1)} {scenario.upper()}, {shots}-shot: "
            f"published ordering {published_order} {verdict}\n",
            shown.to_markdown(index=False, disable_numparse=True),
            "",
        ]
    return "\n".join(parts)
