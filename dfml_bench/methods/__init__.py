"""DFML methods behind one interface, registered by name.

Adding a method: one module in this folder that subclasses `Method` and decorates it with
`register_method`, plus its import line below.
"""

# the built-in methods register themselves on import (each module: a method, then its ablations)
from dfml_bench.methods import (  # noqa: F401
    average,
    dro,
    free,
    oracle,
    ota,
    purer,
    random_init,
)
from dfml_bench.methods.base import (
    Checkpoint,
    MetaModelSpec,
    MetaTrainContext,
    Method,
    NoMetaTraining,
    TestAdaptation,
    create_method,
    method_class,
    method_names,
    method_rank,
    register_method,
    registered_methods,
)

__all__ = [
    "Checkpoint",
    "MetaModelSpec",
    "MetaTrainContext",
    "Method",
    "NoMetaTraining",
    "TestAdaptation",
    "create_method",
    "method_class",
    "method_names",
    "method_rank",
    "register_method",
    "registered_methods",
]
