"""Model registry (Conv4, ResNet-10, ResNet-18), initialisation and safe state-dict storage."""

from dfml_bench.models.init import ModelInit
from dfml_bench.models.registry import architecture_names, build_model

__all__ = ["ModelInit", "architecture_names", "build_model"]
