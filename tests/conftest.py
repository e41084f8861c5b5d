"""Shared fixtures: one real local Ray instance (2 CPUs, loopback) for the in-process tests."""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    """A real small file system at ``path`` (``size=16k``: a disk that fills, ``ro``: a read-only
    one) for fault tests; needs the right to mount (root), else the test is skipped."""
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
