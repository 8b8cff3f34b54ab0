"""PURER: the ECI data step, the curriculum switch, the variants, and that it beats Random."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dfml_bench.config import RunSpec
from dfml_bench.inversion import DeepInversionWeights
from dfml_bench.inversion.pool import PseudoImagePool
from dfml_bench.meta.loop import checkpoint_iterations
from dfml_bench.methods import create_method, method_class, method_names
from dfml_bench.methods.purer import Adversary, CurriculumSwitch, eci_data_step
from dfml_bench.models import build_model
from dfml_bench.records import read_record
from dfml_bench.runner import execute_run
from dfml_bench.zoo.manifest import Zoo


def _teachers(zoo: Zoo) -> list[torch.nn.Module]:
    return [zoo.load_teacher(index) for index in range(len(zoo.teachers))]


def _teacher_ce(teachers: list[torch.nn.Module], pool: PseudoImagePool) -> float:
    with torch.no_grad():
        return sum(
            float(torch.nn.functional.cross_entropy(teacher(block), labels))
            for teacher, block, labels in zip(teachers, pool.blocks, pool.local_labels)
        )


def test_one_eci_step_changes_the_pool_and_lowers_the_teachers_ce(toy_zoo: Zoo) -> None:
    teachers = _teachers(toy_zoo)
    generator = torch.Generator().manual_seed(0)
    pool = PseudoImagePool([t.class_ids for t in toy_zoo.teachers], 4, 32, generator)
    before = [block.detach().clone() for block in pool.blocks]
    teacher_state = [dict(t.state_dict()) for t in teachers]
    ce_before = _teacher_ce(teachers, pool)
    optimizer = torch.optim.Adam(pool.parameters(), lr=0.25)
    eci_data_step(teachers, pool, optimizer, DeepInversionWeights(), 0, generator)
    assert all(not torch.equal(a, b) for a, b in zip(before, pool.blocks))
    assert _teacher_ce(teachers, pool) < ce_before
    for teacher, state in zip(teachers, teacher_state):  # teachers are only read
        for name, tensor in teacher.state_dict().items():
            assert torch.equal(tensor, state[name]), name


def test_adversarial_step_raises_the_meta_models_loss(toy_zoo: Zoo) -> None:
    """Same start, same task: a small adversarial step raises the meta-loss on that task, a plain
    DeepInversion step does not move it as far (first-order: plain SGD with a small lr)."""
    from dfml_bench.meta.adaptation import use_batch_statistics
    from dfml_bench.meta.maml import maml_outer_loss

    teachers = _teachers(toy_zoo)
    torch.manual_seed(0)
    model = use_batch_statistics(build_model("conv4", 5, 32))
    losses = []
    for adversary in (None, Adversary(model, 1000.0, 1, 0.01)):
        generator = torch.Generator().manual_seed(0)
        pool = PseudoImagePool([t.class_ids for t in toy_zoo.teachers], 16, 32, generator)
        task_draw = generator.get_state()  # jitter 0: the step's task is the next draw
        optimizer = torch.optim.SGD(pool.parameters(), lr=1e-4)
        eci_data_step(
            teachers, pool, optimizer, DeepInversionWeights(), 0, generator, adversary, (5, 1, 15)
        )
        replay = torch.Generator()
        replay.set_state(task_draw)
        task = pool.sample_task(5, 1, 15, replay)
        loss, _ = maml_outer_loss(model, dict(model.named_parameters()), [task], 1, 0.01)
        losses.append(float(loss.detach()))
    assert losses[1] > losses[0]


def test_pool_tasks_have_disjoint_support_and_query_and_labels_0_to_n() -> None:
    pool = PseudoImagePool([[0, 1, 2], [3, 4, 5]], 20, 16, torch.Generator().manual_seed(0))
    assert pool.num_images == 120 and pool.classes == [0, 1, 2, 3, 4, 5]
    task = pool.sample_task(5, 5, 15, torch.Generator().manual_seed(0))
    assert task.support_images.shape == (25, 3, 16, 16)
    assert task.query_images.shape == (75, 3, 16, 16)
    assert task.support_labels.tolist() == [c for c in range(5) for _ in range(5)]
    support = {tuple(x.flatten()[:8].tolist()) for x in task.support_images}
    query = {tuple(x.flatten()[:8].tolist()) for x in task.query_images}
    assert not support & query
    with pytest.raises(ValueError, match="raise per_class"):
        pool.sample_task(5, 10, 15, torch.Generator().manual_seed(0))


def test_curriculum_all_time_best_fires_on_a_plateau_and_not_before_the_start() -> None:
    switch = CurriculumSwitch(start=10, patience=3, trigger="all-time-best")
    fired = [switch.update(i, 50.0 if i > 1 else 10.0) for i in range(1, 20)]
    # accuracy stops improving at iteration 2; plateau long enough from iteration 5 on, but the
    # switch may only fire from the start iteration 10, then again after each `patience` plateau
    assert fired.index(True) + 1 == 10
    assert [i + 1 for i, f in enumerate(fired) if f] == [10, 13, 16, 19]
    rising = CurriculumSwitch(start=0, patience=2, trigger="all-time-best")
    assert not any(rising.update(i, float(i)) for i in range(1, 30))


def test_curriculum_authors_fires_at_the_start_and_restarts_its_reference() -> None:
    rising = CurriculumSwitch(start=5, patience=2)
    assert [i for i in range(1, 30) if rising.update(i, float(i))] == [5]  # forced, once
    falling = CurriculumSwitch(start=3, patience=2)
    # after a fire the next accuracy becomes the reference, however low
    assert [i for i in range(1, 15) if falling.update(i, 100.0 - i)] == [3, 6, 9, 12]


def test_curriculum_state_survives_a_restart() -> None:
    accuracies = [30.0, 31.0, 31.0, 29.0, 32.0, 32.0, 32.0, 30.0, 30.0, 33.0, 30.0, 30.0]
    straight = CurriculumSwitch(start=2, patience=2)
    expected = [straight.update(i, a) for i, a in enumerate(accuracies, 1)]
    first, fired = CurriculumSwitch(start=2, patience=2), []
    for i, a in enumerate(accuracies[:6], 1):
        fired.append(first.update(i, a))
    second = CurriculumSwitch(start=2, patience=2)
    second.load(first.state())
    fired += [second.update(i, a) for i, a in enumerate(accuracies[6:], 7)]
    assert fired == expected


def test_evaluations_follow_the_interval_and_end_at_the_last_iteration() -> None:
    assert checkpoint_iterations(100, 25) == {25, 50, 75, 100}
    assert checkpoint_iterations(10, 4) == {4, 8, 10}  # the final model is always evaluated
    assert checkpoint_iterations(3, 10) == {3}
    assert checkpoint_iterations(3, None) == {3}
    assert checkpoint_iterations(60_000, 500) == set(range(500, 60_001, 500))  # PURER: 120


def test_variants_are_registered_with_their_components() -> None:
    assert {"purer", "purer-no-eci", "purer-no-icfil"} <= set(method_names())
    full, no_eci, no_icfil = (
        create_method(name) for name in ("purer", "purer-no-eci", "purer-no-icfil")
    )
    assert full.uses_icfil and full.curriculum
    assert no_eci.uses_icfil and not no_eci.curriculum
    assert not no_icfil.uses_icfil and no_icfil.curriculum


def test_purer_run_records_recovery_and_writes_a_grid(
    toy_zoo: Zoo, tmp_path: Path, paired_run_spec: Callable[..., RunSpec]
) -> None:
    import json

    settings = {
        "iterations": 4,
        "eval_interval": 2,
        "curriculum_start": 0,
        "curriculum_patience": 1,
    }
    spec = paired_run_spec("purer-no-icfil", str(toy_zoo.directory), tmp_path / "run", settings, 1)
    paper, clean = (json.loads(p.read_text()) for p in execute_run(spec, progress=False))
    assert paper["recovery_s"] > 0 and paper["recovery_s"] < paper["meta_train_s"]
    assert paper["method_timings"]["images_recovered"] == 2 * 5 * 16
    assert paper["checkpoints_evaluated"] == 2 and clean["val_acc_mean"] is not None
    assert (tmp_path / "run" / "pseudo-task.png").stat().st_size > 0


@pytest.mark.slow
def test_short_purer_run_beats_random_on_the_same_episodes(
    glyph_zoo_dir: str, tmp_path: Path, paired_run_spec: Callable[..., RunSpec]
) -> None:
    """Paired over the same 100 test episodes of the embedded dataset, 5-way 5-shot."""
    import json

    settings = {"iterations": 15, "eval_interval": None, "curriculum_start": 2}
    accuracies = {}
    for method, method_settings in (("random", {}), ("purer-no-icfil", settings)):
        spec = paired_run_spec(method, glyph_zoo_dir, tmp_path / method, method_settings, 5)
        record = json.loads(execute_run(spec, progress=False)[0].read_text())
        accuracies[method] = record["acc_mean"]
    assert accuracies["purer-no-icfil"] > accuracies["random"] + 5.0, accuracies


@pytest.mark.slow
def test_full_purer_is_evaluated_with_icfil_at_the_selected_checkpoint(
    toy_zoo: Zoo, tmp_path: Path, paired_run_spec: Callable[..., RunSpec]
) -> None:
    import json

    settings = {"iterations": 2, "eval_interval": 1, "per_class": 16}
    spec = paired_run_spec("purer", str(toy_zoo.directory), tmp_path / "run", settings, 1)
    for path in execute_run(spec, progress=False):
        record = json.loads(path.read_text())
        assert record["icfil"] is True and record["icfil_s_per_task"] > 0
        assert 0 <= record["acc_mean_without_icfil"] <= 100
        assert "ICFIL" in record["selection"]


REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "runs"


@pytest.mark.parametrize("scenario", ["ss", "sh", "mh"])
def test_the_reference_run_purer_rows_differ_for_the_reason_their_names_give(
    scenario: str,
) -> None:
    """The committed default run: the curriculum acted in every PURER record with ECI (the
    authors' trigger fires after curriculum_start whatever the accuracy), never in w/o ECI."""
    records = sorted((REFERENCE / scenario).glob("purer*/*shot/seed*/record-clean.json"))
    assert len(records) == 6, "three PURER rows x two shot settings"
    for path in records:
        record = read_record(path)
        steps = record.method_timings.adversarial_steps
        if record.method == "purer-no-eci":
            assert steps == 0, path
        else:
            assert steps is not None and steps >= 1, path
            assert method_class(record.method).inactive_mechanisms(record) == [], path


ECI_ABLATION = REFERENCE.parents[1] / "reference-eci-ablation-standin" / "runs" / "ss"


def test_the_committed_eci_ablation_has_every_run_and_its_curriculum_acted() -> None:
    """docs/fidelity.md draws its ECI conclusion from these 9 records: 3 seeds of each row, the
    profile each row names, adversarial steps in every ECI run and none without ECI or ICFIL."""
    expected = {
        "eci-authors": ("purer-no-icfil", "authors"),
        "eci-corrected": ("purer-no-icfil", "corrected"),
        "no-eci-authors": ("purer-no-eci", "authors"),
    }
    for variant, (method, fidelity) in expected.items():
        records = sorted((ECI_ABLATION / variant / "1shot").glob("seed*/record-clean.json"))
        assert [p.parent.name for p in records] == ["seed0", "seed1", "seed2"], variant
        for path in records:
            record = json.loads(path.read_text())
            assert record["base_method"] == method and record["fidelity"] == fidelity, path
            assert not record["icfil"], path
            steps = record["method_timings"]["adversarial_steps"]
            assert (steps > 0) == (method == "purer-no-icfil"), path
