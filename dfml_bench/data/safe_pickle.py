"""Read dataset pickles without trusting them: only plain data and numpy arrays come out.

The official CIFAR-100 archive and the MiniImageNet caches are pickles, and a plain
`pickle.load` runs whatever callable a tampered file names. This unpickler resolves only the
few numpy globals an array needs, so a hostile file fails with one line and runs nothing.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from dfml_bench.data.images import DataSource

# numpy's array reconstructor, whatever module path (numpy.core / numpy._core) a pickle names.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
# Exactly what an array pickled with protocol 2-4 names (Python 2 pickles included); numpy
# scalars, protocol-5 buffers and every other global are refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes in protocol 2
}


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name}") from None


def read_dict(source: DataSource, path: Path) -> dict[str, Any]:
    """A pickled dict with str keys (Python 2 wrote them as byte strings); one-line errors."""
    try:
        with open(path, "rb") as handle:
            content = ArrayOnlyUnpickler(handle, encoding="latin1").load()
    except Exception as error:  # a corrupt or hostile pickle can raise almost anything
        raise source.error(path, f"cannot read the pickle safely ({error})") from error
    if not isinstance(content, dict):
        raise source.error(path, f"pickle holds a {type(content).__name__}, not a dict")
    return {text(key): value for key, value in content.items()}


def text(value: Any) -> Any:
    """Byte strings from Python 2 pickles as str; anything else unchanged."""
    return value.decode("latin1") if isinstance(value, bytes) else value
