"""Name registry for datasets: configs refer to datasets by name, loaders register themselves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dfml_bench.data.base import FewShotDataset
from dfml_bench.errors import DfmlError
from dfml_bench.paths import cache_dir as default_cache_dir
from dfml_bench.paths import data_root as default_data_root


class DatasetLoader(Protocol):
    def __call__(self, data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
        """Load (or build and cache) the dataset at `image_size` pixels."""
        ...


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: DatasetLoader
    default_image_size: int
    embedded: bool  # generated offline by the package; needs no data root
    description: str


_REGISTRY: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str, *, default_image_size: int, embedded: bool = False, description: str = ""
) -> Callable[[DatasetLoader], DatasetLoader]:
    def decorate(loader: DatasetLoader) -> DatasetLoader:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} registered twice")
        _REGISTRY[name] = DatasetEntry(name, loader, default_image_size, embedded, description)
        return loader

    return decorate


def dataset_names() -> list[str]:
    _import_builtin_loaders()
    return sorted(_REGISTRY)


def dataset_entry(name: str) -> DatasetEntry:
    _import_builtin_loaders()
    if name not in _REGISTRY:
        raise DfmlError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def load_dataset(
    name: str,
    image_size: int | None = None,
    *,
    data_root: Path | str | None = None,
    cache_dir: Path | str | None = None,
) -> FewShotDataset:
    """Load a registered dataset by name (memoised per process: several runs share one copy)."""
    entry = dataset_entry(name)
    size = image_size or entry.default_image_size
    root = default_data_root(data_root)
    cache = default_cache_dir(cache_dir)
    key = (name, size, str(root), str(cache))
    if key not in _LOADED:
        _LOADED[key] = entry.loader(root, size, cache)
    return _LOADED[key]


_LOADED: dict[tuple[str, int, str, str], FewShotDataset] = {}


BUILTIN_LOADERS = ("glyphs", "omniglot", "tiny_imagenet", "cifar_fs", "miniimagenet", "cub")


def _import_builtin_loaders() -> None:
    """Import the loader modules to register them (lazy: `import dfml_bench` stays cheap)."""
    import importlib

    for module in BUILTIN_LOADERS:
        importlib.import_module(f"dfml_bench.data.{module}")
