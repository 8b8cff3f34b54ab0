"""Shared fixtures: a tiny in-process dataset, a hermetic cache, the real-data root."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dfml_bench.config import RunSpec
from dfml_bench.data import ClassSplit, FewShotDataset, register_dataset
from dfml_bench.evaluation.harness import EvaluationSettings
from dfml_bench.methods import MetaModelSpec
from dfml_bench.zoo.manifest import Zoo

REPO = Path(__file__).resolve().parents[1]
TOY = "test-toy"


def _toy_split(num_classes: int, per_class: int, offset: int, size: int) -> ClassSplit:
    """Each class is a fixed random colour pattern plus noise: learnable in a few steps."""
    generator = torch.Generator().manual_seed(1000 + offset)
    patterns = torch.rand(num_classes, 3, size, size, generator=generator) * 255
    noise = torch.randn(num_classes, per_class, 3, size, size, generator=generator) * 40
    images = (patterns[:, None] + noise).clamp(0, 255).to(torch.uint8).flatten(0, 1)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    names = tuple(f"toy{offset + c}" for c in range(num_classes))
    return ClassSplit(images, labels, names)


@register_dataset(TOY, default_image_size=32, embedded=True, description="test-only toy data")
def _load_toy(data_root: Path | None, image_size: int, cache_dir: Path) -> FewShotDataset:
    splits = {
        "train": _toy_split(12, 30, 0, image_size),
        "val": _toy_split(6, 25, 100, image_size),
        "test": _toy_split(6, 25, 200, image_size),
    }
    return FewShotDataset(TOY, image_size, splits, mean=(0.5,) * 3, std=(0.25,) * 3)


def ss_run_spec(
    method: str,
    zoo_dir: str | Path,
    run_dir: Path,
    evaluation: EvaluationSettings,
    *,
    settings: dict | None = None,
    shots: int = 1,
    seed: int = 0,
    meta_model: MetaModelSpec | None = None,
) -> RunSpec:
    """One 5-way SS run on CPU from a test zoo: tests state only what they vary."""
    return RunSpec(
        scenario="ss",
        scenario_label="SS",
        method=method,
        method_settings=settings or {},
        ways=5,
        shots=shots,
        seed=seed,
        zoo_dir=str(zoo_dir),
        run_dir=str(run_dir),
        meta_model=meta_model or MetaModelSpec(),
        evaluation=evaluation,
        data_root=None,
        cache_dir=None,
        device="cpu",
    )


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread: tiny tensors on a shared 2-core machine gain nothing from two, and
    results stay reproducible (`pytestmark = pytest.mark.usefixtures("single_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """No TensorFloat-32 on CUDA (10-bit mantissas in convolutions and matmuls): equality tests
    compare float32 with float32. No effect on a CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
)


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated/decoded data goes to one cache per test session, never the user's cache."""
    cache = Path(os.environ.get("DFML_TEST_CACHE_DIR") or tmp_path_factory.mktemp("cache"))
    os.environ["DFML_CACHE_DIR"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    root = Path(os.environ.get("DFML_DATA_ROOT") or REPO.parent / "shared" / "data")
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}; set DFML_DATA_ROOT to run these tests")
    return root


@pytest.fixture(scope="session")
def glyph_zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A small SS zoo on the embedded dataset, for 'method beats random' tests."""
    from dfml_bench.zoo.recipe import ZooRecipe
    from dfml_bench.zoo.train import train_zoo

    recipe = ZooRecipe(
        name="glyph-ss",
        datasets=["glyphs"],
        image_size=32,
        architectures=["conv4"],
        teachers_per_dataset=4,
        classes_per_teacher=5,
        epochs=3,
        max_images_per_class=100,
    )
    directory = tmp_path_factory.mktemp("glyph-zoo")
    train_zoo(recipe, directory, progress=False)
    return str(directory)


@pytest.fixture(scope="session")
def toy_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    """Two Conv4 teachers on the toy dataset (seconds to train)."""
    from dfml_bench.zoo.recipe import ZooRecipe
    from dfml_bench.zoo.train import train_zoo

    recipe = ZooRecipe(
        name="toy",
        datasets=[TOY],
        image_size=32,
        architectures=["conv4"],
        teachers_per_dataset=2,
        classes_per_teacher=5,
        epochs=2,
        batch_size=32,
    )
    return train_zoo(recipe, tmp_path_factory.mktemp("zoo"), progress=False)
