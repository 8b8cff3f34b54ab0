"""How methods are named and ordered in every table and figure: what each method class declares
(`display_name`, `table_order`, `ablation_of`), and a config's variant labels from its records."""

from __future__ import annotations

from dfml_bench.methods import method_class, method_names, method_rank

# display names of a config's variants (ablation rows), read from the records' summary
_VARIANT_DISPLAY: dict[str, str] = {}


def remember_variant_names(names: dict[str, str]) -> None:
    """Display names of variant rows (from summary.csv's `display_name`), for every table."""
    _VARIANT_DISPLAY.update(names)


def method_display(method: str) -> str:
    if method in method_names():
        return method_class(method).display_name
    return _VARIANT_DISPLAY.get(method, method)


__all__ = ["method_display", "method_rank", "remember_variant_names"]
