"""Benchmark table: medians of the pytest-benchmark suite (dfml_bench/benchmarks), speed-ups
within each group against its reference implementation, and the published reference figures.

Each benchmark stores in `extra_info` the device, torch version and settings it ran with;
`baseline: true` marks the reference implementation of its group (the loop over teachers, task
by task), and `reference_ms` the authors' figure on an H100 where the issue quotes one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dfml_bench import atomic
from dfml_bench.errors import DfmlError

COLUMNS = ["group", "benchmark", "median_ms", "iqr_ms", "rounds", "speedup", "reference_ms"]


def read_benchmark_json(path: Path) -> tuple[pd.DataFrame, dict]:
    """Rows of one pytest-benchmark JSON file, and the file's machine/run information."""
    try:
        payload = json.loads(path.read_text())
        benchmarks = payload["benchmarks"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise DfmlError(
            f"{path} is not a pytest-benchmark JSON file ({error}); rerun `dfml-bench bench`"
        ) from None
    rows = []
    for bench in benchmarks:
        extra = bench.get("extra_info", {})
        rows.append(
            dict(
                group=bench.get("group") or bench["name"],
                benchmark=extra.get("variant", bench["name"]),
                median_ms=bench["stats"]["median"] * 1e3,
                iqr_ms=bench["stats"]["iqr"] * 1e3,
                rounds=bench["stats"]["rounds"],
                baseline=bool(extra.get("baseline", False)),
                reference_ms=extra.get("reference_ms"),
                device=extra.get("device", "?"),
                torch=extra.get("torch", "?"),
                settings=extra.get("settings", ""),
            )
        )
    frame = pd.DataFrame(rows)
    info = payload.get("machine_info", {}) | {"datetime": payload.get("datetime", "?")}
    return frame, info


def with_speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """speedup = the group baseline's median / this median (1.0 for the baseline itself)."""
    frame = frame.copy()
    baselines = frame[frame["baseline"]].groupby("group")["median_ms"].first()
    frame["speedup"] = [
        baselines[group] / median if group in baselines.index else None
        for group, median in zip(frame["group"], frame["median_ms"])
    ]
    return frame


def bench_markdown(paths: list[Path]) -> str:
    """One section per benchmark JSON file (one per device / machine)."""
    parts = [
        "# Benchmarks (pytest-benchmark medians)\n",
        "Written by `dfml-bench bench`. *speed-up* = the group's reference implementation "
        "(marked baseline: loop over teachers, task by task) over this median. *reference* = "
        "the authors' code on one NVIDIA H100 as quoted in the performance issue (only "
        "comparable with rows measured on an H100).\n",
    ]
    if not paths:
        return "\n".join(parts + ["No benchmark JSON found.\n"])
    for path in sorted(paths):
        frame, info = read_benchmark_json(path)
        if frame.empty:
            continue
        frame = with_speedups(frame)
        devices = ", ".join(sorted(frame["device"].astype(str).unique()))
        torches = ", ".join(sorted(frame["torch"].astype(str).unique()))
        cpu = info.get("cpu", {}).get("brand_raw", info.get("processor", "?"))
        shown = pd.DataFrame(
            {
                "group": frame["group"],
                "benchmark": frame["benchmark"]
                + frame["baseline"].map({True: " (baseline)", False: ""}),
                "median (ms)": frame["median_ms"].map("{:.2f}".format),
                "IQR (ms)": frame["iqr_ms"].map("{:.2f}".format),
                "rounds": frame["rounds"],
                "speed-up": frame["speedup"].map(lambda v: "—" if pd.isna(v) else f"{v:.2f}x"),
                "reference (ms)": frame["reference_ms"].map(
                    lambda v: "—" if v is None or pd.isna(v) else f"{v:g}"
                ),
                "settings": frame["settings"],
            }
        )
        parts += [
            f"## {path.stem}: {devices}\n",
            f"Machine {info.get('node', '?')} ({cpu}, {info.get('cpu', {}).get('count', '?')} "
            f"CPUs), torch {torches}, run {info['datetime']}.\n",
            shown.to_markdown(index=False, disable_numparse=True),
            "",
        ]
    return "\n".join(parts)


def write_bench_markdown(bench_dir: Path | str) -> Path:
    bench_dir = Path(bench_dir)
    paths = sorted(bench_dir.glob("*.json"))
    return atomic.write_text(bench_dir / "bench.md", bench_markdown(paths))
