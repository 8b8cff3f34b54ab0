"""Fine-tuning a meta-model on a support set: the MAML inner loop, written with torch.func."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Copy `model` with BatchNorm that always normalises by the batch (transductive, as in MAML).

    Dropping running statistics also keeps the meta-model's state to parameters only, so a
    functional inner loop never mutates buffers.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            module.num_batches_tracked = None
    return model


def parameters_of(model: nn.Module) -> Params:
    return {name: param.detach() for name, param in model.named_parameters()}


def finetune(
    model: nn.Module,
    params: Params,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    lr: float,
) -> Params:
    """`steps` full-batch SGD steps on cross-entropy from `params` (first order: no outer graph).

    Plain autograd on `functional_call`: on CPU it is ~10x faster than `torch.func.grad` here.
    """
    names = list(params)
    current = [params[name].detach().requires_grad_() for name in names]
    for _ in range(steps):
        logits = functional_call(model, dict(zip(names, current)), (images,))
        gradients = torch.autograd.grad(F.cross_entropy(logits, labels), current)
        with torch.no_grad():
            current = [value - lr * gradient for value, gradient in zip(current, gradients)]
        current = [value.requires_grad_() for value in current]
    return {name: value.detach() for name, value in zip(names, current)}
