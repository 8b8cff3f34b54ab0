import math

import pytest

from dfml_bench.evaluation.stats import combine_ci95, mean_ci95


def test_ci_formula_matches_papers() -> None:
    values = [40.0, 60.0, 50.0, 50.0]
    mean, ci = mean_ci95(values)
    std = math.sqrt(sum((v - 50.0) ** 2 for v in values) / 4)  # population std, as np.std
    assert mean == 50.0
    assert ci == pytest.approx(1.96 * std / math.sqrt(4))


def test_ci_of_constant_is_zero_and_combination() -> None:
    assert mean_ci95([30.0] * 600) == (30.0, 0.0)
    assert combine_ci95([0.3, 0.4]) == pytest.approx(0.25)
