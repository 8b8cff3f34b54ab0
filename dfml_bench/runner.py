"""One run: zoo -> method -> checkpoints -> harness -> records (paper and clean protocol)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from dfml_bench import atomic
from dfml_bench.config import RunSpec
from dfml_bench.data import FewShotDataset, load_dataset
from dfml_bench.device import resolve_device
from dfml_bench.environment import environment
from dfml_bench.evaluation.harness import EvaluationResult, evaluate
from dfml_bench.evaluation.stats import combine_ci95
from dfml_bench.methods import Checkpoint, MetaTrainContext, Method, create_method
from dfml_bench.zoo.manifest import Zoo

PROTOCOLS = ("paper", "clean")


def record_path(run_dir: Path | str, protocol: str) -> Path:
    return Path(run_dir) / f"record-{protocol}.json"


@dataclass(frozen=True)
class CheckpointScore:
    iteration: int
    test: list[EvaluationResult]
    val: list[EvaluationResult] | None

    @property
    def test_mean(self) -> float:
        return sum(result.mean for result in self.test) / len(self.test)

    @property
    def val_mean(self) -> float:
        assert self.val is not None
        return sum(result.mean for result in self.val) / len(self.val)


def execute_run(spec: RunSpec, progress: bool = True) -> list[Path]:
    """Meta-train, evaluate every checkpoint, write one record per protocol (atomically)."""
    device = resolve_device(spec.device)
    torch.manual_seed(spec.seed)
    zoo = Zoo.open(spec.zoo_dir)
    datasets = [
        load_dataset(
            name, spec.meta_model.image_size, data_root=spec.data_root, cache_dir=spec.cache_dir
        )
        for name in zoo.datasets
    ]
    method = create_method(spec.method, spec.method_settings)
    context = MetaTrainContext(
        zoo,
        spec.meta_model,
        spec.ways,
        spec.shots,
        spec.seed,
        device,
        progress,
        Path(spec.run_dir),
        training_data=None if method.data_free else datasets,
    )

    reason = method.inapplicable_reason(context)
    if reason is not None:
        return _write_inapplicable(spec, zoo, datasets, method, device, reason)

    # ICFIL runs on every checkpoint's test tasks (the paper protocol maximises over them); the
    # same pass also scores plain fine-tuning. Meta-val selection uses plain fine-tuning.
    icfil = method.uses_icfil or spec.evaluation.icfil.enabled
    checkpoints: list[Checkpoint] = []
    scores: list[CheckpointScore] = []
    meta_train_seconds = 0.0
    eval_seconds = 0.0
    stream = method.meta_train(context)
    while True:
        started = time.perf_counter()
        checkpoint = next(stream, None)
        meta_train_seconds += time.perf_counter() - started
        if checkpoint is None:
            break
        started = time.perf_counter()
        test = [
            _evaluate(checkpoint, d, "test", spec, device, progress, icfil=icfil) for d in datasets
        ]
        eval_seconds += time.perf_counter() - started
        checkpoints.append(Checkpoint(checkpoint.iteration, copy.deepcopy(checkpoint.model).cpu()))
        scores.append(CheckpointScore(checkpoint.iteration, test, None))

    if len(checkpoints) > 1:  # model selection on meta-val is only needed with a choice to make
        started = time.perf_counter()
        for index, checkpoint in enumerate(checkpoints):
            val = [_evaluate(checkpoint, d, "val", spec, device, progress) for d in datasets]
            scores[index] = CheckpointScore(scores[index].iteration, scores[index].test, val)
        eval_seconds += time.perf_counter() - started

    paper = max(scores, key=lambda score: score.test_mean)
    clean = scores[0] if len(scores) == 1 else max(scores, key=lambda score: score.val_mean)
    common = _common_fields(spec, zoo, datasets, method, device) | {
        "meta_train_s": round(meta_train_seconds, 3),
        "recovery_s": round(method.timings.recovery_seconds, 3),
        "eval_s": round(eval_seconds, 3),
        "method_timings": method.timings.extra,
        "checkpoints_evaluated": len(scores),
        "curve": [_curve_point(score) for score in scores],
    }
    written = []
    for protocol, chosen in (("paper", paper), ("clean", clean)):
        record = dict(common, protocol=protocol, icfil=icfil, **_summarise(chosen))
        if icfil:
            without = sum(r.plain_mean for r in chosen.test) / len(chosen.test)
            record["acc_mean_without_icfil"] = round(without, 4)
            record["icfil_s_per_task"] = round(
                sum(r.icfil_seconds_per_task or 0.0 for r in chosen.test) / len(chosen.test), 4
            )
        record["selection"] = (
            "max meta-test accuracy over checkpoints (test-set selection, as the papers)"
            if protocol == "paper"
            else "checkpoint with the best meta-val accuracy"
            if len(scores) > 1
            else "single checkpoint (nothing to select)"
        ) + ("; test accuracy with ICFIL, meta-val without" if icfil else "")
        written.append(atomic.write_json(record_path(spec.run_dir, protocol), record))
    return written


def _write_inapplicable(
    spec: RunSpec,
    zoo: Zoo,
    datasets: list[FewShotDataset],
    method: Method,
    device: torch.device,
    reason: str,
) -> list[Path]:
    """Records without accuracy, so the table shows an em dash instead of silently no row."""
    common = _common_fields(spec, zoo, datasets, method, device) | {
        "applicable": False,
        "reason": reason,
        "acc_mean": None,
        "acc_ci95": None,
        "episodes": 0,
    }
    return [
        atomic.write_json(record_path(spec.run_dir, protocol), dict(common, protocol=protocol))
        for protocol in PROTOCOLS
    ]


def _common_fields(
    spec: RunSpec,
    zoo: Zoo,
    datasets: list[FewShotDataset],
    method: Method,
    device: torch.device,
) -> dict[str, object]:
    return {
        "scenario": spec.scenario_label.lower(),
        "scenario_key": spec.scenario,
        "dataset": _dataset_label(datasets),
        "datasets": [d.name for d in datasets],
        "stand_in_for": _stand_in(datasets),
        "method": spec.method,
        "data_free": method.data_free,
        "backbone": spec.meta_model.architecture,
        "ways": spec.ways,
        "shots": spec.shots,
        "seed": spec.seed,
        "applicable": True,
        "zoo": {
            "recipe": zoo.manifest.recipe_name,
            "recipe_hash": zoo.manifest.recipe_hash,
            "teachers": len(zoo.teachers),
            "architectures": zoo.architectures,
        },
        "spec": spec.model_dump(),
        "environment": environment(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _evaluate(
    checkpoint: Checkpoint,
    dataset: FewShotDataset,
    split: str,
    spec: RunSpec,
    device: torch.device,
    progress: bool,
    icfil: bool = False,
) -> EvaluationResult:
    return evaluate(
        checkpoint.model,
        dataset,
        split,
        spec.shots,
        spec.evaluation,
        spec.seed,
        device,
        progress,
        icfil=icfil,
    )


def _summarise(score: CheckpointScore) -> dict[str, object]:
    per_dataset = {
        result.dataset: {
            "acc_mean": result.mean,
            "acc_ci95": result.ci95,
            "episodes": result.episodes,
        }
        for result in score.test
    }
    mean = score.test_mean
    ci95 = (
        score.test[0].ci95 if len(score.test) == 1 else combine_ci95([r.ci95 for r in score.test])
    )
    return {
        "acc_mean": round(mean, 4),
        "acc_ci95": round(ci95, 4),
        "episodes": sum(result.episodes for result in score.test),
        "iteration": score.iteration,
        "per_dataset": per_dataset,
        "val_acc_mean": None if score.val is None else round(score.val_mean, 4),
    }


def _curve_point(score: CheckpointScore) -> dict[str, object]:
    """Meta-test accuracy of one checkpoint, for accuracy-against-iterations figures."""
    summary = _summarise(score)
    return {key: summary[key] for key in ("iteration", "acc_mean", "acc_ci95", "val_acc_mean")}


def _dataset_label(datasets: list[FewShotDataset]) -> str:
    return datasets[0].name if len(datasets) == 1 else "mixed"


def _stand_in(datasets: list[FewShotDataset]) -> str | None:
    labels = {d.stand_in_for for d in datasets if d.stand_in_for}
    return ", ".join(sorted(labels)) or None
