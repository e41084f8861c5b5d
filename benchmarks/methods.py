"""Per-method cost: fit and score seconds and peak memory on one procedural category and one digit
class, for every method of grids/demo.yaml at its demo size (the same cells the demo runs).

    python benchmarks/methods.py [--grid grids/demo.yaml] [--only METHOD ...]

Each cell runs in this process, one after another, through the orchestrator's run_cell (so the
numbers are what a worker measures); the feature cache is off so every method pays its own way.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TARGETS = {"digits": "0", "synthetic": None}  # None: the grid's first class of that dataset


def cost_table(grid_path: str, only: list[str] | None, threads: int):
    import pandas as pd
    import torch

    from orchestrator.cell import run_cell
    from orchestrator.config import load_grid
    from orchestrator.grid import expand

    torch.set_num_threads(threads)
    cells = expand(load_grid(grid_path)).cells
    picked, seen = [], set()
    for cell in cells:
        want = TARGETS.get(cell.dataset, "skip")
        key = (cell.method, cell.dataset)
        if want == "skip" or key in seen or (only and cell.method not in only):
            continue
        if want is not None and cell.class_label != want:
            continue
        seen.add(key)
        picked.append(cell)
    records = []
    for cell in picked:
        row = run_cell(cell)[0]
        records.append({"method": cell.method, "dataset": cell.dataset, "class": cell.class_label,
                        "status": row["status"], "fit_s": row.get("fit_s"), "score_s": row.get("score_s"),
                        "peak_rss_MiB": row["peak_rss_bytes"] / 2**20, "image_auroc": row.get("image_auroc"),
                        "pixel_auroc": row.get("pixel_auroc")})
        print(f"  {cell.method:<12} {cell.dataset:<10} {row['status']}", flush=True)
    return pd.DataFrame.from_records(records)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", default=str(Path(__file__).resolve().parents[1] / "grids" / "demo.yaml"))
    p.add_argument("--only", nargs="*", help="methods to include (default: every method in the grid)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a worker uses its CPU slots)")
    args = p.parse_args()
    table = cost_table(args.grid, args.only, args.threads)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
