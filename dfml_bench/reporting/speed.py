"""Speed table: seconds until a recovered task reaches a fixed quality (time to quality).

Each data-recovering run ends with probes (`dfml_bench.evaluation.recovery_speed`): the same
teachers per seed, each task recovered again until its teacher assigns the threshold share of
the images to their classes. A run records, per recoverer, the median over probes of the seconds
and updates, and the share of probes that reached the quality. FREE runs probe two recoverers
(its meta-generator after meta-training, and a generator trained from scratch per task), PURER
runs one (a fresh ECI pool block). The table gives each recoverer's mean over seeds, and its
speed-up against the from-scratch generator and against the ECI pool of the same seed, with the
spread (minimum to maximum) over seeds.
"""

from __future__ import annotations

import pandas as pd

RECOVERERS = {
    "meta_generator": "FREE meta-generator (after meta-training)",
    "scratch": "generator trained from scratch",
    "eci_pool": "ECI pool block (DeepInversion)",
}
TTQ_FIELDS = [
    *(f"ttq_{name}_{what}" for name in RECOVERERS for what in ("s", "steps", "reached")),
    *(f"ttq_speedup_vs_scratch{end}" for end in ("", "_min", "_max")),
]
SPEED_COLUMNS = [
    "scenario",
    "shots",
    "method",
    "recoverer",
    "seeds",
    "seconds",
    "updates",
    "reached",
    "vs_scratch",
    "vs_scratch_range",
    "vs_scratch_tasks",
    "vs_eci_pool",
    "vs_eci_pool_range",
]


def _probe_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (clean record, recoverer) with its time to quality."""
    runs = frame[frame["protocol"] == "clean"]
    rows = []
    for run in runs.to_dict("records"):
        for name in RECOVERERS:
            seconds = run.get(f"ttq_{name}_s")
            if seconds is None or pd.isna(seconds):
                continue
            rows.append(
                {
                    "scenario": run["scenario"],
                    "shots": run["shots"],
                    "seed": run.get("seed"),
                    "method": run["method"],
                    "recoverer": name,
                    "seconds": seconds,
                    "updates": run.get(f"ttq_{name}_steps"),
                    "reached": run.get(f"ttq_{name}_reached"),
                    "own_speedup": run.get("ttq_speedup_vs_scratch"),
                    "own_min": run.get("ttq_speedup_vs_scratch_min"),
                    "own_max": run.get("ttq_speedup_vs_scratch_max"),
                }
            )
    return pd.DataFrame(rows)


def _reference(probes: pd.DataFrame, recoverer: str, method: str) -> dict[tuple, float]:
    """Seconds of `recoverer` in the run of `method` (else of its family) per scenario, shots
    and seed: what every row of that seed is compared with."""
    chosen = probes[probes["recoverer"] == recoverer]
    exact = chosen[chosen["method"] == method]
    chosen = exact if not exact.empty else chosen[chosen["method"].str.startswith(method)]
    keys = zip(chosen["scenario"], chosen["shots"], chosen["seed"])
    return dict(zip(keys, chosen["seconds"]))


def speed_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per scenario, shots, method and recoverer, means over seeds."""
    probes = _probe_rows(frame)
    if probes.empty:
        return pd.DataFrame(columns=SPEED_COLUMNS)
    scratch = _reference(probes, "scratch", "free")
    eci = _reference(probes, "eci_pool", "purer")
    keys = list(zip(probes["scenario"], probes["shots"], probes["seed"]))
    eci_seconds = pd.Series([eci.get(k, float("nan")) for k in keys], index=probes.index)
    scratch_seconds = pd.Series([scratch.get(k, float("nan")) for k in keys], index=probes.index)
    probes["vs_eci_pool"] = eci_seconds / probes["seconds"]
    probes["vs_scratch"] = scratch_seconds / probes["seconds"]
    # a FREE run's own meta-generator: the probe-wise median ratio against its own scratch
    own = (probes["recoverer"] == "meta_generator") & probes["own_speedup"].notna()
    probes.loc[own, "vs_scratch"] = probes.loc[own, "own_speedup"]
    probes["task_min"] = probes["own_min"].where(own)
    probes["task_max"] = probes["own_max"].where(own)

    def spread(values: pd.Series) -> str:
        values = values.dropna()
        return "—" if values.empty else f"{values.min():.2f}–{values.max():.2f}"

    def tasks(group: pd.DataFrame) -> str:
        low, high = group["task_min"].dropna(), group["task_max"].dropna()
        return "—" if low.empty else f"{low.min():.2f}–{high.max():.2f}"

    keys = ["scenario", "shots", "method", "recoverer"]
    task_ranges = {key: tasks(group) for key, group in probes.groupby(keys)}
    grouped = probes.groupby(keys, as_index=False)
    table = grouped.agg(
        seeds=("seconds", "size"),
        seconds=("seconds", "mean"),
        updates=("updates", "mean"),
        reached=("reached", "mean"),
        vs_scratch=("vs_scratch", "mean"),
        vs_scratch_range=("vs_scratch", spread),
        vs_eci_pool=("vs_eci_pool", "mean"),
        vs_eci_pool_range=("vs_eci_pool", spread),
    )
    table["vs_scratch_tasks"] = [task_ranges[key] for key in zip(*(table[k] for k in keys))]
    return table[SPEED_COLUMNS].sort_values(keys)


def speed_markdown(frame: pd.DataFrame) -> str:
    table = speed_table(frame)
    devices = ", ".join(sorted(frame["device"].dropna().astype(str).unique())) or "unknown"
    torches = ", ".join(sorted(frame["torch"].dropna().astype(str).unique())) or "unknown"
    header = (
        "# Data recovery speed: time to quality\n\n"
        "Seconds (and updates) until one recovered task reaches the quality its run was set "
        "to (by default: its teacher assigns 90% of the recovered images to their classes, "
        "within 200 updates), median over the probe teachers of a run, mean over seeds; "
        "`reached` is the share of probes that got there (the others count with what they "
        "spent). `vs_scratch` and `vs_eci_pool`: how many times faster than a generator "
        "trained from scratch and than a fresh ECI pool block on the same probe tasks of the "
        "same seed (for FREE's meta-generator against scratch: the median of the per-task "
        "ratios, and in `vs_scratch_tasks` the smallest to largest ratio over probe tasks), "
        "with their range over seeds. "
        f"Device: {devices}; torch {torches}.\n\n"
    )
    if table.empty:
        return header + "No run measured its time to quality.\n"
    shown = table.assign(recoverer=table["recoverer"].map(RECOVERERS))
    return header + shown.to_markdown(index=False, floatfmt=".3f") + "\n"
