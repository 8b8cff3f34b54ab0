"""Faults the suite must survive (issue 8): a damaged image folder, a full disk while a record is
written, and a run whose losses stop being finite. Each is caused here on purpose."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dfml_bench import atomic
from dfml_bench.config import RunSpec
from dfml_bench.data import load_dataset
from dfml_bench.data.images import split_list
from dfml_bench.errors import DfmlError
from dfml_bench.evaluation.harness import EvaluationSettings
from dfml_bench.methods import MetaModelSpec
from dfml_bench.runner import execute_run
from dfml_bench.zoo.manifest import Zoo
from dfml_bench.zoo.recipe import ZooRecipe
from dfml_bench.zoo.train import train_zoo

REPO = Path(__file__).resolve().parents[1]
SIZE = 32

# An image folder with a wrong-size, a greyscale and an undecodable image ----------------------


def _pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _expected(path: Path) -> np.ndarray:
    """What the loader must make of a readable file: SxS bicubic, grey copied to 3 channels."""
    with Image.open(path) as image:
        image = image if image.mode == "L" else image.convert("RGB")
        pixels = np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    if pixels.ndim == 2:
        return np.broadcast_to(pixels, (3, SIZE, SIZE))
    return pixels.transpose(2, 0, 1)


def test_damaged_image_folder_is_converted_and_skipped_with_one_warning(
    tmp_path: Path, write_tiny_imagenet: Callable[..., Path], save_jpeg: Callable[..., None]
) -> None:
    """One class folder of a Tiny ImageNet copy holds, beside its good image: a small non-square
    RGB PNG, an 8-bit and a 16-bit greyscale PNG, and three files that cannot be decoded (random
    bytes named .png, a JPEG cut in half, an empty .jpg). The readable ones become uint8
    [3, S, S] RGB; the others are dropped with a single warning that counts and names them."""
    folder = write_tiny_imagenet(tmp_path / "data", per_class=1)
    wnid = split_list("tiny-imagenet", "train")[0]
    images = folder / "train" / wnid / "images"
    grey = _pixels(1, (SIZE + 8, SIZE + 8))
    Image.fromarray(_pixels(0, (12, 20, 3))).save(images / f"{wnid}_a_small.png")
    Image.fromarray(grey).save(images / f"{wnid}_b_grey.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(images / f"{wnid}_c_grey16.png")
    (images / f"{wnid}_d_random.png").write_bytes(np.random.default_rng(3).bytes(2000))
    save_jpeg(tmp_path / "whole.jpg", 4, size=(64, 64))
    whole = (tmp_path / "whole.jpg").read_bytes()
    (images / f"{wnid}_e_truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (images / f"{wnid}_f_empty.jpg").write_bytes(b"")
    with Image.open(images / f"{wnid}_c_grey16.png") as wide:
        assert wide.mode == "I;16"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_dataset(
            "tiny-imagenet", SIZE, data_root=tmp_path / "data", cache_dir=tmp_path / "cache"
        )
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1, messages
    assert "tiny-imagenet: skipped 3 undecodable image(s)" in messages[0]
    bad = [
        images / f"{wnid}_{name}" for name in ("d_random.png", "e_truncated.JPEG", "f_empty.jpg")
    ]
    assert any(str(path) in messages[0] for path in bad), messages[0]

    train = dataset.split("train")
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, SIZE, SIZE)
    first = train.images[train.labels == 0].numpy()
    assert len(first) == 4  # _0.JPEG, a_small, b_grey, c_grey16 (sorted by name)
    np.testing.assert_array_equal(first[1], _expected(images / f"{wnid}_a_small.png"))
    np.testing.assert_array_equal(first[2], _expected(images / f"{wnid}_b_grey.png"))
    # 16-bit grey decodes like the same picture at 8 bits (PIL's own convert would give white)
    np.testing.assert_array_equal(first[3], first[2])
    assert torch.equal(torch.bincount(train.labels), torch.tensor([4] + [1] * 63))


# Disk full while a record is written -----------------------------------------------------------

GOOD_RECORD = {"method": "purer", "protocol": "clean", "acc_mean": 61.25}


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fill_disk(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make one step of `atomic` fail as on a full disk; a write stops after half the data."""
    if where == "write":
        original = Path.write_text

        def half_then_full(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
            original(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(Path, "write_text", half_then_full)
    else:  # ENOSPC often surfaces only when the data is flushed; a rename can need a block too
        monkeypatch.setattr(atomic.os, where, _no_space)


def _folder_state(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_disk_full_while_writing_a_record_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    record = tmp_path / "run" / "record-clean.json"
    atomic.write_json(record, GOOD_RECORD)
    before = _folder_state(record.parent)
    with monkeypatch.context() as patch:
        _fill_disk(patch, where)
        with pytest.raises(OSError) as caught:
            atomic.write_json(record, GOOD_RECORD | {"acc_mean": 99.0, "pad": "x" * 10_000})
    assert caught.value.errno == errno.ENOSPC  # the disk error itself, not one from the clean-up
    assert _folder_state(record.parent) == before  # old record byte for byte, no .*.tmp left
    assert json.loads(record.read_text()) == GOOD_RECORD
    atomic.write_json(record, GOOD_RECORD | {"acc_mean": 70.0})  # space back: writes work again
    assert json.loads(record.read_text())["acc_mean"] == 70.0
    assert [path.name for path in record.parent.iterdir()] == [record.name]


def _npy_writer(array: np.ndarray, room: int | None = None) -> Callable[[Path], None]:
    """A binary writer (np.save to a handle, as the image cache does); with `room` bytes of disk
    left, it writes what fits and then fails as write(2) does on a full disk."""

    def write(path: Path) -> None:
        with open(path, "wb") as handle:
            if room is None:
                np.save(handle, array, allow_pickle=False)
                return
            handle.write(b"\x93NUMPY" + bytes(room - 6))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


@pytest.mark.parametrize("where", ["writer", "fsync"])
def test_disk_full_during_a_binary_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    target = tmp_path / "cache" / "train-images.npy"
    old = np.arange(48, dtype=np.uint8).reshape(1, 3, 4, 4)
    atomic.write_with(target, _npy_writer(old))
    before = _folder_state(target.parent)
    new = np.zeros((64, 3, 32, 32), np.uint8)
    with monkeypatch.context() as patch:
        if where == "fsync":
            patch.setattr(atomic.os, "fsync", _no_space)
        with pytest.raises(OSError) as caught:
            atomic.write_with(target, _npy_writer(new, room=4096 if where == "writer" else None))
    assert caught.value.errno == errno.ENOSPC
    assert _folder_state(target.parent) == before
    np.testing.assert_array_equal(np.load(target, allow_pickle=False), old)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_the_os_refusing_a_write_keeps_the_old_files(tmp_path: Path) -> None:
    """No monkeypatching: a child process whose file-size limit is 16 KiB (the kernel refuses the
    write with EFBIG, as it refuses a write to a full disk with ENOSPC) rewrites a JSON record and
    a .npy file with bigger content. Both writes fail; both old files are intact."""
    script = textwrap.dedent(
        """
        import resource, sys
        from pathlib import Path
        import numpy as np
        from dfml_bench import atomic

        def save_npy(tmp):
            with open(tmp, "wb") as handle:
                np.save(handle, np.zeros(100_000), allow_pickle=False)

        folder = Path(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
        refused = 0
        for write in (
            lambda: atomic.write_json(folder / "record.json", {"pad": "x" * 100_000}),
            lambda: atomic.write_with(folder / "images.npy", save_npy),
        ):
            try:
                write()
            except OSError:
                refused += 1
        print(refused)
        """
    )
    atomic.write_json(tmp_path / "record.json", GOOD_RECORD)
    atomic.write_with(tmp_path / "images.npy", _npy_writer(np.arange(10)))
    before = _folder_state(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["2"], child.stdout  # both writes were refused
    assert _folder_state(tmp_path) == before


# Losses that stop being finite ----------------------------------------------------------------

# Small enough for seconds per run: one 5-class teacher at 16 px, one image pool slot per task.
TINY = 16
PURER = {
    "iterations": 4,
    "eval_interval": 2,  # iteration 2 is evaluated before the fault at 3: still no record
    "per_class": 2,
    "queries": 1,
    "meta_batch": 1,
    "inversion_strategy": "loop",
}
FREE = {
    "epochs": 2,
    "warmup_epochs": 0,
    "eval_interval": None,
    "teachers_per_epoch": 1,
    "per_class": 2,
    "queries": 1,
    "generator_width": 8,
    "latent_dim": 16,
    "generator_steps": 2,
    "inner_steps": 1,
    "meta_batch": 1,
    "max_replay_batches": 3,
    "replay_patience": 2,
}


def _tiny_recipe(dataset: str, name: str, epochs: int, **extra: Any) -> ZooRecipe:
    """One 5-class Conv4 teacher at 16 px on `dataset` (the toy one), at most 10 images per
    class."""
    return ZooRecipe(
        name=name,
        datasets=[dataset],
        image_size=TINY,
        architectures=["conv4"],
        teachers_per_dataset=1,
        classes_per_teacher=5,
        epochs=epochs,
        max_images_per_class=10,
        **extra,
    )


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory, toy_dataset_name: str) -> Zoo:
    """One Conv4 teacher at 16 px on the toy dataset, one epoch: well under a second."""
    directory = tmp_path_factory.mktemp("faults-zoo")
    return train_zoo(_tiny_recipe(toy_dataset_name, "faults", 1), directory, progress=False)


@pytest.fixture(scope="module")
def fault_spec(ss_run_spec: Callable[..., RunSpec]) -> Callable[..., RunSpec]:
    """`fault_spec(method, zoo, run_dir, settings)`: a 16-px run, two episodes of each kind."""

    def spec(method: str, zoo: Zoo, run_dir: Path, settings: dict[str, Any]) -> RunSpec:
        evaluation = EvaluationSettings(episodes=2, val_episodes=2, queries=1, inner_steps=1)
        return ss_run_spec(
            method,
            zoo.directory,
            run_dir,
            evaluation,
            settings=settings,
            meta_model=MetaModelSpec(image_size=TINY),
        )

    return spec


def _teachers_turn_nan(monkeypatch: pytest.MonkeyPatch, from_call: int) -> None:
    """Every teacher outputs NaN from its `from_call`-th forward pass on (a teacher overflowing
    mid-run, as one in bfloat16 might): the inversion loss goes non-finite at that step."""
    load = Zoo.load_teacher

    def load_teacher(self: Zoo, index: int, *args: Any, **kwargs: Any) -> torch.nn.Module:
        teacher = load(self, index, *args, **kwargs)
        calls = 0

        def poison(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return output * math.nan if calls >= from_call else output

        teacher.register_forward_hook(poison)
        return teacher

    monkeypatch.setattr(Zoo, "load_teacher", load_teacher)


def _run_fails(spec: RunSpec) -> str:
    with pytest.raises(DfmlError) as caught:
        execute_run(spec, progress=False)
    assert not list(Path(spec.run_dir).glob("record-*.json")), "a diverged run wrote a record"
    message = str(caught.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        pytest.param(
            "inversion",
            r"purer-no-icfil: non-finite inversion loss at meta-iteration 3 \(.*\); lower pool_lr",
            id="inversion",
        ),
        pytest.param(
            "outer_lr",
            r"purer-no-icfil: non-finite meta-loss at meta-iteration 2; lower outer_lr",
            id="outer_lr",
        ),
    ],
)
def test_purer_stops_at_the_first_non_finite_loss_and_records_nothing(
    tiny_zoo: Zoo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    expected: str,
    fault_spec: Callable[..., RunSpec],
) -> None:
    """The teacher turns NaN at meta-iteration 3 (one loop-strategy pass per iteration), or an
    outer learning rate of 1e30 blows the meta-model up in its first Adam step. (PURER's
    meta-training without ICFIL, whose evaluation would take most of the time.)"""
    settings = dict(PURER)
    if fault == "inversion":
        _teachers_turn_nan(monkeypatch, from_call=3)
    else:
        settings["outer_lr"] = 1e30
    message = _run_fails(fault_spec("purer-no-icfil", tiny_zoo, tmp_path / "run", settings))
    assert re.fullmatch(expected, message), message


@pytest.mark.parametrize("fault", ["inversion", "outer_lr"])
def test_free_stops_on_a_non_finite_loss_and_records_nothing(
    tiny_zoo: Zoo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    fault_spec: Callable[..., RunSpec],
) -> None:
    """A NaN teacher from its first pass (generator, images and distilled meta-learner go NaN in
    epoch 1), or an outer learning rate of 1e30 (the alignment step of epoch 1, taken by the
    same optimiser, blows the meta-learner up; the first replay meta-batch meets a NaN loss)."""
    settings = dict(FREE)
    if fault == "inversion":
        _teachers_turn_nan(monkeypatch, from_call=1)
    else:
        settings["outer_lr"] = 1e30
    message = _run_fails(fault_spec("free", tiny_zoo, tmp_path / "run", settings))
    expected = {
        "inversion": r"free: non-finite recovered images at epoch 1 .*; lower generator_lr .*",
        "outer_lr": r"free: non-finite meta-loss in replay at epoch 1, meta-batch 1; "
        r"lower outer_lr",
    }[fault]
    assert re.fullmatch(expected, message), message


def test_oracle_stops_at_a_non_finite_meta_loss_and_records_nothing(
    tiny_zoo: Zoo, tmp_path: Path, fault_spec: Callable[..., RunSpec]
) -> None:
    settings = {
        "iterations": 4,
        "eval_interval": 2,
        "meta_batch": 1,
        "queries": 1,
        "outer_lr": 1e30,
    }
    message = _run_fails(fault_spec("oracle", tiny_zoo, tmp_path / "run", settings))
    assert message == "oracle: non-finite meta-loss at meta-iteration 2; lower outer_lr"


def test_dro_stops_at_a_non_finite_objective_and_records_nothing(
    tiny_zoo: Zoo, tmp_path: Path, fault_spec: Callable[..., RunSpec]
) -> None:
    settings = {"iterations": 4, "eval_interval": 2, "inversion_steps": 1, "lr": 1e30}
    message = _run_fails(fault_spec("dro", tiny_zoo, tmp_path / "run", settings))
    assert re.fullmatch(
        r"dro: non-finite objective at iteration \d; lower lr or ascent_lr", message
    )


def test_dro_stops_when_inversion_diverges(
    tiny_zoo: Zoo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault_spec: Callable[..., RunSpec],
) -> None:
    _teachers_turn_nan(monkeypatch, from_call=1)
    settings = {"iterations": 2, "eval_interval": None, "inversion_steps": 1}
    message = _run_fails(fault_spec("dro", tiny_zoo, tmp_path / "run", settings))
    assert message == "dro: inversion produced non-finite images; lower inversion_lr"


def test_runner_never_records_a_model_with_non_finite_weights(
    tiny_zoo: Zoo,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault_spec: Callable[..., RunSpec],
) -> None:
    """The last line of defence for a method without its own check: a NaN model still predicts
    some class, so its accuracy would look like a number."""
    from dfml_bench.methods import average

    build = average.average_of_zoo

    def diverged(*args: Any) -> torch.nn.Module:
        model = build(*args)
        with torch.no_grad():
            model.features[0][0].weight.fill_(math.nan)  # the head may be zeroed afterwards
        return model

    monkeypatch.setattr(average, "average_of_zoo", diverged)
    message = _run_fails(fault_spec("average", tiny_zoo, tmp_path / "run", {}))
    assert message.startswith("average: the meta-model at iteration 0 has non-finite weights")


def test_teacher_training_stops_when_its_weights_diverge(
    tmp_path: Path, toy_dataset_name: str
) -> None:
    recipe = _tiny_recipe(
        toy_dataset_name, "diverges", 2, optimizers={"conv4": {"name": "adam", "lr": 1e30}}
    )
    with pytest.raises(DfmlError, match=r"teacher 0 has non-finite weights after epoch \d"):
        train_zoo(recipe, tmp_path / "zoo", progress=False)
    assert not list((tmp_path / "zoo").glob("teacher-000.*"))
