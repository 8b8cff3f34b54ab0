"""Shared fixtures: a tiny in-process dataset, a hermetic cache, the real-data root, small zoos,
run specs, random teachers and dataset folders written in their own format.

Test modules take what they share as fixtures (some return a factory function or a constant) and
never import from one another or from this file."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dfml_bench.config import RunSpec
from dfml_bench.data import ClassSplit, FewShotDataset, load_dataset, register_dataset
from dfml_bench.data.images import split_list
from dfml_bench.evaluation.harness import EvaluationSettings
from dfml_bench.inversion.pixels import Normalisation
from dfml_bench.methods import MetaModelSpec, MetaTrainContext
from dfml_bench.models import build_model
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


def _ss_run_spec(
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


def _quick_run_spec(
    method: str, zoo_dir: str | Path, run_dir: Path, shots: int = 1, seed: int = 0
) -> RunSpec:
    evaluation = EvaluationSettings(episodes=30, val_episodes=20, queries=5)
    return _ss_run_spec(method, zoo_dir, run_dir, evaluation, shots=shots, seed=seed)


def _paired_run_spec(
    method: str, zoo_dir: str | Path, run_dir: Path, settings: dict, shots: int
) -> RunSpec:
    evaluation = EvaluationSettings(episodes=100, val_episodes=20, inner_steps=1)
    return _ss_run_spec(method, zoo_dir, run_dir, evaluation, settings=settings, shots=shots)


# small budgets with every mechanism on: curriculum switches, replay, several checkpoints
RESUMABLE_SETTINGS: dict[str, dict[str, Any]] = {
    "purer": {
        "iterations": 8,
        "eval_interval": 3,
        "per_class": 6,
        "queries": 3,
        "meta_batch": 2,
        "curriculum_start": 2,
        "curriculum_patience": 1,
    },
    "free": {
        "epochs": 6,
        "eval_interval": 2,
        "warmup_epochs": 1,
        "per_class": 6,
        "queries": 3,
        "generator_width": 8,
        "latent_dim": 16,
        "teachers_per_epoch": 2,
        "generator_steps": 2,
        "max_replay_batches": 3,
        "replay_patience": 2,
        "inner_steps": 1,
        "meta_batch": 2,
    },
    "oracle": {"iterations": 6, "eval_interval": 2, "meta_batch": 2, "queries": 3},
    "dro": {"iterations": 6, "eval_interval": 2, "inversion_steps": 3},
}


def _resumable_run_spec(
    method: str, zoo_dir: str | Path, run_dir: Path, **settings: Any
) -> RunSpec:
    evaluation = EvaluationSettings(episodes=20, val_episodes=10, queries=5, inner_steps=2)
    return _ss_run_spec(
        method, zoo_dir, run_dir, evaluation, settings=RESUMABLE_SETTINGS[method] | settings
    )


@pytest.fixture(scope="session")
def toy_dataset_name() -> str:
    """The name of the toy dataset registered above (load it with `load_dataset(name)`)."""
    return TOY


@pytest.fixture(scope="session")
def ss_run_spec() -> Callable[..., RunSpec]:
    """`ss_run_spec(method, zoo_dir, run_dir, evaluation, *, settings=None, shots=1, seed=0,
    meta_model=None)`: one 5-way SS run on CPU from a test zoo."""
    return _ss_run_spec


@pytest.fixture(scope="session")
def quick_run_spec() -> Callable[..., RunSpec]:
    """`quick_run_spec(method, zoo_dir, run_dir, shots=1, seed=0)`: the method's own settings,
    30 test and 20 validation episodes."""
    return _quick_run_spec


@pytest.fixture(scope="session")
def paired_run_spec() -> Callable[..., RunSpec]:
    """`paired_run_spec(method, zoo_dir, run_dir, settings, shots)`: scored on 100 test episodes,
    the same for every method (accuracies pair up), one adaptation step."""
    return _paired_run_spec


@pytest.fixture(scope="session")
def resumable_run_spec() -> Callable[..., RunSpec]:
    """`resumable_run_spec(method, zoo_dir, run_dir, **settings)` for purer, free, oracle or dro:
    small budgets with every mechanism on (RESUMABLE_SETTINGS), so a run saves many states;
    `settings` override them."""
    return _resumable_run_spec


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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device (skipped when there is none), e.g. a device param"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="no CUDA device here")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(no_cuda)


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Every in-process test on one torch thread. With one thread per core, a machine that is
    busy with anything else oversubscribes its cores and small CPU kernels stall: a FREE smoke
    run took 70 s instead of 4.6 s beside one other job on 2 cores. Subprocesses (Snakemake
    rules) set OMP_NUM_THREADS themselves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def toy_zoo_dir(toy_zoo: Zoo) -> Path:
    """The folder of `toy_zoo`: runs only read it."""
    return Path(toy_zoo.directory)


# FREE: small settings and a context with the teachers' normalisation ------------------------

FREE_SHORT = {  # one post-warm-up epoch of small pieces
    "epochs": 2,
    "warmup_epochs": 1,
    "per_class": 16,
    "generator_steps": 2,
    "generator_width": 8,
    "latent_dim": 16,
    "meta_batch": 2,
    "inner_steps": 1,
    "max_replay_batches": 2,
    "eval_interval": None,
}


def _free_context(zoo: Zoo, artifacts: Path | None = None) -> MetaTrainContext:
    normalisations = {}
    for name in zoo.datasets:
        data = load_dataset(name, 32)
        normalisations[name] = Normalisation(data.mean, data.std)
    return MetaTrainContext(
        zoo,
        MetaModelSpec(),
        5,
        1,
        0,
        torch.device("cpu"),
        False,
        artifacts,
        normalisations=normalisations,
    )


@pytest.fixture
def free_short() -> dict[str, Any]:
    """FREE settings for one post-warm-up epoch of small pieces (a fresh dict per test)."""
    return dict(FREE_SHORT)


@pytest.fixture(scope="session")
def free_context() -> Callable[..., MetaTrainContext]:
    """`free_context(zoo, artifacts=None)`: 5-way 1-shot on CPU, with each of the zoo's datasets'
    normalisation (FREE's generator makes pixels, the teachers take normalised images)."""
    return _free_context


# Random teachers and pseudo images, for the inversion losses ---------------------------------


def _random_teacher(architecture: str, classes: int, image_size: int, seed: int) -> nn.Module:
    """A random teacher whose running statistics differ from a fresh model's, so the BN term
    and its gradient are far from trivial."""
    torch.manual_seed(seed)
    teacher = build_model(architecture, classes, image_size).eval()
    for module in teacher.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    return teacher


RANDOM_ZOOS = {  # (architecture, classes, image size) of each teacher
    "conv4": [("conv4", 5, 16), ("conv4", 5, 16), ("conv4", 5, 16)],
    "resnet10": [("resnet10", 3, 16), ("resnet10", 3, 16)],
    "resnet18": [("resnet18", 2, 16), ("resnet18", 2, 16)],
    # two groups of different head sizes, interleaved, and a conv4 that sees resized images
    "mixed": [("conv4", 5, 16), ("resnet10", 3, 16), ("conv4", 5, 16), ("resnet10", 2, 16)],
    "mixed-sizes": [("conv4", 4, 32), ("conv4", 4, 16), ("conv4", 4, 32)],
}


def _random_teacher_zoo(
    name: str,
) -> tuple[list[nn.Module], list[torch.Tensor], list[torch.Tensor]]:
    """Teachers, their pseudo images (16 px, two per class) and local targets."""
    specs = RANDOM_ZOOS[name]
    teachers = [_random_teacher(*spec, seed=index) for index, spec in enumerate(specs)]
    generator = torch.Generator().manual_seed(7)
    images = [torch.randn(2 * classes, 3, 16, 16, generator=generator) for _, classes, _ in specs]
    targets = [torch.arange(classes).repeat_interleave(2) for _, classes, _ in specs]
    return teachers, images, targets


@pytest.fixture(scope="session")
def random_teacher() -> Callable[[str, int, int, int], nn.Module]:
    """`random_teacher(architecture, classes, image_size, seed)`: an eval-mode teacher with
    random weights and running statistics (seeds torch's global generator)."""
    return _random_teacher


@pytest.fixture(scope="session")
def random_teacher_zoo() -> Callable[[str], tuple[list[nn.Module], list, list]]:
    """`random_teacher_zoo(name)` for a name of RANDOM_ZOOS (conv4, resnet10, resnet18, mixed,
    mixed-sizes): its random teachers (seeds 0, 1, ...), their pseudo images (16 px, two per
    class) and local targets."""
    return _random_teacher_zoo


# Dataset folders in their own format (no real data needed) ----------------------------------

_SPLITS = ("train", "val", "test")
_TINY_WNIDS = [wnid for split in _SPLITS for wnid in split_list("tiny-imagenet", split)]
_CIFAR_FS = [pair.split(",") for split in _SPLITS for pair in split_list("cifar-fs", split)]


def _save_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> None:
    """A small random image; the non-square size exercises the resize."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path, quality=90)


def _write_tiny_imagenet(root: Path, per_class: int = 2) -> Path:
    folder = root / "tiny-imagenet-200"
    for index, wnid in enumerate(_TINY_WNIDS):
        for k in range(per_class):
            _save_jpeg(folder / "train" / wnid / "images" / f"{wnid}_{k}.JPEG", index * 10 + k)
    (folder / "wnids.txt").write_text("\n".join(_TINY_WNIDS) + "\n")
    (folder / "words.txt").write_text("".join(f"{wnid}\tthing {wnid}\n" for wnid in _TINY_WNIDS))
    return folder


def _cifar_names() -> tuple[list[str], list[str]]:
    fine = sorted(name for _, name in _CIFAR_FS)
    coarse = sorted({superclass for superclass, _ in _CIFAR_FS})
    return fine, coarse


def _write_cifar(root: Path) -> Path:
    """The official pickles' structure: per-image rows of 3072 bytes (R, G, B planes)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    fine, coarse = _cifar_names()
    superclass = {name: sup for sup, name in _CIFAR_FS}
    rng = np.random.default_rng(0)
    for part, per_class in (("train", 2), ("test", 1)):
        labels = [label for label in range(100) for _ in range(per_class)]
        batch = {
            "filenames": [f"{part}_{i}.png" for i in range(len(labels))],
            "batch_label": f"{part} batch",
            "fine_labels": labels,
            "coarse_labels": [coarse.index(superclass[fine[label]]) for label in labels],
            "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
        }
        (folder / part).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"fine_label_names": fine, "coarse_label_names": coarse}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


@pytest.fixture(scope="session")
def save_jpeg() -> Callable[..., None]:
    """`save_jpeg(path, seed, size=(40, 30), mode="RGB")`: a small random image (folders made)."""
    return _save_jpeg


@pytest.fixture(scope="session")
def write_tiny_imagenet() -> Callable[..., Path]:
    """`write_tiny_imagenet(root, per_class=2)`: a Tiny ImageNet copy under `root` (the classes
    of the split lists, `per_class` random JPEGs each); returns its tiny-imagenet-200 folder."""
    return _write_tiny_imagenet


@pytest.fixture(scope="session")
def cifar_names() -> Callable[[], tuple[list[str], list[str]]]:
    """`cifar_names()`: CIFAR-100's fine and coarse label names, sorted (fresh lists)."""
    return _cifar_names


@pytest.fixture(scope="session")
def write_cifar() -> Callable[[Path], Path]:
    """`write_cifar(root)`: CIFAR-100's python pickles under `root` (2 train, 1 test image per
    class, random pixels); returns its cifar-100-python folder."""
    return _write_cifar
