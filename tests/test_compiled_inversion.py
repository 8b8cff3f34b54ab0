"""`inversion_compile`: the torch.compile'd vectorised DeepInversion loss equals the eager one,
for all teachers and for a gathered subset (FREE's sampled teachers), on CPU and (where present)
CUDA, and the setting is checked.

Compiling on a CPU needs a C++ compiler (inductor builds its kernels with it); without one the
compile test skips with that reason. One compile takes about 20-40 s here, so every case shares
one compiled zoo.
"""

import os
import shutil
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from dfml_bench.errors import ConfigError
from dfml_bench.inversion import DeepInversionWeights
from dfml_bench.inversion.vectorised import StackedTeachers, resolve_strategy
from dfml_bench.methods import create_method
from dfml_bench.models import build_model

RTOL = 1e-4
TEACHERS, CLASSES, SIZE = 3, 4, 16


def _cxx_available() -> bool:
    return any(shutil.which(name) for name in (os.environ.get("CXX", ""), "g++", "c++") if name)


def _teachers() -> list[nn.Module]:
    teachers = []
    for seed in range(TEACHERS):
        torch.manual_seed(seed)
        teacher = build_model("conv4", CLASSES, SIZE).eval().requires_grad_(False)
        for module in teacher.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
        teachers.append(teacher)
    return teachers


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.cuda),
    ],
)
def zoos(request: pytest.FixtureRequest) -> Iterator[tuple[StackedTeachers, StackedTeachers]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    teachers = [teacher.to(request.param) for teacher in _teachers()]
    yield StackedTeachers(teachers), StackedTeachers(teachers, compile=True)
    torch.set_num_threads(threads)


def _loss_and_gradients(
    zoo: StackedTeachers, indices: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    device = next(iter(zoo.groups[0].params.values())).device
    generator = torch.Generator().manual_seed(seed)
    images = [
        torch.randn(2 * CLASSES, 3, SIZE, SIZE, generator=generator).to(device).requires_grad_()
        for _ in indices
    ]
    targets = [torch.arange(CLASSES, device=device).repeat_interleave(2) for _ in indices]
    loss, logits = zoo.loss(images, targets, DeepInversionWeights(), 2, generator, indices)
    loss.total.backward()
    return loss.total.detach(), loss.terms, [image.grad for image in images], logits


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


@pytest.mark.skipif(not _cxx_available(), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize(
    "indices",
    [[0, 1, 2], [2, 0], [1, 2]],  # all in order, then two gathered subsets of the same shape
    ids=["all", "subset-2-0", "subset-1-2"],
)
def test_compiled_loss_and_gradients_equal_eager(
    zoos: tuple[StackedTeachers, StackedTeachers], indices: list[int]
) -> None:
    eager, compiled = zoos
    expected = _loss_and_gradients(eager, indices, seed=sum(indices))
    actual = _loss_and_gradients(compiled, indices, seed=sum(indices))
    assert _relative_error(actual[0], expected[0]) < RTOL
    assert _relative_error(actual[1], expected[1]) < RTOL
    for got, want in zip(actual[2], expected[2]):
        assert _relative_error(got, want) < RTOL
    for got, want in zip(actual[3], expected[3]):
        assert _relative_error(got, want) < RTOL


def test_compile_needs_the_vectorised_strategy() -> None:
    for method in ("purer", "purer-no-icfil"):
        with pytest.raises(ConfigError, match="inversion_compile compiles the vectorised"):
            create_method(method, {"inversion_compile": True, "inversion_strategy": "loop"})
        settings = create_method(method, {"inversion_compile": True}).settings
        assert settings.vectorised_on(torch.device("cpu"))
    assert resolve_strategy("auto", "cpu", compile=True) == "vectorised"
    assert not create_method("purer").settings.vectorised_on(torch.device("cpu"))
