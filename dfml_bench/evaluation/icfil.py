"""ICFIL, PURER's Inversion Calibration following Inner Loop (CVPR 2023): a meta-test plug-in.

For each test task, after the inner loop has adapted the meta-model on the real support set S:

1. invert the ADAPTED model: `pseudo_per_class` learnable pseudo images per label (initialised
   N(0, 1) in normalised pixel space from the task's generator) take `inversion_steps` Adam steps
   on the DeepInversion objective

       ce * CE(f(jitter(x)), y) + bn * sum_l BN_l + tv * TV(jitter(x)) + l2 * ||jitter(x)||_2

   with the forms of `dfml_bench.inversion.deepinversion` (TV, L2, jitter are reused from there).
   Only the pseudo images receive gradients; the adapted parameters are constants.

   BN target. The meta-model normalises by the batch (`use_batch_statistics`): it keeps NO running
   statistics to match, unlike a pre-trained teacher. The target of BN_l is therefore the
   per-channel batch mean and (biased) variance of the REAL SUPPORT SET's features at the input of
   the l-th BatchNorm layer, computed once, under no_grad, with the adapted parameters:
   BN_l = ||mean_l(x) - mean_l(S)||_2 + ||var_l(x) - var_l(S)||_2. The pseudo images are thus pulled
   towards the feature statistics of this very task, which is what the running statistics stand
   for in DeepInversion (the data the model fits).

2. calibrate the backbone phi (every parameter except `head.*`) with `calibration_steps` plain
   SGD steps (lr `calibration_lr`) on the contrastive loss of the paper

       L = - sum_{x in S} sum_{x+} log( exp(phi(x).phi(x+)/tau) / sum_{x^} exp(phi(x).phi(x^)/tau) )

   where x+ are the pseudo images with x's label and x^ all pseudo images. phi(.) is the model's
   `embed` L2-normalised (so phi(x).phi(x') is a cosine similarity and tau a temperature on
   [-1, 1]). We AVERAGE over the (x, x+) pairs instead of summing, so the step size does not scale
   with shots and `pseudo_per_class` (every anchor has exactly `pseudo_per_class` positives, so this
   is the paper's sum divided by a constant). The pseudo images are fixed during calibration.

3. the head, by `head` (default `keep`):
   - `keep`: the queries are classified with the calibrated backbone and the ADAPTED head, left
     as the inner loop made it. The paper only calibrates phi (its Figure 3 leaves the head out,
     and the authors' public code has no ICFIL), so this is the literal reading.
   - `refit`: with the calibrated backbone frozen, the adapted head takes `head_steps` plain SGD
     steps (lr `head_lr`) on the cross-entropy of the REAL SUPPORT SET, so that the head fits
     the features it will classify; the support features are computed once (batch statistics
     of the support set, as in the inner loop) and only `head.*` receive gradients. The queries
     are then classified with the calibrated backbone and the refitted head.

Batch statistics: every forward pass normalises by its own batch, as the harness does (support
alone in the inner loop, queries alone when scoring); the real support set and the pseudo images
are embedded in separate passes, so neither batch shifts the other's normalisation.

Everything is functional (`torch.func.functional_call` on parameter dicts): neither the model nor
the parameter dicts passed in are modified, so the next task starts from the same meta-model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from dfml_bench.inversion.deepinversion import (
    channel_statistics,
    l2_prior,
    random_jitter,
    total_variation,
)
from dfml_bench.meta.adaptation import Params

HEAD_PREFIX = "head."


class IcfilSettings(BaseModel):
    """ICFIL at meta-test; the defaults keep it cheap enough for 600 CPU tasks."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool | None = Field(
        None,
        description="None: the method decides (PURER and purer-no-eci calibrate); "
        "true / false: on or off for every method",
    )
    pseudo_per_class: int = Field(2, ge=1)
    inversion_steps: int = Field(10, ge=0)
    inversion_lr: float = Field(0.1, gt=0)
    calibration_steps: int = Field(3, ge=0)
    calibration_lr: float = Field(0.01, gt=0)
    tau: float = Field(0.5, gt=0)
    ce_weight: float = Field(1.0, ge=0)
    bn_weight: float = Field(0.01, ge=0)
    tv_weight: float = Field(1e-4, ge=0)
    l2_weight: float = Field(1e-5, ge=0)
    jitter: int = Field(2, ge=0)
    head: Literal["keep", "refit"] = Field(
        "keep",
        description=(
            "the head after calibration (step 3). `keep`: the inner loop's adapted head, as the "
            "paper states (it calibrates the backbone only); `refit`: `head_steps` SGD steps of "
            "the adapted head on the support set's cross-entropy through the calibrated, frozen "
            "backbone, so the head matches the features it now reads. A setting because neither "
            "the paper nor the authors' code settles it. Default keep: refit's gain is that of an "
            "extra head step without calibration (config/icfil-head.yaml)"
        ),
    )
    head_steps: int = Field(
        1,
        ge=0,
        description=(
            "SGD steps of `head: refit`; default: PURER's meta-test fine-tuning (1 step), the "
            "budget the inner loop gave the head"
        ),
    )
    head_lr: float = Field(
        0.01, gt=0, description="learning rate of `head: refit`; default: PURER's meta-test 0.01"
    )


class _Embedding(nn.Module):
    """`model.embed` as a module's forward, so `functional_call` can run it with given params
    (the wrapper's parameter names are the model's, prefixed by `model.`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed(images)


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if any(layer.running_mean is not None or layer.running_var is not None for layer in layers):
        raise ValueError(
            "ICFIL needs a meta-model with batch-statistics BatchNorm (no running statistics, "
            "see `use_batch_statistics`): a forward pass would otherwise update its buffers"
        )
    return layers


@contextmanager
def _bn_inputs(layers: list[nn.Module]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the input of each layer (by index) during forward passes inside the context."""
    captured: dict[int, torch.Tensor] = {}

    def hook_for(index: int):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            captured[index] = inputs[0]

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _channels_last(images: torch.Tensor) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if images.dim() == 4 else images


def pseudo_labels(ways: int, per_class: int, device: torch.device | None = None) -> torch.Tensor:
    """Labels of the pseudo images: `per_class` of each label 0..ways-1, grouped by label."""
    return torch.arange(ways, device=device).repeat_interleave(per_class)


def invert_adapted(
    model: nn.Module,
    adapted: Params,
    support_images: torch.Tensor,
    ways: int,
    settings: IcfilSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: pseudo images [ways * pseudo_per_class, *support image shape] and their labels,
    inverted from the adapted model (BN target: the support set's feature statistics)."""
    layers = _batch_norms(model)
    device = support_images.device
    labels = pseudo_labels(ways, settings.pseudo_per_class, device)
    shape = (labels.numel(), *support_images.shape[1:])
    # drawn on the generator's device (CPU in the harness) so the draw is device-independent
    initial = torch.randn(shape, generator=generator, device=generator.device)
    images = _channels_last(initial.to(device, support_images.dtype)).requires_grad_()
    if settings.inversion_steps == 0:
        return images.detach(), labels

    use_bn = settings.bn_weight > 0 and bool(layers)
    targets: list[tuple[torch.Tensor, torch.Tensor]] = []
    if use_bn:
        with torch.no_grad(), _bn_inputs(layers) as captured:
            functional_call(model, adapted, (support_images,))
            targets = [channel_statistics(captured[i]) for i in range(len(layers))]

    constants = {name: value.detach() for name, value in adapted.items()}
    optimizer = torch.optim.Adam([images], lr=settings.inversion_lr)
    for _ in range(settings.inversion_steps):
        jittered = _channels_last(random_jitter(images, settings.jitter, generator))
        if use_bn:
            with _bn_inputs(layers) as captured:
                logits = functional_call(model, constants, (jittered,))
            bn = torch.stack(
                [
                    torch.linalg.vector_norm(mean - target_mean)
                    + torch.linalg.vector_norm(var - target_var)
                    for (mean, var), (target_mean, target_var) in (
                        (channel_statistics(captured[i]), targets[i]) for i in range(len(layers))
                    )
                ]
            ).sum()
        else:
            logits = functional_call(model, constants, (jittered,))
            bn = torch.zeros((), device=device)
        loss = (
            settings.ce_weight * F.cross_entropy(logits, labels)
            + settings.bn_weight * bn
            + settings.tv_weight * total_variation(jittered)
            + settings.l2_weight * l2_prior(jittered)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return images.detach(), labels


def contrastive_calibration_loss(
    anchor_features: torch.Tensor,
    anchor_labels: torch.Tensor,
    pseudo_features: torch.Tensor,
    pseudo_labels: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """ICFIL's contrastive loss, averaged over the (anchor, positive) pairs.

    Features are L2-normalised here. For each real anchor x the softmax runs over ALL pseudo
    features x^ at temperature `tau`; its positives x+ are the pseudo features with x's label.
    Returns mean over pairs of -log softmax(phi(x).phi(x^) / tau)[x+].
    """
    anchors = F.normalize(anchor_features, dim=1)
    pseudo = F.normalize(pseudo_features, dim=1)
    log_probabilities = torch.log_softmax(anchors @ pseudo.T / tau, dim=1)
    positives = (anchor_labels[:, None] == pseudo_labels[None, :]).to(log_probabilities.dtype)
    pairs = positives.sum()
    if pairs == 0:
        raise ValueError("no anchor has a pseudo image with its label")
    return -(log_probabilities * positives).sum() / pairs


def icfil_calibrate(
    model: nn.Module,
    adapted: Params,
    support_images: torch.Tensor,
    support_labels: torch.Tensor,
    ways: int,
    settings: IcfilSettings,
    generator: torch.Generator,
) -> Params:
    """ICFIL for one task: the adapted params with a calibrated backbone (detached).

    `adapted` are the params after the inner loop on (`support_images`, `support_labels`), labels
    in 0..ways-1; the head entries of the result are `adapted`'s with `head: keep`, refitted on
    the support set with `head: refit` (step 3). `generator` seeds the pseudo images'
    initialisation and the jitter (use one derived from the episode for determinism).
    """
    if support_labels.numel() and int(support_labels.max()) >= ways:
        raise ValueError(f"support labels must lie in 0..{ways - 1}")
    support_images = _channels_last(support_images)
    images, labels = invert_adapted(model, adapted, support_images, ways, settings, generator)

    backbone = [name for name in adapted if not name.startswith(HEAD_PREFIX)]
    head = {name: value.detach() for name, value in adapted.items() if name.startswith(HEAD_PREFIX)}
    embedding = _Embedding(model)
    current = [adapted[name].detach().requires_grad_() for name in backbone]
    for _ in range(settings.calibration_steps):
        params = {f"model.{name}": value for name, value in zip(backbone, current)}
        support_features = functional_call(embedding, params, (support_images,))
        pseudo_features = functional_call(embedding, params, (images,))
        loss = contrastive_calibration_loss(
            support_features, support_labels, pseudo_features, labels, settings.tau
        )
        gradients = torch.autograd.grad(loss, current, allow_unused=True)
        with torch.no_grad():
            current = [
                value if gradient is None else value - settings.calibration_lr * gradient
                for value, gradient in zip(current, gradients)
            ]
        current = [value.requires_grad_() for value in current]
    calibrated = dict(zip(backbone, (value.detach() for value in current)))
    if settings.head == "refit":
        head = refit_head(model, calibrated, head, support_images, support_labels, settings)
    return {name: calibrated[name] if name in calibrated else head[name] for name in adapted}


def refit_head(
    model: nn.Module,
    backbone: Params,
    head: Params,
    support_images: torch.Tensor,
    support_labels: torch.Tensor,
    settings: IcfilSettings,
) -> Params:
    """Step 3 with `head: refit`: `head_steps` SGD steps (lr `head_lr`) of the `head.*` params
    on the support set's cross-entropy, the backbone frozen at `backbone` (detached result).

    The model's forward is `head(embed(x))`, so the support features are computed once, by
    `embed` with batch statistics of the support set, and the steps run on the head alone.
    """
    names = list(head)
    if settings.head_steps == 0 or not names:
        return {name: value.detach() for name, value in head.items()}
    with torch.no_grad():
        params = {f"model.{name}": value for name, value in backbone.items()}
        features = functional_call(_Embedding(model), params, (support_images,))
    current = [head[name].detach().requires_grad_() for name in names]
    for _ in range(settings.head_steps):
        logits = functional_call(
            model.head,
            {name.removeprefix(HEAD_PREFIX): value for name, value in zip(names, current)},
            (features,),
        )
        gradients = torch.autograd.grad(F.cross_entropy(logits, support_labels), current)
        with torch.no_grad():
            current = [value - settings.head_lr * g for value, g in zip(current, gradients)]
        current = [value.requires_grad_() for value in current]
    return {name: value.detach() for name, value in zip(names, current)}
