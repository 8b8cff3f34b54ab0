"""The workflow on a SLURM cluster through profiles/slurm: every job is a SLURM job, the results
equal a local run's, and a failing job fails the workflow instead of hanging it.

Needs a running cluster (CI starts one with ../shared/tools/local-slurm.sh up) and the
`[slurm]` extra; skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests/data/tiny-workflow.yaml"
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: .*/rule_(\w+)/")
# columns that differ between any two runs: wall times, timestamps, the absolute run folder
VOLATILE = re.compile(r"(_s|_s_per_task|^created|^run_dir)$")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def cluster() -> None:
    """Skip unless sbatch exists, the controller answers and the executor plugin is installed."""
    if shutil.which("sbatch") is None:
        pytest.skip("no SLURM here (sbatch not on PATH); start one: local-slurm.sh up")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        pytest.skip(f"SLURM controller not up ({ping.stdout.strip() or ping.stderr.strip()})")
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="pip install -e '.[slurm]'")


def snakemake_command(workdir: Path, *args: str, limit: int) -> list[str]:
    """Snakemake on summary.csv, stopped with SIGINT (its graceful stop) after `limit` s."""
    return [
        "timeout", "-s", "INT", str(limit),
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
        str(workdir / "results/summary.csv"),  # first: --configfile/--config take many values
        "--directory", str(workdir), "--config", f"results_dir={workdir / 'results'}", *args,
    ]  # fmt: skip


def on_slurm(workdir: Path, *args: str, limit: int) -> subprocess.CompletedProcess[str]:
    command = snakemake_command(
        workdir, "--executor", "slurm", "--profile", str(REPO / "profiles/slurm"), *args,
        limit=limit,
    )  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=limit + 60)


def squeue_jobs(ids: list[str]) -> dict[str, str]:
    """Job id -> state for finished jobs too (the cluster keeps them; no sacct needed)."""
    listed = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i %T", "--jobs", ",".join(ids)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return dict(line.split() for line in listed.stdout.splitlines() if line.strip())


def stable(summary: Path) -> pd.DataFrame:
    frame = pd.read_csv(summary)
    keep = [column for column in frame.columns if not VOLATILE.search(column)]
    return frame[keep].sort_values(["scenario", "method", "protocol"]).reset_index(drop=True)


def test_tiny_workflow_on_slurm_matches_local_run(tmp_path: Path) -> None:
    # the local run goes alongside: the SLURM run mostly waits on the executor's polling
    local_log = tmp_path / "local.log"
    with open(local_log, "w") as log_file:
        local = subprocess.Popen(
            snakemake_command(
                tmp_path / "local", "--cores", "1", "--configfile", str(CONFIG), limit=300
            ),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        remote = on_slurm(tmp_path / "slurm", "--configfile", str(CONFIG), limit=200)
        local_rc = local.wait(timeout=360)
    log = remote.stdout + remote.stderr
    assert remote.returncode == 0, log[-3000:]
    submitted = SUBMITTED.findall(log)
    rules = sorted(rule for _, rule in submitted)
    # 2 zoos, 5 runs (ss: random/average, mh: random/average/purer), collect: all via SLURM
    assert rules == ["collect"] + ["run_method"] * 5 + ["train_zoo"] * 2, log[-3000:]
    ids = [job for job, _ in submitted]
    assert len(set(ids)) == len(ids)
    states = squeue_jobs(ids)
    assert states and all(states.get(job) == "COMPLETED" for job in ids), states

    assert local_rc == 0, local_log.read_text()[-3000:]
    pd.testing.assert_frame_equal(
        stable(tmp_path / "slurm/results/summary.csv"),
        stable(tmp_path / "local/results/summary.csv"),
    )


def test_failing_slurm_job_fails_the_workflow(tmp_path: Path) -> None:
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    # valid enough for the DAG (the rule only needs the file), invalid for `zoo train`
    (recipes / "broken.yaml").write_text("name: broken\nepochs: 0\n")
    config = tmp_path / "failing.yaml"
    config.write_text(  # recipes_dir is relative to the Snakefile's folder
        f"recipes_dir: {os.path.relpath(recipes, REPO)}\ndevice: cpu\nshots: [1]\n"
        "scenarios:\n  ss: {recipe: broken, methods: [random]}\n"
    )
    result = on_slurm(tmp_path / "run", "--configfile", str(config), limit=120)
    log = result.stdout + result.stderr
    assert result.returncode not in (0, 124), log[-3000:]  # 124: hung until the timeout
    assert SUBMITTED.search(log) and "Error in rule train_zoo" in log, log[-3000:]
    assert not (tmp_path / "run/results/summary.csv").exists()
