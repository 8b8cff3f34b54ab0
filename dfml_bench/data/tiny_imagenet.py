"""Tiny ImageNet split by class 64/16/20: stand-in for CIFAR-FS (32 px) or MiniImageNet (84 px).

Only the training images are used (500 per class): few-shot benchmarks split by class, so the
dataset's own val/test folders play no part. The class split is the committed
`splits/tiny-imagenet/*.txt`, so every run on this stand-in uses the same classes.
"""

from __future__ import annotations

from pathlib import Path

from dfml_bench.data.base import IMAGENET_MEAN, IMAGENET_STD, SPLITS, FewShotDataset
from dfml_bench.data.cache import cached_splits
from dfml_bench.data.images import DataSource, cache_key, decode_splits, image_files, split_list
from dfml_bench.data.registry import register_dataset

NAME = "tiny-imagenet"
SOURCE = DataSource(
    dataset=NAME,
    folder="tiny-imagenet-200",
    layout="train/<wnid>/images/*.JPEG for the 100 wnids of dfml_bench/data/splits/tiny-imagenet",
    origin="http://cs231n.stanford.edu/tiny-imagenet-200.zip",
)
STAND_IN_FOR = {32: "CIFAR-FS", 84: "MiniImageNet"}


@register_dataset(
    NAME,
    default_image_size=32,
    description="Tiny ImageNet, 100 classes split 64/16/20 (stand-in for CIFAR-FS/MiniImageNet)",
)
def load_tiny_imagenet(data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
    """Decode (first run) or read from the cache the 100 split classes at `image_size` px."""
    root = SOURCE.locate(data_root)
    classes = {
        split: {
            wnid: image_files(SOURCE, root / "train" / wnid / "images")
            for wnid in split_list(NAME, split)
        }
        for split in SPLITS
    }
    files = [path for split in classes.values() for paths in split.values() for path in paths]
    splits = cached_splits(
        cache_dir,
        cache_key(NAME, image_size, root, files),
        lambda: decode_splits(NAME, classes, image_size),
    )
    return FewShotDataset(
        name=NAME,
        image_size=image_size,
        splits=splits,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        stand_in_for=STAND_IN_FOR.get(image_size),
        notes=_notes(root),
    )


def _notes(root: Path) -> dict[str, str]:
    """The class split, plus each wnid's human-readable name from words.txt when it is there."""
    notes = {"split": "dfml_bench/data/splits/tiny-imagenet (seeded 64/16/20 class split)"}
    words = root / "words.txt"
    if words.is_file():
        wanted = {wnid for split in SPLITS for wnid in split_list(NAME, split)}
        names = dict(
            line.split("\t", 1)
            for line in words.read_text(encoding="utf-8").splitlines()
            if "\t" in line
        )
        notes["class_words"] = "; ".join(
            f"{wnid}: {names[wnid].strip()}" for wnid in sorted(wanted & names.keys())
        )
    return notes
