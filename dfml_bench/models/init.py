"""Weight initialisation of fresh models: the authors' `init_layer` or PyTorch's defaults.

PURER and FREE (`init_layer`, network.py:14-21 and 13-20) re-draw conv weights from N(0, 2 / n)
with n = kernel_h x kernel_w x OUT_channels (fan-out, although their comment says fan-in) and
reset BatchNorm to weight 1, bias 0; conv biases and linear heads keep PyTorch's defaults. For
Conv4's inner convs that is 2.4x PyTorch's default std (0.083 vs 0.034), so teachers and
meta-models trained from it differ; "pytorch" keeps the defaults, for comparison.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

ModelInit = Literal["authors", "pytorch"]


def authors_init_(model: nn.Module) -> nn.Module:
    """Re-initialise `model` in place as the authors' `init_layer` does, and return it."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                kernel_h, kernel_w = module.kernel_size
                fan_out = kernel_h * kernel_w * module.out_channels
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.fill_(1.0)
                module.bias.fill_(0.0)
    return model


def initialise_(model: nn.Module, init: ModelInit) -> nn.Module:
    """Apply the named initialisation in place; "pytorch" leaves the constructors' draw."""
    if init == "authors":
        return authors_init_(model)
    if init == "pytorch":
        return model
    raise ValueError(f"unknown init {init!r}; known: authors, pytorch")
