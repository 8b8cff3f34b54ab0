"""MiniImageNet with the Ravi & Larochelle (2017) 64/16/20 class split.

The dataset circulates in six layouts; `detect_layout` accepts all of them under
`miniimagenet/`, checked in this order: the pickled caches `mini-imagenet-cache-{split}.pkl`,
Ravi's `images/` with `train.csv`/`val.csv`/`test.csv`, split folders `{split}/<wnid>/*.jpg`,
class folders `images/<wnid>/*.jpg` or `<wnid>/*.jpg`, and the flat `images/<wnid><index>.jpg`.
Whatever the layout, each split holds the classes of the committed split lists: a layout whose
own split disagrees is refused, as results on another split are not comparable. Images are
resized to a square, as in the original 84x84 release.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np

from dfml_bench.data.base import IMAGENET_MEAN, IMAGENET_STD, SPLITS, ClassSplit, FewShotDataset
from dfml_bench.data.images import (
    DataSource,
    is_image_name,
    list_images,
    split_from_arrays,
    split_list,
    subfolders,
)
from dfml_bench.data.layouts import (
    ALL,
    FileLayout,
    Layout,
    Match,
    Survey,
    class_folders,
    match_standard,
)
from dfml_bench.data.registry import register_dataset
from dfml_bench.data.safe_pickle import read_dict, text
from dfml_bench.errors import DatasetError

NAME = "miniimagenet"
SOURCE = DataSource(
    dataset=NAME,
    folder="miniimagenet",
    layout=(
        "images/<wnid>/*.jpg, <wnid>/*.jpg, {train,val,test}/<wnid>/*.jpg, "
        "images/<wnid><index>.jpg (optionally with train.csv, val.csv, test.csv) or "
        "mini-imagenet-cache-{train,val,test}.pkl, for the 100 wnids of "
        "dfml_bench/data/splits/miniimagenet"
    ),
    origin="the MiniImageNet release of Ravi & Larochelle (https://github.com/twitter/"
    "meta-learning-lstm) or ImageNet",
)
WNID_LENGTH = len("n01532829")
WNID = re.compile(r"n\d{8}")
CACHE_FILE = "mini-imagenet-cache-{split}.pkl"
CSV_HEADER = ["filename", "label"]


@register_dataset(
    NAME,
    default_image_size=84,
    description="MiniImageNet, Ravi & Larochelle 64/16/20 class split",
)
def load_miniimagenet(data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
    """Decode (first run) or read from the cache the Ravi split at `image_size` px."""
    return detect_layout(data_root).dataset(
        image_size,
        cache_dir,
        (IMAGENET_MEAN, IMAGENET_STD),
        "dfml_bench/data/splits/miniimagenet (Ravi & Larochelle, 2017)",
    )


def detect_layout(data_root: Path | None) -> Layout:
    """The one place that decides which layout `miniimagenet/` has (first match wins)."""
    root = SOURCE.locate(data_root)
    standard = {split: split_list(NAME, split) for split in SPLITS}
    if any((root / CACHE_FILE.format(split=split)).is_file() for split in SPLITS):
        return CacheLayout(root, standard)
    if any((root / f"{split}.csv").is_file() for split in SPLITS):
        return _csv_layout(root, standard)
    if any((root / split).is_dir() for split in SPLITS):
        return _split_folder_layout(root, standard)
    wnids = [wnid for split in SPLITS for wnid in standard[split]]
    for base, name in ((root / "images", "images/<wnid>/*.jpg"), (root, "<wnid>/*.jpg")):
        if any((base / wnid).is_dir() for wnid in wnids):
            return _class_folder_layout(base, f"class folders {name}", root, standard)
    if not (root / "images").is_dir():
        raise SOURCE.error(root, "no images/ folder and no <wnid>/ class folders")
    return _flat_layout(root, standard)


def _split_folder_layout(root: Path, standard: dict[str, list[str]]) -> FileLayout:
    """`{train,val,test}/<wnid>/*.jpg`: the folders' split must be the standard one."""
    problems = [
        SOURCE.error(root / split, "split folder not found (this layout needs train/, val/, test/)")
        for split in SPLITS
        if not (root / split).is_dir()
    ]
    found = {split: class_folders(root / split) for split in SPLITS}
    match = match_standard(
        SOURCE,
        standard,
        found,
        lambda split, wnid: root / split / wnid,
        missing_text="folder of standard {split} class {cls} not found",
    )
    name = "split folders {train,val,test}/<wnid>/*.jpg"
    return FileLayout(SOURCE, name, root, match, problems=problems)


def _class_folder_layout(
    base: Path, name: str, root: Path, standard: dict[str, list[str]]
) -> FileLayout:
    """`images/<wnid>/` or `<wnid>/`: only the standard wnids are listed (ImageNet has 1000)."""
    wanted = {wnid for split in SPLITS for wnid in standard[split]}
    found = {
        folder.name: list_images(folder) if folder.name in wanted else []
        for folder in subfolders(base)
        if WNID.fullmatch(folder.name)
    }
    match = match_standard(SOURCE, standard, {ALL: found}, lambda _, wnid: base / wnid)
    return FileLayout(SOURCE, name, root, match)


def _flat_layout(root: Path, standard: dict[str, list[str]]) -> FileLayout:
    """Ravi's flat `images/<wnid><index>.jpg`: the wnid is the name's first nine characters."""
    flat = root / "images"
    found: dict[str, list[Path]] = {}
    for name in sorted(os.listdir(flat)):
        wnid = name[:WNID_LENGTH]
        if is_image_name(name) and WNID.fullmatch(wnid):
            found.setdefault(wnid, []).append(flat / name)
    match = match_standard(
        SOURCE, standard, {ALL: found}, lambda _, wnid: flat, missing_text="no image named {cls}*"
    )
    return FileLayout(SOURCE, "flat images/<wnid><index>.jpg", root, match)


def _csv_layout(root: Path, standard: dict[str, list[str]]) -> FileLayout:
    """Ravi's `images/` with `{split}.csv` rows `filename,label`: the csv decides the label."""
    images = root / "images"
    present = set(os.listdir(images)) if images.is_dir() else set()
    problems: list[DatasetError] = []
    if not images.is_dir():
        problems.append(SOURCE.error(images, "folder not found (the csv files name images in it)"))
    found: dict[str, dict[str, list[Path]]] = {}
    csv_files = []
    for split in SPLITS:
        path = root / f"{split}.csv"
        found[split] = {}
        if not path.is_file():
            problems.append(
                SOURCE.error(path, "split file not found (this layout needs all three csv files)")
            )
            continue
        csv_files.append(path)
        rows, problem = _read_csv(path)
        if problem:
            problems.append(SOURCE.error(path, problem))
            continue
        absent = [name for name, _ in rows if name not in present]
        if absent and images.is_dir():
            problems.append(
                SOURCE.error(
                    images / absent[0],
                    f"{split}.csv lists {len(absent)} image(s) missing from images/, e.g. this",
                )
            )
        for name, wnid in rows:
            if name in present:
                found[split].setdefault(wnid, []).append(images / name)
    for classes in found.values():
        for files in classes.values():
            files.sort()
    match = match_standard(
        SOURCE,
        standard,
        found,
        lambda split, _: root / f"{split}.csv",
        missing_text="no row labelled {cls} (a standard {split} class)",
    )
    name = "csv split files {train,val,test}.csv with flat images/"
    return FileLayout(SOURCE, name, root, match, problems=problems, label_files=csv_files)


def _read_csv(path: Path) -> tuple[list[tuple[str, str]], str | None]:
    """(filename, label) rows of one split file, or the reason it cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            lines = [line for line in csv.reader(handle) if line]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        return [], f"cannot read the csv ({error})"
    if not lines or [cell.strip() for cell in lines[0]] != CSV_HEADER:
        header = ",".join(lines[0]) if lines else "nothing"
        return [], f"header is {header!r}, not 'filename,label'"
    bad = next((row for row in lines[1:] if len(row) != 2), None)
    if bad is not None:
        return [], f"row {','.join(bad)!r} does not have two fields"
    return [(name.strip(), label.strip()) for name, label in lines[1:]], None


class CacheLayout(Layout):
    """The pickled caches: `image_data` uint8 [n, H, W, 3] and `class_dict` {wnid: [indices]}.

    Read with the restricted unpickler, so a tampered cache cannot run code. The class check
    needs the whole pickle, so it runs when the splits are built (or verified); the pickles
    join the cache fingerprint, so a changed pickle is checked again.
    """

    def __init__(self, root: Path, standard: dict[str, list[str]]) -> None:
        super().__init__(SOURCE, "pickled caches mini-imagenet-cache-{train,val,test}.pkl", root)
        self.standard = standard
        self.paths = {split: root / CACHE_FILE.format(split=split) for split in SPLITS}

    def check(self) -> None:
        for path in self.paths.values():
            if not path.is_file():
                raise self._missing(path)

    def fingerprint(self) -> list[Path]:
        return list(self.paths.values())

    def survey(self) -> Survey:
        problems: list[DatasetError] = []
        class_dicts: dict[str, dict[str, np.ndarray]] = {}
        for split, path in self.paths.items():
            class_dicts[split] = {}
            if not path.is_file():
                problems.append(self._missing(path))
                continue
            try:
                class_dicts[split] = self._read(path)[1]
            except DatasetError as error:
                problems.append(error)
        match = self._match(class_dicts)
        return Survey(
            layout=self.name,
            counts={
                split: {wnid: len(indices) for wnid, indices in classes.items()}
                for split, classes in match.splits.items()
            },
            missing=match.missing,
            extra=match.extra,
            misplaced=match.misplaced,
            problems=problems + match.problems,
        )

    def build(self, image_size: int) -> dict[str, ClassSplit]:
        self.check()
        class_dicts: dict[str, dict[str, np.ndarray]] = {}
        arrays: dict[str, dict[str, np.ndarray]] = {}
        for split, path in self.paths.items():  # one pickle in memory at a time
            data, class_dicts[split] = self._read(path)
            wanted = set(self.standard[split])
            arrays[split] = {w: data[i] for w, i in class_dicts[split].items() if w in wanted}
            del data
        match = self._match(class_dicts)
        if match.problems:
            raise match.problems[0]
        return {
            split: split_from_arrays(
                NAME, {wnid: arrays[split][wnid] for wnid in match.splits[split]}, image_size
            )
            for split in SPLITS
        }

    def _match(self, class_dicts: dict[str, dict[str, np.ndarray]]) -> Match[np.ndarray]:
        return match_standard(
            SOURCE,
            self.standard,
            class_dicts,
            lambda split, _: self.paths[split],
            missing_text="class_dict has no {cls} (a standard {split} class)",
            empty_text="class_dict lists no image of {cls}",
        )

    def _missing(self, path: Path) -> DatasetError:
        return SOURCE.error(path, "file not found (this layout needs all three cache pickles)")

    def _read(self, path: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One cache's images as uint8 [n, H, W, 3] and each wnid's image indices."""
        content = read_dict(SOURCE, path)
        data = content.get("image_data")
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4):
            raise SOURCE.error(path, "no uint8 [n, H, W, 3] array `image_data` in the pickle")
        if data.shape[3] != 3:
            raise SOURCE.error(path, f"`image_data` is {data.shape}, not [n, H, W, 3]")
        class_dict = content.get("class_dict")
        if not isinstance(class_dict, dict):
            raise SOURCE.error(path, "no dict `class_dict` {wnid: [indices]} in the pickle")
        out = {}
        for key, value in class_dict.items():
            indices = np.asarray(value)
            if indices.ndim != 1 or (len(indices) and indices.dtype.kind not in "iu"):
                raise SOURCE.error(path, f"class_dict[{text(key)!r}] is not a list of indices")
            if len(indices) and (indices.min() < 0 or indices.max() >= len(data)):
                raise SOURCE.error(
                    path, f"class_dict[{text(key)!r}] indexes past the {len(data)} images"
                )
            out[str(text(key))] = indices.astype(np.int64)
        return data, out
