"""Published reference numbers, cited: the PURER paper's main table (5-way, mean +- 95% CI).

Source: Hu et al., "Architecture, Dataset and Model-Scale Agnostic Data-free Meta-Learning"
(PURER, CVPR 2023), the poster's main results table (code: github.com/Egg-Hu/PURER). The CIFAR-FS
cells of Average and OTA are merged into one row in the poster;
they are kept here but marked unconfirmed and left out of comparisons by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

CITATION = (
    "PURER main results table (5-way, mean ± 95% CI): Hu et al., CVPR 2023, github.com/Egg-Hu/PURER"
)


@dataclass(frozen=True)
class PublishedCell:
    scenario: str
    dataset: str
    method: str
    shots: int
    mean: float
    ci95: float | None
    confirmed: bool = True


def _cells(
    scenario: str,
    dataset: str,
    method: str,
    one: tuple[float, float | None],
    five: tuple[float, float | None],
    confirmed: bool = True,
) -> list[PublishedCell]:
    return [
        PublishedCell(scenario, dataset, method, 1, *one, confirmed),
        PublishedCell(scenario, dataset, method, 5, *five, confirmed),
    ]


PUBLISHED: tuple[PublishedCell, ...] = tuple(
    cell
    for cells in (
        _cells("ss", "CIFAR-FS", "random", (21.65, 0.45), (21.59, 0.45)),
        _cells("ss", "CIFAR-FS", "average", (28.12, 0.62), (32.13, None), confirmed=False),
        _cells("ss", "CIFAR-FS", "ota", (29.10, 0.65), (34.33, 0.67), confirmed=False),
        _cells("ss", "CIFAR-FS", "dro", (23.92, 0.49), (24.34, 0.49)),
        _cells("ss", "CIFAR-FS", "purer", (38.66, 0.78), (51.95, 0.79)),
        _cells("ss", "MiniImageNet", "random", (22.45, 0.41), (23.48, 0.45)),
        _cells("ss", "MiniImageNet", "average", (22.87, 0.39), (26.13, 0.43)),
        _cells("ss", "MiniImageNet", "ota", (24.22, 0.53), (27.22, 0.59)),
        _cells("ss", "MiniImageNet", "dro", (23.96, 0.42), (25.81, 0.41)),
        _cells("ss", "MiniImageNet", "purer", (31.14, 0.63), (40.86, 0.64)),
        _cells("sh", "CIFAR-FS", "random", (21.65, 0.45), (21.59, 0.45)),
        _cells("sh", "CIFAR-FS", "purer", (39.15, 0.70), (49.08, 0.74)),
        _cells("sh", "MiniImageNet", "random", (22.45, 0.41), (23.48, 0.45)),
        _cells("sh", "MiniImageNet", "purer", (28.76, 0.60), (35.19, 0.64)),
        _cells("mh", "mixed", "random", (21.11, 0.41), (21.34, 0.40)),
        _cells("mh", "mixed", "purer", (28.50, 0.63), (33.10, 0.69)),
    )
    for cell in cells
)


def published_frame(include_unconfirmed: bool = False) -> pd.DataFrame:
    """The published cells as a frame (scenario, dataset, method, shots, mean, ci95, confirmed)."""
    frame = pd.DataFrame([cell.__dict__ for cell in PUBLISHED])
    return frame if include_unconfirmed else frame[frame["confirmed"]].reset_index(drop=True)
