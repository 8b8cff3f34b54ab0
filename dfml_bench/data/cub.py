"""CUB-200-2011 birds with the class split of the DFML papers' code.

The 200 class names sorted: index i % 2 == 0 is meta-train (100 classes), i % 4 == 1 meta-val
(50), i % 4 == 3 meta-test (50). Two layouts of `CUB_200_2011/` are accepted (`detect_layout`):
the official one, whose `images.txt` and `classes.txt` then decide the images and classes, and
the bare `images/<NNN.Name>/` folders (copies often drop the metadata). Whole images are used
(no box crops), resized to a square.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dfml_bench.data.base import IMAGENET_MEAN, IMAGENET_STD, FewShotDataset
from dfml_bench.data.images import DataSource
from dfml_bench.data.layouts import ALL, FileLayout, class_folders, match_standard
from dfml_bench.data.registry import register_dataset
from dfml_bench.errors import DatasetError

NAME = "cub"
SOURCE = DataSource(
    dataset=NAME,
    folder="CUB_200_2011",
    layout="images/<NNN.Name>/*.jpg, 200 class folders, with or without images.txt and "
    "classes.txt (the official CUB_200_2011.tgz layout)",
    origin="https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)",
)
NUM_CLASSES = 200
METADATA = ("classes.txt", "images.txt")


@register_dataset(
    NAME,
    default_image_size=84,
    description="CUB-200-2011 birds, 100/50/50 class split of the DFML papers",
)
def load_cub(data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
    """Decode (first run) or read from the cache the 200 bird classes at `image_size` px."""
    return detect_layout(data_root).dataset(
        image_size,
        cache_dir,
        (IMAGENET_MEAN, IMAGENET_STD),
        "sorted class names: i % 2 == 0 train, i % 4 == 1 val, i % 4 == 3 test",
    )


def standard_split(names: Iterable[str]) -> dict[str, list[str]]:
    """The DFML papers' split of the class names, sorted (i.e. by their NNN. prefix)."""
    ordered = sorted(names)
    return {"train": ordered[0::2], "val": ordered[1::4], "test": ordered[3::4]}


def detect_layout(data_root: Path | None) -> FileLayout:
    """The one place that decides the layout: with metadata if either file is there."""
    root = SOURCE.locate(data_root)
    images = root / "images"
    if not images.is_dir():
        raise SOURCE.error(images, "folder not found")
    if any((root / name).is_file() for name in METADATA):
        return _metadata_layout(root)
    found = class_folders(images)
    problems = []
    if len(found) != NUM_CLASSES:
        problems.append(SOURCE.error(images, f"found {len(found)} class folders, not 200"))
    match = match_standard(SOURCE, standard_split(found), {ALL: found}, lambda _, c: images / c)
    name = "class folders images/<NNN.Name>/*.jpg (no metadata)"
    return FileLayout(SOURCE, name, root, match, problems=problems)


def _metadata_layout(root: Path) -> FileLayout:
    """`classes.txt` lists the classes, `images.txt` each image as `<id> <class>/<file>`."""
    images = root / "images"
    problems: list[DatasetError] = []
    listed: dict[str, list[str]] = {}
    for name in METADATA:
        path = root / name
        if not path.is_file():
            problems.append(
                SOURCE.error(
                    path,
                    f"metadata file not found ({' and '.join(METADATA)} go together: restore it "
                    "from CUB_200_2011.tgz, or delete the other to use the class folders alone)",
                )
            )
            continue
        values, problem = _read_listing(path)
        if problem:
            problems.append(SOURCE.error(path, problem))
        listed[name] = values
    if "images.txt" in listed:
        named = {path.split("/", 1)[0] for path in listed["images.txt"]}
        classes = listed.get("classes.txt", sorted(named))
        found, problem = _images_by_class(images, listed["images.txt"], set(classes))
        if problem:
            problems.append(SOURCE.error(root / "images.txt", problem))
    else:  # only classes.txt: the folders hold the images (a problem is raised above anyway)
        found = class_folders(images)
        classes = listed.get("classes.txt", list(found))
    if len(classes) != NUM_CLASSES:
        count = f"lists {len(classes)} classes, not 200"
        problems.append(SOURCE.error(root / "classes.txt", count))
    match = match_standard(
        SOURCE,
        standard_split(classes),
        {ALL: found},
        lambda *_: root / "images.txt",
        missing_text="no image of class {cls} listed",
        empty_text="class folder missing or without the images images.txt lists",
        empty_place=lambda _, cls: images / cls,
    )
    name = "class folders images/<NNN.Name>/*.jpg with images.txt and classes.txt"
    label_files = [root / name for name in METADATA if name in listed]
    return FileLayout(SOURCE, name, root, match, problems=problems, label_files=label_files)


def _images_by_class(
    images: Path, relative: list[str], classes: set[str]
) -> tuple[dict[str, list[Path]], str | None]:
    """The existing files `images.txt` lists, by class folder; a problem if they disagree."""
    found: dict[str, list[Path]] = {}
    absent: list[str] = []
    unknown: list[str] = []
    for path in relative:
        cls = path.split("/", 1)[0]
        if cls not in classes:
            unknown.append(path)
        elif os.path.isfile(images / path):
            found.setdefault(cls, []).append(images / path)
        else:
            absent.append(path)
    for files in found.values():
        files.sort()
    if unknown:
        example = unknown[0]
        return found, f"lists {len(unknown)} image(s) of classes not in classes.txt, e.g. {example}"
    if absent:
        return found, f"lists {len(absent)} image(s) missing from images/, e.g. {absent[0]}"
    return found, None


def _read_listing(path: Path) -> tuple[list[str], str | None]:
    """The second field of each `<id> <value>` line, or the reason the file is malformed."""
    values = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            return values, f"line {number} is not `<id> <value>`"
        values.append(fields[1].strip())
    return values, None
