"""Gather every run record under results/runs into one flat summary.csv."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dfml_bench import atomic
from dfml_bench.errors import DfmlError
from dfml_bench.reporting.speed import TTQ_FIELDS

SUMMARY_COLUMNS = [
    "scenario",
    "dataset",
    "datasets",
    "method",
    "display_name",
    "backbone",
    "zoo_teachers",
    "zoo_architectures",
    "ways",
    "shots",
    "seed",
    "protocol",
    "applicable",
    "acc_mean",
    "acc_ci95",
    "episodes",
    "meta_train_s",
    "recovery_s",
    "recovered_images",
    "recovery_s_per_task",
    *TTQ_FIELDS,
    "icfil",
    "icfil_s_per_task",
    "eval_s",
    "checkpoints_evaluated",
    "test_steps",
    "test_lr",
    "fidelity",
    "fused_head",
    "inactive",
    "iteration",
    "data_free",
    "stand_in_for",
    "device",
    "torch",
    "git_commit",
    "machine",
    "created",
    "run_dir",
    "record",
]


def read_records(results_dir: Path) -> pd.DataFrame:
    rows = []
    for path in sorted((results_dir / "runs").glob("**/record-*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise DfmlError(
                f"run record {path} is not valid JSON ({error}); rerun that run"
            ) from None
        env = record.get("environment", {})
        timings = record.get("method_timings") or {}
        rows.append(
            {
                **{key: record.get(key) for key in SUMMARY_COLUMNS},
                "datasets": "+".join(record.get("datasets") or [record.get("dataset", "")]),
                "zoo_teachers": record.get("zoo", {}).get("teachers"),
                "zoo_architectures": "+".join(record.get("zoo", {}).get("architectures", [])),
                "run_dir": record.get("spec", {}).get("run_dir"),
                "created": record.get("created"),
                "machine": env.get("machine"),
                "recovered_images": timings.get("images_recovered", timings.get("pseudo_images")),
                "recovery_s_per_task": timings.get("recovery_s_per_task"),
                **{field: timings.get(field) for field in TTQ_FIELDS},
                "test_steps": record.get("spec", {}).get("evaluation", {}).get("inner_steps"),
                "test_lr": record.get("spec", {}).get("evaluation", {}).get("inner_lr"),
                "fused_head": (record.get("method_settings") or {}).get("head"),
                "inactive": "; ".join(_inactive_mechanisms(record)) or None,
                "device": env.get("device"),
                "torch": env.get("packages", {}).get("torch"),
                "git_commit": env.get("git_commit"),
                "record": str(path.relative_to(results_dir)),
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _inactive_mechanisms(record: dict) -> list[str]:
    """The method's own reading of its record (`Method.inactive_mechanisms`)."""
    from dfml_bench.methods import method_class, method_names

    base = record.get("base_method") or record.get("method")
    return method_class(base).inactive_mechanisms(record) if base in method_names() else []


def collect(results_dir: Path | str, output: Path | str | None = None) -> Path:
    results_dir = Path(results_dir)
    frame = read_records(results_dir)
    if frame.empty:
        raise DfmlError(f"no run records under {results_dir / 'runs'}; run the workflow first")
    frame = frame.sort_values(["scenario", "dataset", "method", "shots", "seed", "protocol"])
    target = Path(output) if output else results_dir / "summary.csv"
    return atomic.write_with(target, lambda tmp: frame.to_csv(tmp, index=False))
