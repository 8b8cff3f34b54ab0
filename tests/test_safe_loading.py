"""Nothing the package reads from disk can run code: no unrestricted unpickling anywhere, and a
damaged teacher file is refused with one line that names it."""

from __future__ import annotations

import ast
import builtins
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dfml_bench.data import cifar_fs
from dfml_bench.errors import CheckpointError, DfmlError
from dfml_bench.models.storage import file_sha256
from dfml_bench.zoo.manifest import Zoo

PACKAGE = Path(__file__).resolve().parents[1] / "dfml_bench"
# modules whose load functions unpickle (or unmarshal) whatever they are given
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve"}


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
        for k in call.keywords
    )


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, why) for every call or class in `tree` that could unpickle arbitrary objects."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(base) for base in node.bases}
            overrides = any(
                isinstance(item, ast.FunctionDef) and item.name == "find_class"
                for item in node.body
            )
            if bases & {"pickle.Unpickler", "Unpickler"} and not overrides:
                found.append((node.lineno, f"{node.name} subclasses Unpickler without find_class"))
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        module, _, function = name.rpartition(".")
        if module in UNSAFE_MODULES and function in {"load", "loads", "open", "Unpickler"}:
            found.append((node.lineno, f"{name}() unpickles anything"))
        elif name in {"torch.load", "torch.jit.load"} and not _keyword_is(
            node, "weights_only", True
        ):
            found.append((node.lineno, f"{name}() without weights_only=True"))
        elif module in {"np", "numpy"} and _keyword_is(node, "allow_pickle", True):
            found.append((node.lineno, f"{name}(allow_pickle=True)"))
    return found


def test_package_never_unpickles_untrusted_files() -> None:
    problems = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {why}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, why in _unsafe_calls(ast.parse(path.read_text(), str(path)))
    ]
    assert not problems, "\n".join(problems)


def test_the_scan_catches_each_unsafe_pattern() -> None:
    source = """
import pickle, torch, numpy as np
pickle.load(handle)
pickle.loads(data)
torch.load(path)
torch.load(path, weights_only=False)
np.load(path, allow_pickle=True)
class Loose(pickle.Unpickler):
    pass
torch.load(path, weights_only=True)
np.load(path, allow_pickle=False)
"""
    lines = [line for line, _ in _unsafe_calls(ast.parse(source))]
    assert sorted(lines) == [3, 4, 5, 6, 7, 8]


class _Reduce:
    """Pickles as a call of `function(*args)`: what a hostile archive would contain."""

    def __init__(self, function: object, *args: object) -> None:
        self.call = (function, args)

    def __reduce__(self) -> tuple:
        return self.call


@pytest.mark.parametrize(
    ("function", "refused"),
    [(os.system, r"(posix|nt)\.system"), (builtins.exec, r"(__builtin__|builtins)\.exec")],
)
def test_hostile_cifar_pickle_is_refused_before_it_runs(
    tmp_path: Path, function: object, refused: str, write_cifar: Callable[[Path], Path]
) -> None:
    folder = write_cifar(tmp_path / "data")
    marker = tmp_path / "pwned"
    payload = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w')"
    (folder / "train").write_bytes(pickle.dumps(_Reduce(function, payload), protocol=2))
    with pytest.raises(DfmlError) as caught:
        cifar_fs.load_cifar_fs(tmp_path / "data", 32, tmp_path / "cache")
    message = str(caught.value)
    assert "\n" not in message and str(folder / "train") in message
    assert re.search(f"refused to load global {refused}", message), message
    assert not marker.exists()
    assert not list((tmp_path / "cache").glob("**/*.npy"))  # nothing cached from a bad archive


def _damaged_copy(zoo: Zoo, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of `zoo` to damage, and its teacher 0 file."""
    copy = Path(shutil.copytree(zoo.directory, tmp_path / "zoo"))
    return copy, copy / zoo.teachers[0].file


def _assert_names_file(error: pytest.ExceptionInfo[CheckpointError], path: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_teacher_with_wrong_checksum_is_refused(toy_zoo: Zoo, tmp_path: Path) -> None:
    copy, weights = _damaged_copy(toy_zoo, tmp_path)
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF  # same size, one flipped byte in the last tensor
    weights.write_bytes(bytes(content))
    with pytest.raises(CheckpointError) as caught:
        Zoo.open(copy).load_teacher(0)
    assert "checksum" in _assert_names_file(caught, weights)


def test_truncated_teacher_is_refused_even_with_matching_checksum(
    toy_zoo: Zoo, tmp_path: Path
) -> None:
    copy, weights = _damaged_copy(toy_zoo, tmp_path)
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(CheckpointError) as caught:  # checksum from the manifest: caught first
        Zoo.open(copy).load_teacher(0)
    _assert_names_file(caught, weights)
    manifest = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(
        manifest.replace(toy_zoo.teachers[0].sha256, file_sha256(weights))
    )
    with pytest.raises(CheckpointError) as caught:  # checksum fits: safetensors must refuse it
        Zoo.open(copy).load_teacher(0)
    assert "corrupt" in _assert_names_file(caught, weights)
