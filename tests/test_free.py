"""FREE: task recovery with a fast generator copy, the meta-generator's progress, the alignment
step and its ablation, the memory, teacher sampling, the profiles, and that replay learns the
recovered tasks. The authors' step-by-step numbers are pinned in test_golden.py."""

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dfml_bench.inversion.generator import Generator
from dfml_bench.inversion.memory import ImageMemory
from dfml_bench.inversion.pixels import CropFlip, Normalisation
from dfml_bench.meta.adaptation import use_batch_statistics
from dfml_bench.meta.maml import maml_outer_loss
from dfml_bench.methods import MetaModelSpec, MetaTrainContext, create_method, method_names
from dfml_bench.methods.free import (
    FreeSettings,
    Recovery,
    RecoveryTarget,
    Student,
    adversarial_divergence,
    distil_and_align,
    distillation_loss,
    recover_task,
)
from dfml_bench.models import build_model
from dfml_bench.zoo.manifest import Zoo


def test_generator_makes_pixels_and_checks_its_size() -> None:
    generator = Generator(32, latent_dim=16)
    images = generator(torch.randn(3, 16)).detach()
    assert images.shape == (3, 3, 32, 32)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    with pytest.raises(ValueError, match="divisible by 4"):
        Generator(30)


def test_a_context_without_the_teachers_normalisation_is_refused(
    toy_zoo: Zoo, free_short: dict[str, Any]
) -> None:
    context = MetaTrainContext(toy_zoo, MetaModelSpec(), 5, 1, 0, torch.device("cpu"), False)
    method = create_method("free", free_short)
    with pytest.raises(Exception, match="no pixel normalisation for dataset 'test-toy'"):
        list(method.meta_train(context))


def test_recovery_adapts_a_copy_and_leaves_the_source_weights(toy_zoo: Zoo) -> None:
    """The source generator's weights stay; its BN statistics move (the authors' discarded
    forward); the images are the last step's, and the meta-gradient covers every weight."""
    settings = FreeSettings(generator_steps=3, latent_dim=16, generator_width=8, per_class=4)
    source = Generator(32, 16, 8)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    target = RecoveryTarget(
        toy_zoo.load_teacher(0), Normalisation((0.5,) * 3, (0.25,) * 3), [7, 8, 9, 10, 11], 0, 0
    )
    student = use_batch_statistics(build_model("conv4", 5, 32))
    generator = torch.Generator().manual_seed(0)
    recovery = recover_task(
        source,
        target,
        torch.randn(20, 16, generator=generator),
        settings,
        Student(student, dict(student.named_parameters())),
        lambda: CropFlip.draw(4, generator),
        keep_trace=True,
    )
    assert recovery.pixels.shape == (20, 3, 32, 32) and not recovery.pixels.requires_grad
    assert torch.equal(recovery.pixels, recovery.trace[-1]["pixels"])
    for name, param in source.named_parameters():
        assert torch.equal(param, before[name]), name
    assert not torch.equal(source.body[0].running_mean, before["body.0.running_mean"])
    assert len(recovery.meta_gradient) == len(list(source.parameters()))
    assert all(bool(g.isfinite().all()) for g in recovery.meta_gradient)
    assert len(recovery.trace) == 3


def test_crop_flip_pads_with_zero_pixels_and_flips() -> None:
    pixels = torch.arange(16.0).view(1, 1, 4, 4) + 1
    shifted = CropFlip(top=0, left=0, flip=False).apply(pixels, 1)
    assert float(shifted[0, 0, 0].abs().sum()) == 0  # the padded row
    assert torch.equal(shifted[0, 0, 1:, 1:], pixels[0, 0, :3, :3])
    assert torch.equal(CropFlip(1, 1, True).apply(pixels, 1), pixels.flip(-1))


def test_the_authors_divergences_take_probabilities_where_log_probabilities_belong() -> None:
    teacher, student = torch.randn(6, 5), torch.randn(6, 5)
    p_t, p_s = teacher.softmax(1), student.softmax(1)
    quirk = adversarial_divergence(teacher, student, "probabilities")
    torch.testing.assert_close(quirk, (p_s * (p_s.log() - p_t)).sum(1))
    fixed = adversarial_divergence(teacher, student, "kl")
    torch.testing.assert_close(fixed, (p_s * (p_s.log() - p_t.log())).sum(1))
    assert float(adversarial_divergence(teacher, teacher, "kl").abs().max()) < 1e-6
    torch.testing.assert_close(
        distillation_loss(student, teacher, "probabilities"), (p_t * (p_t.log() - p_s)).mean()
    )
    torch.testing.assert_close(
        distillation_loss(student, teacher, "kl"),
        F.kl_div(student.log_softmax(1), p_t, reduction="batchmean"),
    )


def _models(zoo: Zoo) -> tuple[torch.nn.Module, list[torch.nn.Module], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = use_batch_statistics(build_model("conv4", 5, 32))
    teachers = [zoo.load_teacher(i).requires_grad_(False) for i in range(2)]
    inputs = [torch.randn(10, 3, 32, 32), torch.randn(10, 3, 32, 32)]
    return model, teachers, inputs


def test_alignment_steps_the_shared_adam_along_the_fast_chain(toy_zoo: Zoo) -> None:
    """free: one fast copy, one Adam step per teacher in order; the meta-gradient is
    alignment_scale x (meta - fast) and the meta-learner's own Adam takes it."""
    model, teachers, inputs = _models(toy_zoo)
    settings = FreeSettings(alignment_scale=67.0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trace = distil_and_align(model, optimizer, teachers, inputs, settings, keep_trace=True)
    fast = trace[-1]
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, 67.0 * (before[name] - fast[name]))
        assert not torch.equal(param.detach(), before[name])
    assert len(optimizer.state) == len(before)  # the shared optimiser took the step


def test_without_alignment_the_teachers_gradients_are_taken_at_the_meta_weights(
    toy_zoo: Zoo,
) -> None:
    """free-no-align: the sum of every teacher's distillation gradient at the SAME weights (no
    chain, so no cross-teacher products), one Adam step."""
    model, teachers, inputs = _models(toy_zoo)
    settings = FreeSettings(fidelity="corrected")
    params = dict(model.named_parameters())
    total = 0
    for teacher, x in zip(teachers, inputs):
        logits = torch.func.functional_call(model, params, (x,))
        total = total + distillation_loss(logits, teacher(x), "kl")
    expected = torch.autograd.grad(total, list(params.values()))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    distil_and_align(model, optimizer, teachers, inputs, settings, align=False)
    for param, want in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, want)


def test_memory_keeps_a_ring_of_writes_per_class_as_8_bit_pixels() -> None:
    memory = ImageMemory(2, [Normalisation((0.5,) * 3, (0.25,) * 3)])
    labels = torch.tensor([3, 4, 5, 6, 7] * 4)
    for value in (0.2, 0.4, 0.6):  # three writes, ring of two: the first is overwritten
        memory.add(torch.full((20, 3, 8, 8), value), labels, dataset=0, teacher=1)
    assert len(memory) == 5 * 2 * 4
    levels = {int(batch[0, 0, 0, 0]) for batch in memory.rings[3]}
    assert levels == {int(0.6 * 255), int(0.4 * 255)}  # 153 and 102: truncated
    task = memory.sample_task(5, 1, 3, torch.Generator().manual_seed(0))
    assert task.support_images.shape == (5, 3, 8, 8) and task.query_images.shape == (15, 3, 8, 8)
    assert task.support_labels.tolist() == [0, 1, 2, 3, 4]
    assert task.query_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    allowed = {round((level / 255 - 0.5) / 0.25, 4) for level in (102, 153)}
    assert {round(float(v), 4) for v in task.query_images.unique()} <= allowed
    with pytest.raises(ValueError, match="a 6-way task needs 6"):
        memory.sample_task(6, 1, 3, torch.Generator())
    with pytest.raises(ValueError, match="raise per_class"):
        memory.sample_task(5, 5, 15, torch.Generator())


@pytest.mark.parametrize(
    ("fidelity", "stored_teachers"), [("authors", "last"), ("corrected", "every")]
)
@pytest.mark.slow
def test_memory_receives_the_last_teacher_under_the_authors_profile(
    toy_zoo: Zoo,
    tmp_path: Path,
    fidelity: str,
    stored_teachers: str,
    free_short: dict[str, Any],
    free_context: Callable[..., MetaTrainContext],
) -> None:
    """Warm-up stores nothing; after it, the authors' code stores only the last sampled
    teacher's images (its add sits after the teacher loop), corrected stores every teacher's."""
    method = create_method(
        "free", free_short | {"fidelity": fidelity, "teachers_per_epoch": 3, "epochs": 2}
    )
    checkpoints = list(method.meta_train(free_context(toy_zoo, tmp_path)))
    assert len(checkpoints) == 1
    writes = sum(len(ring) for ring in method.memory.rings.values())
    assert writes == 5 * (1 if stored_teachers == "last" else 3)  # one post-warm-up epoch
    assert method.timings.images_recovered == 3 * 5 * 16
    assert method.timings.adversarial_epochs == 1
    assert (tmp_path / "recovered.png").stat().st_size > 0
    assert (tmp_path / "pseudo-task.png").stat().st_size > 0


def test_sh_epochs_use_one_architecture_and_the_authors_run_the_last_teacher_loaded() -> None:
    records = [SimpleNamespace(architecture=a) for a in ["conv4", "resnet10"] * 4]
    context = SimpleNamespace(zoo=SimpleNamespace(teachers=records))
    for fidelity in ("authors", "corrected"):
        method = create_method("free", {"fidelity": fidelity})
        generator = torch.Generator().manual_seed(1)
        for _ in range(20):
            drawn = method._sample_teachers(context, generator)  # type: ignore[arg-type]
            assert len(drawn) == 4
            assert len({records[classes].architecture for _, classes in drawn}) == 1
            weights = {w for w, _ in drawn}
            if fidelity == "authors":
                assert weights == {drawn[-1][1]}
            else:
                assert all(w == c for w, c in drawn)


def test_profiles_resolve_every_named_difference() -> None:
    authors, corrected = FreeSettings(), FreeSettings(fidelity="corrected")
    assert authors.kd_loss == "probabilities" and corrected.kd_loss == "kl"
    assert authors.adversarial_student == "last-replay-task"
    assert corrected.adversarial_student == "meta-model"
    assert authors.memory_source == "last-teacher" and corrected.memory_source == "every-teacher"
    assert authors.sh_teachers == "last-loaded" and corrected.sh_teachers == "as-sampled"
    assert FreeSettings(fidelity="corrected", kd_loss="probabilities").departures() == {
        "kd_loss": "probabilities"
    }


@pytest.mark.slow
def test_the_authors_student_is_the_last_replay_tasks_adapted_weights(
    toy_zoo: Zoo, free_short: dict[str, Any], free_context: Callable[..., MetaTrainContext]
) -> None:
    method = create_method("free", free_short)
    list(method.meta_train(free_context(toy_zoo)))
    context = free_context(toy_zoo)
    model = use_batch_statistics(build_model("conv4", 5, 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches, adapted = method._replay(
        model, optimizer, method.memory, context, torch.Generator().manual_seed(0), 2
    )
    assert batches == 2
    assert any(not torch.equal(adapted[k], p) for k, p in model.named_parameters())
    assert torch.equal(method._student_params(model, adapted)["head.bias"], adapted["head.bias"])
    corrected = create_method("free", free_short | {"fidelity": "corrected"})
    own = corrected._student_params(model, adapted)
    assert torch.equal(own["head.bias"], model.head.bias)


@pytest.mark.slow
def test_meta_generator_makes_fresh_images_the_teachers_recognise(
    toy_zoo: Zoo, free_context: Callable[..., MetaTrainContext]
) -> None:
    """After some warm-up epochs, images from NEW latents (no adaptation) are classified by the
    teachers with more confidence than those of the initial generator."""
    settings = {
        "epochs": 6,
        "warmup_epochs": 6,
        "per_class": 8,
        "eval_interval": None,
        "meta_generator_lr": 0.01,
        "generator_width": 16,
    }
    context = free_context(toy_zoo)
    normalisation = context.normalisations["test-toy"]
    torch.manual_seed(0)
    initial = Generator(32, width=16)
    method = create_method("free", settings)
    list(method.meta_train(context))
    teachers = [toy_zoo.load_teacher(i) for i in range(2)]
    latent = torch.randn(64, 256, generator=torch.Generator().manual_seed(123))

    def confidence(generator: Generator) -> float:
        with torch.no_grad():
            images = normalisation.apply(generator.train()(latent))
            return sum(float(t(images).softmax(1).max(1).values.mean()) for t in teachers) / 2

    assert confidence(method.meta_generator_model) > confidence(initial)


@pytest.mark.parametrize(("name", "moves"), [("free", True), ("free-no-metagen", False)])
@pytest.mark.slow
def test_only_free_moves_its_meta_generator(
    toy_zoo: Zoo,
    name: str,
    moves: bool,
    free_short: dict[str, Any],
    free_context: Callable[..., MetaTrainContext],
) -> None:
    """The same seed after 1 and after 2 epochs: FREE's meta-generator has moved, the
    ablation's has not (it inverts with a fresh generator per teacher)."""
    generators = []
    for epochs in (1, 2):
        method = create_method(name, free_short | {"epochs": epochs, "warmup_epochs": epochs})
        list(method.meta_train(free_context(toy_zoo)))
        generators.append(dict(method.meta_generator_model.named_parameters()))
    same = all(torch.equal(generators[0][k], generators[1][k]) for k in generators[0])
    assert same != moves


def test_variants_are_registered() -> None:
    assert {"free", "free-no-align", "free-no-metagen"} <= set(method_names())
    assert not create_method("free-no-align").align
    assert not create_method("free-no-metagen").meta_generator


def test_replay_learns_tasks_from_the_memory(
    toy_zoo: Zoo, free_short: dict[str, Any], free_context: Callable[..., MetaTrainContext]
) -> None:
    """MAML replay raises the meta-learner's query accuracy on memory tasks it has not drawn.
    The memory holds 10 classes of learnable images (a colour per class, plus noise), written
    as recovered images are, so the sampling, labels and normalisation of replay are tested."""
    generator = torch.Generator().manual_seed(0)
    memory = ImageMemory(20, [Normalisation((0.5,) * 3, (0.25,) * 3)])
    colours = torch.rand(10, 3, 1, 1, generator=generator)
    for _ in range(2):
        noise = 0.15 * torch.randn(10, 20, 3, 32, 32, generator=generator)
        pixels = (colours[:, None] + noise).clamp(0, 1).flatten(0, 1)
        memory.add(pixels, torch.arange(100, 110).repeat_interleave(20), 0, 0)
    method = create_method("free", free_short | {"max_replay_batches": 15, "replay_patience": 15})
    torch.manual_seed(0)
    model = use_batch_statistics(build_model("conv4", 5, 32))
    held_out = [memory.sample_task(5, 1, 5, torch.Generator().manual_seed(i)) for i in range(8)]

    def accuracy() -> float:
        params = dict(model.named_parameters())
        return maml_outer_loss(model, params, held_out, 1, 0.01, second_order=False)[1]

    before = accuracy()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    method._replay(model, optimizer, memory, free_context(toy_zoo), generator, 2)
    assert accuracy() > before + 20, (before, accuracy())


def test_distillation_takes_teachers_with_different_class_counts(
    toy_zoo: Zoo, free_short: dict[str, Any]
) -> None:
    """A zoo over 64 classes ends with a 4-class teacher: its images (4 x per_class) are
    distilled next to 5-class ones under the same crop and flip."""
    method = create_method("free", free_short)
    model, teachers, _ = _models(toy_zoo)
    normalisation = Normalisation((0.5,) * 3, (0.25,) * 3)
    recoveries = [
        (
            RecoveryTarget(teacher, normalisation, list(range(classes)), 0, index),
            Recovery(torch.rand(classes * 4, 3, 32, 32), []),
        )
        for index, (teacher, classes) in enumerate(zip(teachers, (5, 4)))
    ]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    method._distil(model, optimizer, recoveries, method.settings, torch.Generator())
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
