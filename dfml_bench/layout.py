"""Where every output of a workflow lives under its results folder: the one definition that the
config, the Snakemake rules, the runner, `collect`, the figures and the CLI all read.

Paths are built by string formatting, so the Snakemake rules pass wildcards (`"{scenario}"`) for
any part and get their output patterns from the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dfml_bench.records import PROTOCOLS


@dataclass(frozen=True)
class ResultsLayout:
    root: str = "results"

    def zoo(self, recipe: str) -> str:
        """A zoo's folder: its teachers and manifest.json."""
        return f"{self.root}/zoo/{recipe}"

    def manifest(self, recipe: str) -> str:
        return f"{self.zoo(recipe)}/manifest.json"

    def run(self, scenario: str, method: str, shots: int | str, seed: int | str) -> str:
        """One run's folder: its records, figures it saved, and its saved state while running."""
        return f"{self.root}/runs/{scenario}/{method}/{shots}shot/seed{seed}"

    def record(
        self, scenario: str, method: str, shots: int | str, seed: int | str, protocol: str
    ) -> str:
        return str(record_path(self.run(scenario, method, shots, seed), protocol))

    def run_log(self, scenario: str, method: str, shots: int | str, seed: int | str) -> str:
        return f"{self.root}/logs/runs/{scenario}/{method}/{shots}shot-seed{seed}.log"

    def run_benchmark(self, scenario: str, method: str, shots: int | str, seed: int | str) -> str:
        return f"{self.root}/benchmarks/runs/{scenario}/{method}/{shots}shot-seed{seed}.tsv"

    def zoo_log(self, recipe: str) -> str:
        return f"{self.root}/logs/zoo/{recipe}.log"

    def zoo_benchmark(self, recipe: str) -> str:
        return f"{self.root}/benchmarks/zoo/{recipe}.tsv"

    def log(self, rule: str) -> str:
        return f"{self.root}/logs/{rule}.log"

    @property
    def summary(self) -> str:
        return f"{self.root}/summary.csv"

    @property
    def tables(self) -> str:
        return f"{self.root}/tables"

    @property
    def figures(self) -> str:
        return f"{self.root}/figures"

    @property
    def report(self) -> str:
        return f"{self.root}/REPORT.md"

    @property
    def bench(self) -> str:
        """`dfml-bench bench` output: pytest-benchmark JSON per device and bench.md."""
        return f"{self.root}/bench"

    def records(self, protocol: str | None = None) -> list[Path]:
        """Every record file in the results folder (of one protocol, or all), sorted."""
        name = f"record-{protocol}.json" if protocol else "record-*.json"
        return sorted(Path(self.root).glob(f"runs/*/*/*shot/seed*/{name}"))


def record_path(run_dir: Path | str, protocol: str) -> Path:
    """A run's record under one selection protocol (`paper` or `clean`)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    return Path(run_dir) / f"record-{protocol}.json"


def resume_dir(run_dir: Path | str) -> Path:
    """Where a running job keeps its saved states (removed when the job finishes)."""
    return Path(run_dir) / "resume"
