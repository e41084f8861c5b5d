"""Scale benchmark (issue #23): a grid of 10,000 cells, and a results folder of 100,000 rows.

Each figure is printed with a ratio against a baseline measured in the same run:

* dryrun    ``bench.py GRID --dry-run`` of 10,000 ``noop`` cells (100,000 with --big): wall time and
            peak RSS, against a process that only imports what planning imports (the registries:
            methods, data) and one that imports the orchestrator alone; the planning's own µs per
            cell (load, expand, describe, the runner's affinity) measured inside one process.
* cells     10,000 ``noop`` cells (100,000 with --big) on --workers Ray workers: cells/s and the
            per-cell overhead (dispatch -> row written, minus the cell's own total_s), against the
            no-Ray loop of ``run_cell`` over the same kind of cell in this process.
* planning  a resume's planning (load + expand the grid, open the store, ``statuses()``, the cells
            to run) in a fresh process per size, at 1,000 / 10,000 / 100,000 finished rows: wall
            time and peak RSS (VmHWM), against the same process's VmHWM once its imports are done and
            against the smallest size. Rows are written with ``RowStore.write`` (real ``noop`` rows
            of each class, re-keyed per cell). Where the store can compact (``RowStore.compact``)
            each size is also planned after ``bench.py compact RUN`` (or ``compact()``).
* report    ``bench.py report RUN`` from cold (no bootstrap cache) at 10,000 rows (100,000 with
            --big) over the store as a finished run leaves it (compacted at its end): wall time and
            peak RSS, against the same at a tenth of the rows (10x the rows should cost at most about
            10x). ``--report-loose`` also times the rows left as one-row files. Uses the rows of the
            ``cells`` part when it ran, else the synthetic rows.
* recovery  a 4-node local cluster (head 127.0.0.2 with no CPU, workers 127.0.0.3-5 with one each, as
            tests/test_cluster.py starts nodes); ``bench.py GRID --address`` runs 90 ``noop`` cells of
            0.2 s; once a third of the rows are written the raylet of node 127.0.0.4 is killed
            (SIGKILL); prints rows == cells and the retried count.

    python benchmarks/scale.py [--only dryrun,cells,planning,report,recovery] [--big] [--workers 2]
                               [--workdir DIR] [--repo PATH]

The default run (all parts, 10,000 cells, planning up to 100,000 rows) takes ~15 minutes on the
2-core development machine. ``--workdir`` keeps the synthetic rows between runs (written once);
``--repo`` runs the dry-run and planning children against another checkout (before / after a change).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PARTS = ("dryrun", "cells", "planning", "report", "recovery")
CLASSES = 10  # digits


# -- helpers ------------------------------------------------------------------------------------

def vm_kib(field: str = "VmHWM") -> int:
    """A field of /proc/self/status in KiB (VmHWM: peak RSS; VmRSS: RSS now)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def mib(kib: float) -> str:
    return f"{kib / 1024:.0f} MiB"


def noop_grid(path: Path, cells: int, sleep_s: float | None = None) -> Path:
    """A grid of ``cells`` noop cells on digits: all 10 classes × cells/10 seeds."""
    if cells % CLASSES:
        raise SystemExit(f"{cells} cells: use a multiple of {CLASSES} (digits' classes)")
    params = f"\n    params: {{sleep_s: {sleep_s}}}" if sleep_s else ""
    path.write_text(textwrap.dedent(f"""\
        name: scale{cells}
        seeds: [{", ".join(map(str, range(cells // CLASSES)))}]
        datasets:
          - name: digits
            protocol: one_class
            classes: all
        methods:
          - name: noop""") + params + "\n")
    return path


def timed_process(cmd: list[str], out: Path, timeout: float, cwd: Path = ROOT, env=None) -> dict:
    """Run ``cmd`` with stdout/stderr to ``out``; its wall time, exit status and peak RSS (the
    child's ru_maxrss from wait4, KiB)."""
    with open(out, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"wall_s": time.perf_counter() - t0, "rc": None, "maxrss_kib": usage.ru_maxrss,
                        "timed_out": True}
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": wall, "rc": proc.returncode, "maxrss_kib": usage.ru_maxrss, "timed_out": False}


def child_json(cmd: list[str], timeout: float = 1200) -> dict:
    """Run a child of this script that prints one JSON line last; fail loudly otherwise."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def this(*args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *map(str, args)]


# -- children (run in a fresh process: their peak RSS is their own) -------------------------------

def child_imports(repo: str, what: str) -> None:
    sys.path.insert(0, repo)
    t0 = time.perf_counter()
    if what == "registries":
        import data  # noqa: F401
        import methods  # noqa: F401
    import orchestrator.config  # noqa: F401
    import orchestrator.grid  # noqa: F401
    print(json.dumps({"import_s": time.perf_counter() - t0, "hwm_kib": vm_kib()}))


def child_expand(repo: str, grid: str) -> None:
    """Planning's own cost per cell in one process, after the imports: CPU seconds (the machine is
    shared, so wall time is noisier) of load_grid, expand, describe and the runner's affinity."""
    sys.path.insert(0, repo)
    import data  # noqa: F401
    import methods  # noqa: F401
    from data.protocols import planning
    from orchestrator.config import load_grid
    from orchestrator.grid import expand
    from orchestrator.runner import affinity
    import orchestrator.grid as grid_module

    hwm0, clock = vm_kib(), time.process_time
    with planning():
        t0 = clock()
        g = load_grid(grid)
        t1 = clock()
        cells = expand(g).cells
        t2 = clock()
    for c in cells:
        c.describe()
    t3 = clock()
    keys = {affinity(c) for c in cells}
    t4 = clock()
    if hasattr(grid_module, "affinity"):   # the cached one (orchestrator/grid.py), where it exists
        if {grid_module.affinity(c) for c in cells} != keys:
            raise RuntimeError("grid.affinity and runner.affinity disagree")
    t5 = clock()
    print(json.dumps({"cells": len(cells), "load_s": t1 - t0, "expand_s": t2 - t1, "describe_s": t3 - t2,
                      "affinity_s": t4 - t3, "grid_affinity_s": t5 - t4, "groups": len(keys),
                      "has_grid_affinity": hasattr(grid_module, "affinity"),
                      "hwm_imports_kib": hwm0, "hwm_kib": vm_kib()}))


def child_plan(repo: str, run_dir: str, grid: str) -> None:
    """What ``bench.py GRID`` does before Ray starts on a resume (bench.py run_locked): load and
    expand the grid, open the store, read every row's status, pick the cells still to run."""
    sys.path.insert(0, repo)
    t0 = time.perf_counter()
    import data  # noqa: F401
    import methods  # noqa: F401
    from orchestrator.config import load_grid
    from orchestrator.grid import expand
    from orchestrator.store import RowStore

    t1, hwm_imports = time.perf_counter(), vm_kib()
    cells = expand(load_grid(grid)).cells
    t2 = time.perf_counter()
    store = RowStore(run_dir)
    store.clean_temporaries()
    statuses = store.statuses()
    t3 = time.perf_counter()
    todo = [c for c in cells if c.cell_id not in statuses]
    t4 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "expand_s": t2 - t1, "statuses_s": t3 - t2, "todo_s": t4 - t3,
                      "plan_s": t4 - t1, "cells": len(cells), "done": len(statuses), "todo": len(todo),
                      "damaged": len(store.damaged), "hwm_imports_kib": hwm_imports, "hwm_kib": vm_kib(),
                      "rss_kib": vm_kib("VmRSS")}))


# -- synthetic rows -----------------------------------------------------------------------------
#
# A real noop row per digits class is written by RowStore.write into a scratch store; each cell's
# row file is that file's bytes with the 16-character cell id and the 8-byte seed replaced (same
# lengths, so every offset holds). ``patchable`` proves it per template: patched with random values,
# every column of the copy must read back with the new id and seed and otherwise unchanged. This
# writes 100,000 rows in seconds where RowStore.write takes minutes (a few ms of CPU and an fsync
# each); --writer store writes every row through RowStore.write instead.

MAGIC_SEED = 0x1D2C3B4A59687786   # a seed whose 8 bytes occur nowhere else in a row file


def template_rows() -> dict:
    """One real ``noop`` row per digits class, from run_cell (what a finished cell writes)."""
    from orchestrator.cell import run_cell
    from orchestrator.grid import Cell

    out = {}
    for k in range(CLASSES):
        rows = run_cell(Cell("noop", {}, "digits", {}, "one_class", str(k), 0))
        if rows[0]["status"] != "ok":
            raise RuntimeError(f"a noop cell failed: {rows[0]['error']}")
        out[str(k)] = rows[0]
    return out


def _seed_bytes(seed: int) -> bytes:
    return int(seed).to_bytes(8, "little", signed=True)


class RowTemplate:
    """The bytes of one class's row file, written by RowStore.write, to be re-keyed per cell."""

    def __init__(self, scratch, row: dict, run_id: str, label: str):
        from orchestrator.cell import base_row
        from orchestrator.grid import Cell

        cell = Cell("noop", {}, "digits", {}, "one_class", label, MAGIC_SEED)
        self.row = {**row, **base_row(cell, run_id, 1)}
        self.cell_id = cell.cell_id
        scratch.write(cell.cell_id, [self.row], overwrite=True)
        self.data = scratch.path(cell.cell_id).read_bytes()
        self.id_bytes, self.seed_bytes = cell.cell_id.encode(), _seed_bytes(MAGIC_SEED)

    def bytes_for(self, cell_id: str, seed: int) -> bytes:
        return self.data.replace(self.id_bytes, cell_id.encode()).replace(self.seed_bytes, _seed_bytes(seed))

    def patchable(self, folder: Path) -> bool:
        import random

        import pyarrow.parquet as pq

        want = pq.read_table(folder / f"{self.cell_id}.parquet").to_pylist()[0]
        for _ in range(3):
            cell_id, seed = f"{random.getrandbits(64):016x}", random.randrange(1 << 40)
            probe = folder / f"probe-{cell_id}.parquet"
            probe.write_bytes(self.bytes_for(cell_id, seed))
            got = pq.read_table(probe).to_pylist()[0]
            probe.unlink()
            if got != {**want, "cell_id": cell_id, "base_cell_id": cell_id, "seed": seed}:
                return False
        return True


def write_synthetic(run_dir: Path, cells, how: str = "template") -> float:
    """A row for every cell lacking one; returns the seconds taken."""
    from orchestrator.store import RowStore

    store = RowStore(run_dir)
    missing = [c for c in cells if not store.exists(c.cell_id)]
    if not missing:
        return 0.0
    t0 = time.perf_counter()
    rows = template_rows()
    scratch = RowStore(run_dir.parent / f".{run_dir.name}-templates")
    templates = {label: RowTemplate(scratch, row, run_dir.name, label) for label, row in rows.items()}
    if how == "template" and all(t.patchable(scratch.rows_dir) for t in templates.values()):
        for cell in missing:
            target = store.path(cell.cell_id)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(templates[cell.class_label].bytes_for(cell.cell_id, cell.seed))
            os.replace(tmp, target)
    else:
        from orchestrator.cell import base_row

        for cell in missing:
            store.write(cell.cell_id, [{**rows[cell.class_label], **base_row(cell, run_dir.name, 1)}])
    shutil.rmtree(scratch.run_dir)
    import pyarrow.parquet as pq

    for cell in missing[::97] + missing[-1:]:   # a sample reads back whole, with its own id and seed
        got = pq.read_table(store.path(cell.cell_id)).select(["cell_id", "seed", "normal_class"]).to_pylist()
        if got != [{"cell_id": cell.cell_id, "seed": cell.seed, "normal_class": cell.class_label}]:
            raise RuntimeError(f"synthetic row of {cell.cell_id} reads back as {got}")
    return time.perf_counter() - t0


def linked_subset(src: Path, dest: Path, cell_ids) -> Path:
    """A run folder whose row files are hard links to ``src``'s files of ``cell_ids`` (no copy)."""
    from orchestrator.store import RowStore

    if dest.exists():
        shutil.rmtree(dest)
    rows, have = RowStore(dest).rows_dir, RowStore(src)
    for cell_id in cell_ids:
        os.link(have.path(cell_id), rows / have.path(cell_id).name)
    return dest


def compact(run_dir: Path, repo: Path, log: Path) -> float | None:
    """Compact a run folder where the store can (``bench.py compact RUN``, else ``compact()``);
    returns the seconds taken, None where the store has no compaction."""
    from orchestrator.store import RowStore

    if not hasattr(RowStore, "compact"):
        return None
    help_rc = subprocess.run([sys.executable, str(repo / "bench.py"), "compact", "--help"], cwd=repo,
                             capture_output=True).returncode
    t0 = time.perf_counter()
    if help_rc == 0:
        r = timed_process([sys.executable, str(repo / "bench.py"), "compact", str(run_dir)], log, 1800, cwd=repo)
        if r["rc"] != 0:
            raise RuntimeError(f"bench.py compact {run_dir} exited {r['rc']}: {log.read_text()[-2000:]}")
    else:
        RowStore(run_dir).compact()
    return time.perf_counter() - t0


# -- parts --------------------------------------------------------------------------------------

def n_cells(args) -> int:
    return args.cells or (100_000 if args.big else 10_000)


def part_dryrun(args, work: Path) -> None:
    n = n_cells(args)
    grid = noop_grid(work / f"dry{n}.yaml", n)
    repo = Path(args.repo)
    light, heavy = ({**r, **json.loads((work / f"imports-{what}.out").read_text().strip().splitlines()[-1])}
                    for what in ("orchestrator", "registries")
                    for r in [timed_process(this("--child", "imports", repo, what), work / f"imports-{what}.out", 600)])
    dry = timed_process([sys.executable, str(repo / "bench.py"), str(grid), "--dry-run",
                         "--results", str(work / "results")], work / "dryrun.out", 1200, cwd=repo)
    tail = (work / "dryrun.out").read_text().strip().splitlines()[-1:]
    inner = child_json(this("--child", "expand", repo, grid))
    per = {k: 1e6 * inner[f"{k}_s"] / inner["cells"]
           for k in ("load", "expand", "describe", "affinity", "grid_affinity")}
    print(f"\n[dryrun] bench.py --dry-run of {n:,} noop cells ({repo})")
    print(f"  dry run          {dry['wall_s']:6.2f} s  peak RSS {mib(dry['maxrss_kib'])}   -> {' '.join(tail)}")
    print(f"  imports alone    {heavy['wall_s']:6.2f} s  peak RSS {mib(heavy['maxrss_kib'])}  (methods, data: "
          f"torch, torchvision, sklearn...; {heavy['import_s']:.2f} s of it importing)")
    print(f"  orchestrator     {light['wall_s']:6.2f} s  peak RSS {mib(light['maxrss_kib'])}  (config + grid, "
          "no method or dataset module)")
    print(f"  dry run / imports alone: time {dry['wall_s'] / heavy['wall_s']:.2f}x, "
          f"RSS {dry['maxrss_kib'] / heavy['maxrss_kib']:.2f}x; beyond the imports "
          f"{1e6 * (dry['wall_s'] - heavy['wall_s']) / n:.0f} µs/cell wall (bench.py's other imports and "
          "printing included)")
    print(f"  in one process (CPU µs/cell): load {per['load']:.2f}, expand {per['expand']:.2f}, "
          f"describe {per['describe']:.2f}, runner.affinity {per['affinity']:.2f}, grid.affinity "
          f"{per['grid_affinity']:.2f}" + ("" if inner["has_grid_affinity"] else " (absent)") + "; RSS growth "
          f"{mib(inner['hwm_kib'] - inner['hwm_imports_kib'])} ({1024 * (inner['hwm_kib'] - inner['hwm_imports_kib']) / n:.0f} B/cell)")


def part_cells(args, work: Path, state: dict) -> None:
    import ray

    from orchestrator.cell import run_cell
    from orchestrator.config import load_grid
    from orchestrator.grid import expand
    from orchestrator.runner import Runner, start_ray
    from orchestrator.store import RowStore

    n = n_cells(args)
    cells = expand(load_grid(noop_grid(work / f"cells{n}.yaml", n))).cells
    # baseline: the same kind of cell, run_cell in a loop in this process (no Ray, no store), set up
    # as a worker runs it (orchestrator/worker.py): one torch thread, the artefact cache
    import torch

    from methods.base import ArtifactCache
    from orchestrator.runner import DEFAULT_CACHE_BYTES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = ArtifactCache(DEFAULT_CACHE_BYTES)
    run_cell(cells[0], cache=cache)   # warm: imports, digits decoded
    sample = cells[1:1 + args.baseline_cells]
    t0 = time.perf_counter()
    own = [run_cell(c, cache=cache)[0]["total_s"] for c in sample]
    loop_s = (time.perf_counter() - t0) / len(sample)
    torch.set_num_threads(threads)
    del cache
    run_dir = work / "results" / f"cells{n}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    start_ray(num_cpus=args.workers, dashboard=False)
    try:
        runner = Runner(cells, RowStore(run_dir), run_id=run_dir.name, workers=args.workers, progress=False)
        s = runner.run()
    finally:
        ray.shutdown()
    rows = len(list((run_dir / "rows").glob("*.parquet")))
    busy = sum(o for _, o in runner.latencies)
    over = [lat - o for lat, o in runner.latencies]
    mean_over = (s.wall_s * s.workers - busy) / n
    own_ray = busy / n
    rate, loop_rate = n / s.wall_s, 1 / loop_s
    print(f"\n[cells] {n:,} noop cells on {s.workers} Ray workers: ok {s.ok}, failed {s.failed}, rows {rows}")
    print(f"  wall {s.wall_s:.1f} s after {s.startup_s:.1f} s worker start-up: {rate:.1f} cells/s")
    print(f"  no-Ray loop of run_cell ({len(sample)} cells, one process, a worker's cache and 1 thread): {loop_rate:.1f} cells/s "
          f"({1e3 * loop_s:.1f} ms/cell, own total_s {1e3 * statistics.mean(own):.1f} ms)")
    print(f"  cells/s ratio Ray / loop: {rate / loop_rate:.2f} (ideal {s.workers}: {s.workers} workers); "
          f"per worker {rate / loop_rate / s.workers:.2f}")
    print(f"  cells/s / ideal (workers / the cell's own total_s on Ray, {s.workers / own_ray:.1f} cells/s): "
          f"{rate / (s.workers / own_ray):.2f}  (the loop ran at another moment of a shared machine's load; "
          "this ratio's baseline is the same run's)")
    print(f"  per-cell overhead: median {1e3 * statistics.median(over):.1f} ms (dispatch -> row written, minus "
          f"the cell's own), mean {1e3 * mean_over:.1f} ms (wall x workers - own); the cell's own total_s "
          f"{1e3 * own_ray:.1f} ms on Ray: overhead / own {mean_over / own_ray:.2f}")
    state["cells_run"] = (run_dir, n)


def part_planning(args, work: Path, state: dict) -> None:
    from orchestrator.config import load_grid
    from orchestrator.grid import expand
    from orchestrator.store import RowStore

    sizes = sorted(args.planning_sizes)
    big = sizes[-1]
    src = work / "results" / f"plan{big}"
    cells = expand(load_grid(noop_grid(work / f"plan{big}.yaml", big))).cells
    wrote = write_synthetic(src, cells, args.writer)
    print(f"\n[planning] resume planning in a fresh process per size ({args.repo})")
    print(f"  synthetic rows: {big:,} in {src}" + (f", written in {wrote:.0f} s ("
                                                   f"{args.writer} writer, read back whole)" if wrote else " (reused)"))
    results = []
    for n in sizes:
        grid = noop_grid(work / f"plan{n}.yaml", n)
        ids = [c.cell_id for c in expand(load_grid(grid)).cells]
        run_dir = src if n == big else linked_subset(src, work / "results" / f"plan{n}", ids)
        variants = [("rows", run_dir)]
        if hasattr(RowStore, "compact"):
            compacted = linked_subset(src, work / "results" / f"plan{n}-compacted", ids)
            took = compact(compacted, Path(args.repo), work / f"compact{n}.out")
            variants.append((f"compacted ({took:.0f} s)", compacted))
        for label, folder in variants:
            r = child_json(this("--child", "plan", args.repo, folder, grid))
            if r["done"] != n or r["todo"] != 0:
                raise RuntimeError(f"planning at {n}: {r['done']} done, {r['todo']} to run (expected {n}, 0)")
            results.append((n, label, r))
    base = results[0][2]
    print(f"  {'rows':>8} {'store':<16} {'plan s':>7} {'statuses s':>10} {'µs/row':>7} {'peak RSS':>9} "
          f"{'after imports':>13} {'growth':>8} {'B/row':>6}")
    for n, label, r in results:
        growth = r["hwm_kib"] - r["hwm_imports_kib"]
        print(f"  {n:>8,} {label:<16} {r['plan_s']:>7.2f} {r['statuses_s']:>10.2f} {1e6 * r['plan_s'] / n:>7.0f} "
              f"{mib(r['hwm_kib']):>9} {mib(r['hwm_imports_kib']):>13} {mib(growth):>8} {1024 * growth / n:>6.0f}")
    top = [r for n, label, r in results if n == big][0]
    print(f"  at {big:,} vs {sizes[0]:,} rows: plan time {top['plan_s'] / base['plan_s']:.1f}x for "
          f"{big / sizes[0]:.0f}x the rows; peak RSS {top['hwm_kib'] / base['hwm_kib']:.2f}x")


def part_report(args, work: Path, state: dict) -> None:
    from orchestrator.config import load_grid
    from orchestrator.grid import expand

    n = n_cells(args)
    if state.get("cells_run", (None, 0))[1] == n:
        src, kind = state["cells_run"][0], "rows of the cells part"
    else:
        # the planning part's rows (this run's, or a --workdir's earlier run's) where they cover n cells
        written = sorted((int(p.name[4:]), p) for p in (work / "results").glob("plan*") if p.name[4:].isdigit())
        covering = [p for size, p in written if size >= n]
        if covering:
            src = covering[0]
        else:
            src = work / "results" / f"plan{n}"
            write_synthetic(src, expand(load_grid(noop_grid(work / f"plan{n}.yaml", n))).cells, args.writer)
        kind = f"synthetic rows ({src.name})"
    sizes = []
    for size in (n // 10, n):   # a tenth of the rows: the baseline
        grid = noop_grid(work / f"report{size}.yaml", size)
        ids = [c.cell_id for c in expand(load_grid(grid)).cells]
        folder = linked_subset(src, work / "results" / f"report{size}", ids)
        # as a finished run leaves its rows: compacted at its end (bench.py compact)
        took = compact(folder, Path(args.repo), work / f"compact-report{size}.out")
        stores = [("compacted" if took is not None else "loose files", folder, took)]
        if args.report_loose and took is not None:  # also as one-row files: a run whose compaction was off
            stores.insert(0, ("loose files", linked_subset(src, work / "results" / f"report{size}loose", ids), None))
        for label, run_dir, took in stores:
            r = timed_process([sys.executable, str(Path(args.repo) / "bench.py"), "report", str(run_dir)],
                              report_log(work, size, label), args.report_timeout, cwd=Path(args.repo))
            sizes.append((size, label, took, r))
    print(f"\n[report] bench.py report, cold (no bootstrap cache) ({kind})")
    for size, label, took, r in sizes:
        state_txt = "timed out" if r["timed_out"] else f"exit {r['rc']}"
        made = f"; the run's compaction took {took:.0f} s" if took is not None else ""
        print(f"  {size:>8,} rows, {label:<11}: {r['wall_s']:7.1f} s, peak RSS {mib(r['maxrss_kib'])} "
              f"({state_txt}{made})")
    for label in dict.fromkeys(lbl for _, lbl, _, _ in sizes):
        pair = [(size, r) for size, lbl, _, r in sizes if lbl == label]
        (a, ra), (b, rb) = pair
        if not (ra["timed_out"] or rb["timed_out"]):
            print(f"  {label}: {b:,} vs {a:,} rows: {rb['wall_s'] / ra['wall_s']:.1f}x the time for {b / a:.0f}x the "
                  f"rows ({rb['wall_s'] / ra['wall_s'] / (b / a):.2f} of linear)")
    for size, label, _, r in sizes:
        if r["rc"] != 0:
            print(f"  report at {size:,} rows ({label}): " + report_log(work, size, label).read_text()[-1500:])


def report_log(work: Path, size: int, label: str) -> Path:
    return work / f"report{size}-{label.split()[0]}.out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_recovery(args, work: Path) -> None:
    """Head + 3 worker nodes on loopback addresses; one worker node's raylet killed mid-grid."""
    import psutil

    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # socket paths stay under 107 bytes
    port, dash = free_port(), free_port()
    address = f"127.0.0.2:{port}"
    nodes: dict[str, subprocess.Popen] = {}
    logs = work / "recovery"
    logs.mkdir(exist_ok=True)

    def status() -> str:
        return subprocess.run([ray_bin, "status", f"--address={address}"], env=env, capture_output=True,
                              text=True).stdout

    def wait_for(what: str, ok, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            time.sleep(1)
        raise RuntimeError(f"{what} within {timeout:.0f} s:\n{status()}")

    try:
        nodes["127.0.0.2"] = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.2", f"--port={port}",
             "--num-cpus=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={ray_tmp}"],
            env=env, start_new_session=True, stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT)
        wait_for("the head node did not start", lambda: subprocess.run(
            [ray_bin, "status", f"--address={address}"], env=env, capture_output=True).returncode == 0)
        for k, ip in enumerate(("127.0.0.3", "127.0.0.4", "127.0.0.5"), 1):   # one at a time: three
            nodes[ip] = subprocess.Popen(                                         # at once time out on 2 cores
                [ray_bin, "start", "--block", f"--node-ip-address={ip}", f"--address={address}", "--num-cpus=1",
                 f"--dashboard-agent-listen-port={free_port()}"],
                env=env, start_new_session=True, stdout=open(logs / f"node-{ip}.log", "w"), stderr=subprocess.STDOUT)
            wait_for(f"worker node {ip} did not join", lambda: f"/{k}.0 CPU" in status()
                     or nodes[ip].poll() is not None)
            if nodes[ip].poll() is not None:
                raise RuntimeError(f"worker node {ip} exited: {(logs / f'node-{ip}.log').read_text()[-2000:]}")
        n = args.recovery_cells
        grid = noop_grid(work / "recovery.yaml", n, sleep_s=0.2)
        results = work / "results"
        rows_dir = results / f"scale{n}" / "rows"
        if rows_dir.parent.exists():
            shutil.rmtree(rows_dir.parent)
        t0 = time.perf_counter()
        driver = subprocess.Popen([sys.executable, str(ROOT / "bench.py"), str(grid), "--address", address,
                                   "--results", str(results), "--quiet", "--no-report"], cwd=ROOT, env=env,
                                  stdout=open(logs / "driver.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        victim = nodes["127.0.0.4"]
        killed_at = None
        while driver.poll() is None:
            done = len(list(rows_dir.glob("*.parquet"))) if rows_dir.is_dir() else 0
            if killed_at is None and done >= n // 3:
                raylets = [p for p in psutil.Process(victim.pid).children(recursive=True) if p.name() == "raylet"]
                if not raylets:
                    raise RuntimeError("no raylet under the 127.0.0.4 node's `ray start`")
                for p in raylets:
                    p.send_signal(signal.SIGKILL)
                killed_at = (time.perf_counter() - t0, done)
            if time.perf_counter() - t0 > args.recovery_timeout:
                os.killpg(driver.pid, signal.SIGKILL)
                raise RuntimeError(f"the grid did not finish within {args.recovery_timeout:.0f} s: "
                                   + (logs / "driver.log").read_text()[-3000:])
            time.sleep(0.2)
        wall = time.perf_counter() - t0
        import pandas as pd

        df = pd.read_parquet(rows_dir, columns=["cell_id", "status", "node_ip", "attempt"])
        out = (logs / "driver.log").read_text()
        finished = [line for line in out.splitlines() if line.startswith("finished in")]
        print(f"\n[recovery] {n} noop cells of 0.2 s on a head + 3 worker nodes; raylet of 127.0.0.4 SIGKILLed "
              f"at {killed_at[0]:.1f} s with {killed_at[1]} rows written" if killed_at else
              f"\n[recovery] the grid finished before {n // 3} rows were written: nothing was killed")
        print(f"  driver exit {driver.returncode}, wall {wall:.1f} s: {finished[0] if finished else out[-1500:]}")
        ok = int((df["status"] == "ok").sum())
        print(f"  rows {len(df)} == cells {n}: {len(df) == n and df['cell_id'].is_unique}; ok {ok}; "
              f"rows per node {df['node_ip'].value_counts().sort_index().to_dict()}; "
              f"attempt 2 rows {int((df['attempt'] > 1).sum())}")
    finally:
        for proc in reversed(list(nodes.values())):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    p.add_argument("--big", action="store_true", help="100,000 cells for dryrun, cells and report")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cells", type=int, help="cells of the dryrun, cells and report parts (default 10,000; "
                   "100,000 with --big)")
    p.add_argument("--baseline-cells", type=int, default=200, help="cells of the no-Ray run_cell loop")
    p.add_argument("--planning-sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1000, 10_000, 100_000], help="finished rows to plan a resume over")
    p.add_argument("--writer", choices=["template", "store"], default="template",
                   help="synthetic rows: re-keyed copies of RowStore-written files (seconds), or RowStore.write "
                   "per row (minutes at 100,000)")
    p.add_argument("--recovery-cells", type=int, default=90)
    p.add_argument("--recovery-timeout", type=float, default=600)
    p.add_argument("--report-timeout", type=float, default=600, help="seconds per report build")
    p.add_argument("--report-loose", action="store_true", help="also time the report over the rows as one-row "
                   "files (a run with compaction off); by default only the compacted store a run leaves")
    p.add_argument("--workdir", help="keep rows and grids here (reused by a later run) instead of a temp folder")
    p.add_argument("--repo", default=str(ROOT), help="checkout whose bench.py and orchestrator the dryrun and "
                   "planning children use (default: this one)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        {"imports": child_imports, "expand": child_expand, "plan": child_plan}[kind](*rest)
        return 0
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown part(s) {', '.join(unknown)}; valid: {', '.join(PARTS)}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="adgrid-scale-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"scale benchmark: parts {', '.join(parts)}; work folder {work}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs", flush=True)
    state: dict = {}
    t0 = time.perf_counter()
    try:
        for part in PARTS:
            if part not in parts:
                continue
            t = time.perf_counter()
            if part == "dryrun":
                part_dryrun(args, work)
            elif part == "cells":
                part_cells(args, work, state)
            elif part == "planning":
                part_planning(args, work, state)
            elif part == "report":
                part_report(args, work, state)
            else:
                part_recovery(args, work)
            print(f"  ({part}: {time.perf_counter() - t:.0f} s)", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
