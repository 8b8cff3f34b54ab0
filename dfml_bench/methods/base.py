"""The method interface: meta-train on a zoo, yield meta-model checkpoints; the harness evaluates.

A method never sees test data and never samples test episodes; it only turns a zoo (and a budget)
into meta-model initialisations. Registration is by name, so configs and tables use that name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from dfml_bench.data.base import FewShotDataset
from dfml_bench.errors import DfmlError
from dfml_bench.inversion.pixels import Normalisation
from dfml_bench.models.init import ModelInit
from dfml_bench.records import MethodTimings, RunRecord
from dfml_bench.resume import StateStore
from dfml_bench.zoo.manifest import Zoo

if TYPE_CHECKING:
    from dfml_bench.cost import RunShape, WorkRates


class MetaModelSpec(BaseModel):
    """The model every method produces and the harness fine-tunes."""

    model_config = ConfigDict(extra="forbid")
    architecture: str = "conv4"
    image_size: int = 32
    init: ModelInit = Field(
        "authors",
        description=(
            "the meta-model's starting point: 'authors' = PURER's and FREE's init_layer, "
            "'pytorch' = PyTorch's defaults (dfml_bench.models.init)"
        ),
    )


@dataclass
class MetaTrainContext:
    zoo: Zoo
    meta_model: MetaModelSpec
    ways: int
    shots: int
    seed: int
    device: torch.device
    progress: bool = True
    artifacts_dir: Path | None = None  # where a method may leave figures (e.g. pseudo-task grids)
    training_data: list[FewShotDataset] | None = None  # real data: only for data_free = False
    # long loops save their state here at intervals and continue from it after a restart
    resume: StateStore = field(default_factory=StateStore.disabled)
    # pixel statistics of each zoo dataset (what its teachers expect), by dataset name: not data,
    # so data-free methods that generate pixels may use them
    normalisations: dict[str, Normalisation] = field(default_factory=dict)

    def normalisation(self, dataset: str) -> Normalisation:
        if dataset not in self.normalisations:
            raise DfmlError(
                f"no pixel normalisation for dataset {dataset!r}: give MetaTrainContext the "
                "mean and std its teachers were trained with (the runner takes them from the data)"
            )
        return self.normalisations[dataset]


@dataclass(frozen=True)
class Checkpoint:
    """A meta-model snapshot to evaluate. `model` must use batch-statistics BatchNorm."""

    iteration: int
    model: nn.Module


@dataclass(frozen=True)
class TestAdaptation:
    """How the method's paper fine-tunes at meta-test (SGD steps on the support set, lr)."""

    steps: int
    lr: float
    source: str  # where the protocol comes from, for docs and records


# PURER's scripts (--test_inner_update_num 1, --inner_lr 0.01); its paper scores every baseline so
PURER_TEST_ADAPTATION = TestAdaptation(1, 0.01, "PURER scripts: 1 step, lr 0.01")


class Method(ABC):
    """Base class of every DFML method. A subclass declares what the rest of the suite reads:
    its `name` (configs, folders), `display_name` and `table_order` (tables and figures),
    `ablation_of` (an ablation sorts right after its method), its `Settings`, and its cost model
    (`meta_training_seconds`, for `dfml-bench estimate`)."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    table_order: ClassVar[int]  # the papers' row order; an ablation takes its method's
    ablation_of: ClassVar[str | None] = None
    Settings: ClassVar[type[BaseModel]]
    same_architecture_only: ClassVar[bool] = False
    uses_icfil: ClassVar[bool] = False  # the harness applies ICFIL at meta-test for this method
    data_free: ClassVar[bool] = True
    test_adaptation: ClassVar[TestAdaptation] = PURER_TEST_ADAPTATION
    # what `meta_training_seconds` counts, printed with every estimate
    cost_assumption: ClassVar[str | None] = None
    # the smallest settings that still exercise every mechanism (several checkpoints, the
    # curriculum, replay): the contract tests run every registered method with them
    smoke_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, settings: BaseModel) -> None:
        self.settings = settings
        self.recovery_seconds = 0.0  # time spent recovering data (inversion, generators)
        self.timings = MethodTimings()

    def inapplicable_reason(self, context: MetaTrainContext) -> str | None:
        """Why the method cannot use this zoo (None when it can): the table shows an em dash."""
        return self.architecture_mismatch(context) if self.same_architecture_only else None

    def architecture_mismatch(self, context: MetaTrainContext) -> str | None:
        """Why the zoo's parameters cannot be fused into the meta-model (None when they can)."""
        architectures = context.zoo.architectures
        if architectures != [context.meta_model.architecture]:
            return (
                f"method {self.name!r} fuses parameters, so it needs a zoo of one architecture "
                f"equal to the meta-model ({context.meta_model.architecture}); zoo "
                f"{context.zoo.manifest.recipe_name!r} has {', '.join(architectures)}"
            )
        sizes = {teacher.image_size for teacher in context.zoo.teachers}
        if sizes != {context.meta_model.image_size}:
            return (
                f"method {self.name!r} needs teachers at the meta-model's image size "
                f"{context.meta_model.image_size}; zoo has {sorted(sizes)}"
            )
        return None

    def check_zoo(self, context: MetaTrainContext) -> None:
        """Refuse zoos the method cannot use, with a message that says why."""
        reason = self.inapplicable_reason(context)
        if reason is not None:
            raise DfmlError(reason)

    @classmethod
    def inactive_mechanisms(cls, record: RunRecord) -> list[str]:
        """What the run's name promises but its record shows did not act on the scored model
        (tables flag such cells instead of reading them as evidence). Here: ICFIL."""
        if not record.icfil:
            return []
        icfil = record.spec.get("evaluation", {}).get("icfil", {})
        if icfil.get("calibration_steps") == 0 or icfil.get("inversion_steps") == 0:
            return ["ICFIL took no calibration step"]
        if record.acc_mean_without_icfil == record.acc_mean:
            return ["ICFIL changed no test accuracy"]
        return []

    @abstractmethod
    def meta_train(self, context: MetaTrainContext) -> Iterator[Checkpoint]:
        """Yield checkpoints (periodically, for the paper protocol); the last one is final."""

    @classmethod
    def meta_training_seconds(cls, settings: BaseModel, run: RunShape, rates: WorkRates) -> float:
        """Estimated meta-training seconds of one run, from benchmarked rates of work.

        Every method must say: an estimate that silently counted 0 s would mislead."""
        raise DfmlError(
            f"method {cls.name!r} declares no cost model; define meta_training_seconds on its "
            "class (return 0.0 when it does no meta-training)"
        )


class NoMetaTraining(Method):
    """A method that builds its meta-model straight from the zoo or an init, with no training
    loop: its cost model is 0 s of meta-training (evaluation is still counted)."""

    @classmethod
    def meta_training_seconds(cls, settings: BaseModel, run: RunShape, rates: WorkRates) -> float:
        return 0.0


_METHODS: dict[str, type[Method]] = {}
_DECLARED = ("display_name", "table_order", "Settings")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make the method known by `cls.name` to configs, runner and tables."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    missing = [attribute for attribute in _DECLARED if not hasattr(cls, attribute)]
    if missing:
        raise TypeError(f"method {cls.name!r} must declare {', '.join(missing)}")
    if cls.ablation_of is not None and cls.ablation_of not in _METHODS:
        raise TypeError(
            f"method {cls.name!r} is an ablation of {cls.ablation_of!r}, which is not "
            "registered (register the method before its ablations)"
        )
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def registered_methods() -> list[type[Method]]:
    """Every registered method in table order, each ablation right after its method."""
    return sorted(_METHODS.values(), key=lambda cls: method_rank(cls.name))


def method_rank(name: str) -> tuple[int, int, str]:
    """Row order of a registered method, or of a config variant named `<method>-<suffix>`."""
    cls = _METHODS.get(name) or _METHODS.get(name.split("-")[0])
    if cls is None:
        return (len(_METHODS), 1, name)
    return (cls.table_order, int(name != cls.name or cls.ablation_of is not None), name)


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise DfmlError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def create_method(name: str, settings: dict[str, Any] | None = None) -> Method:
    from dfml_bench.validation import validate_model

    cls = method_class(name)
    settings = settings or {}
    if "checkpoints" in settings and "checkpoints" not in cls.Settings.model_fields:
        raise DfmlError(
            f"settings of method {name!r}: `checkpoints` was replaced by `eval_interval` "
            "(iterations or epochs between evaluations; null: the final model only)"
        )
    return cls(validate_model(cls.Settings, settings, f"settings of method {name!r}"))
