"""The Snakemake workflow end to end on a tiny config, its lint, and its DAG on the defaults."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
STOPPING = "Terminating processes on user request"  # Snakemake's answer to a Ctrl-C


def snakemake(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_tiny_workflow_end_to_end(tmp_path: Path) -> None:
    results = tmp_path / "results"
    args = (
        "--cores",
        "2",
        "--configfile",
        str(REPO / "tests/data/tiny-workflow.yaml"),
        "--config",
        f"results_dir={results}",
        "--directory",
        str(tmp_path),
    )
    first = snakemake(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    frame = pd.read_csv(results / "summary.csv")
    assert set(frame["scenario"]) == {"ss", "mh"}
    assert set(frame[frame["scenario"] == "ss"]["method"]) == {"random", "average"}
    mh = frame[frame["scenario"] == "mh"]
    assert (mh["dataset"] == "mixed").all()
    assert set(mh["method"]) == {"random", "average", "purer"}
    assert mh[mh["method"] == "average"]["acc_mean"].isna().all()  # mixed zoo: em dash
    assert mh[mh["method"] == "purer"]["icfil"].all()
    assert (results / "runs/mh/purer/1shot/seed0/pseudo-task.png").is_file()
    assert "—" in (results / "tables" / "mh.md").read_text()
    for label in ("ss", "mh"):
        assert "± " in (results / "tables" / f"{label}.md").read_text()
        assert r"\begin{tabular}" in (results / "tables" / f"{label}.tex").read_text()
    report = (results / "REPORT.md").read_text()
    assert "## Scenario MH" in report and "--configfile tests/data/tiny-workflow.yaml" in report
    for kind in ("pseudo-tasks", "curves", "tradeoff"):
        assert (results / "figures" / f"{kind}-mh.pdf").stat().st_size > 1000
    assert (results / "tables" / "reference.md").is_file()
    assert list((results / "benchmarks").glob("**/*.tsv"))
    assert list((results / "logs").glob("**/*.log"))
    again = snakemake(*args)  # complete workflow: nothing left to do
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_default_dag_resolves() -> None:
    result = snakemake("-n", "--cores", "1", "--quiet", "rules")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "train_zoo" in out and "run_method" in out and "report" in out


@pytest.mark.slow
def test_lint_has_only_conda_advice() -> None:
    result = snakemake("--lint")
    output = result.stdout + result.stderr
    lints = [line.strip() for line in output.splitlines() if line.startswith("    * ")]
    assert lints, output[-2000:]  # the conda advice is always there: proves the lint ran
    assert all("conda environment" in lint for lint in lints), lints


@pytest.mark.slow
def test_real_data_config_dag(real_data_root: Path) -> None:
    result = snakemake(
        "-n",
        "--cores",
        "1",
        "--configfile",
        "config/real-data.yaml",
        "--config",
        f"data_root={real_data_root}",
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_interrupted_workflow_completes_without_redoing_finished_jobs(tmp_path: Path) -> None:
    """SIGINT mid-way (Snakemake's graceful stop), then the same command finishes the rest and
    leaves the records written before the interruption untouched."""
    import signal
    import time

    results = tmp_path / "results"
    command = [
        *SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "1",
        "--configfile", str(REPO / "tests/data/tiny-workflow.yaml"),
        "--config", f"results_dir={results}", "--directory", str(tmp_path),
    ]  # fmt: skip
    log = tmp_path / "interrupted.log"
    with log.open("w") as sink:
        # default SIGINT handling for Snakemake even when pytest inherited SIG_IGN (a shell
        # ignores SIGINT in the jobs it starts in the background), as a Ctrl-C at a terminal has
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )

    def done_runs() -> list[Path]:
        return sorted(
            (path.parent for path in results.glob("runs/**/record-clean.json")),
            key=lambda folder: (folder / "record-clean.json").stat().st_mtime_ns,
        )

    # with one core, a second run's records mean Snakemake had finished the first one's job; no
    # deadline (a busy machine only slows Snakemake down), but ending before that fails
    while len(done_runs()) < 2:
        assert process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    finished = {
        path: path.stat().st_mtime_ns for run in done_runs()[:-1] for path in run.glob("record-*")
    }
    # Snakemake's log handler swallows a KeyboardInterrupt that lands while it writes a line
    # (snakemake/logging.py), so a Ctrl-C may need a second press: send it again if Snakemake
    # has not said it is stopping 5 s later; once it has, wait for it however long that takes.
    for _ in range(5):
        if process.poll() is not None or STOPPING in log.read_text():
            break
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            continue
    process.wait()
    assert finished, "no run finished before the interruption"
    # it really stopped mid-way
    assert not (results / "summary.csv").exists(), log.read_text()[-3000:]
    again = subprocess.run(
        [*command, "--rerun-incomplete"], capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (results / "REPORT.md").is_file()
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was redone"
    assert not list(results.glob("**/.*.tmp")), "a temp file was left behind"


@pytest.mark.slow
def test_workflow_killed_with_sigkill_resumes_the_running_job(tmp_path: Path) -> None:
    """SIGKILL to Snakemake and its jobs (a lost node) in the middle of a PURER run: after
    `--unlock`, the same command with `--rerun-incomplete` continues that run from its saved
    state instead of from scratch, and completes the workflow."""
    import contextlib
    import json
    import os
    import signal
    import time

    import yaml

    config = yaml.safe_load((REPO / "tests/data/tiny-workflow.yaml").read_text())
    config["scenarios"] = {"mh": {"recipe": "tiny-mh", "methods": ["random", "purer"]}}
    config["method_settings"]["purer"] |= {"iterations": 40, "eval_interval": 20}
    config["state_interval_s"] = 0
    config["results_dir"] = str(tmp_path / "results")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    run = tmp_path / "results/runs/mh/purer/1shot/seed0"
    command = [
        *SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "1",
        "--configfile", str(config_file), "--directory", str(tmp_path),
    ]  # fmt: skip
    log = tmp_path / "killed.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )

    def saved() -> list[int]:  # iterations of the states the run holds (the newest two)
        return sorted(int(path.stem.split("-")[1]) for path in run.glob("resume/state-*.pt"))

    try:
        # waits on the run's progress, not on a clock: until it has saved the state of
        # iteration 5 or later, or until the workflow ends without one, which fails
        while not any(iteration >= 5 for iteration in saved()):
            assert process.poll() is None, (
                f"the workflow ended before it could be killed, the run having saved states "
                f"{saved()}: {log.read_text()[-3000:]}"
            )
            time.sleep(0.02)
    finally:  # also after a failure, so that nothing is left running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (run / "record-paper.json").exists()

    unlock = subprocess.run([*command, "--unlock"], capture_output=True, text=True, timeout=300)
    assert unlock.returncode == 0, unlock.stderr[-3000:]
    again = subprocess.run(
        [*command, "--rerun-incomplete"], capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads((run / "record-paper.json").read_text())["resumed_from"]
    assert len(resumed) == 1 and 5 <= resumed[0] < 40
    assert (tmp_path / "results/REPORT.md").is_file()
    assert not (run / "resume").exists()
