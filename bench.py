#!/usr/bin/env python
"""adgrid command line.

  python bench.py [run] GRID.yaml [--results DIR] [--run NAME] [--address ADDR] [--only KEY=VALUE ...]
                  [--dry-run] [--rerun failed|all] [--max-attempts N] [--cell-timeout SECONDS]
                  [--no-feature-cache] [--workers N] [--node-ip IP]
  python bench.py list [GRID.yaml]
  python bench.py report RESULTS/RUN [--compare OTHER_RUN] [--tolerance POINTS] [--expected CSV]
  python bench.py compact RESULTS/RUN [--part-mb MB]

``run`` is the default subcommand: ``python bench.py GRID.yaml`` runs the grid.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

EXIT_FAILED = 1  # no cell of the run succeeded, or the results could not be written
EXIT_BAD_INPUT = 2  # also: results folder not writable, run folder held by another driver
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM
#: per-cell row files a run lets accumulate before it compacts them (--compact-every)
COMPACT_EVERY = 1000
PART_MB = 64.0
#: I/O errors that are the results folder's (said in one line, no traceback)
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO,
                  errno.ENOTDIR, errno.EEXIST}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``ray job stop``, ``kill``) delivered as an interrupt, so
    the run stops the way Ctrl-C stops it: finished rows kept, workers killed, a resume hint."""


_sigterm_received = False


def _raise_terminated(signum, frame):
    # Ray's blocking calls (ray.wait, ray.get) run Python signal handlers themselves and re-raise
    # whatever they raise as a plain KeyboardInterrupt, so the exit status reads this flag instead
    global _sigterm_received
    _sigterm_received = True
    raise Terminated()


def run_stoppable(runner):
    """Run the grid with SIGTERM delivered as an interrupt. Returns the runner's summary, or the
    exit status a shell expects when SIGTERM (143) or Ctrl-C (130) stopped it; finished rows stay.

    Call it after ray.init, which installs Ray's own SIGTERM handler (a native stack dump and
    abort). Once the grid is done SIGTERM just ends the process: a report is built aside, then
    moved, so a half-built one never replaces the last."""
    global _sigterm_received
    _sigterm_received = False
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return runner.run()
    except KeyboardInterrupt:
        return EXIT_TERMINATED if _sigterm_received else EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def add_run_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("grid", help="grid YAML file (see grids/demo.yaml)")
    p.add_argument("--results", default="results", help="results folder (default: results/)")
    p.add_argument("--run", help="run name (default: the grid's name)")
    p.add_argument("--address", help="existing Ray cluster: auto or HOST:PORT")
    p.add_argument("--node-ip", help="node address of a local Ray (default 127.0.0.1, the one address on "
                   "which all of Ray's servers listen on loopback alone)")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="restrict the grid (method=, dataset=, class=, seed=, protocol=); repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the cells and start nothing")
    p.add_argument("--rerun", choices=["failed", "all"], help="run finished cells again")
    p.add_argument("--max-attempts", type=int, default=2, help="attempts per cell when a worker dies")
    p.add_argument("--cell-timeout", type=float, help="seconds before a cell is cancelled (timeout row)")
    p.add_argument("--no-feature-cache", action="store_true", help="turn the worker feature cache off")
    p.add_argument("--cache-gb", type=float, default=4.0, help="feature cache budget per worker (GiB)")
    p.add_argument("--workers", type=int, help="number of worker actors (default: one per GPU / CPU slot)")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compact-every", type=int, default=COMPACT_EVERY, metavar="N",
                   help=f"fold the per-cell row files into rows/compacted/ whenever N have accumulated; a "
                   f"run of N cells or more ends compacted (default {COMPACT_EVERY}; 0: never)")
    return p


def add_list_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("grid", nargs="?", help="also list the methods and datasets this grid's plugins register")
    return p


def add_report_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("run_dir")
    p.add_argument("--compare", help="another run folder to compare against")
    p.add_argument("--tolerance", type=float, default=1.0, help="AUROC points counted as reproduced")
    p.add_argument("--expected", action="append", default=[], metavar="CSV",
                   help="your own reference numbers (reports/expected.csv's columns), added to its numbers")
    return p


def add_compact_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("run_dir", help="a run folder, RESULTS/RUN")
    p.add_argument("--part-mb", type=float, default=PART_MB, help=f"size of a part file (default {PART_MB:g} MB)")
    return p


#: subcommand -> (help, argument builder, handler); ``run`` is the default
SUBCOMMANDS = {
    "run": ("run a grid (the default: bench.py GRID.yaml)", add_run_arguments, lambda a: cmd_run(a)),
    "list": ("list methods, datasets and protocols with their params and defaults", add_list_arguments,
             lambda a: cmd_list(a)),
    "report": ("build the report of a finished run", add_report_arguments, lambda a: cmd_report(a)),
    "compact": ("fold a run's per-cell row files into rows/compacted/ (a finished, killed or re-run run)",
                add_compact_arguments, lambda a: cmd_compact(a)),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description="adgrid: benchmark grids of anomaly and OOD "
                                "detectors over Ray. `bench.py GRID.yaml` is short for `bench.py run GRID.yaml`.")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (text, build, handler) in SUBCOMMANDS.items():
        build(sub.add_parser(name, help=text, description=text)).set_defaults(handler=handler)
    return p


def run_parser() -> argparse.ArgumentParser:
    """The ``run`` subcommand's parser alone (its options, for tools that build on them)."""
    return add_run_arguments(argparse.ArgumentParser(prog="bench.py run", description="Run a benchmark grid over Ray."))


def parse_only(items: list[str]) -> dict[str, list[str]]:
    from orchestrator.config import ConfigError
    from orchestrator.grid import ONLY_KEYS

    only: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in ONLY_KEYS:
            raise ConfigError(f"--only {item!r}: expected KEY=VALUE with KEY one of {', '.join(ONLY_KEYS)}")
        only.setdefault(key, []).append(value)
    return only


# methods whose rows are a reference line, not a detector: the summary table labels them
BASELINES = {"noop": "chance baseline"}


def summary_table(df) -> str:
    """Mean image / pixel AUROC and seconds per (dataset, protocol, method); a baseline's rows are
    labelled with what they are, e.g. ``noop (chance baseline)``."""
    import pandas as pd

    if df.empty:
        return "(no rows)"
    df = df.assign(method=df["method"].map(lambda m: f"{m} ({BASELINES[m]})" if m in BASELINES else m))
    g = df.groupby(["dataset", "protocol", "method"], dropna=False)
    table = pd.DataFrame({
        "rows": g.size(),
        "ok": g["status"].apply(lambda s: int((s == "ok").sum())),
        "image_auroc": g["image_auroc"].mean(),
        "pixel_auroc": g["pixel_auroc"].mean(),
        "total_s": g["total_s"].mean(),
    })
    return table.to_string(float_format=lambda v: f"{v:.3f}")


def cannot_write(err: OSError, where) -> str:
    """One line naming the path and the operating system's cause (full disk, read-only...)."""
    from orchestrator.store import cause

    return f"cannot write {err.filename or where}: {cause(err)}"


def print_damaged(store) -> None:
    for original, moved, why in store.damaged:
        if original.parent == store.parts_dir:
            print(f"damaged row file {original} ({why}): moved to {moved}; the cells it held run again")
        else:
            print(f"damaged row file {original} ({why}): moved to {moved}; its cell runs again")
    store.damaged.clear()


#: the columns the end-of-run summary reads (summary_table, failed_line): not the scores
SUMMARY_COLUMNS = ["base_cell_id", "dataset", "protocol", "method", "status", "image_auroc", "pixel_auroc",
                   "total_s", "params", "normal_class", "seed", "error"]


def failed_line(row) -> str:
    return (f"{row['status']}: {row['method']} {row['params']} {row['dataset']} class={row['normal_class']} "
            f"seed={row['seed']}: {row['error']}")


def lock_run(run_dir: Path):
    """The run folder's lock (and its store's folders made), or the exit status of why not: another
    driver holds it, or the results folder cannot be written (both said in one line, exit 2)."""
    from orchestrator.lock import RunLock, RunLocked
    from orchestrator.store import RowStore

    try:
        RowStore(run_dir)
        lock = RunLock(run_dir).acquire()
    except RunLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:  # read-only or unwritable --results, full disk: before anything ran
        if e.errno not in STORAGE_ERRNOS:
            raise
        print(f"error: {cannot_write(e, run_dir)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if lock.note:
        print(f"note: {lock.note}")
    return lock


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.config import ConfigError, load_grid, run_folder
    from orchestrator.grid import expand
    from orchestrator.store import RowStore
    from data.protocols import planning

    try:
        # a dry run plans datasets whose files are absent with their published classes
        with planning() if args.dry_run else contextlib.nullcontext([]) as planned:
            grid = load_grid(args.grid)
            only = parse_only(args.only)
            expansion = expand(grid, only)
        run_dir = run_folder(args.results, args.run or grid.name)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    cells = expansion.cells
    if args.dry_run:
        for note in planned:
            print(f"planned without data: {note}")
        for what, why in expansion.dropped:
            print(f"dropped: {what}: {why}")
        for cell in cells:
            print(cell.describe())
        print(f"{len(cells)} cells ({len(expansion.dropped)} dropped)")
        return 0
    lock = lock_run(run_dir)
    if isinstance(lock, int):
        return lock
    try:
        return run_locked(args, grid, cells, RowStore(run_dir))
    except OSError as e:  # full disk, folder gone read-only mid-run: rows already written stay
        if e.errno not in STORAGE_ERRNOS:
            raise
        print(f"error: {cannot_write(e, run_dir)}; the rows written before it are kept: free the space "
              "and run the same command again to resume", file=sys.stderr)
        return EXIT_FAILED
    finally:
        lock.release()


def compacted_line(store, what: str) -> str | None:
    """One line for the compactions ``store`` did since the last call (None where it did none)."""
    done, store.compactions = store.compactions, []
    sources = sum(c.sources for c in done)
    if not sources:
        return None
    parts = [p.name for c in done for p in c.parts]
    return (f"compacted {sources} row file(s){' ' + what if what else ''} into {len(parts)} part(s) under "
            f"{store.parts_dir}" + (f" ({parts[0]})" if len(parts) == 1 else f" ({parts[0]} .. {parts[-1]})"))


def run_locked(args, grid, cells, store) -> int:
    """The run proper, under the run folder's lock: rows, summary, report, exit status."""
    run_name = store.run_dir.name
    every = getattr(args, "compact_every", COMPACT_EVERY)
    if every is not None and every < 0:
        print("error: --compact-every must be 0 (never) or a positive number of files", file=sys.stderr)
        return EXIT_BAD_INPUT
    store.clean_temporaries()   # also finishes or undoes a compaction a killed driver left
    if every and len(store.fresh_files()) >= every:   # the files of a killed large run: one read less
        store.compact(int(PART_MB * (1 << 20)))
        print_damaged(store)
        line = compacted_line(store, "left by an earlier run")
        if line:
            print(line)
    statuses = store.statuses()
    print_damaged(store)
    if args.rerun == "all":
        overwrite = {c.cell_id for c in cells if c.cell_id in statuses}
    elif args.rerun == "failed":
        overwrite = {c.cell_id for c in cells if statuses.get(c.cell_id, "ok") != "ok"}
    else:
        overwrite = set()
    todo = [c for c in cells if c.cell_id not in statuses or c.cell_id in overwrite]
    print(f"grid {grid.name}: {len(cells)} cells, {len(cells) - len(todo)} already done, {len(todo)} to run"
          f" -> {store.rows_dir}")
    s = None
    if todo:
        from orchestrator.runner import DEFAULT_NODE_IP, ClusterError, Runner, node_ip_free, start_ray

        node_ip = args.node_ip or DEFAULT_NODE_IP
        with_dashboard = True
        if not (args.address or os.environ.get("RAY_ADDRESS")):
            if node_ip != DEFAULT_NODE_IP:
                print(f"node address {node_ip}: Ray's servers listen on every interface (only "
                      f"{DEFAULT_NODE_IP} keeps them on loopback)")
            if not node_ip_free(node_ip):
                with_dashboard = False
                print(f"another local Ray holds {node_ip}:52365 (its dashboard agent): this run starts "
                      "without a dashboard, which would show that run's logs and metrics")
        from plugins.loader import ship_paths

        dashboard = start_ray(args.address, node_ip=node_ip, dashboard=with_dashboard,
                              py_modules=ship_paths(grid.plugin_specs))
        if dashboard:
            print(f"Ray dashboard: {dashboard}")
        store.auto_compact(every or None)
        runner = Runner(todo, store, run_id=run_name, max_attempts=args.max_attempts,
                        cell_timeout=args.cell_timeout,
                        cache_bytes=0 if args.no_feature_cache else int(args.cache_gb * (1 << 30)),
                        workers=args.workers, overwrite=overwrite, progress=not args.quiet)
        try:
            s = run_stoppable(runner)
        except ClusterError as e:   # finished rows are kept; the message says what the cluster lacks
            print(f"error: {e}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            store.auto_compact(None)
        if isinstance(s, int):
            return s
        print(f"finished in {s.wall_s:.1f}s on {s.workers} worker(s): ok {s.ok}, failed {s.failed}, "
              f"timeout {s.timeout}, retried {s.retried}"
              + (f", re-queued from lost nodes {s.lost}" if s.lost else "")
              + (f", not written {s.not_written} (their cells already had a row)" if s.not_written else ""))
    # a run of `every` cells or more ends with no per-cell file left (smaller runs keep theirs)
    if every and store.fresh_files() and len(set(statuses) | {c.cell_id for c in todo}) >= every:
        store.compact(int(PART_MB * (1 << 20)))
    line = compacted_line(store, "during the run")
    if line:
        print(line)
    print_damaged(store)
    df = store.read(columns=SUMMARY_COLUMNS)
    print_damaged(store)
    ids = {c.cell_id for c in cells}
    df = df[df["base_cell_id"].isin(ids)]
    # exit 1 when no row this run wrote is ok; where it wrote none, when no cell of the grid has an ok row
    ran = s.ok + s.failed + s.timeout if s is not None else 0
    succeeded = s.ok > 0 if ran else (df.empty or bool((df["status"] == "ok").any()))
    print(summary_table(df))
    failed = df[df["status"] != "ok"]
    for _, row in failed.iterrows():
        print(failed_line(row))
    if not args.no_report:
        report_hook = _report_module()
        if report_hook is not None and not df.empty:
            out = report_hook.build_report(store.run_dir)
            print(f"report: {out}")
    if not succeeded:
        print("error: no cell of this run succeeded", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _report_module():
    try:
        import reports.leaderboard as leaderboard
    except ImportError:
        return None
    return leaderboard if hasattr(leaderboard, "build_report") else None


def cmd_list(args: argparse.Namespace) -> int:
    from data import DATASETS
    from data.protocols import PROTOCOLS
    from methods import METHODS
    from orchestrator.config import ConfigError, load_grid_plugins, load_plugins
    from plugins.registry import BUILTIN

    try:  # installed entry points, and with a grid its plugins: listed like the built-ins
        load_grid_plugins(args.grid) if args.grid else load_plugins([], Path.cwd(), "installed plugins")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT

    def source(registry, name) -> str:
        where = registry.source(name)
        return "" if where == BUILTIN else f"  (plugin: {where})"

    def fields(model) -> str:
        parts = []
        for name, f in model.model_fields.items():
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            parts.append(f"    {name} = {default}")
        return "\n".join(parts) or "    (no parameters)"

    print("methods:")
    for name, cls in sorted(METHODS.items()):
        print(f"  {name}  protocols: {', '.join(sorted(cls.protocols))}" + (f"  [{cls.paper}]" if cls.paper else "")
              + source(METHODS, name))
        if cls.reference:
            print(f"    reference code: {cls.reference}")
        print(fields(cls.Params))
    print("datasets:")
    for name, cls in sorted(DATASETS.items()):
        print(f"  {name}" + source(DATASETS, name))
        print(fields(cls.Params))
    print("protocols:")
    for name, text in PROTOCOLS.items():
        print(f"  {name}: {text}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    module = _report_module()
    if module is None:
        print("error: the report stage (reports/leaderboard.py) is not available", file=sys.stderr)
        return 1
    for folder in filter(None, [args.run_dir, args.compare]):
        if not (Path(folder) / "rows").is_dir():
            print(f"error: {folder} has no rows/ folder (expected RESULTS/RUN)", file=sys.stderr)
            return EXIT_BAD_INPUT
    from orchestrator.store import RowStore
    from reports.expected import ExpectedFileError

    try:
        for folder in filter(None, [args.run_dir, args.compare]):
            store = RowStore(folder)
            store.statuses()  # sets aside row files whose footer or status does not read (the report
            # reads every column through the store, which sets aside any other damage with a warning)
            print_damaged(store)
        out = module.build_report(Path(args.run_dir), compare=args.compare, tolerance=args.tolerance,
                                  extra_expected=tuple(args.expected))
    except ExpectedFileError as e:
        print(f"error: --expected: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        print(f"error: {cannot_write(e, Path(args.run_dir) / 'report')}", file=sys.stderr)
        return EXIT_FAILED
    print(f"report: {out}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Fold a run folder's per-cell row files into parts, under the run's lock (a driver running
    the grid holds it: exit 2). Also finishes or undoes a compaction a kill interrupted."""
    from orchestrator.store import RowStore

    run_dir = Path(args.run_dir)
    if not (run_dir / "rows").is_dir():
        print(f"error: {run_dir} has no rows/ folder (expected RESULTS/RUN)", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.part_mb > 0:
        print("error: --part-mb must be positive", file=sys.stderr)
        return EXIT_BAD_INPUT
    lock = lock_run(run_dir)
    if isinstance(lock, int):
        return lock
    try:
        store = RowStore(run_dir)
        store.clean_temporaries()
        done = store.compact(max(1, int(args.part_mb * (1 << 20))))
        print_damaged(store)
        for f in done.kept:
            print(f"kept {f} as it is: it has columns outside the row schema")
        print(compacted_line(store, "") or f"nothing to compact in {store.rows_dir}")
        if done.dropped:
            print(f"rewrote {len(done.dropped)} older part(s) without the cells a newer row file replaced")
        return 0
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        print(f"error: {cannot_write(e, run_dir / 'rows')}; nothing was lost: run the same command again "
              "once there is space", file=sys.stderr)
        return EXIT_FAILED
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]   # bench.py GRID.yaml: the default subcommand
    args = parser().parse_args(argv)
    if args.command is None:
        parser().print_help()
        return EXIT_BAD_INPUT
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
