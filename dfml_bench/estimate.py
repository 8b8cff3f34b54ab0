"""Wall-time estimate of a workflow config before running it (`dfml-bench estimate`).

Paper-scale budgets take days; this says how many, per job of the Snakemake DAG, from the
pytest-benchmark medians of one device (`dfml-bench bench`), so a user can pick a machine first.
Every cost is a benchmark median times a ratio of work to the benchmark's own work, so the
estimate is linear in every budget (iterations, epochs, episodes, checkpoints). The ratios are
first-order models, listed by `assumptions()` (each method declares its own) and printed with
the estimate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, cast

from dfml_bench.config import WorkflowConfig, all_runs, load_workflow_config, run_spec
from dfml_bench.cost import RunShape, WorkRates, task_images
from dfml_bench.errors import DfmlError
from dfml_bench.evaluation.harness import EvaluationSettings
from dfml_bench.zoo.recipe import ZooRecipe, load_recipe

DEFAULT_BENCH = Path("results/reference/bench/bench-cpu.json")

# Meta-train classes and images per class of each registered dataset (the zoo plan and the
# pre-training cost need them without loading the data). CUB: 11,788 images / 200 classes.
META_TRAIN_CLASSES = {
    "cifar-fs": 64,
    "miniimagenet": 64,
    "tiny-imagenet": 64,
    "cub": 100,
    "omniglot": 771,  # 964 background characters minus the 193 held out for meta-val
    "glyphs": 64,
    "glyphs-latin": 22,
    "glyphs-greek-cyrillic": 21,
    "glyphs-armenian-georgian": 21,
}
IMAGES_PER_CLASS = {
    "cifar-fs": 600,
    "miniimagenet": 600,
    "tiny-imagenet": 500,
    "cub": 59,
    "omniglot": 20,
    "glyphs": 500,
    "glyphs-latin": 500,
    "glyphs-greek-cyrillic": 500,
    "glyphs-armenian-georgian": 500,
}

# Zoo pre-training, seconds per image-epoch at 32 px, from the default run's Snakemake benchmark
# files (results/reference/benchmarks/zoo/*.tsv; glyphs, 120 images per class, 4 epochs, same
# 2-core CPU as bench-cpu.json). conv4: ss-glyphs-conv4, 17.99 s / (64 classes x 120 x 4).
# ResNet (mean of ResNet-10 and -18): the SH and MH zoos (mean 25.73 s for 2 Conv4 + 4 ResNet
# teachers of 5 classes x 120 x 4) minus their Conv4 share, over 9,600 ResNet image-epochs.
ZOO_S_PER_IMAGE_EPOCH = {
    "conv4": 17.99 / 30_720,
    "resnet": (25.725 - 4_800 * 17.99 / 30_720) / 9_600,
}
ZOO_REFERENCE_DEVICE = "cpu (AMD EPYC, 2 threads), one job at a time"

# What each benchmark of dfml_bench/benchmarks times (its work is the denominator of every ratio).
ECI = "PURER ECI data step"  # 13 conv4 teachers x 5 classes x 20 images, 32 px
PURER_ITERATION = "PURER meta-iteration"  # that data step + 4 tasks 5-way 5-shot, 1 step
FREE_SYNTH = "FREE synthesize (4 teachers x 5 steps)"  # 4 conv4 teachers x 5 x 20, width 64
FREE_EPOCH = "FREE epoch without replay"  # synthesis + KD into the meta-learner
MAML_BATCH = "MAML meta-batch (4 tasks)"  # 5-way 1-shot, 15 queries, 1 inner step
META_TEST = "meta-test"  # N tasks 5-way 1-shot, 15 queries, 10 inner steps (N in its name)
BENCH_ECI_IMAGES = 13 * 5 * 20

ASSUMPTIONS = (
    "time is proportional to images passed through a network x its forward FLOPs (conv4 at "
    "32 px = 1): support images per inner step plus queries once per task, teacher images per "
    "data step; so image size and architecture scale by FLOPs, overheads of small batches are "
    "not modelled",
    "each benchmark group's fastest variant among those `auto` may pick is used (variants that "
    "need an opt-in setting, such as bfloat16 or torch.compile, are left out)",
    "the time-to-quality probes that end PURER and FREE runs (at most probes x max_steps "
    "updates per recoverer, usually far fewer) are not counted",
    "evaluation: checkpoints x datasets x (test episodes, with ICFIL's inversion and "
    "calibration images for PURER) + meta-val episodes when there are several checkpoints",
    f"zoo: image-epochs x seconds per image-epoch measured on {ZOO_REFERENCE_DEVICE} "
    "(results/reference/benchmarks/zoo, CloserLook ResNet stems), scaled by the FLOPs of the "
    "recipe's image size and architecture (the authors' ResNet stem: ~15x the FLOPs, so an "
    "overestimate: a ResNet-18 teacher took 7-11x as long on a 2-core CPU)",
    "job start-up, data decoding and Snakemake overhead are not counted; jobs run one at a time",
)


def assumptions() -> list[str]:
    """The general assumptions, then each registered method's own cost model."""
    from dfml_bench.methods import registered_methods
    from dfml_bench.methods.base import NoMetaTraining

    methods = [cls for cls in registered_methods() if cls.ablation_of is None]
    declared = [cls.cost_assumption for cls in methods if cls.cost_assumption]
    untrained = [cls.display_name for cls in methods if issubclass(cls, NoMetaTraining)]
    declared.append(f"{', '.join(untrained)}: no meta-training cost")
    return [*ASSUMPTIONS[:2], *declared, *ASSUMPTIONS[2:]]


@dataclass(frozen=True)
class JobEstimate:
    """One job of the DAG: `train_s` is the part that scales with the training budget."""

    rule: str
    name: str
    train_s: float
    evaluation_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.train_s + self.evaluation_s


@dataclass(frozen=True)
class Estimate:
    device: str
    bench: Path
    jobs: list[JobEstimate]

    @property
    def total_s(self) -> float:
        return sum(job.seconds for job in self.jobs)


class BenchMedians:
    """Median seconds per benchmark group of one pytest-benchmark JSON: the fastest variant that
    runs under default settings (one marked `opt_in` would not run for a config without it)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise DfmlError(f"benchmark JSON {path} not found; write one with `dfml-bench bench`")
        try:
            raw = json.loads(path.read_text())
            benchmarks = raw["benchmarks"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DfmlError(
                f"{path} is not a pytest-benchmark JSON (no 'benchmarks' list)"
            ) from None
        self.path = path
        self.medians: dict[str, float] = {}
        self.tasks: dict[str, float] = {}
        self.device = "unknown device"
        for entry in benchmarks:
            group, median = entry.get("group") or entry["name"], entry["stats"]["median"]
            extra = entry.get("extra_info", {})
            self.device = extra.get("device", self.device)
            if extra.get("opt_in"):
                continue
            if median < self.medians.get(group, float("inf")):
                self.medians[group] = median
                self.tasks[group] = extra.get("tasks_per_call") or 1

    def __getitem__(self, group: str) -> float:
        matches = [name for name in self.medians if name == group or name.startswith(group + " (")]
        if not matches:
            raise DfmlError(f"{self.path} has no '{group}' benchmark; rerun `dfml-bench bench`")
        return self.medians[matches[0]]

    def per_task(self, group: str) -> float:
        name = next(name for name in self.medians if name.startswith(group + " ("))
        return self[name] / self.tasks[name]


@cache
def flops(architecture: str, image_size: int) -> float:
    """Forward FLOPs of one image, relative to conv4 at 32 px."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dfml_bench.models import build_model

    def count(arch: str, size: int) -> float:
        model = build_model(arch, 5, size).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        return float(counter.get_total_flops())

    return count(architecture, image_size) / count("conv4", 32)


@dataclass(frozen=True)
class _ClassCount:
    """Stands in for a dataset in `plan_teachers`, which reads only meta-train class counts."""

    num_classes: int

    def split(self, name: str) -> _ClassCount:
        return self


def teacher_shapes(recipe: ZooRecipe) -> list[tuple[str, str, int]]:
    """(dataset, architecture, classes) of every teacher the recipe trains."""
    from dfml_bench.zoo.train import plan_teachers

    unknown = sorted(set(recipe.datasets) - set(META_TRAIN_CLASSES))
    if unknown:
        raise DfmlError(f"no class counts for datasets {unknown} in dfml_bench/estimate.py")
    counts = {name: _ClassCount(META_TRAIN_CLASSES[name]) for name in recipe.datasets}
    plans = plan_teachers(recipe, cast(Any, counts))
    return [(plan.dataset, plan.architecture, len(plan.dataset_class_indices)) for plan in plans]


def zoo_seconds(recipe: ZooRecipe) -> float:
    """Pre-training: image-epochs x the measured per-image-epoch constant of the family."""
    total = 0.0
    for dataset, architecture, classes in teacher_shapes(recipe):
        images = classes * min(IMAGES_PER_CLASS[dataset], recipe.max_images_per_class or 10**9)
        family = "resnet" if architecture.startswith("resnet") else "conv4"
        scale = flops(architecture, recipe.image_size) / flops(_timed_counterpart(architecture), 32)
        total += images * recipe.epochs * ZOO_S_PER_IMAGE_EPOCH[family] * scale
    return total


def _timed_counterpart(architecture: str) -> str:
    """The architecture whose pre-training `ZOO_S_PER_IMAGE_EPOCH` timed: the authors' ResNet stem
    keeps stage 1 at full resolution (~15x the FLOPs), so it scales from the CloserLook one."""
    return architecture.removesuffix("-authors")


class _RunCosts:
    """Per-run cost model of one config against one set of benchmark medians."""

    def __init__(self, config: WorkflowConfig, bench: BenchMedians) -> None:
        self.config, self.bench = config, bench
        self.recipes: dict[str, ZooRecipe] = {}
        recipes_dir = Path(config.recipes_dir)
        for entry in config.scenarios.values():
            if entry.recipe not in self.recipes:
                self.recipes[entry.recipe] = load_recipe(recipes_dir / f"{entry.recipe}.yaml")
        # seconds per image (x FLOPs) of each kind of work, from the benchmarks' own sizes
        self.rates = WorkRates(
            eci_image=bench[ECI] / BENCH_ECI_IMAGES,
            maml_image=(bench[PURER_ITERATION] - bench[ECI]) / (4 * task_images(5, 5, 15, 1)),
            replay_image=bench[MAML_BATCH] / (4 * task_images(5, 1, 15, 1)),
            generator_image=bench[FREE_SYNTH] / (4 * 5 * 5 * 20),
            free_epoch_image=bench[FREE_EPOCH] / (4 * 5 * 5 * 20),
        )
        self.test_image = bench.per_task(META_TEST) / task_images(5, 1, 15, 10)

    def estimate(self, scenario: str, method: str, shots: int) -> tuple[float, float]:
        """(meta-training seconds, evaluation seconds) of one run."""
        from dfml_bench.methods import create_method, method_class

        entry = self.config.scenarios[scenario]
        recipe = self.recipes[entry.recipe]
        spec = run_spec(self.config, scenario, method, shots, 0)
        meta = spec.meta_model
        meta_flops = flops(meta.architecture, meta.image_size)
        teachers = teacher_shapes(recipe)
        settings = create_method(spec.method, spec.method_settings).settings
        evaluation = spec.evaluation
        method = spec.method  # a variant costs what its method costs
        if method_class(method).same_architecture_only and _heterogeneous(
            teachers, meta.architecture
        ):
            return 0.0, 0.0  # not applicable: a record with the reason, no training
        # images x FLOPs of one pass over every teacher class
        teacher_load = sum(
            classes * flops(arch, recipe.image_size) for _, arch, classes in teachers
        )
        run = RunShape(self.config.ways, shots, meta_flops, teacher_load, len(teachers))
        train = method_class(method).meta_training_seconds(settings, run, self.rates)
        return train, self._evaluation(scenario, method, shots, settings, evaluation, meta_flops)

    def _evaluation(
        self,
        scenario: str,
        method: str,
        shots: int,
        settings: Any,
        evaluation: EvaluationSettings,
        meta_flops: float,
    ) -> float:
        from dfml_bench.meta.loop import checkpoint_iterations
        from dfml_bench.methods import method_class

        adaptation = method_class(method).test_adaptation
        evaluation = evaluation.with_adaptation(adaptation.steps, adaptation.lr)
        datasets = len(self.recipes[self.config.scenarios[scenario].recipe].datasets)
        iterations = getattr(settings, "iterations", None) or getattr(settings, "epochs", 1)
        interval = getattr(settings, "eval_interval", None)
        checkpoints = len(checkpoint_iterations(iterations, interval))
        ways, inner = evaluation.ways, evaluation.inner_steps
        task = task_images(ways, shots, evaluation.queries, inner)
        test_task = task
        switch = evaluation.icfil.enabled
        if method_class(method).uses_icfil if switch is None else switch:
            icfil = evaluation.icfil
            pseudo = ways * icfil.pseudo_per_class
            test_task += icfil.inversion_steps * pseudo
            test_task += icfil.calibration_steps * (ways * shots + pseudo)
        images = evaluation.episodes * test_task
        if checkpoints > 1:  # meta-val per checkpoint, and the clean protocol's test pass
            images += evaluation.val_episodes * task + evaluation.episodes * test_task / checkpoints
        return checkpoints * datasets * images * self.test_image * meta_flops


def _heterogeneous(teachers: list[tuple[str, str, int]], meta_architecture: str) -> bool:
    return {arch for _, arch, _ in teachers} != {meta_architecture}


def estimate(config_path: Path | str, bench_path: Path | str = DEFAULT_BENCH) -> Estimate:
    """Every job of the config's DAG (zoo per recipe, each run) with its estimated seconds."""
    config = load_workflow_config(config_path)
    bench = BenchMedians(Path(bench_path))
    costs = _RunCosts(config, bench)
    jobs = [
        JobEstimate("train_zoo", name, zoo_seconds(recipe))
        for name, recipe in costs.recipes.items()
    ]
    cache: dict[tuple[str, str, int], tuple[float, float]] = {}
    for scenario, method, shots, seed in all_runs(config):
        key = (scenario, method, shots)
        if key not in cache:
            cache[key] = costs.estimate(scenario, method, shots)
        train, evaluation = cache[key]
        name = f"{scenario}/{method}/{shots}shot/seed{seed}"
        jobs.append(JobEstimate("run_method", name, train, evaluation))
    return Estimate(bench.device, bench.path, jobs)


def format_estimate(result: Estimate, config_path: str) -> str:
    """The table `dfml-bench estimate` prints: one line per job, the total, the assumptions."""
    lines = [
        f"estimate for {config_path} on {result.device} (medians from {result.bench}); "
        "zoo constants from the reference CPU",
        f"{'rule':<11} {'job':<52} {'train h':>9} {'eval h':>8} {'total h':>9}",
    ]
    for job in result.jobs:
        lines.append(
            f"{job.rule:<11} {job.name:<52} {job.train_s / 3600:>9.2f} "
            f"{job.evaluation_s / 3600:>8.2f} {job.seconds / 3600:>9.2f}"
        )
    total = result.total_s
    lines.append(
        f"total: {len(result.jobs)} jobs, {total / 3600:.1f} h ({total / 86400:.1f} days) "
        "one job at a time; collect and report not counted"
    )
    lines.append("assumptions:")
    lines += [f"- {assumption}" for assumption in assumptions()]
    return "\n".join(lines)
