"""Declarative model-zoo recipes (model_zoo_recipes/*.yaml), validated before any training."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dfml_bench.errors import ConfigError
from dfml_bench.models.init import ModelInit
from dfml_bench.validation import validate_model

# \Z, not $: "$" also matches before a trailing newline, and a name ends up in folder names
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class OptimizerSpec(BaseModel):
    """Pre-training optimiser; defaults follow the authors' code per architecture family."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["adam", "sgd"]
    lr: float = Field(gt=0)
    momentum: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.0, ge=0)


AUTHORS_OPTIMIZERS: dict[str, OptimizerSpec] = {
    "conv4": OptimizerSpec(name="adam", lr=0.01),
    "resnet": OptimizerSpec(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4),
}


class ZooRecipe(BaseModel):
    """How to pre-train one zoo of teachers.

    Teachers are trained on classes of each dataset's meta-train split only. `class_policy`
    "disjoint" cuts the shuffled classes into consecutive groups (PURER; the last group may be
    smaller), "random" draws an independent random subset per teacher (FREE). Architectures are
    assigned round-robin, so a list gives a heterogeneous zoo.
    """

    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    datasets: list[str] = Field(min_length=1)
    image_size: int = Field(ge=16)
    architectures: list[str] = Field(min_length=1)
    teachers_per_dataset: int | None = Field(None, ge=1)
    classes_per_teacher: int = Field(5, ge=2)
    class_policy: Literal["disjoint", "random"] = "disjoint"
    epochs: int = Field(ge=1)
    batch_size: int = Field(128, ge=1)
    milestones: list[float] = Field(default=[0.5, 2 / 3, 5 / 6])
    family_milestones: dict[Literal["conv4", "resnet"], list[float]] = Field(
        default_factory=dict,
        description="milestones per architecture family, replacing `milestones` for it (FREE's "
        "pretrain: none within 60 epochs for Conv4, 30 and 50 of 60 for ResNets)",
    )
    lr_decay: float = Field(0.2, gt=0, le=1)
    grad_clip: float = Field(50.0, gt=0)
    heldout_fraction: float = Field(0.2, gt=0, lt=1)
    max_images_per_class: int | None = Field(None, ge=5)
    optimizers: dict[str, OptimizerSpec] = Field(default_factory=lambda: dict(AUTHORS_OPTIMIZERS))
    init: ModelInit = Field(
        "authors",
        description=(
            "teachers' initialisation: 'authors' = PURER's and FREE's init_layer (conv weights "
            "normal(0, sqrt(2 / (k*k*out_channels))), BatchNorm 1 / 0), 'pytorch' = the defaults"
        ),
    )
    keep_epoch: Literal["best", "last"] = Field(
        "best",
        description=(
            "which epoch's weights a teacher keeps: 'best' = the epoch with the highest held-out "
            "accuracy (a deep copy), 'last' = the final epoch. PURER's and FREE's pre-training "
            "keep the last epoch: the state_dict they store as 'best' aliases the live weights "
            "(no deep copy), so what they save is the final epoch, whatever epoch was best"
        ),
    )
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not SAFE_NAME.match(name):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names a folder)")
        return name

    @field_validator("architectures")
    @classmethod
    def _known_architectures(cls, names: list[str]) -> list[str]:
        from dfml_bench.models import architecture_names

        unknown = sorted(set(names) - set(architecture_names()))
        if unknown:
            raise ValueError(f"unknown {unknown}; known: {architecture_names()}")
        return names

    @field_validator("datasets")
    @classmethod
    def _known_datasets(cls, names: list[str]) -> list[str]:
        from dfml_bench.data import dataset_names

        unknown = sorted(set(names) - set(dataset_names()))
        if unknown:
            raise ValueError(f"unknown {unknown}; known: {dataset_names()}")
        return names

    @model_validator(mode="after")
    def _milestones_are_fractions(self) -> ZooRecipe:
        every = [*self.milestones, *(m for ms in self.family_milestones.values() for m in ms)]
        if any(not 0 < m < 1 for m in every):
            raise ValueError("milestones are fractions of the epochs, each in (0, 1)")
        return self

    def optimizer_for(self, architecture: str) -> OptimizerSpec:
        return self.optimizers.get(architecture) or self.optimizers[_family(architecture)]

    def milestone_epochs(self, architecture: str) -> list[int]:
        """Epochs after which the learning rate decays, for this architecture."""
        fractions = self.family_milestones.get(_family(architecture), self.milestones)
        return sorted({max(1, int(f * self.epochs)) for f in fractions})

    def fingerprint(self) -> str:
        """Hash of everything that changes the teachers (not the description).

        `keep_epoch` enters only when not "best" and `family_milestones` only when set, so
        recipes written before they existed keep their fingerprint (zoos and results are keyed
        by it)."""
        excluded = {"description"} | ({"keep_epoch"} if self.keep_epoch == "best" else set())
        excluded |= set() if self.family_milestones else {"family_milestones"}
        payload = self.model_dump(exclude=excluded)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _family(architecture: str) -> Literal["conv4", "resnet"]:
    return "resnet" if architecture.startswith("resnet") else "conv4"


def load_recipe(path: Path | str) -> ZooRecipe:
    """Parse and validate a recipe; every invalid field is listed in one error message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found; recipes live in model_zoo_recipes/*.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"recipe {path} is not valid YAML: {error}".replace("\n", " ")) from None
    return validate_model(ZooRecipe, raw, f"recipe {path}")
