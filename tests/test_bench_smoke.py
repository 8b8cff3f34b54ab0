"""The benchmark suite (dfml_bench/benchmarks, shipped with the package) collects and runs
(smoke sizes, one round) in the full test run, so a broken benchmark is caught by CI;
`dfml-bench bench` writes its JSON and the Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dfml_bench.cli import main

pytestmark = pytest.mark.slow  # the whole suite in a subprocess: over a minute on 2 cores


def test_benchmarks_run_in_smoke_mode_and_make_a_table(tmp_path: Path) -> None:
    assert main(["bench", "--out", str(tmp_path), "--device", "cpu", "--smoke"]) == 0
    benchmarks = json.loads((tmp_path / "bench-cpu.json").read_text())["benchmarks"]
    groups = {bench["group"] for bench in benchmarks}
    assert {"PURER ECI data step", "FREE synthesize (4 teachers x 5 steps)"} <= groups
    assert len(benchmarks) == 13  # FREE recovers teacher by teacher: one variant per group
    for bench in benchmarks:
        assert bench["extra_info"]["device"].startswith("cpu")
        assert bench["extra_info"]["torch"] and bench["extra_info"]["settings"]
    table = (tmp_path / "bench.md").read_text()
    assert "PURER ECI data step" in table and "loop (baseline)" in table and "1.00x" in table
