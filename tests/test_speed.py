"""The speed table: time to quality per recoverer, and speed-ups paired by seed."""

import pandas as pd

from dfml_bench.reporting.speed import speed_markdown, speed_table


def _run(method: str, seed: int, **ttq: float) -> dict:
    return dict(
        scenario="ss",
        method=method,
        shots=1,
        seed=seed,
        protocol="clean",
        device="cpu (test)",
        torch="2.x",
        **{f"ttq_{k}": v for k, v in ttq.items()},
    )


def _frame() -> pd.DataFrame:
    rows = []
    for seed, (meta, scratch, own, eci) in enumerate(
        [(0.5, 10.0, 18.0, 5.0), (1.0, 12.0, 14.0, 6.0)]
    ):
        rows.append(
            _run(
                "free",
                seed,
                meta_generator_s=meta,
                meta_generator_steps=1.0,
                meta_generator_reached=1.0,
                scratch_s=scratch,
                scratch_steps=40.0,
                scratch_reached=0.8,
                speedup_vs_scratch=own,
                speedup_vs_scratch_min=own / 2,
                speedup_vs_scratch_max=own * 2,
            )
        )
        rows.append(_run("purer", seed, eci_pool_s=eci, eci_pool_steps=30.0, eci_pool_reached=1.0))
        rows.append(_run("random", seed))
        rows.append({**rows[-2], "protocol": "paper", "ttq_eci_pool_s": 999.0})  # ignored
    return pd.DataFrame(rows)


def test_rows_per_recoverer_with_speedups_paired_by_seed() -> None:
    table = speed_table(_frame()).set_index(["method", "recoverer"])
    assert set(table.index) == {
        ("free", "meta_generator"),
        ("free", "scratch"),
        ("purer", "eci_pool"),
    }  # random recovers nothing; paper-protocol records are not read
    meta = table.loc[("free", "meta_generator")]
    assert meta["seeds"] == 2 and meta["seconds"] == 0.75
    assert meta["vs_scratch"] == 16.0  # the runs' own probe-wise ratios, averaged
    assert meta["vs_scratch_range"] == "14.00–18.00"
    assert meta["vs_scratch_tasks"] == "7.00–36.00"  # smallest and largest probe task
    assert meta["vs_eci_pool"] == (5.0 / 0.5 + 6.0 / 1.0) / 2
    purer = table.loc[("purer", "eci_pool")]
    assert purer["vs_scratch"] == (10.0 / 5.0 + 12.0 / 6.0) / 2
    assert purer["vs_eci_pool"] == 1.0
    assert table.loc[("free", "scratch")]["reached"] == 0.8


def test_speed_markdown_names_the_measure_the_device_and_torch() -> None:
    text = speed_markdown(_frame())
    assert "time to quality" in text and "cpu (test)" in text and "torch 2.x" in text
    assert "FREE meta-generator" in text and "16.000" in text
    empty = speed_markdown(_frame()[lambda f: f["method"] == "random"])
    assert "No run measured its time to quality" in empty
