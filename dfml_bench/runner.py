"""One run: zoo -> method -> checkpoints -> harness -> records (paper and clean protocol)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from dfml_bench import atomic
from dfml_bench.config import RunSpec
from dfml_bench.data import FewShotDataset, load_dataset
from dfml_bench.device import resolve_device
from dfml_bench.environment import environment
from dfml_bench.errors import DfmlError
from dfml_bench.evaluation.harness import EvaluationResult, evaluate
from dfml_bench.evaluation.stats import combine_ci95
from dfml_bench.inversion.pixels import Normalisation
from dfml_bench.layout import record_path
from dfml_bench.layout import resume_dir as resume_dir_of
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.methods import Checkpoint, MetaTrainContext, Method, create_method
from dfml_bench.models import build_model
from dfml_bench.models.finite import non_finite_parameters
from dfml_bench.models.storage import load_into, save_state
from dfml_bench.records import (
    PROTOCOLS,
    CurvePoint,
    Environment,
    MethodTimings,
    RunRecord,
    Score,
    TestAdaptationRecord,
    ZooSummary,
)
from dfml_bench.resume import StateStore
from dfml_bench.zoo.manifest import Zoo


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


def execute_run(
    spec: RunSpec, progress: bool = True, state_interval_s: float | None = None
) -> list[Path]:
    """Meta-train, evaluate every checkpoint, write one record per protocol (atomically).

    With `state_interval_s` set, the run's full state is saved in `<run_dir>/resume/` at
    that interval and at every evaluated checkpoint; started again after a crash or a kill, the
    same run continues from the newest good state and writes the same records."""
    method = create_method(spec.method, spec.method_settings)
    adaptation = method.test_adaptation
    spec = spec.model_copy(
        update={"evaluation": spec.evaluation.with_adaptation(adaptation.steps, adaptation.lr)}
    )
    device = resolve_device(spec.device)
    torch.manual_seed(spec.seed)
    zoo = Zoo.open(spec.zoo_dir)
    datasets = [
        load_dataset(
            name, spec.meta_model.image_size, data_root=spec.data_root, cache_dir=spec.cache_dir
        )
        for name in zoo.datasets
    ]
    resume_dir = resume_dir_of(spec.run_dir)
    state_store = StateStore(resume_dir, run_fingerprint(spec), state_interval_s)
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
        resume=state_store,
        normalisations={d.name: Normalisation(d.mean, d.std) for d in datasets},
    )

    reason = method.inapplicable_reason(context)
    if reason is not None:
        return _write_inapplicable(spec, zoo, datasets, method, device, reason)

    # ICFIL runs on every checkpoint's test tasks (the paper protocol maximises over them); the
    # same pass also scores plain fine-tuning. Meta-val selection uses plain fine-tuning.
    switch = spec.evaluation.icfil.enabled
    icfil = method.uses_icfil if switch is None else switch
    run = RunProgress.restore(state_store, method, spec, resume_dir)
    state_store.progress_state = run.state

    if not run.method_done:
        stream = method.meta_train(context)
        while True:
            started = time.perf_counter()
            checkpoint = next(stream, None)
            run.meta_train_seconds += time.perf_counter() - started
            if checkpoint is None:
                break
            _check_finite(checkpoint, spec.method)
            started = time.perf_counter()
            # the paper protocol: each periodic evaluation on freshly drawn test tasks
            draw = len(run.checkpoints)
            test = [
                _evaluate(checkpoint, d, "test", spec, device, progress, icfil=icfil, draw=draw)
                for d in datasets
            ]
            run.eval_seconds += time.perf_counter() - started
            run.add_checkpoint(checkpoint, test, resume_dir if state_store.enabled else None)
        run.method_done = True

    if len(run.checkpoints) > 1:  # model selection on meta-val is only needed with a choice
        for index, checkpoint in enumerate(run.checkpoints):
            if run.scores[index].val is not None:  # scored before a restart
                continue
            started = time.perf_counter()
            val = [_evaluate(checkpoint, d, "val", spec, device, progress) for d in datasets]
            run.scores[index] = CheckpointScore(
                run.scores[index].iteration, run.scores[index].test, val
            )
            run.eval_seconds += time.perf_counter() - started
            state_store.step(checkpoint.iteration, dict, force=True)

    scores = run.scores
    paper = max(scores, key=lambda score: score.test_mean)
    # the clean protocol: the checkpoint with the best meta-val accuracy, scored on the fixed
    # test tasks (draw 0, the tasks of every method's first evaluation)
    chosen = 0 if len(scores) == 1 else max(range(len(scores)), key=lambda i: scores[i].val_mean)
    clean = scores[chosen]
    if chosen > 0:
        started = time.perf_counter()
        test = [
            _evaluate(run.checkpoints[chosen], d, "test", spec, device, progress, icfil=icfil)
            for d in datasets
        ]
        run.eval_seconds += time.perf_counter() - started
        clean = CheckpointScore(clean.iteration, test, clean.val)
    common = _common_fields(spec, zoo, datasets, method, device) | {
        "meta_train_s": round(run.meta_train_seconds, 3),
        "recovery_s": round(method.recovery_seconds, 3),
        "eval_s": round(run.eval_seconds, 3),
        "method_timings": method.timings,
        "checkpoints_evaluated": len(scores),
        "curve": [_curve_point(score) for score in scores],
        "resumed_from": run.resumed_from,
    }
    written = []
    for protocol, chosen_score in (("paper", paper), ("clean", clean)):
        fields = dict(common, protocol=protocol, icfil=icfil, **_summarise(chosen_score))
        if icfil:
            tests = chosen_score.test
            without = sum(r.plain_mean for r in tests) / len(tests)
            fields["acc_mean_without_icfil"] = round(without, 4)
            fields["icfil_s_per_task"] = round(
                sum(r.icfil_seconds_per_task or 0.0 for r in tests) / len(tests), 4
            )
        fields["selection"] = (
            "max meta-test accuracy over periodic evaluations, each on freshly drawn test "
            "tasks (test-set selection, as the papers)"
            if protocol == "paper"
            else "checkpoint with the best meta-val accuracy, on the fixed test tasks"
            if len(scores) > 1
            else "single checkpoint (nothing to select)"
        ) + ("; test accuracy with ICFIL, meta-val without" if icfil else "")
        written.append(_write_record(spec, protocol, fields))
    state_store.clear()
    return written


def _check_finite(checkpoint: Checkpoint, method: str) -> None:
    """A model with NaN or infinite weights still predicts some class, so its accuracy would
    look like a number; stop instead of recording it."""
    bad = non_finite_parameters(checkpoint.model)
    if bad:
        raise DfmlError(
            f"{method}: the meta-model at iteration {checkpoint.iteration} has non-finite "
            f"weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); nothing was "
            "recorded; lower the method's learning rates"
        )


def run_fingerprint(spec: RunSpec) -> str:
    """What a saved state must match to be continued: everything the run computes from."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


@dataclass
class RunProgress:
    """The runner's side of a run's state: evaluated checkpoints, timings, how far it got."""

    method: Method
    checkpoints: list[Checkpoint] = field(default_factory=list)
    scores: list[CheckpointScore] = field(default_factory=list)
    meta_train_seconds: float = 0.0
    eval_seconds: float = 0.0
    method_done: bool = False
    resumed_from: list[int] = field(default_factory=list)

    @classmethod
    def restore(
        cls, state_store: StateStore, method: Method, spec: RunSpec, resume_dir: Path
    ) -> RunProgress:
        run = cls(method)
        saved = state_store.restored
        if saved is None:
            return run
        state = saved.progress
        run.meta_train_seconds = state["meta_train_s"]
        run.eval_seconds = state["eval_s"]
        run.method_done = state["method_done"]
        run.resumed_from = [*state["resumed_from"], saved.iteration]
        method.recovery_seconds = state["recovery_s"]
        method.timings = MethodTimings.model_validate(state["method_timings"])
        for entry in state["scores"]:
            iteration = entry["iteration"]
            model = build_model(
                spec.meta_model.architecture,
                spec.ways,
                spec.meta_model.image_size,
                spec.meta_model.init,
            )
            model = load_into(use_batch_statistics(model), _checkpoint_file(resume_dir, iteration))
            run.checkpoints.append(Checkpoint(iteration, model))
            run.scores.append(
                CheckpointScore(
                    iteration,
                    [EvaluationResult(**result) for result in entry["test"]],
                    None if entry["val"] is None else [EvaluationResult(**r) for r in entry["val"]],
                )
            )
        return run

    def add_checkpoint(
        self, checkpoint: Checkpoint, test: list[EvaluationResult], resume_dir: Path | None
    ) -> None:
        model = copy.deepcopy(checkpoint.model).cpu()
        if resume_dir is not None:  # the state refers to it; written once, not with every state
            save_state(model, _checkpoint_file(resume_dir, checkpoint.iteration))
        self.checkpoints.append(Checkpoint(checkpoint.iteration, model))
        self.scores.append(CheckpointScore(checkpoint.iteration, test, None))

    def state(self) -> dict[str, object]:
        return {
            "meta_train_s": self.meta_train_seconds,
            "eval_s": self.eval_seconds,
            "method_done": self.method_done,
            "resumed_from": self.resumed_from,
            "recovery_s": self.method.recovery_seconds,
            "method_timings": self.method.timings.measured(),
            "scores": [
                {
                    "iteration": score.iteration,
                    "test": [dataclasses.asdict(result) for result in score.test],
                    "val": None
                    if score.val is None
                    else [dataclasses.asdict(r) for r in score.val],
                }
                for score in self.scores
            ],
        }


def _checkpoint_file(resume_dir: Path, iteration: int) -> Path:
    return resume_dir / f"checkpoint-{iteration:09d}.safetensors"


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
        _write_record(spec, protocol, dict(common, protocol=protocol)) for protocol in PROTOCOLS
    ]


def _write_record(spec: RunSpec, protocol: str, fields: dict[str, object]) -> Path:
    """Validate the record against `RunRecord` before writing: a field the model does not know
    is a bug here, not a new column for the tables to guess at."""
    record = RunRecord.model_validate(fields)
    return atomic.write_json(record_path(spec.run_dir, protocol), record.to_json())


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
        "method": spec.variant or spec.method,  # a variant is a row of its own
        "base_method": spec.method,
        "display_name": spec.variant_label,
        "data_free": method.data_free,
        "backbone": spec.meta_model.architecture,
        "ways": spec.ways,
        "shots": spec.shots,
        "seed": spec.seed,
        "applicable": True,
        "zoo": ZooSummary(
            recipe=zoo.manifest.recipe_name,
            recipe_hash=zoo.manifest.recipe_hash,
            teachers=len(zoo.teachers),
            architectures=zoo.architectures,
        ),
        "spec": spec.model_dump(),
        # what ran: every setting after the fidelity profile was applied, and the protocol
        "fidelity": getattr(method.settings, "fidelity", None),
        "method_settings": method.settings.model_dump(mode="json"),
        "test_adaptation": TestAdaptationRecord(
            steps=spec.evaluation.inner_steps,
            lr=spec.evaluation.inner_lr,
            method_default=method.test_adaptation.source,
        ),
        "environment": Environment.model_validate(environment(device)),
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
    draw: int = 0,
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
        draw=draw,
    )


def _summarise(score: CheckpointScore) -> dict[str, object]:
    per_dataset = {
        result.dataset: Score(acc_mean=result.mean, acc_ci95=result.ci95, episodes=result.episodes)
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


def _curve_point(score: CheckpointScore) -> CurvePoint:
    """Meta-test accuracy of one checkpoint, for accuracy-against-iterations figures."""
    summary = _summarise(score)
    return CurvePoint.model_validate(
        {key: summary[key] for key in ("iteration", "acc_mean", "acc_ci95", "val_acc_mean")}
    )


def _dataset_label(datasets: list[FewShotDataset]) -> str:
    return datasets[0].name if len(datasets) == 1 else "mixed"


def _stand_in(datasets: list[FewShotDataset]) -> str | None:
    labels = {d.stand_in_for for d in datasets if d.stand_in_for}
    return ", ".join(sorted(labels)) or None
