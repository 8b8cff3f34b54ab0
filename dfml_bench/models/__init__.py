"""Model registry (Conv4, ResNet-10, ResNet-18) and safe state-dict storage."""

from dfml_bench.models.registry import architecture_names, build_model

__all__ = ["architecture_names", "build_model"]
