"""Every accepted layout of MiniImageNet, CIFAR-FS and CUB, on tiny generated fixtures.

Each image is one flat colour that encodes its class, so a test can check that every image
comes back under the right class name in the right split. Class lists are the committed
standard splits, so the 64/16/20 (CUB: 100/50/50) counts are the real ones.
"""

from __future__ import annotations

import csv
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfml_bench import cli
from dfml_bench.data import cifar_fs, cub, miniimagenet
from dfml_bench.data.base import SPLITS, FewShotDataset
from dfml_bench.data.images import split_list
from dfml_bench.errors import DfmlError

MINI = {split: split_list("miniimagenet", split) for split in SPLITS}
MINI_ALL = [wnid for split in SPLITS for wnid in MINI[split]]
CIFAR = {split: [line.split(",")[1] for line in split_list("cifar-fs", split)] for split in SPLITS}
CIFAR_FINE = sorted(name for split in SPLITS for name in CIFAR[split])  # CIFAR-100 label order
CUB_NAMES = [f"{index + 1:03d}.Bird_{index}" for index in range(200)]
CUB = {"train": CUB_NAMES[0::2], "val": CUB_NAMES[1::4], "test": CUB_NAMES[3::4]}
STEP = 51  # colour levels 0, 51, ..., 255: 216 distinct colours, far apart for JPEG


def _colour(index: int) -> tuple[int, int, int]:
    return (index // 36 % 6 * STEP, index // 6 % 6 * STEP, index % 6 * STEP)


def _index_of(image: torch.Tensor) -> int:
    """The class index a decoded uint8 [3, H, W] image's colour encodes."""
    r, g, b = (round(float(channel.float().mean()) / STEP) for channel in image)
    return r * 36 + g * 6 + b


def _save(path: Path, index: int, size: int = 8) -> None:
    """A flat image of class `index`'s colour; the suffix picks the format (JPEG, PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), _colour(index)).save(path, quality=95)


def _check_labels(
    dataset: FewShotDataset, expected: dict[str, list[str]], ordered: list[str]
) -> None:
    """Split class lists are the standard ones and each image's colour names its class."""
    for split in SPLITS:
        part = dataset.split(split)
        assert part.class_names == tuple(expected[split]), split
        assert torch.bincount(part.labels, minlength=part.num_classes).min() > 0, split
        for image, label in zip(part.images, part.labels.tolist(), strict=True):
            assert ordered[_index_of(image)] == part.class_names[label], (split, label)


def _assert_one_line(error: pytest.ExceptionInfo[DfmlError], path: Path, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message


def _assert_nothing_cached(cache: Path) -> None:
    leftovers = list(cache.rglob("*")) if cache.exists() else []
    assert not leftovers, leftovers  # no .npy, no index.json, no .tmp


# MiniImageNet ---------------------------------------------------------------------------


def _mini_folders(root: Path, pattern: str) -> None:
    """One or two images per class, at `pattern.format(split=..., wnid=..., k=...)`."""
    for split in SPLITS:
        for wnid in MINI[split]:
            for k in range(2 if split == "val" else 1):
                _save(root / pattern.format(split=split, wnid=wnid, k=k), MINI_ALL.index(wnid))


def _mini_csv(root: Path) -> None:
    """Ravi's release: flat images/ and `filename,label` rows (written in shuffled order)."""
    rng = np.random.default_rng(0)
    for split in SPLITS:
        rows = []
        for wnid in MINI[split]:
            for k in range(2):
                name = f"{wnid}{k:08d}.jpg"
                _save(root / "images" / name, MINI_ALL.index(wnid))
                rows.append((name, wnid))
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            writer.writerows(rows[i] for i in rng.permutation(len(rows)))


def _mini_pickles(root: Path, class_dicts: dict[str, dict[str, list[int]]] | None = None) -> None:
    """The cache pickles: 84x84 arrays stored in reverse class order, so indices matter."""
    root.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        wnids = MINI[split]
        data = np.empty((2 * len(wnids), 84, 84, 3), np.uint8)
        class_dict = {}
        for position, wnid in enumerate(reversed(wnids)):
            data[2 * position : 2 * position + 2] = _colour(MINI_ALL.index(wnid))
            class_dict[wnid] = [2 * position + 1, 2 * position]
        if class_dicts is not None:
            class_dict = class_dicts[split]
        content = {"image_data": data, "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(content, protocol=4))


MINI_LAYOUTS: dict[str, Callable[[Path], None]] = {
    "class folders images/<wnid>/*.jpg": lambda r: _mini_folders(r, "images/{wnid}/{k}.jpg"),
    "class folders <wnid>/*.jpg": lambda r: _mini_folders(r, "{wnid}/{k}.jpg"),
    "flat images/<wnid><index>.jpg": lambda r: _mini_folders(r, "images/{wnid}{k:08d}.jpg"),
    "split folders {train,val,test}/<wnid>/*.jpg": lambda r: _mini_folders(
        r, "{split}/{wnid}/{k}.jpg"
    ),
    "csv split files {train,val,test}.csv with flat images/": _mini_csv,
    "pickled caches mini-imagenet-cache-{train,val,test}.pkl": _mini_pickles,
}


@pytest.mark.parametrize("layout", list(MINI_LAYOUTS))
def test_miniimagenet_layout_labels(tmp_path: Path, layout: str) -> None:
    MINI_LAYOUTS[layout](tmp_path / "data" / "miniimagenet")
    dataset = miniimagenet.load_miniimagenet(tmp_path / "data", 8, tmp_path / "cache")
    assert dataset.notes["layout"] == layout
    _check_labels(dataset, MINI, MINI_ALL)
    assert {split: dataset.split(split).num_classes for split in SPLITS} == {
        "train": 64,
        "val": 16,
        "test": 20,
    }
    assert list((tmp_path / "cache").glob("*/index.json")), "the splits were cached"


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)


def _remove_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    folder.rmdir()


def _csv_row_to(root: Path, wnid: str, source: str, target: str) -> None:
    """Move `wnid`'s rows from `source`.csv to `target`.csv."""
    read = {
        name: list(csv.reader((root / f"{name}.csv").read_text().splitlines()))
        for name in (source, target)
    }
    moved = [row for row in read[source] if row[1] == wnid]
    read[source] = [row for row in read[source] if row[1] != wnid]
    read[target] += moved
    for name, rows in read.items():
        with open(root / f"{name}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)


def _pickle_with_misplaced_wnid(root: Path) -> None:
    dicts = {split: {wnid: [0] for wnid in MINI[split]} for split in SPLITS}
    wnid = MINI["train"][0]
    del dicts["train"][wnid]
    dicts["test"][wnid] = [1]
    _mini_pickles(root, dicts)


TRAIN0, VAL0, TEST0 = MINI["train"][0], MINI["val"][0], MINI["test"][0]
# (layout, damage, path the message names relative to miniimagenet/, fragments)
ALMOST_MINI: dict[str, tuple[str, Callable[[Path], None], str, tuple[str, ...]]] = {
    "split folder missing": (
        "split folders {train,val,test}/<wnid>/*.jpg",
        lambda r: _remove_tree(r / "val"),
        "val",
        ("split folder not found",),
    ),
    "wnid in the wrong split": (
        "split folders {train,val,test}/<wnid>/*.jpg",
        lambda r: _move(r / "train" / TRAIN0, r / "val" / TRAIN0),
        f"val/{TRAIN0}",
        (f"class {TRAIN0} is under val here but the standard split puts it in train",),
    ),
    "wnid in no standard split": (
        "split folders {train,val,test}/<wnid>/*.jpg",
        lambda r: _save(r / "test" / "n99999999" / "0.jpg", 0),
        "test/n99999999",
        ("class n99999999 is in no standard split", "remove it"),
    ),
    "class folder missing": (
        "class folders images/<wnid>/*.jpg",
        lambda r: _remove_tree(r / "images" / TEST0),
        f"images/{TEST0}",
        ("class folder not found",),
    ),
    "csv split file missing": (
        "csv split files {train,val,test}.csv with flat images/",
        lambda r: (r / "test.csv").unlink(),
        "test.csv",
        ("split file not found",),
    ),
    "csv rows in the wrong split": (
        "csv split files {train,val,test}.csv with flat images/",
        lambda r: _csv_row_to(r, VAL0, "val", "train"),
        "train.csv",
        (f"class {VAL0} is under train here but the standard split puts it in val",),
    ),
    "csv lists a missing image": (
        "csv split files {train,val,test}.csv with flat images/",
        lambda r: (r / "images" / f"{TEST0}00000001.jpg").unlink(),
        f"images/{TEST0}00000001.jpg",
        ("test.csv lists 1 image(s) missing from images/",),
    ),
    "pickle missing": (
        "pickled caches mini-imagenet-cache-{train,val,test}.pkl",
        lambda r: (r / "mini-imagenet-cache-val.pkl").unlink(),
        "mini-imagenet-cache-val.pkl",
        ("file not found",),
    ),
    "pickle class_dict in the wrong split": (
        "pickled caches mini-imagenet-cache-{train,val,test}.pkl",
        _pickle_with_misplaced_wnid,
        "mini-imagenet-cache-test.pkl",
        (f"class {TRAIN0} is under test here but the standard split puts it in train",),
    ),
}


@pytest.mark.parametrize("case", list(ALMOST_MINI))
def test_almost_right_miniimagenet_is_one_line_and_caches_nothing(
    tmp_path: Path, case: str
) -> None:
    layout, damage, named, fragments = ALMOST_MINI[case]
    root = tmp_path / "data" / "miniimagenet"
    MINI_LAYOUTS[layout](root)
    damage(root)
    with pytest.raises(DfmlError) as error:
        miniimagenet.load_miniimagenet(tmp_path / "data", 8, tmp_path / "cache")
    _assert_one_line(error, root / named, "miniimagenet", *fragments)
    _assert_nothing_cached(tmp_path / "cache")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_hostile_miniimagenet_pickle_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "data" / "miniimagenet"
    _mini_pickles(root)
    marker = tmp_path / "pwned"
    hostile = root / "mini-imagenet-cache-test.pkl"
    hostile.write_bytes(pickle.dumps({"image_data": _Exploit(marker), "class_dict": {}}))
    with pytest.raises(DfmlError) as error:
        miniimagenet.load_miniimagenet(tmp_path / "data", 8, tmp_path / "cache")
    _assert_one_line(error, hostile, "refused to load global")
    assert not marker.exists()
    _assert_nothing_cached(tmp_path / "cache")


# CIFAR-FS -------------------------------------------------------------------------------


def _cifar_pickles(root: Path) -> None:
    """The official archive: one train and one test image per class, rows of R, G, B planes."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    labels = list(range(100))
    for part in ("train", "test"):
        rows = np.array([np.repeat(_colour(label), 1024) for label in labels], np.uint8)
        batch = {"fine_labels": labels, "coarse_labels": [0] * 100, "data": rows}
        (folder / part).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"fine_label_names": CIFAR_FINE, "coarse_label_names": ["x"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def _cifar_release(root: Path) -> None:
    """The CIFAR-FS release: data/<class>/*.png and splits/bertinetto/<split>.txt."""
    folder = root / "cifar100"
    for split in SPLITS:
        for name in CIFAR[split]:
            for k in range(2):
                _save(folder / "data" / name / f"{name}_s_{k:06d}.png", CIFAR_FINE.index(name), 32)
        split_file = folder / "splits" / "bertinetto" / f"{split}.txt"
        split_file.parent.mkdir(parents=True, exist_ok=True)
        split_file.write_text("".join(f"{name}\n" for name in sorted(CIFAR[split])))


@pytest.mark.parametrize("write", [_cifar_pickles, _cifar_release], ids=["pickles", "release"])
def test_cifar_fs_layout_labels(tmp_path: Path, write: Callable[[Path], None]) -> None:
    write(tmp_path / "data")
    dataset = cifar_fs.load_cifar_fs(tmp_path / "data", 32, tmp_path / "cache")
    _check_labels(dataset, CIFAR, CIFAR_FINE)
    assert torch.equal(torch.bincount(dataset.split("val").labels), torch.full((16,), 2))


def _damage_release_split_file(root: Path) -> None:
    """Move `apple`-like first val class into the train split file."""
    splits = root / "cifar100" / "splits" / "bertinetto"
    name = CIFAR["val"][0]
    val = (splits / "val.txt").read_text().replace(f"{name}\n", "")
    (splits / "val.txt").write_text(val)
    with open(splits / "train.txt", "a") as handle:
        handle.write(f"{name}\n")


ALMOST_CIFAR: dict[str, tuple[Callable[[Path], None], str, tuple[str, ...]]] = {
    "split file missing": (
        lambda r: (r / "cifar100" / "splits" / "bertinetto" / "test.txt").unlink(),
        "cifar100/splits/bertinetto/test.txt",
        ("split file not found",),
    ),
    "class folder missing": (
        lambda r: _remove_tree(r / "cifar100" / "data" / CIFAR["test"][3]),
        f"cifar100/data/{CIFAR['test'][3]}",
        ("class folder missing or without images",),
    ),
    "class in the wrong split file": (
        _damage_release_split_file,
        "cifar100/splits/bertinetto/train.txt",
        (f"class {CIFAR['val'][0]} is under train here but the standard split puts it in val",),
    ),
}


@pytest.mark.parametrize("case", list(ALMOST_CIFAR))
def test_almost_right_cifar_fs_release(tmp_path: Path, case: str) -> None:
    damage, named, fragments = ALMOST_CIFAR[case]
    _cifar_release(tmp_path / "data")
    damage(tmp_path / "data")
    with pytest.raises(DfmlError) as error:
        cifar_fs.load_cifar_fs(tmp_path / "data", 32, tmp_path / "cache")
    _assert_one_line(error, tmp_path / "data" / named, "cifar-fs", *fragments)
    _assert_nothing_cached(tmp_path / "cache")


# CUB ------------------------------------------------------------------------------------


def _cub(root: Path, metadata: bool) -> Path:
    """CUB_200_2011/images/<NNN.Name>/*.jpg, with the official metadata files if asked."""
    folder = root / "CUB_200_2011"
    listed = []
    for index, name in enumerate(CUB_NAMES):
        relative = f"{name}/{name}_{index:04d}.jpg"
        _save(folder / "images" / relative, index)
        listed.append(relative)
    if metadata:
        classes = "".join(f"{i + 1} {name}\n" for i, name in enumerate(CUB_NAMES))
        (folder / "classes.txt").write_text(classes)
        (folder / "images.txt").write_text("".join(f"{i + 1} {p}\n" for i, p in enumerate(listed)))
        # a stray file images.txt does not list (and of the wrong colour): must be ignored
        _save(folder / "images" / CUB_NAMES[0] / "stray.jpg", 199)
    return folder


@pytest.mark.parametrize("metadata", [False, True], ids=["folders", "metadata"])
def test_cub_layout_labels(tmp_path: Path, metadata: bool) -> None:
    _cub(tmp_path / "data", metadata)
    dataset = cub.load_cub(tmp_path / "data", 8, tmp_path / "cache")
    _check_labels(dataset, CUB, CUB_NAMES)  # with metadata, the unlisted stray is left out
    assert len(dataset.split("train").labels) == 100


def test_cub_without_metadata_reads_every_file_of_the_folders(tmp_path: Path) -> None:
    folder = _cub(tmp_path / "data", metadata=True)
    (folder / "images.txt").unlink()
    (folder / "classes.txt").unlink()
    dataset = cub.load_cub(tmp_path / "data", 8, tmp_path / "cache")
    assert len(dataset.split("train").labels) == 101  # the stray is now an image of class 0


ALMOST_CUB: dict[str, tuple[bool, Callable[[Path], None], str, tuple[str, ...]]] = {
    "metadata file missing": (
        True,
        lambda f: (f / "classes.txt").unlink(),
        "classes.txt",
        ("metadata file not found", "delete the other"),
    ),
    "class folder missing (metadata)": (
        True,
        lambda f: _remove_tree(f / "images" / CUB_NAMES[7]),
        "images.txt",
        ("image(s) missing from images/",),
    ),
    "class folder missing (folders)": (
        False,
        lambda f: _remove_tree(f / "images" / CUB_NAMES[7]),
        "images",
        ("found 199 class folders, not 200",),
    ),
}


@pytest.mark.parametrize("case", list(ALMOST_CUB))
def test_almost_right_cub(tmp_path: Path, case: str) -> None:
    metadata, damage, named, fragments = ALMOST_CUB[case]
    folder = _cub(tmp_path / "data", metadata)
    damage(folder)
    with pytest.raises(DfmlError) as error:
        cub.load_cub(tmp_path / "data", 8, tmp_path / "cache")
    _assert_one_line(error, folder / named, "cub", *fragments)
    _assert_nothing_cached(tmp_path / "cache")


# dfml-bench datasets verify -------------------------------------------------------------


def _verify(
    name: str, data: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[str], list[str]]:
    code = cli.main(["datasets", "verify", name, "--data-root", str(data)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), [line for line in err.splitlines() if line.strip()]


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache verify would write to if it wrote one."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DFML_CACHE_DIR", str(cache))
    return cache


def test_verify_ready_miniimagenet(
    tmp_path: Path, cache_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    MINI_LAYOUTS["split folders {train,val,test}/<wnid>/*.jpg"](tmp_path / "data" / "miniimagenet")
    code, out, err = _verify("miniimagenet", tmp_path / "data", capsys)
    assert code == 0 and not err
    assert "layout: split folders {train,val,test}/<wnid>/*.jpg" in out
    assert "train: 64 classes, 64 images" in out and "val: 16 classes, 32 images" in out
    assert "missing classes: none" in out and "undecodable files: none" in out
    assert out[-1] == "miniimagenet: ready (64/16/20 classes, 116 images)"
    _assert_nothing_cached(cache_env)


def test_verify_reports_every_problem_and_fails(
    tmp_path: Path, cache_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "data" / "miniimagenet"
    MINI_LAYOUTS["split folders {train,val,test}/<wnid>/*.jpg"](root)
    _remove_tree(root / "test" / TEST0)
    _move(root / "train" / TRAIN0, root / "val" / TRAIN0)
    _save(root / "train" / "n99999999" / "0.jpg", 0)
    (root / "val" / VAL0 / "2.jpg").write_bytes(b"not a jpeg")
    code, out, err = _verify("miniimagenet", tmp_path / "data", capsys)
    assert code != 0
    assert f"missing classes: test: 1 ({TEST0})" in out
    assert "extra classes (in no standard split): 1 (n99999999)" in out
    assert f"misplaced classes: 1 ({TRAIN0} in val, standard train)" in out
    assert any(line.startswith(f"undecodable files: 1, e.g. {root}") for line in out)
    assert sum(line.startswith("problem: ") for line in out) == 4
    assert len(err) == 1 and "miniimagenet: not ready, 4 problem(s)" in err[0]
    _assert_nothing_cached(cache_env)


@pytest.mark.parametrize(
    ("name", "write", "summary"),
    [
        ("cifar-fs", _cifar_release, "cifar-fs: ready (64/16/20 classes, 200 images)"),
        ("cifar-fs", _cifar_pickles, "cifar-fs: ready (64/16/20 classes, 200 images)"),
        ("cub", lambda r: _cub(r, True), "cub: ready (100/50/50 classes, 200 images)"),
        ("miniimagenet", lambda r: _mini_pickles(r / "miniimagenet"), "miniimagenet: ready"),
    ],
    ids=["cifar-release", "cifar-pickles", "cub-metadata", "mini-pickles"],
)
def test_verify_other_layouts(
    tmp_path: Path,
    cache_env: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    write: Callable[[Path], None],
    summary: str,
) -> None:
    write(tmp_path / "data")
    code, out, err = _verify(name, tmp_path / "data", capsys)
    assert code == 0 and not err, err
    assert out[-1].startswith(summary)
    _assert_nothing_cached(cache_env)


def test_verify_missing_root_and_embedded(
    tmp_path: Path, cache_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _verify("cub", tmp_path / "nowhere", capsys)
    assert code != 0 and len(err) == 1 and str(tmp_path / "nowhere") in err[0]
    code, out, err = _verify("glyphs", tmp_path / "nowhere", capsys)
    assert code == 0 and out[-1] == "glyphs: ready"
    _assert_nothing_cached(cache_env)
