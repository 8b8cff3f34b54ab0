"""Meta-test: fine-tune the meta-model on each episode's support set, score its queries.

The harness owns the episodes (seeded by the run seed, never by the method), so every method is
evaluated on exactly the same tasks and comparisons are paired.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from dfml_bench.data.base import FewShotDataset
from dfml_bench.data.sampler import EpisodeSampler
from dfml_bench.device import synchronize
from dfml_bench.evaluation.adaptation import finetune, parameters_of
from dfml_bench.evaluation.icfil import IcfilSettings, icfil_calibrate
from dfml_bench.evaluation.stats import mean_ci95

VAL_SEED_OFFSET = 10_007  # meta-val episodes never coincide with meta-test episodes
ICFIL_SEED_OFFSET = 0x1CF1  # ICFIL's pseudo-image generator: a stream apart from the sampler's


class EvaluationSettings(BaseModel):
    """How test tasks are drawn and how the meta-model adapts to each one."""

    model_config = ConfigDict(extra="forbid")
    ways: int = Field(5, ge=2)
    episodes: int = Field(600, ge=2)
    val_episodes: int = Field(200, ge=2)
    queries: int = Field(15, ge=1)
    inner_steps: int = Field(10, ge=0)
    inner_lr: float = Field(0.01, gt=0)
    icfil: IcfilSettings = Field(default_factory=IcfilSettings)


@dataclass(frozen=True)
class EvaluationResult:
    dataset: str
    split: str
    accuracies: torch.Tensor  # per-episode accuracy in percent
    mean: float
    ci95: float
    icfil_seconds_per_task: float | None = None  # extra time ICFIL took per task; None when off
    plain_accuracies: torch.Tensor | None = None  # with ICFIL on: the same tasks without it

    @property
    def plain_mean(self) -> float:
        """Mean accuracy without ICFIL (equals `mean` when ICFIL is off)."""
        if self.plain_accuracies is None:
            return self.mean
        return float(self.plain_accuracies.mean())

    @property
    def episodes(self) -> int:
        return int(self.accuracies.numel())


def evaluate(
    model: nn.Module,
    dataset: FewShotDataset,
    split: str,
    shots: int,
    settings: EvaluationSettings,
    seed: int,
    device: torch.device,
    progress: bool = True,
    *,
    icfil: bool | None = None,
) -> EvaluationResult:
    """Mean accuracy (percent) and 95% CI over seeded episodes of `dataset`'s `split`.

    `model` must use batch statistics in BatchNorm (see `use_batch_statistics`) and have a head
    of `settings.ways` outputs; images are resized when the model expects another size.
    `icfil` turns PURER's ICFIL calibration on or off after each inner loop (None: follow
    `settings.icfil.enabled`); its extra seconds per task are reported when on.
    """
    use_icfil = settings.icfil.enabled if icfil is None else icfil
    episodes = settings.episodes if split == "test" else settings.val_episodes
    episode_seed = seed if split == "test" else seed + VAL_SEED_OFFSET
    sampler = EpisodeSampler(
        dataset.split(split), settings.ways, shots, settings.queries, episodes, episode_seed
    )
    # channels_last: BatchNorm and convolutions on CPU run about 2x faster in NHWC
    model = model.to(device, memory_format=torch.channels_last).train()
    init = parameters_of(model)
    image_size = getattr(model, "image_size", dataset.image_size)
    accuracies = torch.empty(episodes, dtype=torch.float64)
    iterator = tqdm(
        sampler,
        desc=f"{dataset.name}/{split} {shots}-shot" + ("+icfil" if use_icfil else ""),
        disable=not progress,
        leave=False,
    )
    icfil_seconds = 0.0
    plain = torch.empty(episodes, dtype=torch.float64) if use_icfil else None
    for index, episode in enumerate(iterator):
        support = _prepare(dataset, episode.support_images, image_size, device)
        query = _prepare(dataset, episode.query_images, image_size, device)
        adapted = finetune(
            model,
            init,
            support,
            episode.support_labels.to(device),
            settings.inner_steps,
            settings.inner_lr,
        )
        if plain is not None:  # one pass gives both accuracies, so ICFIL never re-adapts
            with torch.no_grad():
                logits = torch.func.functional_call(model, adapted, (query,))
            plain[index] = 100.0 * (logits.argmax(1).cpu() == episode.query_labels).double().mean()
            generator = torch.Generator().manual_seed(
                (episode_seed + ICFIL_SEED_OFFSET) * 1_000_003 + index
            )
            synchronize(device)
            start = time.perf_counter()
            adapted = icfil_calibrate(
                model,
                adapted,
                support,
                episode.support_labels.to(device),
                settings.ways,
                settings.icfil,
                generator,
            )
            synchronize(device)
            icfil_seconds += time.perf_counter() - start
        with torch.no_grad():
            logits = torch.func.functional_call(model, adapted, (query,))
        correct = (logits.argmax(dim=1).cpu() == episode.query_labels).double().mean()
        accuracies[index] = 100.0 * correct
    mean, ci95 = mean_ci95(accuracies)
    seconds_per_task = icfil_seconds / episodes if use_icfil else None
    return EvaluationResult(dataset.name, split, accuracies, mean, ci95, seconds_per_task, plain)


def _prepare(
    dataset: FewShotDataset, images: torch.Tensor, image_size: int, device: torch.device
) -> torch.Tensor:
    images = dataset.normalize(images.to(device))
    if images.shape[-1] != image_size:
        images = F.interpolate(
            images, size=image_size, mode="bilinear", antialias=True, align_corners=False
        )
    return images.contiguous(memory_format=torch.channels_last)
