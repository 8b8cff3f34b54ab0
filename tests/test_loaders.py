"""Real-data loaders on tiny fixtures written in each dataset's own format (no real data needed)."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dfml_bench.data import cifar_fs, cub, images, miniimagenet, omniglot, tiny_imagenet
from dfml_bench.data.base import FewShotDataset
from dfml_bench.data.images import split_list
from dfml_bench.errors import DatasetError

SIZES = {"train": 64, "val": 16, "test": 20}
WNIDS = {split: split_list("tiny-imagenet", split) for split in SIZES}
MINI_WNIDS = {split: split_list("miniimagenet", split) for split in SIZES}
CIFAR_FS = {split: [line.split(",") for line in split_list("cifar-fs", split)] for split in SIZES}


def _check_splits(dataset: FewShotDataset, sizes: dict[str, int], image_size: int) -> None:
    assert {split: dataset.split(split).num_classes for split in sizes} == sizes
    names = [set(dataset.split(split).class_names) for split in sizes]
    assert sum(len(n) for n in names) == len(set.union(*names)), "splits share a class"
    for split in sizes:
        part = dataset.split(split)
        assert part.images.dtype == torch.uint8
        assert part.images.shape[1:] == (3, image_size, image_size)
        assert torch.bincount(part.labels).min() > 0


@pytest.mark.parametrize("size", [32, 84])
def test_tiny_imagenet_splits_and_shapes(
    tmp_path: Path, size: int, write_tiny_imagenet: Callable[..., Path]
) -> None:
    write_tiny_imagenet(tmp_path / "data")
    dataset = tiny_imagenet.load_tiny_imagenet(tmp_path / "data", size, tmp_path / "cache")
    _check_splits(dataset, SIZES, size)
    assert dataset.split("val").class_names == tuple(WNIDS["val"])
    assert len(dataset.split("train").images) == 64 * 2
    assert dataset.stand_in_for == {32: "CIFAR-FS", 84: "MiniImageNet"}[size]
    assert f"{WNIDS['test'][0]}: thing {WNIDS['test'][0]}" in dataset.notes["class_words"]


def test_greyscale_and_rgba_become_rgb(
    tmp_path: Path, write_tiny_imagenet: Callable[..., Path], save_jpeg: Callable[..., None]
) -> None:
    folder = write_tiny_imagenet(tmp_path / "data")
    wnid = WNIDS["train"][0]
    save_jpeg(folder / "train" / wnid / "images" / f"{wnid}_8.JPEG", 1, mode="L")
    save_jpeg(folder / "train" / wnid / "images" / f"{wnid}_9.png", 2, mode="RGBA")
    dataset = tiny_imagenet.load_tiny_imagenet(tmp_path / "data", 32, tmp_path / "cache")
    train = dataset.split("train")
    first = train.images[train.labels == 0]
    assert len(first) == 4
    grey = first[2]  # files sorted by name: _0, _1, _8 (grey), _9 (RGBA)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert not torch.equal(first[3][0], first[3][1])


def test_undecodable_image_is_skipped_with_one_counting_warning(
    tmp_path: Path, write_tiny_imagenet: Callable[..., Path]
) -> None:
    folder = write_tiny_imagenet(tmp_path / "data")
    for wnid in (WNIDS["train"][0], WNIDS["test"][0]):
        (folder / "train" / wnid / "images" / f"{wnid}_7.JPEG").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match="skipped 2 undecodable") as record:
        dataset = tiny_imagenet.load_tiny_imagenet(tmp_path / "data", 32, tmp_path / "cache")
    assert len(record) == 1
    assert torch.bincount(dataset.split("train").labels)[0] == 2


def test_class_without_decodable_images_is_an_error(
    tmp_path: Path, write_tiny_imagenet: Callable[..., Path]
) -> None:
    folder = write_tiny_imagenet(tmp_path / "data", per_class=1)
    wnid = WNIDS["val"][3]
    (folder / "train" / wnid / "images" / f"{wnid}_0.JPEG").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DatasetError, match=f"none of the 1 image.*'{wnid}'"):
        tiny_imagenet.load_tiny_imagenet(tmp_path / "data", 32, tmp_path / "cache")


def test_missing_root_errors_name_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="DFML_DATA_ROOT") as unset:
        tiny_imagenet.load_tiny_imagenet(None, 32, tmp_path)
    assert "tiny-imagenet-200/" in str(unset.value) and "never downloads" in str(unset.value)
    missing = tmp_path / "nowhere"
    for loader in (
        tiny_imagenet.load_tiny_imagenet,
        cifar_fs.load_cifar_fs,
        miniimagenet.load_miniimagenet,
        cub.load_cub,
        omniglot.load_omniglot,
    ):
        with pytest.raises(DatasetError) as error:
            loader(missing, 32, tmp_path)
        message = str(error.value)
        assert str(missing) in message and "\n" not in message and "download" in message


def test_missing_wnid_folder_is_an_error(
    tmp_path: Path, write_tiny_imagenet: Callable[..., Path]
) -> None:
    folder = write_tiny_imagenet(tmp_path / "data", per_class=1)
    wnid = WNIDS["test"][5]
    for file in (folder / "train" / wnid / "images").iterdir():
        file.unlink()
    (folder / "train" / wnid / "images").rmdir()
    with pytest.raises(DatasetError, match=f"class folder not found: .*{wnid}"):
        tiny_imagenet.load_tiny_imagenet(tmp_path / "data", 32, tmp_path / "cache")


def test_second_load_reads_the_cache_and_a_changed_source_rebuilds(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    write_tiny_imagenet: Callable[..., Path],
    save_jpeg: Callable[..., None],
) -> None:
    folder = write_tiny_imagenet(tmp_path / "data", per_class=1)
    first = tiny_imagenet.load_tiny_imagenet(tmp_path / "data", 32, tmp_path / "cache")

    def refuse(path: Path, size: int) -> np.ndarray:
        raise AssertionError("decoded again")

    monkeypatch.setattr(images, "decode_image", refuse)
    again = tiny_imagenet.load_tiny_imagenet(tmp_path / "data", 32, tmp_path / "cache")
    assert torch.equal(first.split("test").images, again.split("test").images)
    assert first.split("test").class_names == again.split("test").class_names
    wnid = WNIDS["train"][0]
    save_jpeg(folder / "train" / wnid / "images" / f"{wnid}_0.JPEG", 99, size=(50, 50))
    with pytest.raises(AssertionError, match="decoded again"):
        tiny_imagenet.load_tiny_imagenet(tmp_path / "data", 32, tmp_path / "cache")


# CIFAR-FS -------------------------------------------------------------------------------


def test_cifar_fs_pools_train_and_test_per_class(
    tmp_path: Path,
    write_cifar: Callable[[Path], Path],
    cifar_names: Callable[[], tuple[list[str], list[str]]],
) -> None:
    folder = write_cifar(tmp_path / "data")
    dataset = cifar_fs.load_cifar_fs(tmp_path / "data", 32, tmp_path / "cache")
    _check_splits(dataset, SIZES, 32)
    assert dataset.split("test").class_names == tuple(name for _, name in CIFAR_FS["test"])
    assert torch.equal(torch.bincount(dataset.split("train").labels), torch.full((64,), 3))
    # Pixels are kept exactly at 32 px: first train image of the first meta-train class.
    batch = pickle.loads((folder / "train").read_bytes())
    fine, _ = cifar_names()
    row = batch["fine_labels"].index(fine.index(dataset.split("train").class_names[0]))
    expected = torch.from_numpy(batch["data"][row].reshape(3, 32, 32))
    assert torch.equal(dataset.split("train").images[0], expected)
    assert dataset.mean == (0.5071, 0.4867, 0.4408)
    assert cifar_fs.load_cifar_fs(tmp_path / "data", 84, tmp_path / "cache").image_size == 84


def test_cifar_fs_cache_hit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_cifar: Callable[[Path], Path]
) -> None:
    write_cifar(tmp_path / "data")
    first = cifar_fs.load_cifar_fs(tmp_path / "data", 32, tmp_path / "cache")

    def refuse(path: Path) -> dict:
        raise AssertionError("read again")

    monkeypatch.setattr(cifar_fs, "_read_pickle", refuse)
    again = cifar_fs.load_cifar_fs(tmp_path / "data", 32, tmp_path / "cache")
    assert torch.equal(first.split("val").images, again.split("val").images)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running_code(
    tmp_path: Path, write_cifar: Callable[[Path], Path]
) -> None:
    folder = write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": _Exploit(marker)}))
    with pytest.raises(DatasetError, match=r"refused to load global (posix|nt)\.system"):
        cifar_fs.load_cifar_fs(tmp_path / "data", 32, tmp_path / "cache")
    assert not marker.exists()


def test_cifar_fs_missing_file_and_wrong_class_names(
    tmp_path: Path,
    write_cifar: Callable[[Path], Path],
    cifar_names: Callable[[], tuple[list[str], list[str]]],
) -> None:
    folder = write_cifar(tmp_path / "data")
    fine, coarse = cifar_names()
    fine[fine.index("whale")] = "orca"
    meta = {"fine_label_names": fine, "coarse_label_names": coarse}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(DatasetError, match="lacks CIFAR-FS class 'whale'"):
        cifar_fs.load_cifar_fs(tmp_path / "data", 32, tmp_path / "cache")
    (folder / "test").unlink()
    with pytest.raises(DatasetError, match=f"file not found: {folder / 'test'}"):
        cifar_fs.load_cifar_fs(tmp_path / "data", 32, tmp_path / "cache")


# MiniImageNet and CUB -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["images/<wnid>", "<wnid>", "flat"])
def test_miniimagenet_layouts(tmp_path: Path, layout: str, save_jpeg: Callable[..., None]) -> None:
    folder = tmp_path / "data" / "miniimagenet"
    for index, wnid in enumerate(wnid for split in SIZES for wnid in MINI_WNIDS[split]):
        for k in range(2):
            name = {
                "images/<wnid>": f"images/{wnid}/{k}.jpg",
                "<wnid>": f"{wnid}/{k}.jpg",
                "flat": f"images/{wnid}{k:08d}.jpg",
            }[layout]
            save_jpeg(folder / name, index * 2 + k, size=(90, 70))
    dataset = miniimagenet.load_miniimagenet(tmp_path / "data", 84, tmp_path / "cache")
    _check_splits(dataset, SIZES, 84)
    assert dataset.split("train").class_names == tuple(MINI_WNIDS["train"])
    assert len(dataset.split("test").images) == 40


def test_miniimagenet_missing_wnid(tmp_path: Path, save_jpeg: Callable[..., None]) -> None:
    folder = tmp_path / "data" / "miniimagenet" / "images"
    for wnid in [w for split in SIZES for w in MINI_WNIDS[split]][1:]:
        save_jpeg(folder / wnid / "0.jpg", 0)
    with pytest.raises(DatasetError, match=f"class folder not found: .*{MINI_WNIDS['train'][0]}"):
        miniimagenet.load_miniimagenet(tmp_path / "data", 84, tmp_path / "cache")


def _write_cub(save_jpeg: Callable[..., None], root: Path, num_classes: int = 200) -> Path:
    folder = root / "CUB_200_2011" / "images"
    for index in range(num_classes):
        save_jpeg(folder / f"{index + 1:03d}.Bird_{index}" / f"Bird_{index}_1.jpg", index)
    return folder


def test_cub_split_by_sorted_folder_index(tmp_path: Path, save_jpeg: Callable[..., None]) -> None:
    _write_cub(save_jpeg, tmp_path / "data")
    dataset = cub.load_cub(tmp_path / "data", 32, tmp_path / "cache")
    _check_splits(dataset, {"train": 100, "val": 50, "test": 50}, 32)
    assert dataset.split("train").class_names[:2] == ("001.Bird_0", "003.Bird_2")
    assert dataset.split("val").class_names[:2] == ("002.Bird_1", "006.Bird_5")
    assert dataset.split("test").class_names[:2] == ("004.Bird_3", "008.Bird_7")


def test_cub_needs_exactly_200_class_folders(
    tmp_path: Path, save_jpeg: Callable[..., None]
) -> None:
    folder = _write_cub(save_jpeg, tmp_path / "data", num_classes=199)
    with pytest.raises(DatasetError, match=f"found 199 class folders, not 200: {folder}"):
        cub.load_cub(tmp_path / "data", 32, tmp_path / "cache")


# Omniglot -------------------------------------------------------------------------------


def _omniglot_arrays() -> dict[str, np.ndarray]:
    """Bool [characters, drawers, 20, 20], True = background, a random stroke of ink each."""
    rng = np.random.default_rng(0)
    out = {}
    for part, characters in (("background", 10), ("evaluation", 5)):
        ink = rng.random((characters, 3, 20, 20)) < 0.2
        out[part] = ~ink
    return out


def _write_omniglot_npz(root: Path) -> None:
    folder = root / "omniglot"
    folder.mkdir(parents=True)
    for part, array in _omniglot_arrays().items():
        labels = np.repeat(np.arange(len(array))[:, None], array.shape[1], axis=1)
        np.savez_compressed(folder / f"images_{part}.npz", images=array, labels=labels)


def _write_omniglot_pngs(root: Path) -> None:
    """Official layout; two alphabets whose sorted characters follow the archive order."""
    for part, array in _omniglot_arrays().items():
        for index, drawings in enumerate(array):
            character = root / "omniglot" / f"images_{part}" / f"Alphabet_{index // 4}"
            character /= f"character{index % 4 + 1:02d}"
            character.mkdir(parents=True)
            for k, drawing in enumerate(drawings):
                Image.fromarray(drawing).save(character / f"{index:04d}_{k + 1:02d}.png")


def test_omniglot_npz_splits_and_ink(tmp_path: Path) -> None:
    _write_omniglot_npz(tmp_path / "data")
    dataset = omniglot.load_omniglot(tmp_path / "data", 28, tmp_path / "cache")
    _check_splits(dataset, {"train": 8, "val": 2, "test": 5}, 28)
    assert dataset.split("test").class_names[0] == "evaluation/000"
    assert all(name.startswith("background/") for name in dataset.split("val").class_names)
    train = dataset.split("train").images
    assert torch.equal(train[:, 0], train[:, 1]) and torch.equal(train[:, 1], train[:, 2])
    assert train.float().mean() > 127, "background must be white, ink dark"
    assert 0.5 < dataset.mean[0] < 1 and 0 < dataset.std[0] < 0.5
    assert len(set(dataset.mean)) == 1


def test_omniglot_png_layout_matches_the_archives(tmp_path: Path) -> None:
    _write_omniglot_npz(tmp_path / "npz")
    _write_omniglot_pngs(tmp_path / "png")
    from_npz = omniglot.load_omniglot(tmp_path / "npz", 32, tmp_path / "cache")
    from_png = omniglot.load_omniglot(tmp_path / "png", 32, tmp_path / "cache")
    _check_splits(from_png, {"train": 8, "val": 2, "test": 5}, 32)
    assert from_png.split("train").class_names[0] == "background/Alphabet_0/character01"
    for split in SIZES:
        assert torch.equal(from_npz.split(split).images, from_png.split(split).images)
        assert torch.equal(from_npz.split(split).labels, from_png.split(split).labels)


def test_omniglot_malformed_archive(tmp_path: Path) -> None:
    _write_omniglot_npz(tmp_path / "data")
    archive = tmp_path / "data" / "omniglot" / "images_evaluation.npz"
    np.savez(archive, images=np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(DatasetError, match=f"not bool 4-d: {archive}"):
        omniglot.load_omniglot(tmp_path / "data", 28, tmp_path / "cache")
    archive.unlink()
    with pytest.raises(DatasetError, match=f"archive not found: {archive}"):
        omniglot.load_omniglot(tmp_path / "data", 28, tmp_path / "cache")
