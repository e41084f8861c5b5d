"""Shared fixtures: one real local Ray instance (2 CPUs, loopback) for the in-process tests."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Generated and decoded data go to a per-session folder, never the user's cache."""
    if "ADGRID_CACHE" not in os.environ:
        os.environ["ADGRID_CACHE"] = str(tmp_path_factory.mktemp("adgrid-cache"))
    yield


@pytest.fixture(scope="session")
def ray_local():
    """A real Ray on 127.0.0.1 (all its sockets on loopback) with 2 CPUs, shared by the tests that run
    grids in-process."""
    import ray

    from orchestrator.runner import start_ray

    start_ray(num_cpus=2, dashboard=False)
    yield ray
    ray.shutdown()


def write_grid(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_grid_inprocess(grid_path: Path, results: Path, run: str | None = None, **runner_kwargs):
    """Load, expand and run a grid in this process on the session's Ray; returns (store, summary)."""
    from orchestrator.config import load_grid
    from orchestrator.grid import expand
    from orchestrator.runner import Runner
    from orchestrator.store import RowStore

    grid = load_grid(grid_path)
    cells = expand(grid).cells
    store = RowStore(results / (run or grid.name))
    done = store.statuses()
    todo = [c for c in cells if c.cell_id not in done]
    runner_kwargs.setdefault("progress", False)
    summary = Runner(todo, store, run_id=run or grid.name, **runner_kwargs).run()
    return store, summary, cells
