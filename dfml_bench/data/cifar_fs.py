"""CIFAR-FS (Bertinetto et al., 2019): CIFAR-100 split by class 64/16/20.

Two layouts are accepted (`detect_layout`): the official `cifar-100-python` pickles, read
without trusting them (see `safe_pickle`), each class pooling its train and test images (600
per class, as few-shot splits are by class); and the CIFAR-FS release `cifar100/`, PNG folders
`data/<class>/` with its own split files `splits/bertinetto/{train,val,test}.txt`, which must
agree with the committed split so results stay comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dfml_bench.data.base import SPLITS, ClassSplit, FewShotDataset
from dfml_bench.data.images import DataSource, list_images, split_from_arrays, split_list
from dfml_bench.data.layouts import ALL, FileLayout, Layout, Match, Survey, match_standard
from dfml_bench.data.registry import register_dataset
from dfml_bench.data.safe_pickle import read_dict, text
from dfml_bench.errors import DatasetError

NAME = "cifar-fs"
SOURCE = DataSource(
    dataset=NAME,
    folder="cifar-100-python",
    layout="the official CIFAR-100 python pickles train, test and meta (or cifar100/ holding "
    "the CIFAR-FS release: data/<class>/*.png and splits/bertinetto/{train,val,test}.txt)",
    origin="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract it)",
)
RELEASE = DataSource(
    dataset=NAME,
    folder="cifar100",
    layout="data/<class>/*.png and splits/bertinetto/{train,val,test}.txt, one class a line "
    "(the CIFAR-FS release)",
    origin="the CIFAR-FS release of Bertinetto et al. (https://github.com/bertinetto/r2d2)",
)
CIFAR_FS_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_FS_STD = (0.2675, 0.2565, 0.2761)
FILES = ("train", "test", "meta")


@register_dataset(
    NAME,
    default_image_size=32,
    description="CIFAR-FS: CIFAR-100 classes split 64/16/20 (Bertinetto et al., 2019)",
)
def load_cifar_fs(data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
    """Build (first run) or read from the cache the CIFAR-FS splits at `image_size` px."""
    return detect_layout(data_root).dataset(
        image_size,
        cache_dir,
        (CIFAR_FS_MEAN, CIFAR_FS_STD),
        "dfml_bench/data/splits/cifar-fs (Bertinetto et al., 2019)",
    )


def standard_classes() -> dict[str, list[str]]:
    """The committed split's class names per split (its lines are `superclass,class`)."""
    return {
        split: [line.rsplit(",", 1)[-1] for line in split_list(NAME, split)] for split in SPLITS
    }


def detect_layout(data_root: Path | None) -> Layout:
    """The one place that decides the layout: the pickles if present, else the release."""
    if data_root is not None:
        pickles, release = Path(data_root) / SOURCE.folder, Path(data_root) / RELEASE.folder
        if not pickles.is_dir() and release.is_dir():
            return _release_layout(release)
    return PickleLayout(SOURCE.locate(data_root))


def _release_layout(root: Path) -> FileLayout:
    """`cifar100/data/<class>/*.png`, split by `splits/bertinetto/<split>.txt`."""
    problems: list[DatasetError] = []
    found: dict[str, dict[str, list[Path]]] = {}
    split_files = []
    for split in SPLITS:
        path = root / "splits" / "bertinetto" / f"{split}.txt"
        found[split] = {}
        if not path.is_file():
            problems.append(
                RELEASE.error(path, "split file not found (this layout needs all three)")
            )
            continue
        split_files.append(path)
        for line in path.read_text(encoding="utf-8").splitlines():
            name = line.strip().rsplit(",", 1)[-1]  # tolerate `superclass,class` lines
            if name:
                folder = root / "data" / name
                found[split][name] = list_images(folder) if folder.is_dir() else []
    match = match_standard(
        RELEASE,
        standard_classes(),
        found,
        lambda split, _: root / "splits" / "bertinetto" / f"{split}.txt",
        missing_text="standard {split} class {cls} is not listed in this split file",
        empty_text="class folder missing or without images",
        empty_place=lambda _, name: root / "data" / name,
    )
    name = "CIFAR-FS release data/<class>/*.png with splits/bertinetto/{train,val,test}.txt"
    return FileLayout(RELEASE, name, root, match, problems=problems, label_files=split_files)


class PickleLayout(Layout):
    """The official pickles: every class pools its 500 train and 100 test images."""

    def __init__(self, root: Path) -> None:
        super().__init__(SOURCE, "official cifar-100-python pickles train, test, meta", root)
        self.paths = [root / name for name in FILES]

    def check(self) -> None:
        for path in self.paths:
            if not path.is_file():
                raise SOURCE.error(path, "file not found")

    def fingerprint(self) -> list[Path]:
        return self.paths

    def survey(self) -> Survey:
        try:
            self.check()
            _, match = self._read()
        except DatasetError as error:
            return Survey(self.name, {split: {} for split in SPLITS}, problems=[error])
        counts = {
            split: {name: len(rows) for name, rows in classes.items()}
            for split, classes in match.splits.items()
        }
        return Survey(self.name, counts, match.missing, match.extra, problems=match.problems)

    def build(self, image_size: int) -> dict[str, ClassSplit]:
        self.check()
        pooled, match = self._read()
        if match.problems:
            raise match.problems[0]
        return {
            split: split_from_arrays(
                NAME, {name: pooled[rows] for name, rows in classes.items()}, image_size
            )
            for split, classes in match.splits.items()
        }

    def _read(self) -> tuple[np.ndarray, Match[np.ndarray]]:
        """All images as uint8 [n, 32, 32, 3] and the rows of each standard class."""
        root = self.root
        names = _field(_read_pickle(root / "meta"), root / "meta", "fine_label_names", list)
        images, labels = zip(*(_read_batch(root / name) for name in ("train", "test")), strict=True)
        pooled, fine = np.concatenate(images), np.concatenate(labels)
        rows = {name: np.flatnonzero(fine == index) for index, name in enumerate(names)}
        match = match_standard(
            SOURCE,
            standard_classes(),
            {ALL: rows},
            lambda *_: root / "meta",
            missing_text="fine_label_names lacks CIFAR-FS class {cls!r}",
            empty_text="no train or test image has the fine label of {cls!r}",
        )
        return pooled, match


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle's images as uint8 [n, 32, 32, 3] RGB and its fine labels as int64 [n]."""
    content = _read_pickle(path)
    data = _field(content, path, "data", np.ndarray)
    fine = np.asarray(_field(content, path, "fine_labels", list), dtype=np.int64)
    if data.dtype != np.uint8 or data.shape != (len(fine), 3 * 32 * 32):
        raise SOURCE.error(path, f"`data` is {data.dtype} {data.shape}, not uint8 [n, 3072]")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), fine


def _read_pickle(path: Path) -> dict[str, Any]:
    """An official pickle as a dict with str keys, through the restricted unpickler."""
    return read_dict(SOURCE, path)


def _field(content: dict[str, Any], path: Path, key: str, kind: type) -> Any:
    """`content[key]`, checked to be a `kind`; list items that are bytes become str."""
    value = content.get(key)
    if not isinstance(value, kind):
        raise SOURCE.error(path, f"no {kind.__name__} `{key}` in the pickle")
    return [text(item) for item in value] if kind is list else value
