"""CIFAR-FS (Bertinetto et al., 2019): CIFAR-100 split by class 64/16/20.

Reads the official `cifar-100-python` pickles without trusting them: the unpickler resolves
only the few numpy globals an array needs, so a tampered file cannot run code. Each class
pools its train and test images (600 per class), as few-shot splits are by class.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from dfml_bench.data.base import SPLITS, ClassSplit, FewShotDataset
from dfml_bench.data.cache import cached_splits
from dfml_bench.data.images import DataSource, cache_key, split_from_arrays, split_list
from dfml_bench.data.registry import register_dataset

NAME = "cifar-fs"
SOURCE = DataSource(
    dataset=NAME,
    folder="cifar-100-python",
    layout="the official CIFAR-100 python pickles train, test and meta",
    origin="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (extract it)",
)
CIFAR_FS_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_FS_STD = (0.2675, 0.2565, 0.2761)
FILES = ("train", "test", "meta")

# numpy's array reconstructor, whatever module path (numpy.core / numpy._core) a pickle names.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes in protocol 2
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}") from None


@register_dataset(
    NAME,
    default_image_size=32,
    description="CIFAR-FS: CIFAR-100 classes split 64/16/20 (Bertinetto et al., 2019)",
)
def load_cifar_fs(data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
    """Build (first run) or read from the cache the CIFAR-FS splits at `image_size` px."""
    root = SOURCE.locate(data_root)
    paths = [root / name for name in FILES]
    for path in paths:
        if not path.is_file():
            raise SOURCE.error(path, "file not found")
    splits = cached_splits(
        cache_dir, cache_key(NAME, image_size, root, paths), lambda: _build(root, image_size)
    )
    return FewShotDataset(
        name=NAME,
        image_size=image_size,
        splits=splits,
        mean=CIFAR_FS_MEAN,
        std=CIFAR_FS_STD,
        notes={"split": "dfml_bench/data/splits/cifar-fs (Bertinetto et al., 2019)"},
    )


def _build(root: Path, image_size: int) -> dict[str, ClassSplit]:
    meta = _read_pickle(root / "meta")
    names = _field(meta, root / "meta", "fine_label_names", list)
    images, labels = zip(*(_read_batch(root / name) for name in ("train", "test")), strict=True)
    pooled, fine = np.concatenate(images), np.concatenate(labels)
    splits = {}
    for split in SPLITS:
        classes = {}
        for line in split_list(NAME, split):
            name = line.rsplit(",", 1)[-1]  # lines are "superclass,class"
            if name not in names:
                raise SOURCE.error(root / "meta", f"fine_label_names lacks CIFAR-FS class {name!r}")
            classes[name] = pooled[fine == names.index(name)]
        splits[split] = split_from_arrays(NAME, classes, image_size)
    return splits


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle's images as uint8 [n, 32, 32, 3] RGB and its fine labels as int64 [n]."""
    content = _read_pickle(path)
    data = _field(content, path, "data", np.ndarray)
    fine = np.asarray(_field(content, path, "fine_labels", list), dtype=np.int64)
    if data.dtype != np.uint8 or data.shape != (len(fine), 3 * 32 * 32):
        raise SOURCE.error(path, f"`data` is {data.dtype} {data.shape}, not uint8 [n, 3072]")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), fine


def _read_pickle(path: Path) -> dict[str, Any]:
    """An official pickle as a dict with str keys (Python 2 wrote them as byte strings)."""
    try:
        with open(path, "rb") as handle:
            content = _ArrayOnlyUnpickler(handle, encoding="latin1").load()
    except Exception as error:  # a corrupt or hostile pickle can raise almost anything
        raise SOURCE.error(path, f"cannot read the pickle safely ({error})") from error
    if not isinstance(content, dict):
        raise SOURCE.error(path, f"pickle holds a {type(content).__name__}, not a dict")
    return {_text(key): value for key, value in content.items()}


def _field(content: dict[str, Any], path: Path, key: str, kind: type) -> Any:
    """`content[key]`, checked to be a `kind`; list items that are bytes become str."""
    value = content.get(key)
    if not isinstance(value, kind):
        raise SOURCE.error(path, f"no {kind.__name__} `{key}` in the pickle")
    return [_text(item) for item in value] if kind is list else value


def _text(value: Any) -> Any:
    return value.decode("latin1") if isinstance(value, bytes) else value
