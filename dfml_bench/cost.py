"""What a method's cost model reads: the shape of one run and the benchmarked rates of work.

`dfml-bench estimate` fills both from a config and a pytest-benchmark JSON; each method turns
them into seconds (`Method.meta_training_seconds`), so a new method brings its own formula.
"""

from __future__ import annotations

from dataclasses import dataclass


def task_images(ways: int, shots: int, queries: int, inner_steps: int) -> int:
    """Images one task sends through the network: the support per inner step, queries once."""
    return ways * (shots * inner_steps + queries)


@dataclass(frozen=True)
class WorkRates:
    """Seconds per image of each kind of work, for a network of conv4-at-32-px FLOPs."""

    eci_image: float  # one image through a teacher in an ECI data step (forward + backward)
    maml_image: float  # one image in a second-order MAML meta-batch
    replay_image: float  # one image in FREE's replay meta-batch
    generator_image: float  # one generated image in FREE's task recovery
    free_epoch_image: float  # one generated image in a FREE epoch without replay


@dataclass(frozen=True)
class RunShape:
    """One run's sizes: task shape, the meta-model's relative FLOPs and the zoo's load."""

    ways: int
    shots: int
    meta_flops: float  # forward FLOPs of one image through the meta-model, conv4 at 32 px = 1
    teacher_load: float  # images x FLOPs of one image per class through every teacher
    teachers: int

    def task(self, queries: int, inner_steps: int) -> int:
        return task_images(self.ways, self.shots, queries, inner_steps)
