"""Speed table: seconds of data recovery per recovered 5-way task, per method, against PURER.

A "task" is ways x per_class images (the images one pseudo task of the method draws from), so
methods that recover different numbers of images compare at the same number of images per task.
"""

from __future__ import annotations

import pandas as pd

SPEED_COLUMNS = [
    "scenario",
    "method",
    "shots",
    "recovered_images",
    "recovery_s",
    "recovery_s_per_task",
    "images_per_s",
    "speedup_vs_purer",
    "meta_train_s",
]


def speed_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run (clean protocol) of a method that recovers data; `speedup_vs_purer` is
    PURER's seconds per task in the same scenario and shots over the method's."""
    runs = frame[(frame["protocol"] == "clean") & frame["recovery_s_per_task"].notna()].copy()
    if runs.empty:
        return pd.DataFrame(columns=SPEED_COLUMNS)
    purer = (  # mean over seeds: one reference per scenario and shots
        runs[runs["method"] == "purer"].groupby(["scenario", "shots"])["recovery_s_per_task"].mean()
    )
    keys = list(zip(runs["scenario"], runs["shots"]))
    reference = pd.Series([purer.get(key) for key in keys], index=runs.index, dtype="float64")
    runs["speedup_vs_purer"] = reference / runs["recovery_s_per_task"]
    runs["images_per_s"] = runs["recovered_images"] / runs["recovery_s"]
    runs = runs.groupby(["scenario", "method", "shots"], as_index=False).mean(numeric_only=True)
    return runs[SPEED_COLUMNS].sort_values(["scenario", "shots", "method"])


def speed_markdown(frame: pd.DataFrame) -> str:
    table = speed_table(frame)
    devices = ", ".join(sorted(frame["device"].dropna().astype(str).unique())) or "unknown"
    torches = ", ".join(sorted(frame["torch"].dropna().astype(str).unique())) or "unknown"
    header = (
        "# Data recovery speed\n\n"
        "Seconds of data recovery (inversion / generator adaptation only) per recovered 5-way "
        "task (ways x per-class images), recovered images per second, the speed-up relative to "
        "PURER's ECI in the same scenario and shots, and the whole meta-training time "
        f"(recovery included), all in seconds. Device: {devices}; torch {torches}.\n\n"
    )
    if table.empty:
        return header + "No run recovered data.\n"
    return header + table.to_markdown(index=False, floatfmt=".3f") + "\n"
