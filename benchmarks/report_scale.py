"""Report build time and peak memory at scale: N synthetic noop-like rows (10,000 by default).

Writes a synthetic run (one Parquet file per cell under ``RUN/rows/``, with ``orchestrator.store``'s
SCHEMA, as ``RowStore.write`` lays them out): ``--methods`` method variants on digits one-class,
classes 0-9, as many seeds as N needs, each row with its labels (one class normal, the others
anomalous) and 100-180 image scores, the six image metrics of those scores and a few failed rows.
Then, each in a fresh process (so peak RSS is that step's alone), measures

* read: ``RowStore.read`` of every column (the baseline: what loading the run costs at all);
* report: ``build_report`` from cold (no bootstrap cache), as a first ``bench.py report``;
* rebuilt: ``build_report`` again (the cache holds every row);

and prints each wall time and peak RSS with the ratio to the baseline measured in the same run.

    python benchmarks/report_scale.py [--rows 10000] [--large] [--keep DIR] [--run DIR]

``--large`` is ``--rows 100000``; ``--run DIR`` reuses a run written before (by ``--keep``);
``--rows-per-file 1000`` lays the rows out as a compacting store would (reading 100,000 one-row
files costs RowStore ~50 KB of Arrow objects a file, whatever the report does with them);
``--against DIR`` also times another checkout's report (main's: the figures before a change).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("noop", "padim", "patchcore", "dsvdd", "dcae")
CHUNK = 2000  # rows built per pyarrow table


def synthetic_rows(n_rows: int, methods=METHODS, failed_every: int = 500, start: int = 0,
                   rng_seed: int = 0) -> list[dict]:
    """Rows ``start`` .. ``start + n_rows`` of a noop-like run: every (method, class) pair seed by seed."""
    from datetime import datetime, timedelta, timezone

    from reports.bootstrap import point_metrics

    rng = np.random.default_rng(rng_seed + start)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = []
    for i in range(start, start + n_rows):
        method = methods[i % len(methods)]
        normal = (i // len(methods)) % 10
        seed = i // (len(methods) * 10)
        cell = f"{method[:4]}{normal}s{seed:06d}x{i:07d}"
        n_test = int(rng.integers(100, 181))
        n_normal = max(2, n_test // 10)
        labels = np.ones(n_test, np.int8)
        labels[:n_normal] = 0
        rng.shuffle(labels)
        scores = rng.random(n_test) + 0.3 * labels * (METHODS.index(method) if method in METHODS else 1) / 4
        failed = failed_every and i % failed_every == failed_every - 1
        row = {"run_id": "scale", "cell_id": cell, "base_cell_id": cell, "method": method,
               "params": json.dumps({"seed_note": "none"} if method == "noop" else {}), "dataset": "digits",
               "dataset_params": json.dumps({"root": "/tmp/data"}), "protocol": "one_class",
               "normal_class": str(normal), "category": None, "ood_set": None, "seed": seed,
               "resolved_params": "{}", "status": "failed" if failed else "ok", "attempt": 1,
               "fit_s": 0.01 + 0.001 * (i % 7), "score_s": 0.002, "total_s": 0.05 + 0.001 * (i % 13),
               "peak_rss_bytes": 300_000_000 + i % 1000, "peak_gpu_bytes": None, "n_train": 170,
               "n_test": n_test, "feature_cache_hit": False,
               "started_at": t0 + timedelta(seconds=i * 0.1), "finished_at": t0 + timedelta(seconds=i * 0.1 + 0.05),
               "hostname": "bench-host", "node_ip": "127.0.0.1", "node_id": "n0", "worker_pid": 1000 + i % 2,
               "device": "cpu", "git_sha": "0" * 40, "versions": "{}", "method_source": "builtin",
               "cpu_share": 1.0}
        if failed:
            row["error"] = f"RuntimeError: noop asked to fail (row {i})"
            row["traceback"] = "Traceback (most recent call last):\n  ...\nRuntimeError: noop asked to fail\n" * 5
        else:
            row.update(point_metrics(labels, scores), labels=labels.tolist(), image_scores=scores.tolist(),
                       metric_variants=json.dumps({"fpr95": "id_tpr95"}))
        rows.append(row)
    return rows


def write_run(run: Path, n_rows: int, methods=METHODS, rows_per_file: int = 1) -> Path:
    """A synthetic run of ``n_rows`` rows, one file per cell as RowStore lays them out, or
    ``rows_per_file`` rows a file (as a store that compacts its files would read them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.store import COLUMNS, SCHEMA, RowStore

    store = RowStore(run)
    for start in range(0, n_rows, CHUNK):
        rows = synthetic_rows(min(CHUNK, n_rows - start), methods, start=start)
        table = pa.Table.from_pylist([{c: r.get(c) for c in COLUMNS} for r in rows], schema=SCHEMA)
        for i in range(0, len(rows), rows_per_file):
            pq.write_table(table.slice(i, rows_per_file), store.path(rows[i]["cell_id"]))
    return run


STEPS = {
    "read": "from orchestrator.store import RowStore; RowStore(run).read()",
    "report": "from reports.leaderboard import build_report; build_report(run)",
}


def measure(step: str, run: Path, root: Path = ROOT) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS GiB) of one step in a fresh interpreter, with the code
    of checkout ``root``. CPU time says what the wall time means on a machine others load too."""
    code = (f"import sys, time, resource; sys.path.insert(0, {str(root)!r}); from pathlib import Path; "
            f"run = Path({str(run)!r}); t0 = time.perf_counter(); c0 = time.process_time(); {STEPS[step]}; "
            "print(time.perf_counter() - t0, time.process_time() - c0, "
            "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=root)
    wall, cpu, rss_kib = out.stdout.split()[-3:]
    return float(wall), float(cpu), int(rss_kib) / 2**20


def n_rows(run: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in (run / "rows").glob("*.parquet"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--large", action="store_true", help="100,000 rows")
    p.add_argument("--keep", help="write the synthetic run to this folder and keep it")
    p.add_argument("--rows-per-file", type=int, default=1,
                   help="rows a file (1: one file per cell, as RowStore writes; more: a compacted store)")
    p.add_argument("--run", help="a synthetic run written before (its rows/ folder is reused)")
    p.add_argument("--no-rebuild", action="store_true", help="skip the rebuilt (cached) report")
    p.add_argument("--against", help="another checkout (e.g. main's): its cold report of the same rows too")
    args = p.parse_args()
    n = 100_000 if args.large else args.rows
    tmp = None
    if args.run:
        run = Path(args.run)
        if not (run / "rows").is_dir():
            raise SystemExit(f"--run {run}: no rows/ folder")
    else:
        run = Path(args.keep) if args.keep else Path(tmp := tempfile.mkdtemp(prefix="report-scale-")) / "run"
        if run.exists() and any(run.iterdir()):
            raise SystemExit(f"--keep {run}: not empty")
        t0 = time.perf_counter()
        write_run(run, n, rows_per_file=args.rows_per_file)
        print(f"wrote {n} rows to {run} in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        files = len(list((run / "rows").glob("*.parquet")))
        for stale in (run / "report", run / ".bootstrap-cache.npz"):  # a reused run: start cold
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        results = [("read every column", *measure("read", run))]
        if args.against:
            results.append((f"report, {Path(args.against).name}'s code", *measure("report", run, Path(args.against))))
            for stale in (run / "report", run / ".bootstrap-cache.npz"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        results.append(("report (cold, no cache)", *measure("report", run)))
        if not args.no_rebuild:
            results.append(("report (rebuilt, cached)", *measure("report", run)))
        base = results[0][1]
        print(f"report of {n_rows(run)} rows in {files} files ({run}); machine load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"{'step':<30} {'wall s':>8} {'vs read':>8} {'CPU s':>8} {'peak RSS GiB':>13}")
        for name, wall, cpu, rss in results:
            print(f"{name:<30} {wall:8.1f} {wall / base:8.2f} {cpu:8.1f} {rss:13.2f}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
