"""The demo grid (grids/demo.yaml) as a newcomer runs it: through bench.py, into a fresh results
folder. Every method must score clearly above chance on every dataset block it runs on (mean image
AUROC >= 0.6 per method and block), and the noop baseline must stay at chance; the summary table
labels the baseline rows. Slow: the whole demo (about a minute of cells on two idle cores)."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT

FLOOR = 0.6
CHANCE = (0.3, 0.7)


def block_means(rows: pd.DataFrame) -> pd.Series:
    """Mean image AUROC per (method, dataset, protocol): one dataset block of the grid."""
    return rows.groupby(["method", "dataset", "protocol"])["image_auroc"].mean()


def floor_failures(means: pd.Series) -> list[str]:
    """Every (method, block) under the floor, and the noop baseline outside the chance band."""
    failures = []
    for (method, dataset, protocol), auroc in means.items():
        if method == "noop":
            if not CHANCE[0] <= auroc <= CHANCE[1]:
                failures.append(f"noop {dataset}/{protocol}: {auroc:.3f} not in {CHANCE}")
        elif not auroc >= FLOOR:
            failures.append(f"{method} {dataset}/{protocol}: {auroc:.3f} < {FLOOR}")
    return failures


def test_floor_failures_names_each_low_block():
    means = pd.Series({("noop", "digits", "ood"): 0.9, ("padim", "digits", "one_class"): 0.95,
                       ("uniad", "synthetic", "one_class"): 0.36, ("noop", "digits", "osr"): 0.5})
    assert floor_failures(means) == ["noop digits/ood: 0.900 not in (0.3, 0.7)",
                                     "uniad synthetic/one_class: 0.360 < 0.6"]


@pytest.mark.slow
def test_demo_grid_every_method_above_chance(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, str(ROOT / "bench.py"), str(ROOT / "grids" / "demo.yaml"),
           "--results", str(tmp_path / "results"), "--quiet", "--no-report"]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1500, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "noop (chance baseline)" in run.stdout
    rows = pd.read_parquet(tmp_path / "results" / "demo" / "rows")
    bad = rows[rows["status"] != "ok"]
    assert bad.empty, bad[["method", "dataset", "normal_class", "error"]].to_string()
    means = block_means(rows)
    # every method of the grid has a block: none dropped from the demo
    from orchestrator.config import load_grid
    assert {m.name for m in load_grid(ROOT / "grids" / "demo.yaml").methods} == set(rows["method"])
    failures = floor_failures(means)
    assert not failures, "\n".join(failures) + "\n\n" + means.round(3).to_string()
