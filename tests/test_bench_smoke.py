"""The benchmark suite collects and runs (smoke sizes, one round) in the plain test run, so a
broken benchmark is caught by CI; and its Markdown table reads what pytest-benchmark writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dfml_bench.reporting.bench import bench_markdown

REPO = Path(__file__).resolve().parents[1]


def test_benchmarks_run_in_smoke_mode_and_make_a_table(tmp_path: Path) -> None:
    output = tmp_path / "bench-cpu.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(REPO / "tests" / "bench"),
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "--benchmark-only",
            f"--benchmark-json={output}",
        ],
        env=os.environ | {"DFML_BENCH_SMOKE": "1", "DFML_BENCH_DEVICE": "cpu"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    benchmarks = json.loads(output.read_text())["benchmarks"]
    groups = {bench["group"] for bench in benchmarks}
    assert {"PURER ECI data step", "FREE synthesize (4 teachers x 5 steps)"} <= groups
    assert len(benchmarks) == 12
    for bench in benchmarks:
        assert bench["extra_info"]["device"].startswith("cpu")
        assert bench["extra_info"]["torch"] and bench["extra_info"]["settings"]
    table = bench_markdown([output])
    assert "PURER ECI data step" in table and "loop (baseline)" in table and "1.00x" in table
