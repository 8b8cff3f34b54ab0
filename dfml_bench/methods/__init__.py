"""DFML methods behind one interface, registered by name."""

from dfml_bench.methods.base import (
    Checkpoint,
    MetaModelSpec,
    MetaTrainContext,
    Method,
    TestAdaptation,
    checkpoint_iterations,
    create_method,
    method_class,
    method_names,
    register_method,
)

__all__ = [
    "Checkpoint",
    "MetaModelSpec",
    "MetaTrainContext",
    "Method",
    "TestAdaptation",
    "checkpoint_iterations",
    "create_method",
    "method_class",
    "method_names",
    "register_method",
]
