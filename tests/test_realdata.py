"""The loaders on the real datasets under DFML_DATA_ROOT (or ../shared/data); skipped if absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfml_bench.data import omniglot, tiny_imagenet
from dfml_bench.data.base import FewShotDataset
from dfml_bench.data.images import split_list

pytestmark = pytest.mark.realdata


def _require(real_data_root: Path, folder: str) -> None:
    if not (real_data_root / folder).is_dir():
        pytest.skip(f"real data not found at {real_data_root / folder}; set DFML_DATA_ROOT")


def _per_class_counts(dataset: FewShotDataset, split: str) -> set[int]:
    part = dataset.split(split)
    return set(torch.bincount(part.labels, minlength=part.num_classes).tolist())


def test_omniglot(real_data_root: Path, tmp_path: Path) -> None:
    _require(real_data_root, "omniglot")
    dataset = omniglot.load_omniglot(real_data_root, 28, tmp_path)
    classes = {split: dataset.split(split).num_classes for split in ("train", "val", "test")}
    assert classes == {"train": 771, "val": 193, "test": 659}
    assert classes["train"] + classes["val"] == 964
    names = [set(dataset.split(split).class_names) for split in ("train", "val", "test")]
    assert len(set.union(*names)) == 964 + 659
    assert all(_per_class_counts(dataset, split) == {20} for split in ("train", "val", "test"))
    assert dataset.split("test").images.shape[1:] == (3, 28, 28)
    assert 0.8 < dataset.mean[0] < 1.0, "mostly white background"


@pytest.mark.slow
def test_tiny_imagenet(real_data_root: Path, tmp_path: Path) -> None:
    _require(real_data_root, "tiny-imagenet-200")
    dataset = tiny_imagenet.load_tiny_imagenet(real_data_root, 32, tmp_path)
    for split, count in (("train", 64), ("val", 16), ("test", 20)):
        part = dataset.split(split)
        assert part.class_names == tuple(split_list("tiny-imagenet", split))
        assert part.num_classes == count
        assert part.images.shape == (count * 500, 3, 32, 32)
        assert _per_class_counts(dataset, split) == {500}
    assert dataset.stand_in_for == "CIFAR-FS"
    cached = tiny_imagenet.load_tiny_imagenet(real_data_root, 32, tmp_path)
    assert torch.equal(cached.split("val").images, dataset.split("val").images)
