"""Orchestration overhead: 200 cells of the `noop` method (50 ms of sleep each) on 2 CPU workers.

Prints the median per-cell overhead (dispatch -> row written, minus the cell's own time), the
workers' utilisation (cell time / (wall × workers), after the workers started), and the same 200
cells run as Ray Tune trials in the same run, with our overhead over Tune's.
Target on the 2-core development machine: <= 25 ms per cell and >= 0.90 utilisation.

    python benchmarks/overhead.py [--cells 200] [--sleep 0.05] [--no-tune] [--tune-cells N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_cells(n: int, sleep_s: float):
    from orchestrator.grid import Cell

    return [Cell("noop", {"sleep_s": sleep_s}, "digits", {}, "one_class", str(i % 10), seed=i)
            for i in range(n)]


def run_ours(cells, workers: int):
    from orchestrator.runner import Runner
    from orchestrator.store import RowStore

    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(cells, RowStore(Path(tmp) / "overhead"), run_id="overhead", workers=workers,
                        progress=False)
        summary = runner.run()
    busy = sum(own for _, own in runner.latencies)
    overheads = [lat - own for lat, own in runner.latencies]
    return {"wall_s": summary.wall_s, "startup_s": summary.startup_s,
            "median_overhead_ms": 1e3 * statistics.median(overheads),
            "mean_overhead_ms": 1e3 * (summary.wall_s * workers - busy) / len(cells),
            "utilisation": busy / (summary.wall_s * workers), "ok": summary.ok}


def run_tune(cells, workers: int):
    from ray import tune

    from orchestrator.cell import run_cell
    from orchestrator.grid import Cell

    def trainable(config):
        rows = run_cell(Cell.from_dict(config["cell"]))
        tune.report({"total_s": rows[0]["total_s"], "ok": rows[0]["status"] == "ok"})

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={"cell": tune.grid_search([c.to_dict() for c in cells])},
            tune_config=tune.TuneConfig(max_concurrent_trials=workers),
            run_config=tune.RunConfig(storage_path=tmp, name="overhead", verbose=0),
        )
        results = tuner.fit()
        wall = time.perf_counter() - t0
    df = results.get_dataframe()
    busy = float(df["total_s"].sum())
    return {"wall_s": wall, "mean_overhead_ms": 1e3 * (wall * workers - busy) / len(cells),
            "utilisation": busy / (wall * workers), "ok": int(df["ok"].sum())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=200)
    p.add_argument("--sleep", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-tune", action="store_true")
    p.add_argument("--tune-cells", type=int, help="run only the first N cells as Tune trials (a Tune "
                   "trial costs seconds here, so 200 take a quarter of an hour; the per-cell figure "
                   "is per trial either way)")
    args = p.parse_args()

    from orchestrator.runner import start_ray

    start_ray(num_cpus=args.workers, dashboard=False)
    cells = make_cells(args.cells, args.sleep)
    ours = run_ours(cells, args.workers)
    print(f"adgrid (Ray Core actors): {args.cells} cells x {args.sleep * 1e3:.0f} ms on {args.workers} workers")
    print(f"  wall {ours['wall_s']:.2f} s after {ours['startup_s']:.2f} s worker start-up, ok {ours['ok']}")
    print(f"  median per-cell overhead {ours['median_overhead_ms']:.2f} ms (target <= 25 ms)")
    print(f"  mean per-cell overhead   {ours['mean_overhead_ms']:.2f} ms")
    print(f"  worker utilisation       {ours['utilisation']:.3f} (target >= 0.90)")
    if args.no_tune:
        return
    tune_cells = cells[: args.tune_cells] if args.tune_cells else cells
    tuned = run_tune(tune_cells, args.workers)
    print(f"Ray Tune trials ({len(tune_cells)} cells): wall {tuned['wall_s']:.2f} s, ok {tuned['ok']}")
    print(f"  mean per-cell overhead   {tuned['mean_overhead_ms']:.2f} ms, utilisation {tuned['utilisation']:.3f}")
    print(f"ours / Tune per-cell overhead: {ours['mean_overhead_ms'] / tuned['mean_overhead_ms']:.4f} "
          f"(Tune costs {tuned['mean_overhead_ms'] / max(ours['mean_overhead_ms'], 1e-9):.0f}x ours)")


if __name__ == "__main__":
    main()
