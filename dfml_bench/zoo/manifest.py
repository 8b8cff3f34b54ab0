"""The zoo manifest: what each teacher file is, checked against the file before it is used."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torch import nn

from dfml_bench import atomic
from dfml_bench.errors import CheckpointError
from dfml_bench.models import build_model
from dfml_bench.models.storage import load_into
from dfml_bench.validation import describe
from dfml_bench.zoo.recipe import SAFE_NAME

MANIFEST_NAME = "manifest.json"


class TeacherRecord(BaseModel):
    """One pre-trained teacher. `class_ids` are absolute: offset per dataset across the zoo."""

    model_config = ConfigDict(extra="forbid")
    index: int
    file: str
    sha256: str
    architecture: str
    dataset: str
    image_size: int
    class_ids: list[int]
    dataset_class_indices: list[int]  # indices into the dataset's meta-train class list
    class_names: list[str]
    heldout_accuracy: float  # of the kept weights (the epoch `kept_epoch`)
    best_epoch: int  # the epoch with the highest held-out accuracy
    # epoch whose weights the file holds (the recipe's keep_epoch); None in manifests written
    # before keep_epoch existed, which always kept the best epoch
    kept_epoch: int | None = None
    train_images: int
    seed: int
    recipe_hash: str
    train_seconds: float

    @field_validator("file")
    @classmethod
    def _file_in_zoo_folder(cls, name: str) -> str:
        """A manifest names files next to it; a path could make it load any file on disk."""
        if not SAFE_NAME.match(name):
            raise ValueError(f"teacher file {name!r} must be a file name in the zoo folder")
        return name


class ZooManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe_name: str
    recipe_hash: str
    recipe: dict
    class_offsets: dict[str, int]
    teachers: list[TeacherRecord]
    environment: dict


class Zoo:
    """A trained zoo on disk; teachers are loaded on demand and verified against the manifest."""

    def __init__(self, directory: Path, manifest: ZooManifest) -> None:
        self.directory = directory
        self.manifest = manifest

    @classmethod
    def open(cls, directory: Path | str) -> Zoo:
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise CheckpointError(
                f"no zoo manifest at {path}; train the zoo first (dfml-bench zoo train RECIPE)"
            )
        try:
            manifest = ZooManifest.model_validate(json.loads(path.read_text()))
        except json.JSONDecodeError as error:
            raise CheckpointError(f"zoo manifest {path} is corrupt ({error}); retrain") from None
        except ValidationError as error:
            raise CheckpointError(
                f"zoo manifest {path} is invalid: {describe(error)}; retrain"
            ) from None
        return cls(directory, manifest)

    @property
    def teachers(self) -> list[TeacherRecord]:
        return self.manifest.teachers

    @property
    def architectures(self) -> list[str]:
        return sorted({teacher.architecture for teacher in self.teachers})

    @property
    def datasets(self) -> list[str]:
        return list(self.manifest.class_offsets)

    def load_teacher(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        """Build the declared architecture and load its weights (safetensors, checksum-checked)."""
        record = self.teachers[index]
        model = build_model(record.architecture, len(record.class_ids), record.image_size)
        load_into(model, self.directory / record.file, record.sha256)
        return model.to(device).eval()

    def frozen_teachers(self, device: torch.device | str = "cpu") -> list[nn.Module]:
        """Every teacher once, frozen, in eval mode and channels-last: methods only invert
        them or read their outputs, never train them."""
        teachers = []
        for index in range(len(self.teachers)):
            teacher = self.load_teacher(index, device).requires_grad_(False)
            teachers.append(teacher.to(memory_format=torch.channels_last))
        return teachers

    def write(self) -> Path:
        return atomic.write_json(self.directory / MANIFEST_NAME, self.manifest.model_dump())
