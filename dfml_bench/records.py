"""Run records: the typed JSON a run writes and every table reads.

The runner builds a `RunRecord` and writes it; `collect` validates every record against the same
model, so a field is spelled once, a record from another version fails with the file's name, and
a table never reads a quantity under two names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from dfml_bench.errors import DfmlError

Protocol = Literal["paper", "clean"]
PROTOCOLS: tuple[Protocol, ...] = ("paper", "clean")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodTimings(_Strict):
    """What a method measured about its own work (beside the runner's wall times).

    Every field is optional: a method sets the ones that mean something for it.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # images (pixels of pseudo-data) recovered from the teachers over the whole run; records
    # written before this field was unified call PURER's `pseudo_images`
    images_recovered: float | None = Field(
        None, validation_alias=AliasChoices("images_recovered", "pseudo_images")
    )
    recovery_s_per_task: float | None = None  # recovery seconds per task's worth of images
    init_from_average: float | None = None  # PURER: 1 when it started from the zoo's Average
    adversarial_steps: float | None = None  # PURER: ECI data steps with the adversarial term
    first_adversarial_iteration: float | None = None  # PURER: the first of them
    adversarial_epochs: float | None = None  # FREE: epochs recovered against the student
    replay_batches: float | None = None  # FREE: meta-batches replayed from memory
    final_objective: float | None = None  # DRO: the fusion objective at the last iteration
    # time to quality (dfml_bench.evaluation.recovery_speed): per recoverer, median seconds,
    # median updates and the share of probes that reached the quality
    ttq_eci_pool_s: float | None = None
    ttq_eci_pool_steps: float | None = None
    ttq_eci_pool_reached: float | None = None
    ttq_meta_generator_s: float | None = None
    ttq_meta_generator_steps: float | None = None
    ttq_meta_generator_reached: float | None = None
    ttq_scratch_s: float | None = None
    ttq_scratch_steps: float | None = None
    ttq_scratch_reached: float | None = None
    ttq_speedup_vs_scratch: float | None = None
    ttq_speedup_vs_scratch_min: float | None = None
    ttq_speedup_vs_scratch_max: float | None = None

    def set(self, **values: float) -> None:
        """Set measured fields by name (an unknown name is an error, not a silent new key)."""
        for name, value in values.items():
            if name not in type(self).model_fields:
                raise ValueError(f"MethodTimings has no field {name!r}")
            setattr(self, name, float(value))

    def measured(self) -> dict[str, float]:
        """The fields a method set, as written into the record."""
        return self.model_dump(exclude_none=True)


class ZooSummary(_Strict):
    recipe: str
    recipe_hash: str
    teachers: int
    architectures: list[str]


class TestAdaptationRecord(_Strict):
    steps: int
    lr: float
    method_default: str  # where the method's own meta-test protocol comes from


class Environment(_Strict):
    device: str
    machine: str
    cpu_count: int
    packages: dict[str, str]
    git_commit: str


class Score(_Strict):
    acc_mean: float
    acc_ci95: float
    episodes: int


class CurvePoint(_Strict):
    iteration: int
    acc_mean: float
    acc_ci95: float
    val_acc_mean: float | None


class RunRecord(_Strict):
    """One run under one selection protocol. An inapplicable run (the method cannot use the
    zoo) has `applicable: false`, a `reason` and no accuracy, so its table cell is a dash."""

    scenario: str
    scenario_key: str
    dataset: str
    datasets: list[str]
    stand_in_for: str | None
    method: str  # the table row: a registered method or a config's variant
    base_method: str  # the registered method that ran
    display_name: str | None  # a variant's label
    data_free: bool
    backbone: str
    ways: int
    shots: int
    seed: int
    applicable: bool
    zoo: ZooSummary
    spec: dict[str, Any]
    fidelity: str | None
    method_settings: dict[str, Any]
    test_adaptation: TestAdaptationRecord
    environment: Environment
    created: str
    protocol: Protocol
    acc_mean: float | None
    acc_ci95: float | None
    episodes: int
    reason: str | None = None
    # the rest exists when the run was applicable
    meta_train_s: float | None = None
    recovery_s: float | None = None
    eval_s: float | None = None
    method_timings: MethodTimings = Field(default_factory=MethodTimings)
    checkpoints_evaluated: int | None = None
    curve: list[CurvePoint] = Field(default_factory=list)
    resumed_from: list[int] = Field(default_factory=list)
    icfil: bool | None = None
    iteration: int | None = None
    per_dataset: dict[str, Score] = Field(default_factory=dict)
    val_acc_mean: float | None = None
    selection: str | None = None
    acc_mean_without_icfil: float | None = None
    icfil_s_per_task: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as written: unset optional fields left out, as before typing."""
        data = self.model_dump(mode="json", exclude_unset=True)
        data["method_timings"] = self.method_timings.measured()
        if not self.applicable:
            data.pop("method_timings")
        return data


def read_record(path: Path) -> RunRecord:
    """A record file, validated; a broken one is a one-line error naming the file."""
    try:
        return RunRecord.model_validate_json(path.read_bytes())
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise DfmlError(
            f"run record {path} is not a valid record ({where}: {first['msg']}; "
            f"{error.error_count()} problem(s)); rerun that run"
        ) from None
