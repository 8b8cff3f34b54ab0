"""Time to quality: the stopping rule, the probes, the summary, and that FREE and PURER runs
record it."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dfml_bench.evaluation.recovery_speed import (
    PoolRecovery,
    TimeToQuality,
    probe_teachers,
    speedup,
    summarise,
    time_to_quality,
)
from dfml_bench.inversion import DeepInversionWeights
from dfml_bench.methods import MetaTrainContext, create_method
from dfml_bench.reporting.speed import TTQ_FIELDS
from dfml_bench.zoo.manifest import Zoo

CPU = torch.device("cpu")


def test_stops_at_the_threshold_and_judges_before_the_first_step() -> None:
    qualities = iter([0.2, 0.5, 0.95, 1.0])
    steps = []
    result = time_to_quality(lambda: steps.append(1), lambda: next(qualities), 0.9, 10, CPU)
    assert result.steps == 2 and len(steps) == 2 and result.quality == 0.95
    already = time_to_quality(lambda: steps.append(1), lambda: 1.0, 0.9, 10, CPU)
    assert already.steps == 0 and len(steps) == 2


def test_a_probe_that_never_reaches_the_quality_is_censored() -> None:
    result = time_to_quality(lambda: None, lambda: 0.1, 0.9, 5, CPU)
    assert result.steps is None and result.quality == 0.1
    fields = summarise({"x": [result, TimeToQuality(2, 1.0, 0.95)]}, max_steps=5)
    assert fields["ttq_x_reached"] == 0.5
    assert fields["ttq_x_steps"] == 3.5  # median of 5 (censored) and 2


def test_probes_are_the_same_for_every_method_of_a_seed() -> None:
    assert probe_teachers(13, 5, 0) == probe_teachers(13, 5, 0)
    assert probe_teachers(13, 5, 0) != probe_teachers(13, 5, 1)
    assert len(set(probe_teachers(13, 5, 0))) == 5
    assert len(probe_teachers(3, 5, 0)) == 3


def test_speedup_is_the_median_probe_ratio_with_its_extremes() -> None:
    slow = [TimeToQuality(10, s, 0.9) for s in (10.0, 20.0, 30.0)]
    fast = [TimeToQuality(1, s, 0.9) for s in (1.0, 1.0, 10.0)]
    assert speedup(slow, fast, "x") == {
        "ttq_speedup_x": 10.0,
        "ttq_speedup_x_min": 3.0,
        "ttq_speedup_x_max": 20.0,
    }


def test_inverting_a_block_raises_the_teachers_agreement(toy_zoo: Zoo) -> None:
    teacher = toy_zoo.load_teacher(0).requires_grad_(False)
    block = PoolRecovery(
        teacher, 5, 4, 32, DeepInversionWeights(), 2, 0.25, torch.Generator().manual_seed(0), CPU
    )
    before = block.quality()
    result = time_to_quality(block.step, block.quality, 0.9, 50, CPU)
    assert result.quality > before and result.steps is not None


@pytest.mark.parametrize("method", [pytest.param("free", marks=pytest.mark.slow), "purer-no-icfil"])
def test_runs_record_their_time_to_quality(
    toy_zoo: Zoo,
    tmp_path: Path,
    method: str,
    free_short: dict[str, Any],
    free_context: Callable[..., MetaTrainContext],
) -> None:
    settings = {
        "free": free_short | {"time_to_quality_probes": 2, "time_to_quality_max_steps": 20},
        "purer-no-icfil": {
            "iterations": 2,
            "eval_interval": None,
            "time_to_quality_probes": 2,
            "time_to_quality_max_steps": 20,
        },
    }[method]
    created = create_method(method, settings)
    list(created.meta_train(free_context(toy_zoo, tmp_path)))
    extra = created.timings.measured()
    names = ["meta_generator", "scratch"] if method == "free" else ["eci_pool"]
    for name in names:
        assert extra[f"ttq_{name}_s"] > 0
        assert 0 <= extra[f"ttq_{name}_steps"] <= 20
        assert 0 <= extra[f"ttq_{name}_reached"] <= 1
    if method == "free":
        assert extra["ttq_speedup_vs_scratch"] > 0
    # everything recorded reaches the summary (collect) and so the speed table
    assert {key for key in extra if key.startswith("ttq_")} <= set(TTQ_FIELDS)
    off = create_method(method, settings | {"time_to_quality_probes": 0})
    list(off.meta_train(free_context(toy_zoo)))
    assert not any(key.startswith("ttq_") for key in off.timings.measured())
