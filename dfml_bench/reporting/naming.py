"""How methods are named and ordered in every table and figure (the papers' order)."""

from __future__ import annotations

METHOD_ORDER = ["random", "average", "ota", "dro", "purer", "free", "oracle"]
METHOD_DISPLAY = {
    "random": "Random",
    "average": "Average",
    "ota": "OTA",
    "dro": "DRO-style",
    "purer": "PURER",
    "purer-no-eci": "PURER w/o ECI",
    "purer-no-icfil": "PURER w/o ICFIL",
    "free": "FREE",
    "free-no-align": "FREE w/o alignment",
    "free-no-metagen": "FREE w/o meta-generator",
    "oracle": "Oracle (real data)",
}


# display names of a config's variants (ablation rows), read from the records' summary
_VARIANT_DISPLAY: dict[str, str] = {}


def remember_variant_names(names: dict[str, str]) -> None:
    """Display names of variant rows (from summary.csv's `display_name`), for every table."""
    _VARIANT_DISPLAY.update(names)


def method_display(method: str) -> str:
    return METHOD_DISPLAY.get(method) or _VARIANT_DISPLAY.get(method, method)


def method_rank(method: str) -> tuple[int, int, str]:
    """Fixed row order: the papers' method order, each method's ablations right after it."""
    base = method.split("-")[0]
    position = METHOD_ORDER.index(base) if base in METHOD_ORDER else len(METHOD_ORDER)
    return (position, int(method != base), method)
