"""Shared machinery of the real-data loaders: locating a dataset, scanning and decoding images.

Every loader turns its source into uint8 [n, 3, S, S] RGB the same way (PIL, bicubic, which
antialiases when shrinking), so a dataset read from files and one read from arrays agree.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from dfml_bench.data.base import ClassSplit
from dfml_bench.errors import DatasetError
from dfml_bench.paths import DATA_ROOT_ENV

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
DECODE_VERSION = 2  # part of every cache key: bump when decoding or resizing changes
# 16/32-bit greyscale (16-bit PNGs): PIL's convert("RGB") clips these at 255, i.e. to white
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
# Errors PIL raises for a corrupt, truncated or unsupported file (UnidentifiedImageError is an
# OSError; SyntaxError and EOFError come from some format plugins).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_CHUNK = 256  # images per thread-pool task: amortises scheduling over tiny images
T = TypeVar("T")


@dataclass(frozen=True)
class DataSource:
    """Where a dataset lives under the data root and how to get it; builds one-line errors."""

    dataset: str
    folder: str  # fixed subfolder of the data root
    layout: str  # what is expected inside `folder`
    origin: str  # where a user downloads it

    def locate(self, data_root: Path | None) -> Path:
        """The dataset folder under `data_root`; a DatasetError saying how to fix it otherwise."""
        if data_root is None:
            raise DatasetError(
                f"{self.dataset}: no data root set; set {DATA_ROOT_ENV} or data_root in the "
                f"config to a folder holding {self.folder}/ ({self.layout}); {self._how_to_get}"
            )
        folder = Path(data_root) / self.folder
        if not folder.is_dir():
            raise self.error(folder, "folder not found")
        return folder

    def error(self, path: Path, problem: str) -> DatasetError:
        """A malformed-source error naming the offending path and the expected layout."""
        problem = " ".join(problem.split())  # keep the message on one line
        return DatasetError(
            f"{self.dataset}: {problem}: {path}; expected {self.folder}/ holding {self.layout} "
            f"in the folder named by {DATA_ROOT_ENV} or data_root in the config; "
            f"{self._how_to_get}"
        )

    def disagreement(self, path: Path, problem: str) -> DatasetError:
        """A dataset present but in disagreement (e.g. with the standard split): `problem` says
        the fix, so no layout or download hint follows."""
        return DatasetError(f"{self.dataset}: {' '.join(problem.split())}: {path}")

    @property
    def _how_to_get(self) -> str:
        return f"download it from {self.origin} yourself (dfml-bench never downloads)"


def split_list(dataset: str, split: str) -> list[str]:
    """Non-empty lines of the committed class list `splits/<dataset>/<split>.txt`."""
    text = resources.files("dfml_bench.data").joinpath("splits", dataset, f"{split}.txt")
    return [line.strip() for line in text.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_image_name(name: str) -> bool:
    """Image suffix, and not a hidden file (macOS `._x.jpg` resource forks are not images)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def subfolders(folder: Path) -> list[Path]:
    """Visible subfolders sorted by name: class folders, in a stable order."""
    return sorted(Path(e.path) for e in os.scandir(folder) if e.is_dir() and e.name[0] != ".")


def image_files(source: DataSource, folder: Path) -> list[Path]:
    """Image files of one class folder, sorted by name so labels and cache keys are stable."""
    if not folder.is_dir():
        raise source.error(folder, "class folder not found")
    files = list_images(folder)
    if not files:
        raise source.error(folder, "no image files in class folder")
    return files


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name; empty (not an error) if there are none."""
    # Sort names as strings and build Paths last: pathlib is slow over 50,000 files.
    names = sorted(e.name for e in os.scandir(folder) if is_image_name(e.name) and e.is_file())
    return [folder / name for name in names]


def cache_key(dataset: str, image_size: int, root: Path, files: Iterable[Path]) -> str:
    """Cache folder name; the fingerprint (names, sizes, mtimes) changes whenever a file does."""
    digest = hashlib.sha256(f"decode-v{DECODE_VERSION}\n".encode())
    prefix = len(os.fspath(root)) + 1  # every file lies under root: cheaper than relative_to
    for path in files:
        name = os.fspath(path)
        stat = os.stat(name)
        digest.update(f"{name[prefix:]}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return f"{dataset}-{image_size}px-{digest.hexdigest()[:16]}"


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 [3, size, size] RGB; raises one of `_DECODE_ERRORS` if broken."""
    with Image.open(path) as image:
        # JPEG only: decode at 1/2..1/8 scale in the DCT, still >= 2x the target, so large
        # photos decode several times faster and the bicubic resize still does the shrinking.
        image.draft(None, (2 * size, 2 * size))
        return _to_chw(image, size)


def decode_splits(
    dataset: str, splits: Mapping[str, Mapping[str, Sequence[Path]]], image_size: int
) -> dict[str, ClassSplit]:
    """Decode the files of each split's classes in a thread pool (PIL releases the GIL).

    Undecodable files are skipped with one warning for the whole dataset; a class left without
    images is a DatasetError.
    """
    out: dict[str, ClassSplit] = {}
    skipped: list[Path] = []
    for split, classes in splits.items():
        paths = [path for files in classes.values() for path in files]
        images, decoded = _decode_all(paths, image_size)
        skipped += [path for path, ok in zip(paths, decoded, strict=True) if not ok]
        labels = np.repeat(np.arange(len(classes)), [len(files) for files in classes.values()])
        if not decoded.all():
            images, labels = images[decoded], labels[decoded]
        empty = _first_empty_class(labels, len(classes))
        if empty is not None:
            name, files = list(classes.items())[empty]
            raise DatasetError(
                f"{dataset}: none of the {len(files)} image(s) of class {name!r} could be "
                f"decoded, e.g. {files[0]}"
            )
        out[split] = _class_split(images, labels, classes)
    if skipped:
        warnings.warn(
            f"{dataset}: skipped {len(skipped)} undecodable image(s), e.g. {skipped[0]}",
            stacklevel=2,
        )
    return out


def undecodable(paths: Sequence[Path]) -> list[Path]:
    """The files `decode_splits` would skip, found by decoding each at a tiny size (no cache)."""
    _, decoded = _decode_all(paths, 8)
    return [path for path, ok in zip(paths, decoded, strict=True) if not ok]


def _decode_all(paths: Sequence[Path], size: int) -> tuple[np.ndarray, np.ndarray]:
    """All `paths` as one uint8 [n, 3, size, size] array, and a bool mask of those that decoded."""
    images = np.empty((len(paths), 3, size, size), np.uint8)

    def fill(index: int) -> bool:
        try:
            images[index] = decode_image(paths[index], size)
        except _DECODE_ERRORS:
            return False
        return True

    return images, np.array(_parallel_map(fill, len(paths)), dtype=bool)


def split_from_arrays(
    dataset: str, classes: Mapping[str, np.ndarray], image_size: int
) -> ClassSplit:
    """Per-class uint8 arrays (grey [n, H, W] or RGB [n, H, W, 3]) -> one resized split."""
    labels = np.repeat(np.arange(len(classes)), [len(images) for images in classes.values()])
    empty = _first_empty_class(labels, len(classes))
    if empty is not None:
        raise DatasetError(f"{dataset}: class {list(classes)[empty]!r} has no images")
    images = resize_array(np.concatenate(list(classes.values())), image_size)
    return _class_split(images, labels, classes)


def resize_array(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 grey [n, H, W] or RGB [n, H, W, 3] -> uint8 [n, 3, size, size] RGB."""
    out = np.empty((len(images), 3, size, size), np.uint8)
    if images.shape[1:3] == (size, size):
        out[:] = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
        return out

    def fill(index: int) -> None:
        out[index] = _to_chw(Image.fromarray(images[index]), size)

    _parallel_map(fill, len(images))
    return out


def _to_chw(image: Image.Image, size: int) -> np.ndarray:
    """Any PIL mode -> uint8 [3, size, size]; grey is resized once, then copied to 3 channels."""
    if image.mode in _WIDE_GREY_MODES:  # 0..65535 -> 0..255, as the 8-bit version of the file
        wide = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(np.rint(wide.clip(0, 255)).astype(np.uint8))
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")  # palette, RGBA (alpha dropped), CMYK, 1-bit, ...
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        return np.broadcast_to(pixels, (3, size, size))
    return pixels.transpose(2, 0, 1)


def _first_empty_class(labels: np.ndarray, num_classes: int) -> int | None:
    empty = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0)
    return int(empty[0]) if len(empty) else None


def _class_split(
    images: np.ndarray, labels: np.ndarray, classes: Mapping[str, object]
) -> ClassSplit:
    return ClassSplit(torch.from_numpy(images), torch.from_numpy(labels).long(), tuple(classes))


def _parallel_map(fn: Callable[[int], T], count: int) -> list[T]:
    """`[fn(i) for i in range(count)]` on a thread pool, in chunks of `_CHUNK` indices."""

    def run(start: int) -> list[T]:
        return [fn(index) for index in range(start, min(start + _CHUNK, count))]

    workers = min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        return [result for chunk in pool.map(run, range(0, count, _CHUNK)) for result in chunk]
