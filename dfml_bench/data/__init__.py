"""Datasets (class-split image tensors), their registry and the episodic sampler."""

from dfml_bench.data.base import SPLITS, ClassSplit, FewShotDataset
from dfml_bench.data.registry import dataset_entry, dataset_names, load_dataset, register_dataset

__all__ = [
    "SPLITS",
    "ClassSplit",
    "FewShotDataset",
    "dataset_entry",
    "dataset_names",
    "load_dataset",
    "register_dataset",
]
