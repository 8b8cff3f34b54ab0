"""Cache decoded splits as uint8 .npy files so a second run never decodes images again."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dfml_bench import atomic
from dfml_bench.data.base import SPLITS, ClassSplit

CACHE_FORMAT_VERSION = 1


def cached_splits(
    cache_root: Path, key: str, build: Callable[[], dict[str, ClassSplit]]
) -> dict[str, ClassSplit]:
    """Return the splits stored under `cache_root/key`, building and storing them if absent.

    `key` must change whenever the content would (dataset, image size, source fingerprint).
    Files are written atomically; the index is written last, so a partial cache is never read.
    """
    folder = cache_root / key
    index_path = folder / "index.json"
    if index_path.is_file():
        try:
            return _read(folder, json.loads(index_path.read_text()))
        except (OSError, ValueError, KeyError):
            index_path.unlink(missing_ok=True)  # corrupt cache: rebuild below
    splits = build()
    index: dict[str, object] = {"version": CACHE_FORMAT_VERSION, "splits": {}}
    for name, split in splits.items():
        atomic.write_with(folder / f"{name}-images.npy", lambda p, s=split: _save(p, s.images))
        atomic.write_with(folder / f"{name}-labels.npy", lambda p, s=split: _save(p, s.labels))
        index["splits"][name] = list(split.class_names)  # type: ignore[index]
    atomic.write_json(index_path, index)
    return splits


def _save(path: Path, tensor: torch.Tensor) -> None:
    with open(path, "wb") as handle:
        np.save(handle, tensor.numpy(), allow_pickle=False)


def _read(folder: Path, index: dict) -> dict[str, ClassSplit]:
    if index.get("version") != CACHE_FORMAT_VERSION:
        raise ValueError("cache format changed")
    out = {}
    for name in SPLITS:
        if name not in index["splits"]:
            continue
        images = torch.from_numpy(np.load(folder / f"{name}-images.npy", allow_pickle=False))
        labels = torch.from_numpy(np.load(folder / f"{name}-labels.npy", allow_pickle=False))
        out[name] = ClassSplit(images, labels.long(), tuple(index["splits"][name]))
    return out
