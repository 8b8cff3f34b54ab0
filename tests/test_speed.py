"""The speed table: seconds per recovered task and the speed-up against PURER."""

import pandas as pd

from dfml_bench.reporting.speed import speed_markdown, speed_table


def _frame() -> pd.DataFrame:
    rows = []
    for method, per_task in (("purer", 2.0), ("free", 0.1), ("random", None)):
        for protocol in ("paper", "clean"):
            rows.append(
                dict(
                    scenario="ss",
                    method=method,
                    shots=5,
                    protocol=protocol,
                    recovered_images=None if per_task is None else 1000,
                    recovery_s=None if per_task is None else 10 * per_task,
                    recovery_s_per_task=per_task,
                    meta_train_s=30.0,
                    device="cpu (test)",
                    torch="2.x",
                )
            )
    return pd.DataFrame(rows)


def test_speedup_is_purers_seconds_per_task_over_the_methods() -> None:
    table = speed_table(_frame()).set_index("method")
    assert set(table.index) == {"purer", "free"}  # random recovers nothing: no row
    assert table.loc["purer", "speedup_vs_purer"] == 1.0
    assert table.loc["free", "speedup_vs_purer"] == 20.0


def test_speed_markdown_names_the_device_and_torch() -> None:
    text = speed_markdown(_frame())
    assert "cpu (test)" in text and "torch 2.x" in text and "20.000" in text


def test_several_seeds_compare_against_purers_mean_over_seeds() -> None:
    frame = pd.concat([_frame().assign(seed=0), _frame().assign(seed=1)], ignore_index=True)
    seed1 = (frame["seed"] == 1) & (frame["method"] == "purer")
    frame.loc[seed1, "recovery_s_per_task"] = 4.0  # PURER: 2 s and 4 s, mean 3 s
    table = speed_table(frame).set_index("method")
    assert table.loc["free", "speedup_vs_purer"] == 30.0
