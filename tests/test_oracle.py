"""The oracle (MAML on real meta-train data): beats Random, and is an upper bound in tables."""

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from dfml_bench.config import RunSpec
from dfml_bench.methods import create_method
from dfml_bench.reporting.tables import scenario_tables, to_latex, to_markdown
from dfml_bench.runner import execute_run


@pytest.mark.slow
def test_oracle_is_not_data_free_and_beats_random(
    glyph_zoo_dir: str, tmp_path: Path, paired_run_spec: Callable[..., RunSpec]
) -> None:
    assert create_method("oracle").data_free is False
    accuracies = {}
    for method, settings in (("random", {}), ("oracle", {"iterations": 15, "eval_interval": None})):
        spec = paired_run_spec(method, glyph_zoo_dir, tmp_path / method, settings, 5)
        record = json.loads(execute_run(spec, progress=False)[0].read_text())
        accuracies[method] = record["acc_mean"]
        assert record["data_free"] is (method != "oracle")
    assert accuracies["oracle"] > accuracies["random"] + 5.0, accuracies


def test_oracle_gets_a_dagger_its_own_block_and_never_the_bold() -> None:
    rows = [
        dict(
            scenario="ss",
            method=m,
            dataset="glyphs",
            stand_in_for="",
            shots=1,
            seed=0,
            protocol="clean",
            acc_mean=acc,
            acc_ci95=1.0,
            episodes=300,
            data_free=free,
        )
        for m, acc, free in (("oracle", 90.0, False), ("random", 30.0, True), ("purer", 50.0, True))
    ]
    table = scenario_tables(pd.DataFrame(rows), "ss")["clean"]
    assert list(table.index) == ["random", "purer", "oracle"]
    markdown = to_markdown(table)
    assert "| Oracle (real data) †" in markdown and "**50.00 ± 1.00**" in markdown
    assert "**90.00" not in markdown
    latex = to_latex(table, "caption")
    assert r"Oracle (real data)$^\dagger$" in latex
    assert latex.index(r"\midrule", latex.index("PURER")) < latex.index("Oracle")
