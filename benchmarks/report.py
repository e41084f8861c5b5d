"""Report build time with and without the bootstrap cache (``RUN/.bootstrap-cache.npz``).

Builds the report of a copy of a run three times and prints each wall time with its ratio to the
first (the baseline, measured in the same run):

* cold: no cache, every row is resampled (1,000 resamples of its whole test set);
* rebuilt: the cache holds every row, as after ``bench.py report`` on a finished run;
* resumed: the cache holds all rows but the ``--new`` newest, as after a resumed or extended run.

It checks that the three reports' tables are identical. Default data: the committed Fashion-MNIST
reproduction (120 rows of 10,000 test samples each).

    python benchmarks/report.py [--rows reports/reproductions/fmnist/rows] [--new 2]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TABLES = ("leaderboard", "reproduction", "cost", "failures")


def timed_build(run: Path) -> tuple[float, dict[str, pd.DataFrame]]:
    from reports.leaderboard import build_report

    t0 = time.perf_counter()
    folder = build_report(run)
    wall = time.perf_counter() - t0
    return wall, {name: pd.read_parquet(folder / f"{name}.parquet") for name in TABLES}


def main() -> int:
    from reports.leaderboard import BOOTSTRAP_CACHE

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=str(ROOT / "reports/reproductions/fmnist/rows"), help="a run's rows/ folder")
    p.add_argument("--new", type=int, default=2, help="rows the cache lacks in the 'resumed' build")
    args = p.parse_args()
    files = sorted(Path(args.rows).glob("*.parquet"), key=lambda f: f.stat().st_mtime)
    if len(files) <= args.new:
        raise SystemExit(f"{args.rows}: {len(files)} row files, need more than --new {args.new}")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        (run / "rows").mkdir(parents=True)
        for f in files:
            shutil.copy2(f, run / "rows" / f.name)
        cache = run / BOOTSTRAP_CACHE
        cold, tables = timed_build(run)
        rebuilt, again = timed_build(run)
        # the cache of the run before its newest rows: build without them, then put them back
        cache.unlink()
        aside = Path(tmp) / "aside"
        aside.mkdir()
        for f in files[-args.new:]:
            shutil.move(run / "rows" / f.name, aside / f.name)
        timed_build(run)
        for f in files[-args.new:]:
            shutil.move(aside / f.name, run / "rows" / f.name)
        resumed, after = timed_build(run)
        same = all(tables[n].equals(again[n]) and tables[n].equals(after[n]) for n in TABLES)
        size_mb = cache.stat().st_size / 1e6
    n = len(files)
    print(f"report of {n} rows ({args.rows}); bootstrap cache {size_mb:.1f} MB")
    print(f"{'build':<34} {'wall s':>8} {'vs cold':>8}")
    for name, wall in (("cold (no cache)", cold), ("rebuilt (cache holds every row)", rebuilt),
                       (f"resumed ({args.new} new rows)", resumed)):
        print(f"{name:<34} {wall:8.1f} {wall / cold:8.2f}")
    print(f"tables identical across the three builds: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
