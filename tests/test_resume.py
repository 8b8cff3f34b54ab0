"""Resume: a run or a teacher training stopped at any point continues from its last saved state
and ends with exactly the record (or teacher file) of an uninterrupted run on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dfml_bench.cli import main
from dfml_bench.config import RunSpec
from dfml_bench.models.storage import file_sha256
from dfml_bench.resume import ResumeWarning, StateStore
from dfml_bench.runner import execute_run, record_path
from dfml_bench.zoo.recipe import ZooRecipe
from dfml_bench.zoo.train import train_zoo

REPO = Path(__file__).resolve().parents[1]
EVERY_ITERATION = 0.0  # save after every iteration: any of them can be the last before a kill
TIMINGS = {"created", "environment", "meta_train_s", "recovery_s", "eval_s", "icfil_s_per_task"}


class Killed(Exception):
    """Stands for SIGKILL right after a state was saved (the worst moment to lose the rest)."""


def comparable(run_dir: Path) -> dict[str, Any]:
    """Both records without timings, dates and the run folder (everything else must match)."""
    records = {}
    for protocol in ("paper", "clean"):
        record = json.loads(record_path(run_dir, protocol).read_text())
        record = {k: v for k, v in record.items() if k not in TIMINGS | {"resumed_from"}}
        record["method_timings"] = {  # seconds, and ratios of seconds, vary between runs
            k: v
            for k, v in record["method_timings"].items()
            if not (k.endswith(("_s_per_task", "_s")) or "speedup" in k)
        }
        record["spec"] = {k: v for k, v in record["spec"].items() if k != "run_dir"}
        records[protocol] = record
    return records


def saved_iterations(run_dir: Path) -> list[int]:
    """The iterations whose states the run in `run_dir` holds now (state-000000004.pt: 4)."""
    return sorted(int(path.stem.split("-")[1]) for path in run_dir.glob("resume/state-*.pt"))


def kill_after_saves(monkeypatch: pytest.MonkeyPatch, saves: int) -> None:
    original = StateStore.save
    count = 0

    def save(self: StateStore, iteration: int, state: dict[str, Any]) -> Path:
        nonlocal count
        path = original(self, iteration, state)
        count += 1
        if count == saves:
            raise Killed(f"after save {saves} (iteration {iteration})")
        return path

    monkeypatch.setattr(StateStore, "save", save)


@pytest.fixture(scope="module")
def uninterrupted(
    glyph_zoo_dir: str,
    resumable_run_spec: Callable[..., RunSpec],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """One uninterrupted run per method, the reference every resumed run must equal: each made
    when a test first asks for it (the fast tier needs only the oracle's)."""
    root = tmp_path_factory.mktemp("uninterrupted")

    class Runs(dict[str, Path]):
        def __missing__(self, method: str) -> Path:
            spec = resumable_run_spec(method, glyph_zoo_dir, root / method)
            execute_run(spec, False, EVERY_ITERATION)
            self[method] = root / method
            return self[method]

    return Runs()


# PURER: killed mid-curriculum and after the last checkpoint (then only meta-val is left); FREE:
# mid-replay; oracle and DRO (whose inverted data must come back from the state) mid-training
@pytest.mark.parametrize("method", ["purer", "free"])
@pytest.mark.slow
def test_two_runs_of_one_spec_give_identical_records(
    method: str,
    glyph_zoo_dir: str,
    resumable_run_spec: Callable[..., RunSpec],
    uninterrupted: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Determinism on CPU: same config and seed, same records (timings aside)."""
    execute_run(
        resumable_run_spec(method, glyph_zoo_dir, tmp_path / "again"), False, EVERY_ITERATION
    )
    assert comparable(tmp_path / "again") == comparable(uninterrupted[method])


@pytest.mark.parametrize(
    ("method", "saves"),
    [
        pytest.param("purer", 5, marks=pytest.mark.slow),
        pytest.param("purer", 9, marks=pytest.mark.slow),
        pytest.param("free", 4, marks=pytest.mark.slow),
        ("oracle", 2),  # the fast tier's resume check
        pytest.param("dro", 4, marks=pytest.mark.slow),
    ],
)
def test_run_killed_after_a_save_resumes_to_the_same_records(
    method: str,
    saves: int,
    glyph_zoo_dir: str,
    resumable_run_spec: Callable[..., RunSpec],
    uninterrupted: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = resumable_run_spec(method, glyph_zoo_dir, tmp_path / "run")
    with monkeypatch.context() as patch:
        kill_after_saves(patch, saves)
        with pytest.raises(Killed):
            execute_run(spec, False, EVERY_ITERATION)
    assert not record_path(spec.run_dir, "paper").exists()
    assert list((tmp_path / "run" / "resume").glob("state-*.pt"))

    execute_run(spec, False, EVERY_ITERATION)
    assert comparable(tmp_path / "run") == comparable(uninterrupted[method])
    record = json.loads(record_path(spec.run_dir, "paper").read_text())
    assert len(record["resumed_from"]) == 1
    assert not (tmp_path / "run" / "resume").exists()  # states go once the records are written


@pytest.mark.slow
def test_corrupt_newest_state_falls_back_to_the_one_before(
    glyph_zoo_dir: str,
    resumable_run_spec: Callable[..., RunSpec],
    uninterrupted: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = resumable_run_spec("purer", glyph_zoo_dir, tmp_path / "run")
    with monkeypatch.context() as patch:
        kill_after_saves(patch, 5)
        with pytest.raises(Killed):
            execute_run(spec, False, EVERY_ITERATION)
    states = sorted((tmp_path / "run" / "resume").glob("state-*.pt"))
    assert len(states) == 2  # the newest and its fallback
    states[-1].write_bytes(states[-1].read_bytes()[:1000])  # truncated, e.g. by a full disk

    with pytest.warns(ResumeWarning, match=f"{states[-1].name} is unreadable"):
        execute_run(spec, False, EVERY_ITERATION)
    assert comparable(tmp_path / "run") == comparable(uninterrupted["purer"])
    record = json.loads(record_path(spec.run_dir, "paper").read_text())
    assert record["resumed_from"] == [int(states[0].stem.split("-")[1])]


@pytest.mark.slow
def test_state_of_another_configuration_is_not_continued(
    glyph_zoo_dir: str,
    resumable_run_spec: Callable[..., RunSpec],
    uninterrupted: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    changed = resumable_run_spec("purer", glyph_zoo_dir, tmp_path / "run", pool_lr=0.1)
    with monkeypatch.context() as patch:
        kill_after_saves(patch, 3)
        with pytest.raises(Killed):
            execute_run(changed, False, EVERY_ITERATION)

    spec = resumable_run_spec("purer", glyph_zoo_dir, tmp_path / "run")
    with pytest.warns(ResumeWarning, match="another configuration"):
        execute_run(spec, False, EVERY_ITERATION)
    assert comparable(tmp_path / "run") == comparable(uninterrupted["purer"])
    assert json.loads(record_path(spec.run_dir, "paper").read_text())["resumed_from"] == []


def test_no_state_is_saved_when_checkpointing_is_off(
    glyph_zoo_dir: str,
    resumable_run_spec: Callable[..., RunSpec],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = resumable_run_spec("oracle", glyph_zoo_dir, tmp_path / "run")
    kill_after_saves(monkeypatch, 1)  # any save would end the run
    execute_run(spec, False, state_interval_s=None)
    assert record_path(spec.run_dir, "paper").is_file()
    assert not (tmp_path / "run" / "resume").exists()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.slow
def test_process_killed_by_a_signal_resumes_with_the_same_command(
    sig: signal.Signals,
    glyph_zoo_dir: str,
    resumable_run_spec: Callable[..., RunSpec],
    uninterrupted: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The real thing: `dfml-bench run` killed by a signal mid-training, then started again."""
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "dfml_bench",
        "--quiet",
        "run",
        "--spec",
        resumable_run_spec("purer", glyph_zoo_dir, run_dir).model_dump_json(),
        "--state-interval-s=0",
    ]
    stderr = tmp_path / "stderr.txt"
    with stderr.open("w") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=sink, env=os.environ
        )
    try:
        # Waits on the run's progress, not on a clock (a busy machine only slows it down): until
        # it has saved the state of iteration 4 or later (only the newest two are kept, so a
        # slow poll may never see state 4 itself), or until it ends without one, which fails.
        while not any(iteration >= 4 for iteration in saved_iterations(run_dir)):
            assert process.poll() is None, (
                f"the run ended (exit {process.returncode}) before it could be killed, having "
                f"saved states {saved_iterations(run_dir)}; stderr: {stderr.read_text()[-3000:]}"
            )
            time.sleep(0.02)
        process.send_signal(sig)
        assert process.wait() != 0
    finally:
        if process.poll() is None:  # a failure above must not leave the run going
            process.kill()
            process.wait()
    assert not record_path(run_dir, "paper").exists()

    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, env=os.environ)
    assert comparable(run_dir) == comparable(uninterrupted["purer"])
    resumed = json.loads(record_path(run_dir, "paper").read_text())["resumed_from"]
    assert len(resumed) == 1 and 4 <= resumed[0] < 8


def test_teacher_training_killed_mid_way_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = ZooRecipe(
        name="glyph-resume",
        datasets=["glyphs"],
        image_size=32,
        architectures=["conv4"],
        teachers_per_dataset=2,
        classes_per_teacher=5,
        epochs=4,
        max_images_per_class=40,
    )
    reference = train_zoo(recipe, tmp_path / "reference", progress=False)

    with monkeypatch.context() as patch:
        kill_after_saves(patch, 6)  # teacher 0 done (4 saves), teacher 1 after 2 of 4 epochs
        with pytest.raises(Killed):
            train_zoo(recipe, tmp_path / "zoo", progress=False, state_interval_s=0)
    assert (tmp_path / "zoo" / "teacher-000.safetensors").is_file()
    assert not (tmp_path / "zoo" / "teacher-001.safetensors").exists()
    assert (tmp_path / "zoo" / "resume" / "teacher-001").is_dir()

    resumed = train_zoo(recipe, tmp_path / "zoo", progress=False, state_interval_s=0)
    assert [t.sha256 for t in resumed.teachers] == [t.sha256 for t in reference.teachers]
    assert [t.best_epoch for t in resumed.teachers] == [t.best_epoch for t in reference.teachers]
    assert file_sha256(tmp_path / "zoo" / "teacher-001.safetensors") == resumed.teachers[1].sha256
    assert not (tmp_path / "zoo" / "resume" / "teacher-001").exists()


@pytest.mark.parametrize("value", ["-1", "soon"])
@pytest.mark.parametrize("command", [["zoo", "train", "x.yaml"], ["run", "--from-record", "x"]])
def test_bad_state_interval_is_a_one_line_error(
    command: list[str], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([*command, f"--state-interval-s={value}"])
    assert stopped.value.code == 2
    assert "--state-interval-s" in capsys.readouterr().err
