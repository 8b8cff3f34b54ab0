"""Benchmark suite (pytest-benchmark), shipped with the package. Run it with `dfml-bench bench`
(needs `pip install 'dfml-bench[bench]'`), which also writes results/bench/bench.md, or from a
checkout with `pytest --benchmark-only` (testpaths include this folder; the plain `pytest` skips
benchmarks) or `pytest dfml_bench/benchmarks --benchmark-only`.
Environment: DFML_BENCH_DEVICE (auto|cpu|cuda); DFML_BENCH_SMOKE=1 for small sizes and one round
(what CI runs, to check the code paths).
"""

from __future__ import annotations

import os

import pytest
import torch

from dfml_bench.device import resolve_device


@pytest.fixture(scope="session")
def device() -> torch.device:
    return resolve_device(os.environ.get("DFML_BENCH_DEVICE", "auto"))
