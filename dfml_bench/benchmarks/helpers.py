"""Shared by the benchmarks: smoke sizes, the timing call that records device, torch and
settings in extra_info, and an in-memory dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from dfml_bench.data import ClassSplit, FewShotDataset
from dfml_bench.device import synchronize
from dfml_bench.environment import environment

SMOKE = os.environ.get("DFML_BENCH_SMOKE", "0") == "1"


def sized(full: int, smoke: int) -> int:
    """The benchmark's size, or a small one in smoke mode (CI checks the code paths only)."""
    return smoke if SMOKE else full


def measure(
    benchmark: Any,
    function: Callable[[], object],
    device: torch.device,
    *,
    group: str,
    variant: str,
    settings: str,
    baseline: bool = False,
    reference_ms: float | None = None,
    tasks_per_call: float | None = None,
    rounds: int = 5,
    opt_in: str | None = None,
) -> None:
    """Time `function` (CUDA synchronised after each call, one warm-up round) and record how.

    `opt_in` names the non-default setting a variant needs (bf16, compile): `dfml-bench estimate`
    leaves such variants out, as a config without that setting never runs them."""
    env = environment(device)
    benchmark.group = group
    benchmark.extra_info.update(
        variant=variant,
        baseline=baseline,
        settings=settings + (" [smoke]" if SMOKE else ""),
        device=env["device"],
        torch=env["packages"]["torch"],
        reference_ms=reference_ms,
        tasks_per_call=tasks_per_call,
        opt_in=opt_in,
    )

    def call() -> None:
        function()
        synchronize(device)

    benchmark.pedantic(call, rounds=1 if SMOKE else rounds, iterations=1, warmup_rounds=1)


def random_dataset(
    classes: int = 20, per_class: int = 40, image_size: int = 32, seed: int = 0
) -> FewShotDataset:
    """In-memory uint8 images: the timing of adaptation does not depend on what they show."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(
        0, 256, (classes * per_class, 3, image_size, image_size), generator=generator
    ).to(torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    split = ClassSplit(images, labels, tuple(f"c{i}" for i in range(classes)))
    return FewShotDataset("bench-random", image_size, {"train": split, "val": split, "test": split})
