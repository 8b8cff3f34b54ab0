"""Meta-test: fine-tune the meta-model on each episode's support set, score its queries.

The harness owns the episodes (seeded by the run seed, never by the method), so every method is
evaluated on exactly the same tasks and comparisons are paired.

Tasks are adapted one by one (CPU) or in chunks under one `torch.func.vmap` call (CUDA), see
`EvaluationSettings.task_batching`. Correct counts stay on the device until the end: no per-task
host sync in the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from dfml_bench.data.base import FewShotDataset
from dfml_bench.data.sampler import EpisodeSampler
from dfml_bench.device import synchronize
from dfml_bench.evaluation.icfil import IcfilSettings, icfil_calibrate
from dfml_bench.evaluation.stats import mean_ci95
from dfml_bench.meta.adaptation import (
    Params,
    TaskBatching,
    batched_logits,
    batches_tasks,
    finetune,
    finetune_batched,
    parameters_of,
)

VAL_SEED_OFFSET = 10_007  # meta-val episodes never coincide with meta-test episodes
ICFIL_SEED_OFFSET = 0x1CF1  # ICFIL's pseudo-image generator: a stream apart from the sampler's
FRESH_DRAW_OFFSET = 1_000_003  # test episodes of the k-th periodic evaluation: seed + k x this


class EvaluationSettings(BaseModel):
    """How test tasks are drawn and how the meta-model adapts to each one."""

    model_config = ConfigDict(extra="forbid")
    ways: int = Field(5, ge=2)
    episodes: int = Field(600, ge=2)
    val_episodes: int = Field(200, ge=2)
    queries: int = Field(15, ge=1)
    # fine-tuning at meta-test; None: the protocol of the method's paper (`Method.test_adaptation`)
    inner_steps: int | None = Field(None, ge=0)
    inner_lr: float | None = Field(None, gt=0)
    icfil: IcfilSettings = Field(default_factory=IcfilSettings)
    # auto: tasks one by one on CPU (vmap is ~2.6x slower there), in vmapped chunks on CUDA
    task_batching: TaskBatching = "auto"
    task_chunk: int = Field(100, ge=1)  # tasks per vmapped call when batching

    def with_adaptation(self, steps: int, lr: float) -> EvaluationSettings:
        """These settings with the method's fine-tuning wherever none was configured."""
        return self.model_copy(
            update={
                "inner_steps": steps if self.inner_steps is None else self.inner_steps,
                "inner_lr": lr if self.inner_lr is None else self.inner_lr,
            }
        )


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
    draw: int = 0,
) -> EvaluationResult:
    """Mean accuracy (percent) and 95% CI over seeded episodes of `dataset`'s `split`.

    `model` must use batch statistics in BatchNorm (see `use_batch_statistics`) and have a head
    of `settings.ways` outputs; images are resized when the model expects another size.
    `icfil` turns PURER's ICFIL calibration on or off after each inner loop (None: follow
    `settings.icfil.enabled`); its extra seconds per task are reported when on. `draw` k > 0
    samples another set of episodes (the same for every method at that k); draw 0 is the fixed
    set every protocol shares.
    """
    if settings.inner_steps is None or settings.inner_lr is None:
        raise ValueError("evaluation settings without inner_steps/inner_lr: resolve them first")
    use_icfil = bool(settings.icfil.enabled) if icfil is None else icfil
    episodes = settings.episodes if split == "test" else settings.val_episodes
    episode_seed = seed if split == "test" else seed + VAL_SEED_OFFSET
    if draw:  # a fresh set of test tasks (the paper protocol's periodic evaluations)
        episode_seed += draw * FRESH_DRAW_OFFSET
    sampler = EpisodeSampler(
        dataset.split(split), settings.ways, shots, settings.queries, episodes, episode_seed
    )
    # channels_last: BatchNorm and convolutions on CPU run about 2x faster in NHWC
    model = model.to(device, memory_format=torch.channels_last).train()
    init = parameters_of(model)
    image_size = getattr(model, "image_size", dataset.image_size)
    dtype = next(iter(init.values())).dtype
    chunk = settings.task_chunk if batches_tasks(settings.task_batching, device) else 1
    correct = torch.zeros(episodes, dtype=torch.int64, device=device)
    plain = torch.zeros_like(correct) if use_icfil else None
    icfil_seconds = 0.0
    bar = tqdm(
        total=episodes,
        desc=f"{dataset.name}/{split} {shots}-shot" + ("+icfil" if use_icfil else ""),
        disable=not progress,
        leave=False,
    )
    for start in range(0, episodes, chunk):
        indices = range(start, min(start + chunk, episodes))
        tasks = _adapt_chunk(model, init, sampler, indices, dataset, image_size, dtype, settings)
        support, support_labels, query, query_labels, adapted, logits = tasks
        hits = (logits.argmax(dim=-1) == query_labels).sum(dim=-1)
        if plain is None:
            correct[start : indices.stop] = hits
        else:  # one pass gives both accuracies, so ICFIL never re-adapts
            plain[start : indices.stop] = hits
            synchronize(device)
            began = time.perf_counter()
            calibrated = [
                icfil_calibrate(
                    model,
                    {name: value[task] for name, value in adapted.items()},
                    support[task],
                    support_labels[task],
                    settings.ways,
                    settings.icfil,
                    torch.Generator().manual_seed(
                        (episode_seed + ICFIL_SEED_OFFSET) * 1_000_003 + index
                    ),
                )
                for task, index in enumerate(indices)
            ]
            synchronize(device)
            icfil_seconds += time.perf_counter() - began
            for task, params in enumerate(calibrated):
                correct[start + task] = _hits(model, params, query[task], query_labels[task])
        bar.update(len(indices))
    bar.close()
    queries = settings.ways * settings.queries
    accuracies = 100.0 * (correct.cpu().double() / queries)
    plain_accuracies = None if plain is None else 100.0 * (plain.cpu().double() / queries)
    mean, ci95 = mean_ci95(accuracies)
    seconds_per_task = icfil_seconds / episodes if use_icfil else None
    return EvaluationResult(
        dataset.name, split, accuracies, mean, ci95, seconds_per_task, plain_accuracies
    )


class _AdaptedChunk(NamedTuple):
    """Tasks of one chunk (leading task dim), their adapted params and plain query logits."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    adapted: Params
    logits: torch.Tensor


def _adapt_chunk(
    model: nn.Module,
    init: Params,
    sampler: EpisodeSampler,
    indices: range,
    dataset: FewShotDataset,
    image_size: int,
    dtype: torch.dtype,
    settings: EvaluationSettings,
) -> _AdaptedChunk:
    """Adapt episodes `indices`: one task with plain autograd (fastest on CPU), several at once
    under vmap. A single task gets a task dim of 1 (views), so both paths share the scoring."""
    device = init[next(iter(init))].device
    steps, lr = settings.inner_steps, settings.inner_lr
    if len(indices) == 1:
        episode = sampler.episode(indices[0])
        support = _prepare(dataset, episode.support_images, image_size, device, dtype)
        query = _prepare(dataset, episode.query_images, image_size, device, dtype)
        support_labels = episode.support_labels.to(device)
        adapted = finetune(model, init, support, support_labels, steps, lr)
        with torch.no_grad():
            logits = torch.func.functional_call(model, adapted, (query,))
        return _AdaptedChunk(
            support[None],
            support_labels[None],
            query[None],
            episode.query_labels.to(device)[None],
            {name: value[None] for name, value in adapted.items()},
            logits[None],
        )
    batch = sampler.batch(indices)
    support = _prepare(dataset, batch.support_images, image_size, device, dtype)
    query = _prepare(dataset, batch.query_images, image_size, device, dtype)
    support_labels = batch.support_labels.to(device)
    adapted = finetune_batched(model, init, support, support_labels, steps, lr)
    with torch.no_grad():
        logits = batched_logits(model, adapted, query)
    return _AdaptedChunk(
        support, support_labels, query, batch.query_labels.to(device), adapted, logits
    )


def _hits(
    model: nn.Module, params: Params, query: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Correct query predictions of one task, as a device tensor (no host sync)."""
    with torch.no_grad():
        logits = torch.func.functional_call(model, params, (query,))
    return (logits.argmax(dim=1) == labels).sum()


def _prepare(
    dataset: FewShotDataset,
    images: torch.Tensor,
    image_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """uint8 images [..., 3, H, W] (one task, or tasks stacked) -> normalised model inputs.

    One task comes out channels_last (fast CPU kernels); stacked tasks stay contiguous, as vmap
    folds the task dim into the batch or channel dim anyway."""
    images = dataset.normalize(images.to(device)).to(dtype)
    if images.shape[-1] != image_size:
        flat = images.flatten(0, -4)
        flat = F.interpolate(
            flat, size=image_size, mode="bilinear", antialias=True, align_corners=False
        )
        images = flat.view(*images.shape[:-2], image_size, image_size)
    if images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images.contiguous()
