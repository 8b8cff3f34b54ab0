"""Workflow configs (config/*.yaml) and the per-run spec derived from them.

The Snakefile and `dfml-bench run --config` both go through `run_spec`, so a run started by hand
and a run started by the workflow are configured identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dfml_bench.errors import ConfigError
from dfml_bench.evaluation.harness import EvaluationSettings
from dfml_bench.layout import ResultsLayout
from dfml_bench.methods.base import MetaModelSpec
from dfml_bench.validation import describe, validate_model
from dfml_bench.zoo.recipe import SAFE_NAME

SCENARIO_LABELS = ("SS", "SH", "MH")


class ScenarioConfig(BaseModel):
    """One scenario: which zoo recipe provides the teachers and which methods run on it."""

    model_config = ConfigDict(extra="forbid")
    label: Literal["SS", "SH", "MH"] | None = None  # table it belongs to; default: name prefix
    recipe: str
    methods: list[str] = Field(min_length=1)
    meta_model: MetaModelSpec | None = None
    # overrides of the global evaluation settings, e.g. {episodes: 100} per dataset for MH
    evaluation: dict[str, Any] = Field(default_factory=dict)

    @field_validator("recipe")
    @classmethod
    def _safe_recipe(cls, name: str) -> str:
        if not SAFE_NAME.match(name):
            raise ValueError("a recipe name (file stem in model_zoo_recipes/), not a path")
        return name

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, names: list[str], info: ValidationInfo) -> list[str]:
        from dfml_bench.methods import method_names

        variants = (info.context or {}).get("variants", set())
        unknown = sorted(set(names) - set(method_names()) - variants)
        if unknown:
            raise ValueError(
                f"unknown methods {unknown}; registered: {method_names()}"
                + (f"; variants: {sorted(variants)}" if variants else "")
            )
        return names


class VariantConfig(BaseModel):
    """A named ablation: a registered method with some settings changed, run and tabled as a
    row of its own (e.g. `average-mean: {method: average, settings: {accumulation: mean}}`)."""

    model_config = ConfigDict(extra="forbid")
    method: str
    label: str | None = None  # table row name; default: the method's, with the changed settings
    settings: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)
    meta_model: dict[str, Any] = Field(default_factory=dict)

    def display(self) -> str:
        from dfml_bench.reporting.naming import method_display

        if self.label:
            return self.label
        changed = {**self.settings, **self.evaluation, **self.meta_model}
        details = ", ".join(f"{key}={value}" for key, value in changed.items())
        return f"{method_display(self.method)} ({details})" if details else self.method


class WorkflowConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    results_dir: str = "results"
    recipes_dir: str = "model_zoo_recipes"
    data_root: str | None = None
    cache_dir: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    state_interval_s: float | None = Field(
        300.0, ge=0, description="seconds between saved run states (resume); null: never save"
    )
    ways: int = Field(5, ge=2)
    shots: list[int] = Field(default=[1, 5], min_length=1)
    seeds: list[int] = Field(default=[0], min_length=1)
    meta_model: MetaModelSpec = Field(default_factory=MetaModelSpec)
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    scenarios: dict[str, ScenarioConfig] = Field(min_length=1)
    method_settings: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # per-method overrides of the evaluation settings, e.g. {free: {inner_steps: 1}}; without
    # one, a method is fine-tuned at meta-test as its paper does (Method.test_adaptation)
    method_evaluation: dict[str, dict[str, Any]] = Field(default_factory=dict)
    variants: dict[str, VariantConfig] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "checkpoint_interval_s" in raw:
            raise ValueError(
                "checkpoint_interval_s was renamed state_interval_s (seconds between saved "
                "run states; a checkpoint is only ever an evaluated meta-model)"
            )
        return raw

    @field_validator("scenarios")
    @classmethod
    def _safe_scenario_names(
        cls, scenarios: dict[str, ScenarioConfig]
    ) -> dict[str, ScenarioConfig]:
        bad = [name for name in scenarios if not SAFE_NAME.match(name)]
        if bad:
            raise ValueError(f"scenario names {bad} must be plain names (they name folders)")
        for name, entry in scenarios.items():
            prefix = name[:2].upper()
            if entry.label is None and prefix not in SCENARIO_LABELS:
                raise ValueError(f"scenario {name!r} needs label: SS, SH or MH")
            entry.label = entry.label or prefix
        return scenarios

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, shots: list[int]) -> list[int]:
        if any(k < 1 for k in shots):
            raise ValueError("shots must be >= 1")
        return shots

    @model_validator(mode="after")
    def _evaluation_ways_match(self) -> WorkflowConfig:
        self.evaluation.ways = self.ways
        from dfml_bench.methods import method_names

        registered = set(method_names())
        unknown = sorted(set(self.method_evaluation) - registered)
        if unknown:
            raise ValueError(f"method_evaluation: unknown methods {unknown}")
        for name, variant in self.variants.items():
            if name in registered or not SAFE_NAME.match(name):
                raise ValueError(
                    f"variant {name!r} must be a plain name (it names folders) that is not a "
                    "registered method"
                )
            if variant.method not in registered:
                raise ValueError(
                    f"variant {name!r}: unknown method {variant.method!r}; registered: "
                    f"{sorted(registered)}"
                )
        for name, entry in self.scenarios.items():
            for method in entry.methods:  # reject bad overrides at load time
                self.scenario_evaluation(name, method)
        return self

    @property
    def layout(self) -> ResultsLayout:
        return ResultsLayout(self.results_dir)

    def base_method(self, name: str) -> str:
        """The registered method behind a method or variant name."""
        return self.variants[name].method if name in self.variants else name

    def scenario_evaluation(self, scenario: str, method: str | None = None) -> EvaluationSettings:
        """The global evaluation settings with the scenario's, then the method's overrides."""
        overrides = self.scenarios[scenario].evaluation
        if method is not None:
            overrides = overrides | self.method_evaluation.get(self.base_method(method), {})
            if method in self.variants:
                overrides = overrides | self.variants[method].evaluation
        if not overrides:
            return self.evaluation
        merged = self.evaluation.model_dump() | overrides
        try:
            return EvaluationSettings.model_validate(merged)
        except ValidationError as error:
            where = f"scenarios.{scenario}.evaluation / method_evaluation.{method}"
            raise ValueError(f"{where}: {describe(error)}") from None


class RunSpec(BaseModel):
    """Everything one (scenario, method, shots, seed) run needs; stored in its record."""

    model_config = ConfigDict(extra="forbid")
    scenario: str
    scenario_label: Literal["SS", "SH", "MH"]
    method: str
    variant: str | None = None  # the config's variant name (its own table row), if any
    variant_label: str | None = None
    method_settings: dict[str, Any]
    ways: int
    shots: int
    seed: int
    zoo_dir: str
    run_dir: str
    meta_model: MetaModelSpec
    evaluation: EvaluationSettings
    data_root: str | None
    cache_dir: str | None
    device: Literal["auto", "cpu", "cuda"]


def load_workflow_config(path: Path | str) -> WorkflowConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} not found; see config/default.yaml for an example")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}".replace("\n", " ")) from None
    return parse_workflow_config(raw, f"config {path}")


def parse_workflow_config(raw: object, what: str = "config") -> WorkflowConfig:
    # scenarios may name the config's variants: their validators read the names from the context
    variants = raw.get("variants") if isinstance(raw, dict) else None
    names = set(variants) if isinstance(variants, dict) else set()
    return validate_model(WorkflowConfig, raw, what, context={"variants": names})


def run_spec(config: WorkflowConfig, scenario: str, method: str, shots: int, seed: int) -> RunSpec:
    if scenario not in config.scenarios:
        raise ConfigError(
            f"scenario {scenario!r} is not in the config ({', '.join(config.scenarios)})"
        )
    entry = config.scenarios[scenario]
    if method not in entry.methods:
        raise ConfigError(f"method {method!r} is not configured for scenario {scenario!r}")
    variant = config.variants.get(method)
    base = config.base_method(method)
    settings = config.method_settings.get(base, {}) | (variant.settings if variant else {})
    meta_model = entry.meta_model or config.meta_model
    if variant is not None and variant.meta_model:
        meta_model = validate_model(
            MetaModelSpec, meta_model.model_dump() | variant.meta_model, f"variant {method!r}"
        )
    return RunSpec(
        scenario=scenario,
        scenario_label=entry.label,
        method=base,
        variant=method if variant else None,
        variant_label=variant.display() if variant else None,
        method_settings=settings,
        ways=config.ways,
        shots=shots,
        seed=seed,
        zoo_dir=config.layout.zoo(entry.recipe),
        run_dir=config.layout.run(scenario, method, shots, seed),
        meta_model=meta_model,
        evaluation=config.scenario_evaluation(scenario, method),
        data_root=config.data_root,
        cache_dir=config.cache_dir,
        device=config.device,
    )


def all_runs(config: WorkflowConfig) -> list[tuple[str, str, int, int]]:
    """Every (scenario, method, shots, seed) the config asks for."""
    return [
        (scenario, method, shots, seed)
        for scenario, entry in config.scenarios.items()
        for method in entry.methods
        for shots in config.shots
        for seed in config.seeds
    ]
