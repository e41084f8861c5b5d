"""The Fashion-MNIST grid on Ray against the same cells run one by one without Ray.

Runs the cells of grids/fmnist.yaml (by default classes 0 and 1, T-shirt/top and Trouser, seed 0, every method) twice in
one run: through the orchestrator (Ray Core actors, ``--workers`` of them, one CPU slot each, the
worker cache on, rows to a temporary store) and as the sequential baseline, a plain loop over
``run_cell`` in this process with torch on every core and one in-process cache (so the DCAE
pre-training is shared there too). Prints the wall time of both, the ratio, and each cell's fit
seconds side by side.

The papers' schedules take hours a cell here (fcdd: 400 epochs of about a minute), so
``--epochs N`` (default 2) caps every epoch count of the cells (dsvdd and dcae pre-training,
dsvdd, fcdd_ae, fcdd) for the measurement; ``--epochs 0`` keeps the papers' schedules. The
reproduction record itself (reports/reproductions/fmnist) is always at the papers' settings.

    python benchmarks/fmnist.py [--only class=Trouser --only seed=0 ...] [--epochs 2] [--workers 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ROOT = Path(__file__).resolve().parents[1]
#: The params holding each method's epoch counts (pre-training included).
EPOCH_PARAMS = {"dsvdd": ("epochs", "ae_epochs"), "dcae": ("ae_epochs",), "fcdd_ae": ("epochs",),
                "fcdd": ("epochs",), "fcdd_hsc": ("epochs",)}
#: The params holding each method's lr milestones, moved inside a capped schedule.
MILESTONE_PARAMS = {"dsvdd": ("milestones", "ae_milestones"), "dcae": ("ae_milestones",)}
DEFAULT_ONLY = ["class=T-shirt/top", "class=Trouser", "seed=0"]


def benchmark_cells(grid_path: str, only: list[str], epochs: int):
    """The grid's cells after ``--only``, with every epoch count capped at ``epochs`` (0: as is)."""
    from bench import parse_only
    from orchestrator.config import load_grid
    from orchestrator.grid import expand

    cells = expand(load_grid(grid_path), parse_only(only)).cells
    if epochs <= 0:
        return cells
    capped = []
    for cell in cells:
        params = dict(cell.params)
        for name in EPOCH_PARAMS.get(cell.method, ()):
            params[name] = epochs
        for name in MILESTONE_PARAMS.get(cell.method, ()):  # inside the shortened schedules
            params[name] = [max(1, epochs - 1)]
        capped.append(replace(cell, params=params))
    return capped


def run_grid(cells, workers: int) -> tuple[float, dict]:
    """Wall seconds of the orchestrator over ``cells`` and each cell's row."""
    from orchestrator.runner import Runner, start_ray
    from orchestrator.store import RowStore

    start_ray(num_cpus=workers, dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        store = RowStore(Path(tmp) / "fmnist-bench")
        t0 = time.perf_counter()
        Runner(cells, store, run_id="fmnist-bench", workers=workers, progress=False).run()
        wall = time.perf_counter() - t0
        rows = store.read()
    return wall, {r["cell_id"]: r for r in rows.to_dict("records")}


def run_sequential(cells, threads: int) -> tuple[float, dict]:
    """Wall seconds of a plain loop over the cells in this process (no Ray) and each cell's row."""
    import torch

    from methods.base import ArtifactCache
    from orchestrator.cell import run_cell
    from orchestrator.runner import DEFAULT_CACHE_BYTES

    torch.set_num_threads(threads)
    cache = ArtifactCache(DEFAULT_CACHE_BYTES)
    rows = {}
    t0 = time.perf_counter()
    for cell in cells:
        rows[cell.cell_id] = run_cell(cell, cache=cache)[0]
        print(f"  sequential: {cell.method:<8} class {cell.class_label:<12} {rows[cell.cell_id]['status']}",
              flush=True)
    return time.perf_counter() - t0, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default=str(ROOT / "grids" / "fmnist.yaml"))
    p.add_argument("--only", action="append", help=f"KEY=VALUE cell filters (default: {' '.join(DEFAULT_ONLY)})")
    p.add_argument("--epochs", type=int, default=2, help="cap every epoch count at N (0: the papers' schedules)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the sequential baseline (default: every core, torch's own default)")
    args = p.parse_args()

    import pandas as pd
    import psutil

    cells = benchmark_cells(args.grid, args.only or DEFAULT_ONLY, args.epochs)
    schedule = "the papers' schedules" if args.epochs <= 0 else f"every schedule capped at {args.epochs} epochs"
    print(f"{len(cells)} cells of {Path(args.grid).name} ({schedule}); load average before: "
          f"{' '.join(f'{x:.2f}' for x in psutil.getloadavg())}", flush=True)
    grid_wall, grid_rows = run_grid(cells, args.workers)
    seq_wall, seq_rows = run_sequential(cells, args.threads)

    table = pd.DataFrame([{
        "method": c.method, "params": ",".join(f"{k}={v}" for k, v in sorted(c.params.items())
                                               if k not in ("epochs", "ae_epochs", "milestones", "ae_milestones")),
        "class": c.class_label, "seed": c.seed,
        "grid_fit_s": grid_rows[c.cell_id].get("fit_s"), "sequential_fit_s": seq_rows[c.cell_id].get("fit_s"),
        "grid_status": grid_rows[c.cell_id]["status"], "sequential_status": seq_rows[c.cell_id]["status"],
        "grid_cache_hit": grid_rows[c.cell_id].get("feature_cache_hit"),
    } for c in cells])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"grid on Ray ({args.workers} workers x 1 CPU): wall {grid_wall:.1f} s, "
          f"fit {table['grid_fit_s'].sum():.1f} s in all")
    print(f"sequential, no Ray (1 process, {args.threads} threads): wall {seq_wall:.1f} s, "
          f"fit {table['sequential_fit_s'].sum():.1f} s in all")
    print(f"grid / sequential wall time: {grid_wall / seq_wall:.3f} (speed-up {seq_wall / grid_wall:.2f}x); "
          f"median per-cell fit ratio {(table['grid_fit_s'] / table['sequential_fit_s']).median():.3f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in psutil.getloadavg())}")


if __name__ == "__main__":
    main()
