"""Omniglot: the 964 background characters make meta-train/meta-val, the 659 evaluation ones
meta-test (the usual protocol: test alphabets are never seen in training).

Meta-val is a seeded 20% of the background characters (`np.random.default_rng(SPLIT_SEED)`
permutation of the character indices; the first round(0.2 * 964) = 193 go to meta-val, both
parts keep the source order), so it is the same on every machine. Ink is dark on white, as in
the official PNGs, in three identical channels. Mean/std are measured on meta-train at load.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from dfml_bench.data.base import ClassSplit, FewShotDataset
from dfml_bench.data.cache import cached_splits
from dfml_bench.data.images import (
    DataSource,
    cache_key,
    decode_splits,
    image_files,
    split_from_arrays,
    subfolders,
)
from dfml_bench.data.registry import register_dataset

NAME = "omniglot"
PARTS = ("background", "evaluation")  # official halves: meta-train+val, meta-test
SOURCE = DataSource(
    dataset=NAME,
    folder="omniglot",
    layout=(
        "images_background.npz and images_evaluation.npz (bool `images` [characters, drawers, "
        "H, W], True = background), or the official PNG folders images_background/<alphabet>/"
        "<character>/*.png and images_evaluation/..."
    ),
    origin="https://github.com/brendenlake/omniglot (python/images_background.zip, "
    "python/images_evaluation.zip)",
)
SPLIT_SEED = 0
VAL_FRACTION = 0.2
T = TypeVar("T")


@register_dataset(
    NAME,
    default_image_size=28,
    description="Omniglot characters; background set -> meta-train/val, evaluation -> meta-test",
)
def load_omniglot(data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
    """Read the NumPy archives if present, else the official PNG folders; cache the result."""
    root = SOURCE.locate(data_root)
    archives = [root / f"images_{part}.npz" for part in PARTS]
    folders = [root / f"images_{part}" for part in PARTS]
    build: Callable[[], dict[str, ClassSplit]]
    if any(path.exists() for path in archives):
        for path in archives:
            if not path.is_file():
                raise SOURCE.error(path, "archive not found")
        files = archives
        build = partial(_splits_from_archives, archives, image_size)
    elif any(path.exists() for path in folders):
        characters = [_character_files(folder) for folder in folders]
        files = [path for part in characters for paths in part.values() for path in paths]
        build = partial(_splits_from_pngs, characters, image_size)
    else:
        raise SOURCE.error(root, "neither the .npz archives nor the PNG folders found")
    splits = cached_splits(cache_dir, cache_key(NAME, image_size, root, files), build)
    mean, std = _grey_mean_std(splits["train"].images)
    return FewShotDataset(
        name=NAME,
        image_size=image_size,
        splits=splits,
        mean=mean,
        std=std,
        notes={
            "split": f"background -> train/val (seeded {VAL_FRACTION:.0%} of characters to val, "
            f"seed {SPLIT_SEED}); evaluation -> test",
            "mean_std": "measured on meta-train (ink dark on white)",
        },
    )


def _splits_from_archives(archives: list[Path], image_size: int) -> dict[str, ClassSplit]:
    background, evaluation = (_read_archive(path) for path in archives)
    train, val = _hold_out_val(background)
    return {
        "train": split_from_arrays(NAME, train, image_size),
        "val": split_from_arrays(NAME, val, image_size),
        "test": split_from_arrays(NAME, evaluation, image_size),
    }


def _read_archive(path: Path) -> dict[str, np.ndarray]:
    """One archive as {"<part>/<index>": uint8 [drawers, H, W]}, 255 = background."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["images"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise SOURCE.error(path, f"unreadable archive ({error})") from error
    if images.dtype != np.bool_ or images.ndim != 4 or 0 in images.shape:
        raise SOURCE.error(path, f"`images` is {images.dtype} {images.shape}, not bool 4-d")
    part = path.stem.removeprefix("images_")
    pixels = images.astype(np.uint8) * np.uint8(255)
    return {f"{part}/{index:03d}": drawings for index, drawings in enumerate(pixels)}


def _character_files(folder: Path) -> dict[str, list[Path]]:
    """{"<part>/<alphabet>/<character>": sorted PNG files}, in alphabet and character order."""
    if not folder.is_dir():
        raise SOURCE.error(folder, "folder not found")
    part = folder.name.removeprefix("images_")
    characters = {
        f"{part}/{alphabet.name}/{character.name}": image_files(SOURCE, character)
        for alphabet in subfolders(folder)
        for character in subfolders(alphabet)
    }
    if not characters:
        raise SOURCE.error(folder, "no <alphabet>/<character>/ folders")
    return characters


def _splits_from_pngs(
    characters: list[dict[str, list[Path]]], image_size: int
) -> dict[str, ClassSplit]:
    background, evaluation = characters
    train, val = _hold_out_val(background)
    return decode_splits(NAME, {"train": train, "val": val, "test": evaluation}, image_size)


def _hold_out_val(classes: Mapping[str, T]) -> tuple[dict[str, T], dict[str, T]]:
    """Seeded class split of the background set: (meta-train, meta-val), source order kept."""
    rng = np.random.default_rng(SPLIT_SEED)
    held_out = set(rng.permutation(len(classes))[: round(VAL_FRACTION * len(classes))].tolist())
    items = list(classes.items())
    train = {name: value for index, (name, value) in enumerate(items) if index not in held_out}
    val = {name: value for index, (name, value) in enumerate(items) if index in held_out}
    return train, val


def _grey_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of [0, 1] pixels from a histogram (exact; no float copy of the data).

    The three channels are identical, so channel 0 stands for all of them.
    """
    counts = torch.bincount(images[:, 0].reshape(-1), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255.0
    mean = float((counts * values).sum() / counts.sum())
    std = float(((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt())
    return (round(mean, 4),) * 3, (round(std, 4),) * 3
