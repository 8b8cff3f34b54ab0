"""CUB-200-2011 birds with the class split of the DFML papers' code.

The 200 class folders sorted by name: index i % 2 == 0 is meta-train (100 classes),
i % 4 == 1 meta-val (50), i % 4 == 3 meta-test (50). Whole images are used (no box crops),
resized to a square.
"""

from __future__ import annotations

from pathlib import Path

from dfml_bench.data.base import IMAGENET_MEAN, IMAGENET_STD, FewShotDataset
from dfml_bench.data.cache import cached_splits
from dfml_bench.data.images import DataSource, cache_key, decode_splits, image_files, subfolders
from dfml_bench.data.registry import register_dataset

NAME = "cub"
SOURCE = DataSource(
    dataset=NAME,
    folder="CUB_200_2011",
    layout="images/<NNN.Name>/*.jpg, 200 class folders (the official CUB_200_2011.tgz layout)",
    origin="https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)",
)
NUM_CLASSES = 200


@register_dataset(
    NAME,
    default_image_size=84,
    description="CUB-200-2011 birds, 100/50/50 class split of the DFML papers",
)
def load_cub(data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
    """Decode (first run) or read from the cache the 200 bird classes at `image_size` px."""
    root = SOURCE.locate(data_root)
    images = root / "images"
    if not images.is_dir():
        raise SOURCE.error(images, "folder not found")
    folders = subfolders(images)
    if len(folders) != NUM_CLASSES:
        raise SOURCE.error(images, f"found {len(folders)} class folders, not {NUM_CLASSES}")
    files = {folder.name: image_files(SOURCE, folder) for folder in folders}
    names = list(files)
    part = {
        "train": names[0::2],
        "val": names[1::4],
        "test": names[3::4],
    }
    classes = {split: {name: files[name] for name in part[split]} for split in part}
    splits = cached_splits(
        cache_dir,
        cache_key(NAME, image_size, root, (path for paths in files.values() for path in paths)),
        lambda: decode_splits(NAME, classes, image_size),
    )
    return FewShotDataset(
        name=NAME,
        image_size=image_size,
        splits=splits,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        notes={"split": "sorted class folders: i % 2 == 0 train, i % 4 == 1 val, i % 4 == 3 test"},
    )
