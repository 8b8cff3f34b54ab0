"""Dataset layouts: which on-disk form a dataset folder has, what it holds and how it loads.

Each real-data loader detects its layout in one function and loads through the `Layout` it
gets back; `dfml-bench datasets verify` prints the same layout's `Survey`. A folder the loader
accepts is therefore one that verify calls ready, and one it rejects fails with the same single
line, before anything is cached. Matching what a layout holds against the standard class split
is shared here, so every layout of every dataset names a misplaced class the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from dfml_bench.data.base import ClassSplit, FewShotDataset
from dfml_bench.data.cache import cached_splits
from dfml_bench.data.images import DataSource, cache_key, decode_splits, list_images, subfolders
from dfml_bench.errors import DatasetError

ALL = ""  # the only key of `found` for a layout whose classes carry no split of their own
T = TypeVar("T", bound=Sized)  # a class's images: a list of files or an index array


@dataclass(frozen=True)
class Survey:
    """What a dataset folder holds, checked against the standard split, before any decoding."""

    layout: str
    counts: dict[str, dict[str, int]]  # split -> class -> images found, standard class order
    missing: dict[str, list[str]] = field(default_factory=dict)  # standard classes not found
    extra: list[str] = field(default_factory=list)  # classes found in no standard split
    misplaced: list[str] = field(default_factory=list)  # "class in X, standard Y"
    problems: list[DatasetError] = field(default_factory=list)  # the loader raises the first
    files: list[Path] = field(default_factory=list)  # image files to test-decode, if any

    def raise_first(self) -> None:
        if self.problems:
            raise self.problems[0]


@dataclass(frozen=True)
class Match(Generic[T]):
    """The standard classes a layout holds, per standard split, and how it disagrees."""

    splits: dict[str, dict[str, T]]  # split -> class -> its images, standard order
    missing: dict[str, list[str]]
    extra: list[str]
    misplaced: list[str]
    problems: list[DatasetError]


def match_standard(
    source: DataSource,
    standard: Mapping[str, Sequence[str]],
    found: Mapping[str, Mapping[str, T]],
    place: Callable[[str, str], Path],
    *,
    missing_text: str = "class folder not found",
    empty_text: str = "no image files in class folder",
    empty_place: Callable[[str, str], Path] | None = None,
) -> Match[T]:
    """Assign what a layout `found` (layout split -> class -> images) to the standard split.

    A layout with its own split (keys among train/val/test) must agree with the standard one: a
    class in the wrong split, or in none of the standard splits, is a problem. A layout without
    one (the single key `ALL`) only has to hold every standard class; other classes are extra
    and ignored, so e.g. all of ImageNet can serve as MiniImageNet. `place(split, cls)` is the
    path that one-line problems name (`empty_place`, if given, for a class with no images);
    the texts may use `{cls}` and `{split}` (the standard split).
    """
    home = {cls: split for split, classes in standard.items() for cls in classes}
    own_split = ALL not in found
    splits: dict[str, dict[str, T]] = {split: {} for split in standard}
    missing: dict[str, list[str]] = {split: [] for split in standard}
    extra: list[str] = []
    misplaced: list[str] = []
    disagree: list[DatasetError] = []
    absent: list[DatasetError] = []
    for where, classes in found.items():
        for cls in classes:
            if cls not in home:
                extra.append(cls)
                if own_split:
                    disagree.append(
                        source.disagreement(
                            place(where, cls),
                            f"class {cls} is in no standard split (dfml_bench/data/splits/"
                            f"{source.dataset}); remove it",
                        )
                    )
            elif own_split and where != home[cls]:
                misplaced.append(f"{cls} in {where}, standard {home[cls]}")
                disagree.append(
                    source.disagreement(
                        place(where, cls),
                        f"class {cls} is under {where} here but the standard split puts it in "
                        f"{home[cls]}; move it to {home[cls]}",
                    )
                )
    for split, classes in standard.items():
        where = split if own_split else ALL
        for cls in classes:
            images = found.get(where, {}).get(cls)
            if images is None and any(cls in found[other] for other in found):
                continue  # misplaced, reported above
            if images is None or len(images) == 0:
                missing[split].append(cls)
                text, at = (missing_text, place) if images is None else (empty_text, empty_place)
                path = (at or place)(where, cls)
                absent.append(source.error(path, text.format(cls=cls, split=split)))
            else:
                splits[split][cls] = images
    return Match(splits, missing, extra, misplaced, disagree + absent)


def class_folders(base: Path) -> dict[str, list[Path]]:
    """Image files of each visible subfolder of `base`, by folder name; {} if `base` is absent."""
    if not base.is_dir():
        return {}
    return {folder.name: list_images(folder) for folder in subfolders(base)}


class Layout(ABC):
    """One accepted on-disk form of a dataset: cheap checks, cache key, survey and decoding."""

    def __init__(self, source: DataSource, name: str, root: Path) -> None:
        self.source = source
        self.name = name  # what verify prints, e.g. "split folders {train,val,test}/<wnid>/"
        self.root = root

    @abstractmethod
    def check(self) -> None:
        """Raise the first problem visible without reading image content."""

    @abstractmethod
    def fingerprint(self) -> list[Path]:
        """Every file the splits are built from: any change to one must rebuild the cache."""

    @abstractmethod
    def survey(self) -> Survey:
        """Classes and images per split and every problem (may read array files in full)."""

    @abstractmethod
    def build(self, image_size: int) -> dict[str, ClassSplit]:
        """Decode the standard splits; raises the first problem before decoding anything."""

    def load(self, image_size: int, cache_dir: Path) -> dict[str, ClassSplit]:
        """The splits from the cache, or built and cached; a problem caches nothing."""
        self.check()
        key = cache_key(self.source.dataset, image_size, self.root, self.fingerprint())
        return cached_splits(cache_dir, key, lambda: self.build(image_size))

    def dataset(
        self,
        image_size: int,
        cache_dir: Path,
        pixels: tuple[tuple[float, float, float], tuple[float, float, float]],
        split_note: str,
    ) -> FewShotDataset:
        """The loaded dataset, its notes saying which split and which layout it came from."""
        mean, std = pixels
        return FewShotDataset(
            name=self.source.dataset,
            image_size=image_size,
            splits=self.load(image_size, cache_dir),
            mean=mean,
            std=std,
            notes={"split": split_note, "layout": self.name},
        )


class FileLayout(Layout):
    """A layout of image files, one list per class: folders, flat files named by class, csv."""

    def __init__(
        self,
        source: DataSource,
        name: str,
        root: Path,
        match: Match[list[Path]],
        *,
        problems: Sequence[DatasetError] = (),
        label_files: Sequence[Path] = (),
    ) -> None:
        """`problems` are layout-level (a missing split file): they come before class ones.

        `label_files` (csv lists, metadata) decide labels, so they join the cache fingerprint.
        """
        super().__init__(source, name, root)
        self.match = match
        self.problems = [*problems, *match.problems]
        self.label_files = list(label_files)

    def check(self) -> None:
        if self.problems:
            raise self.problems[0]

    def fingerprint(self) -> list[Path]:
        return self.label_files + self.files()

    def files(self) -> list[Path]:
        return [
            path
            for classes in self.match.splits.values()
            for files in classes.values()
            for path in files
        ]

    def survey(self) -> Survey:
        counts = {
            split: {cls: len(files) for cls, files in classes.items()}
            for split, classes in self.match.splits.items()
        }
        return Survey(
            layout=self.name,
            counts=counts,
            missing=self.match.missing,
            extra=self.match.extra,
            misplaced=self.match.misplaced,
            problems=self.problems,
            files=self.files(),
        )

    def build(self, image_size: int) -> dict[str, ClassSplit]:
        self.check()
        classes = {
            split: {cls: list(files) for cls, files in part.items()}
            for split, part in self.match.splits.items()
        }
        return decode_splits(self.source.dataset, classes, image_size)
