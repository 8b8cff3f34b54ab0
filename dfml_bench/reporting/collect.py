"""Gather every run record of a results folder into one flat summary.csv."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dfml_bench import atomic
from dfml_bench.errors import DfmlError
from dfml_bench.layout import ResultsLayout
from dfml_bench.records import RunRecord, read_record
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
    """One row per record file of the results layout, each validated as a `RunRecord`."""
    rows = []
    for path in ResultsLayout(str(results_dir)).records():
        record = read_record(path)
        fields = record.model_dump()
        timings = record.method_timings
        evaluation = record.spec.get("evaluation", {})
        rows.append(
            {
                **{key: fields.get(key) for key in SUMMARY_COLUMNS},
                "datasets": "+".join(record.datasets),
                "zoo_teachers": record.zoo.teachers,
                "zoo_architectures": "+".join(record.zoo.architectures),
                "run_dir": record.spec.get("run_dir"),
                "machine": record.environment.machine,
                "recovered_images": timings.images_recovered,
                "recovery_s_per_task": timings.recovery_s_per_task,
                **{field: getattr(timings, field) for field in TTQ_FIELDS},
                "test_steps": evaluation.get("inner_steps"),
                "test_lr": evaluation.get("inner_lr"),
                "fused_head": record.method_settings.get("head"),
                "inactive": "; ".join(_inactive_mechanisms(record)) or None,
                "device": record.environment.device,
                "torch": record.environment.packages.get("torch"),
                "git_commit": record.environment.git_commit,
                "record": str(path.relative_to(results_dir)),
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _inactive_mechanisms(record: RunRecord) -> list[str]:
    """The method's own reading of its record (`Method.inactive_mechanisms`)."""
    from dfml_bench.methods import method_class, method_names

    if record.base_method not in method_names():
        return []
    return method_class(record.base_method).inactive_mechanisms(record)


def collect(results_dir: Path | str, output: Path | str | None = None) -> Path:
    results_dir = Path(results_dir)
    frame = read_records(results_dir)
    if frame.empty:
        raise DfmlError(f"no run records under {results_dir / 'runs'}; run the workflow first")
    frame = frame.sort_values(["scenario", "dataset", "method", "shots", "seed", "protocol"])
    target = Path(output or ResultsLayout(str(results_dir)).summary)
    return atomic.write_with(target, lambda tmp: frame.to_csv(tmp, index=False))
