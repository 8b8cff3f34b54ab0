"""MiniImageNet with the Ravi & Larochelle (2017) 64/16/20 class split.

Three image layouts are accepted under `miniimagenet/`, checked in this order:
`images/<wnid>/*.jpg`, `<wnid>/*.jpg` (one folder per class), and the flat `images/*.jpg` of
the Ravi release, whose file names start with the wnid (`n0153282900000005.jpg`). Images are
resized to a square, as in the original 84x84 release.
"""

from __future__ import annotations

import os
from pathlib import Path

from dfml_bench.data.base import IMAGENET_MEAN, IMAGENET_STD, SPLITS, FewShotDataset
from dfml_bench.data.cache import cached_splits
from dfml_bench.data.images import (
    DataSource,
    cache_key,
    decode_splits,
    image_files,
    is_image_name,
    split_list,
)
from dfml_bench.data.registry import register_dataset

NAME = "miniimagenet"
SOURCE = DataSource(
    dataset=NAME,
    folder="miniimagenet",
    layout=(
        "images/<wnid>/*.jpg, <wnid>/*.jpg or images/<wnid><index>.jpg for the 100 wnids of "
        "dfml_bench/data/splits/miniimagenet"
    ),
    origin="the MiniImageNet release of Ravi & Larochelle (https://github.com/twitter/"
    "meta-learning-lstm) or ImageNet",
)
WNID_LENGTH = len("n01532829")


@register_dataset(
    NAME,
    default_image_size=84,
    description="MiniImageNet, Ravi & Larochelle 64/16/20 class split",
)
def load_miniimagenet(data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
    """Decode (first run) or read from the cache the Ravi split at `image_size` px."""
    root = SOURCE.locate(data_root)
    wnids = {split: split_list(NAME, split) for split in SPLITS}
    files_of = _class_files(root, [wnid for split in SPLITS for wnid in wnids[split]])
    classes = {split: {wnid: files_of[wnid] for wnid in wnids[split]} for split in SPLITS}
    splits = cached_splits(
        cache_dir,
        cache_key(NAME, image_size, root, (path for files in files_of.values() for path in files)),
        lambda: decode_splits(NAME, classes, image_size),
    )
    return FewShotDataset(
        name=NAME,
        image_size=image_size,
        splits=splits,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        notes={"split": "dfml_bench/data/splits/miniimagenet (Ravi & Larochelle, 2017)"},
    )


def _class_files(root: Path, wnids: list[str]) -> dict[str, list[Path]]:
    """The image files of each wnid, from whichever of the three layouts is present."""
    for base in (root / "images", root):
        if any((base / wnid).is_dir() for wnid in wnids):
            return {wnid: image_files(SOURCE, base / wnid) for wnid in wnids}
    flat = root / "images"
    if not flat.is_dir():
        raise SOURCE.error(root, "no images/ folder and no <wnid>/ class folders")
    by_wnid: dict[str, list[Path]] = {wnid: [] for wnid in wnids}
    for name in sorted(os.listdir(flat)):
        if is_image_name(name) and name[:WNID_LENGTH] in by_wnid:
            by_wnid[name[:WNID_LENGTH]].append(flat / name)
    for wnid, files in by_wnid.items():
        if not files:
            raise SOURCE.error(flat, f"no image named {wnid}*")
    return by_wnid
