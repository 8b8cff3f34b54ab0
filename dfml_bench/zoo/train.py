"""Pre-train a zoo of teachers from a recipe: resumable per teacher, keeping the best epoch on
held-out data or the last one (the recipe's `keep_epoch`)."""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dfml_bench import atomic
from dfml_bench.data import FewShotDataset, load_dataset
from dfml_bench.environment import environment
from dfml_bench.errors import ConfigError, DfmlError
from dfml_bench.models import build_model
from dfml_bench.models.finite import non_finite_parameters
from dfml_bench.models.storage import file_sha256, save_state
from dfml_bench.resume import StateStore, load_snapshot, snapshot
from dfml_bench.zoo.manifest import TeacherRecord, Zoo, ZooManifest
from dfml_bench.zoo.recipe import ZooRecipe


@dataclass(frozen=True)
class TeacherPlan:
    index: int
    dataset: str
    architecture: str
    dataset_class_indices: tuple[int, ...]
    seed: int


def class_offsets(recipe: ZooRecipe, datasets: dict[str, FewShotDataset]) -> dict[str, int]:
    """Absolute class id = offset of the dataset + index in its meta-train split (MH keeps
    classes of different datasets apart)."""
    offsets, total = {}, 0
    for name in recipe.datasets:
        offsets[name] = total
        total += datasets[name].split("train").num_classes
    return offsets


def plan_teachers(recipe: ZooRecipe, datasets: dict[str, FewShotDataset]) -> list[TeacherPlan]:
    """Deterministic class subsets and architectures of every teacher of the recipe."""
    plans: list[TeacherPlan] = []
    for dataset_index, name in enumerate(recipe.datasets):
        num_classes = datasets[name].split("train").num_classes
        rng = random.Random(recipe.seed * 7919 + dataset_index)
        if recipe.classes_per_teacher > num_classes:
            raise ConfigError(
                f"recipe {recipe.name}: classes_per_teacher={recipe.classes_per_teacher} but "
                f"{name} has only {num_classes} meta-train classes"
            )
        if recipe.class_policy == "disjoint":
            order = rng.sample(range(num_classes), num_classes)
            k = recipe.classes_per_teacher
            subsets = [sorted(order[start : start + k]) for start in range(0, num_classes, k)]
            subsets = [subset for subset in subsets if len(subset) >= 2]
            count = recipe.teachers_per_dataset or len(subsets)
            if count > len(subsets):
                raise ConfigError(
                    f"recipe {recipe.name}: {count} disjoint teachers of {k} classes do not fit in "
                    f"the {num_classes} meta-train classes of {name}; use class_policy: random"
                )
            subsets = subsets[:count]
        else:
            count = recipe.teachers_per_dataset or num_classes // recipe.classes_per_teacher
            subsets = [
                sorted(rng.sample(range(num_classes), recipe.classes_per_teacher))
                for _ in range(count)
            ]
        for subset in subsets:
            index = len(plans)
            architecture = recipe.architectures[index % len(recipe.architectures)]
            plans.append(TeacherPlan(index, name, architecture, tuple(subset), recipe.seed + index))
    return plans


def train_zoo(
    recipe: ZooRecipe,
    out_dir: Path,
    *,
    data_root: Path | None = None,
    cache_dir: Path | None = None,
    device: torch.device | None = None,
    progress: bool = True,
    state_interval_s: float | None = 300.0,
) -> Zoo:
    """Train every teacher of `recipe` not already in `out_dir`, then write the manifest.

    A teacher's training state is saved every `state_interval_s` seconds (None: never), so
    a killed training continues from its last epoch saved instead of from scratch."""
    device = device or torch.device("cpu")
    datasets = {
        name: load_dataset(name, recipe.image_size, data_root=data_root, cache_dir=cache_dir)
        for name in recipe.datasets
    }
    offsets = class_offsets(recipe, datasets)
    recipe_hash = recipe.fingerprint()
    records = []
    plans = plan_teachers(recipe, datasets)
    for plan in tqdm(plans, desc=f"zoo {recipe.name}", disable=not progress):
        record = _finished_record(out_dir, plan, recipe_hash)
        if record is None:
            record = _train_teacher(
                recipe,
                plan,
                datasets[plan.dataset],
                offsets,
                out_dir,
                device,
                recipe_hash,
                progress,
                state_interval_s,
            )
        records.append(record)
    manifest = ZooManifest(
        recipe_name=recipe.name,
        recipe_hash=recipe_hash,
        recipe=recipe.model_dump(),
        class_offsets=offsets,
        teachers=records,
        environment=environment(device),
    )
    zoo = Zoo(out_dir, manifest)
    zoo.write()
    return zoo


def _sidecar(out_dir: Path, index: int) -> Path:
    return out_dir / f"teacher-{index:03d}.json"


def _finished_record(out_dir: Path, plan: TeacherPlan, recipe_hash: str) -> TeacherRecord | None:
    """A teacher counts as done when its record matches this recipe and its file's checksum."""
    sidecar = _sidecar(out_dir, plan.index)
    if not sidecar.is_file():
        return None
    try:
        record = TeacherRecord.model_validate(json.loads(sidecar.read_text()))
    except ValueError:
        return None
    weights = out_dir / record.file
    if record.recipe_hash != recipe_hash or not weights.is_file():
        return None
    return record if file_sha256(weights) == record.sha256 else None


def _split_heldout(
    labels: torch.Tensor, classes: tuple[int, ...], fraction: float, cap: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: shuffle its images, keep at most `cap`, hold out `fraction` of them."""
    generator = torch.Generator().manual_seed(seed)
    train, heldout = [], []
    for class_index in classes:
        members = torch.nonzero(labels == class_index).flatten()
        members = members[torch.randperm(len(members), generator=generator)][:cap]
        cut = max(1, int(round(len(members) * fraction)))
        heldout.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train), torch.cat(heldout)


def _train_teacher(
    recipe: ZooRecipe,
    plan: TeacherPlan,
    dataset: FewShotDataset,
    offsets: dict[str, int],
    out_dir: Path,
    device: torch.device,
    recipe_hash: str,
    progress: bool,
    state_interval_s: float | None,
) -> TeacherRecord:
    started = time.perf_counter()
    torch.manual_seed(plan.seed)
    split = dataset.split("train")
    train_index, heldout_index = _split_heldout(
        split.labels,
        plan.dataset_class_indices,
        recipe.heldout_fraction,
        recipe.max_images_per_class,
        plan.seed,
    )
    relabel = torch.full((split.num_classes,), -1, dtype=torch.long)
    relabel[list(plan.dataset_class_indices)] = torch.arange(len(plan.dataset_class_indices))
    # channels_last: convolutions and BatchNorm on CPU run about 2x faster in NHWC
    channels_last = torch.channels_last
    train_x = dataset.normalize(split.images[train_index]).to(device, memory_format=channels_last)
    train_y = relabel[split.labels[train_index]].to(device)
    heldout_x = dataset.normalize(split.images[heldout_index]).to(
        device, memory_format=channels_last
    )
    heldout_y = relabel[split.labels[heldout_index]].to(device)

    model = build_model(
        plan.architecture, len(plan.dataset_class_indices), recipe.image_size, recipe.init
    )
    model = model.to(device, memory_format=channels_last)
    spec = recipe.optimizer_for(plan.architecture)
    if spec.name == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    milestones = recipe.milestone_epochs(plan.architecture)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=recipe.lr_decay)

    keep_last = recipe.keep_epoch == "last"
    # best_state stays None with keep_last: only the final weights are saved, no copy needed
    best_accuracy, best_epoch, best_state = -1.0, 0, None
    last_accuracy, last_epoch = -1.0, 0

    stateful = {"model": model, "optimizer": optimizer, "scheduler": scheduler}

    def state() -> dict[str, object]:
        return snapshot(stateful) | {
            "best": [best_accuracy, best_epoch, best_state],
            "last": [last_accuracy, last_epoch],
            "seconds": time.perf_counter() - started,
        }

    state_store = StateStore(
        out_dir / "resume" / f"teacher-{plan.index:03d}",
        f"{recipe_hash}:{plan.index}",
        state_interval_s,
    )
    done = 0
    restored = state_store.restore_method()
    if restored is not None:
        done, saved = restored
        load_snapshot(stateful, saved)
        best_accuracy, best_epoch, best_state = saved["best"]
        # states saved before "last" existed belong to keep_epoch "best" recipes, which ignore it
        last_accuracy, last_epoch = saved.get("last", (-1.0, done))
        started -= saved["seconds"]  # the record's train_seconds spans every attempt
    epochs = tqdm(
        range(done + 1, recipe.epochs + 1),
        initial=done,
        total=recipe.epochs,
        desc=f"teacher {plan.index}",
        leave=False,
        disable=not progress,
    )
    for epoch in epochs:
        model.train()
        order = torch.randperm(len(train_y), device=device)
        for start in range(0, len(order), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
        scheduler.step()
        if non_finite_parameters(model):
            raise DfmlError(
                f"recipe {recipe.name}: teacher {plan.index} has non-finite weights after epoch "
                f"{epoch}; lower its learning rate (optimizers in the recipe)"
            )
        accuracy = _accuracy(model, heldout_x, heldout_y)
        epochs.set_postfix(heldout=f"{accuracy:.1f}%")
        last_accuracy, last_epoch = accuracy, epoch
        if accuracy > best_accuracy:
            best_accuracy, best_epoch = accuracy, epoch
            if not keep_last:
                best_state = copy.deepcopy(model.state_dict())
        state_store.step(epoch, state)

    if keep_last:
        kept_state, kept_accuracy, kept_epoch = model.state_dict(), last_accuracy, last_epoch
    else:
        kept_state, kept_accuracy, kept_epoch = best_state, best_accuracy, best_epoch
    file_name = f"teacher-{plan.index:03d}.safetensors"
    sha256 = save_state(kept_state, out_dir / file_name)
    offset = offsets[plan.dataset]
    record = TeacherRecord(
        index=plan.index,
        file=file_name,
        sha256=sha256,
        architecture=plan.architecture,
        dataset=plan.dataset,
        image_size=recipe.image_size,
        class_ids=[offset + c for c in plan.dataset_class_indices],
        dataset_class_indices=list(plan.dataset_class_indices),
        class_names=[split.class_names[c] for c in plan.dataset_class_indices],
        heldout_accuracy=kept_accuracy,
        best_epoch=best_epoch,
        kept_epoch=kept_epoch,
        train_images=len(train_y),
        seed=plan.seed,
        recipe_hash=recipe_hash,
        train_seconds=time.perf_counter() - started,
    )
    atomic.write_json(_sidecar(out_dir, plan.index), record.model_dump())
    state_store.clear()
    return record


@torch.no_grad()
def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), 512):
        logits = model(images[start : start + 512])
        correct += int((logits.argmax(1) == labels[start : start + 512]).sum())
    return 100.0 * correct / len(labels)
