"""Parquet row store of one run, under ``<results>/<run>/rows/``.

Layout (``pd.read_parquet(rows_dir)`` reads the whole run, once any interrupted compaction has been
finished, see ``RowStore.recover``)::

    rows/<cell_id>.parquet              a fresh row file: one finished cell, written tmp + rename
    rows/compacted/part-NNNNNN.parquet  compacted rows of many cells; the footer's key-value
                                        metadata ``adgrid.cells`` lists [cell id, row count] in
                                        row order (the part's index: no column is added)
    rows/.compact/                      hidden: parts being written and the compaction journal
    rows/.damaged/                      hidden: unreadable files set aside (kept, never read)

pyarrow's dataset discovery skips names starting with ``.`` or ``_``; ``compacted`` is a plain
folder name (a hive ``key=value`` folder would add a partition column clashing with the rows' own).

Precedence, when a cell has rows in several files: a fresh row file wins over every part (it is
written after the cell was last compacted: a ``--rerun``), and among parts the higher sequence
number wins. A complete compaction leaves every cell in exactly one file; the readers apply the
rule anyway, so a compaction stopped at any point never shows a cell twice through the store.

A file is written to a temporary name and renamed, so a crash never leaves half a file, and a
cell's rows are never written twice unless a re-run was asked for. A file that cannot be read whole
(truncated or overwritten by something else) is moved to ``rows/.damaged/`` and its cell(s) count
as not done (or fall back to an older copy a part still holds), so the next run computes them again.
"""
from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

METRICS = ["image_auroc", "pixel_auroc", "pro", "aupr_in", "aupr_out", "fpr95", "fpr95_openood",
           "detection_error", "accuracy"]

SCHEMA = pa.schema(
    [
        # identity
        ("run_id", pa.string()), ("cell_id", pa.string()), ("base_cell_id", pa.string()),
        ("method", pa.string()), ("params", pa.string()), ("dataset", pa.string()),
        ("dataset_params", pa.string()), ("protocol", pa.string()), ("normal_class", pa.string()),
        ("category", pa.string()), ("ood_set", pa.string()), ("seed", pa.int64()),
        # resolved set-up
        ("resolved_params", pa.string()), ("weights_sha256", pa.string()),
        # outcome
        ("status", pa.string()), ("error", pa.string()), ("traceback", pa.string()),
        ("attempt", pa.int64()),
        # metrics
        *[(m, pa.float64()) for m in METRICS],
        ("metric_variants", pa.string()),
        # scores, training, samples
        ("labels", pa.list_(pa.int8())), ("image_scores", pa.list_(pa.float64())),
        ("loss_curve", pa.list_(pa.float64())), ("sample_maps", pa.binary()),
        # cost
        ("fit_s", pa.float64()), ("score_s", pa.float64()), ("total_s", pa.float64()),
        ("peak_rss_bytes", pa.int64()), ("peak_gpu_bytes", pa.int64()),
        ("n_train", pa.int64()), ("n_test", pa.int64()), ("feature_cache_hit", pa.bool_()),
        # provenance
        ("started_at", pa.timestamp("us", tz="UTC")), ("finished_at", pa.timestamp("us", tz="UTC")),
        ("hostname", pa.string()), ("node_ip", pa.string()), ("node_id", pa.string()),
        ("worker_pid", pa.int64()), ("device", pa.string()), ("gpu_name", pa.string()),
        ("git_sha", pa.string()), ("versions", pa.string()),
        # where a plugin method's code came from ("builtin", "file:NAME@sha256:HEX",
        # "package:DIST==VERSION"), and the resources the cell's worker held
        ("method_source", pa.string()), ("gpu_share", pa.float64()), ("cpu_share", pa.float64()),
    ]
)
COLUMNS = SCHEMA.names
DAMAGED = ".damaged"  # hidden: pyarrow's dataset discovery (pd.read_parquet of rows/) skips it
PARTS = "compacted"   # plain name: read by pd.read_parquet(rows/), no partition column
WORK = ".compact"     # hidden: parts being written, the journal of a compaction in progress
JOURNAL = "journal.json"
CELLS_KEY = b"adgrid.cells"
PART_RE = re.compile(r"^part-(\d+)\.parquet$")
#: compaction writes parts of about this many bytes of Arrow data, in row groups of ROW_GROUP_BYTES
PART_BYTES = 64 << 20
ROW_GROUP_BYTES = 8 << 20
#: cells read before they are copied into one compact table: a one-row table read from a file
#: holds far more memory than its nbytes (its pages' buffers), so the small ones must not pile up
SQUASH_CELLS = 256
#: test hook: a compaction that reaches this step prints "compact paused at STEP" and sleeps, so a
#: test can SIGKILL it there (steps: writing, written, committed, renamed, dropped, deleting, deleted)
PAUSE_ENV = "ADGRID_COMPACT_PAUSE"


def _plain(value):
    """numpy arrays (labels, scores) -> lists, numpy scalars -> Python, for pyarrow's row builder."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def cause(err: OSError) -> str:
    """The operating system's words for an I/O error ("No space left on device")."""
    return os.strerror(err.errno) if err.errno else str(err)


def _visible(name: str) -> bool:
    """What pyarrow's dataset discovery reads (it skips ``.`` and ``_`` names)."""
    return not name.startswith((".", "_"))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _pause(step: str) -> None:
    """The fault-injection hook of the compaction tests (see PAUSE_ENV); a no-op otherwise."""
    if os.environ.get(PAUSE_ENV) == step:
        print(f"compact paused at {step}", flush=True)
        time.sleep(3600)


def _conform(table: pa.Table) -> pa.Table | None:
    """The table in SCHEMA's columns and order (absent columns null: a row file of an older
    version), or None where it has a column outside SCHEMA or of another type (left uncompacted)."""
    names = set(table.column_names)
    if not names <= set(COLUMNS):
        return None
    arrays = []
    for f in SCHEMA:
        if f.name not in names:
            arrays.append(pa.nulls(table.num_rows, f.type))
            continue
        col = table.column(f.name)
        if col.type != f.type:
            if col.type != pa.null():
                return None
            col = pa.nulls(table.num_rows, f.type)
        arrays.append(col)
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


class _Restart(Exception):
    """A file vanished or was set aside mid-read (a concurrent compaction, damage): read again."""


@dataclass
class Compaction:
    """What one ``RowStore.compact`` did: ``sources`` fresh row files folded into ``parts`` (new
    part files; ``dropped`` older parts rewritten without the cells a fresh file superseded);
    ``kept`` fresh files left as they are (a column outside the row schema)."""
    sources: int = 0
    parts: list[Path] = field(default_factory=list)
    dropped: list[Path] = field(default_factory=list)
    rows: int = 0
    kept: list[Path] = field(default_factory=list)


def cell_status(statuses) -> str:
    """The one rule for a cell's status from its rows' (a unified / ood cell has several): "ok" when
    every row is ok, else the first other row's ("failed" or "timeout"); no rows, or a row without a
    status, is "failed". ``statuses`` (part files) and ``reports.cost.run_summary`` apply it vectorised;
    tests/test_store.py holds them equal to this."""
    statuses = list(statuses)
    if statuses and all(s == "ok" for s in statuses):
        return "ok"
    return next((s for s in statuses if s != "ok"), "failed") or "failed"


class RowStore:
    """The rows of one run (see the module doc for the layout and the precedence). Fresh files are
    named by the cell's id (``<cell_id>.parquet``). ``damaged`` lists (file, where it was moved,
    why) for each unreadable file set aside. ``compact_every``: where set (``auto_compact``), a
    ``write`` that brings the fresh files to that many compacts them (the caller holds the lock)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.rows_dir = self.run_dir / "rows"
        self.parts_dir = self.rows_dir / PARTS
        self.work_dir = self.rows_dir / WORK
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        self.damaged: list[tuple[Path, Path, str]] = []
        self.compact_every: int | None = None
        self.compactions: list[Compaction] = []
        self._fresh_since = 0
        self._compacted: set[str] | None = None   # cell ids the parts hold (lazy; footers only)

    # ---- files -------------------------------------------------------------------------------
    def path(self, cell_id: str) -> Path:
        return self.rows_dir / f"{cell_id}.parquet"

    def fresh_files(self) -> list[Path]:
        """The per-cell row files not compacted yet, sorted by name (cell id)."""
        with os.scandir(self.rows_dir) as it:
            names = [e.name for e in it if e.name.endswith(".parquet") and _visible(e.name) and e.is_file()]
        return [self.rows_dir / n for n in sorted(names)]

    def part_files(self) -> list[tuple[int, Path]]:
        """(sequence number, path) of every visible Parquet file under ``rows/compacted/``,
        oldest first (a file not named ``part-N.parquet`` sorts first, as -1)."""
        if not self.parts_dir.is_dir():
            return []
        out = []
        with os.scandir(self.parts_dir) as it:
            for e in it:
                if e.name.endswith(".parquet") and _visible(e.name):
                    m = PART_RE.match(e.name)
                    out.append((int(m.group(1)) if m else -1, self.parts_dir / e.name))
        return sorted(out)

    def exists(self, cell_id: str) -> bool:
        """Whether the cell has rows, in a fresh file or a part."""
        return self.path(cell_id).exists() or cell_id in self._compacted_cells()

    def _compacted_cells(self) -> set[str]:
        if self._compacted is None:
            cells: set[str] = set()
            for _, f in self.part_files():
                try:
                    with pq.ParquetFile(f) as parquet:
                        cells.update(c for c, _ in self._part_index(parquet))
                except (pa.ArrowException, OSError, ValueError):
                    continue   # damaged: the next reader sets it aside; its cells are not done
            self._compacted = cells
        return self._compacted

    def _set_aside(self, f: Path, why: str) -> None:
        """Move an unreadable row file or part to ``rows/.damaged/`` (kept for inspection, never read)."""
        aside = self.rows_dir / DAMAGED
        aside.mkdir(exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        dest, n = aside / f"{f.stem}.{stamp}.parquet", 1
        while dest.exists():
            n += 1
            dest = aside / f"{f.stem}.{stamp}.{n}.parquet"
        os.replace(f, dest)
        self.damaged.append((f, dest, why))
        self._compacted = None

    @staticmethod
    def _why(e: Exception) -> str:
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"

    @staticmethod
    def _part_index(parquet: pq.ParquetFile) -> zip:
        """(cell id, row count) pairs in row order, from a part's footer (``{"cells": [ids],
        "rows": [counts]}``: two flat lists, light to parse at 100,000 cells); ValueError if absent
        or inconsistent."""
        meta = parquet.metadata.metadata or {}
        if CELLS_KEY not in meta:
            raise ValueError("no adgrid.cells index in the footer: not a compacted part")
        index = json.loads(meta[CELLS_KEY])
        cells, rows = (index.get("cells"), index.get("rows")) if isinstance(index, dict) else (None, None)
        if not (isinstance(cells, list) and isinstance(rows, list) and len(cells) == len(rows)
                and all(isinstance(c, str) for c in cells) and all(isinstance(n, int) and n >= 0 for n in rows)):
            raise ValueError("malformed adgrid.cells index")
        if sum(rows) != parquet.metadata.num_rows:
            raise ValueError("adgrid.cells index does not match the row count")
        return zip(cells, rows)

    @staticmethod
    def _read_columns(parquet: pq.ParquetFile, columns: list[str] | None) -> pa.Table:
        """``columns`` of a file (all where None); a column the file lacks (a row file of an older
        version) comes back null, typed as in SCHEMA."""
        names = parquet.schema_arrow.names
        if "status" not in names:
            raise ValueError("no status column: not a row file")
        if columns is None:
            return parquet.read()
        table = parquet.read(columns=[c for c in columns if c in names])
        for c in columns:
            if c not in names:
                kind = SCHEMA.field(c).type if c in COLUMNS else pa.null()
                table = table.append_column(pa.field(c, kind), pa.nulls(table.num_rows, kind))
        return table.select(columns)

    # ---- reading ------------------------------------------------------------------------------
    def _collect(self, columns: list[str] | None) -> list[tuple[pa.Table, list[tuple[str, int, int]]]]:
        """The winning rows of every cell: [(table, [(cell id, first row, row count)])], one entry
        a file. Fresh files first (they win), then parts newest first (a cell already taken by a
        newer file is skipped). A file that does not read is set aside; one that vanishes (a
        concurrent compaction) restarts the read."""
        for _ in range(100):
            try:
                return self._collect_once(columns)
            except _Restart:
                continue
        return self._collect_once(columns)

    def _collect_once(self, columns):
        pieces, taken = [], set()
        for f in self.fresh_files():
            try:
                with pq.ParquetFile(f) as parquet:   # one open: footer, then the columns' pages
                    table = self._read_columns(parquet, columns)
            except (pa.ArrowException, OSError, ValueError) as e:
                if not f.exists():   # compacted meanwhile (a reader without the lock): read again
                    raise _Restart() from e
                self._set_aside(f, self._why(e))
                continue
            pieces.append((table, [(f.stem, 0, table.num_rows)]))
            taken.add(f.stem)
        for _, f in reversed(self.part_files()):
            try:
                with pq.ParquetFile(f) as parquet:
                    ranges, offset = [], 0
                    for cell, n in list(self._part_index(parquet)):
                        if cell not in taken:
                            ranges.append((cell, offset, n))
                            taken.add(cell)
                        offset += n
                    if not ranges:
                        continue
                    table = self._read_columns(parquet, columns)
            except (pa.ArrowException, OSError, ValueError) as e:
                if not f.exists():
                    raise _Restart() from e
                self._set_aside(f, self._why(e))
                raise _Restart() from e   # its cells may have older copies in earlier parts
            pieces.append((table, ranges))
        return pieces

    def tables(self) -> dict[str, pa.Table]:
        """cell id -> its rows, for every cell whose winning file reads whole (every column, every
        page, as ``pd.read_parquet`` would); unreadable files are set aside (see ``damaged``)."""
        out = {}
        for table, ranges in self._collect(None):
            for cell, offset, n in ranges:
                out[cell] = table.slice(offset, n)
        return dict(sorted(out.items()))

    def statuses(self) -> dict[str, str]:
        """cell id -> 'ok' | 'failed' | 'timeout' for every finished cell (worst of its rows).
        Reads the footers and the status column alone (a resume stays cheap: a few parts and the
        fresh files), one part at a time (what it holds beyond the answer is one part's index); a
        file whose footer or status column does not read is set aside, so its cells are not done
        and run again. Damage elsewhere in a file is found by the readers (``tables``, ``read``),
        which set it aside the same way. Same precedence as the readers."""
        for _ in range(100):
            try:
                return self._statuses_once()
            except _Restart:
                continue
        return self._statuses_once()

    def _statuses_once(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in self.fresh_files():
            try:
                with pq.ParquetFile(f) as parquet:
                    status = self._read_columns(parquet, ["status"]).column("status").to_pylist()
            except (pa.ArrowException, OSError, ValueError) as e:
                if not f.exists():
                    raise _Restart() from e
                self._set_aside(f, self._why(e))
                continue
            out[f.stem] = cell_status(status)
        for _, f in reversed(self.part_files()):
            try:
                with pq.ParquetFile(f) as parquet:
                    index = list(self._part_index(parquet))
                    if all(cell in out for cell, _ in index):
                        continue
                    status = self._read_columns(parquet, ["status"]).column("status")
            except (pa.ArrowException, OSError, ValueError) as e:
                if not f.exists():
                    raise _Restart() from e
                self._set_aside(f, self._why(e))
                raise _Restart() from e   # its cells may have older copies in earlier parts
            bad = pc.fill_null(pc.not_equal(status, "ok"), True).to_numpy(zero_copy_only=False)
            before = np.concatenate([[0], np.cumsum(bad, dtype=np.int64)])
            offset = 0
            for cell, n in index:
                if cell not in out:
                    if n and before[offset + n] == before[offset]:
                        out[cell] = "ok"
                    elif n:
                        first = offset + int(np.argmax(bad[offset: offset + n]))
                        out[cell] = status[first].as_py() or "failed"
                    else:
                        out[cell] = "failed"
                offset += n
        return out

    def read(self, columns: list[str] | None = None):
        """Every winning row as one DataFrame, ordered by cell id (what ``pd.read_parquet(rows_dir)``
        gives once the damaged files are set aside and no compaction is half done); ``columns``
        reads those alone (summaries, reports)."""
        import pandas as pd

        pieces = self._collect(columns)
        if not pieces:
            return pd.DataFrame(columns=columns or COLUMNS)
        bases = np.cumsum([0] + [t.num_rows for t, _ in pieces])
        entries = sorted((cell, bases[p] + offset, n) for p, (_, ranges) in enumerate(pieces)
                         for cell, offset, n in ranges)
        table = pa.concat_tables([t for t, _ in pieces], promote_options="default")
        counts = np.array([n for _, _, n in entries], np.int64)
        starts = np.array([s for _, s, _ in entries], np.int64)
        total = int(counts.sum())
        index = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(total)
        if total != table.num_rows or not np.array_equal(index, np.arange(total)):
            table = table.take(pa.array(index))
        return table.to_pandas()

    # ---- writing ------------------------------------------------------------------------------
    def write(self, cell_id: str, rows: list[dict], overwrite: bool = False) -> bool:
        """Write a cell's rows atomically. Returns False (and writes nothing) if the cell already
        has rows (a fresh file or a part) and ``overwrite`` is False: a duplicate delivery never
        makes a second row. With ``overwrite`` the new fresh file wins over a compacted copy."""
        target = self.path(cell_id)
        if not overwrite and self.exists(cell_id):
            return False
        table = pa.Table.from_pylist([{c: _plain(r.get(c)) for c in COLUMNS} for r in rows], schema=SCHEMA)
        tmp = self.rows_dir / f".{cell_id}.{uuid.uuid4().hex}.tmp"
        try:
            pq.write_table(table, tmp)
            _fsync_file(tmp)
            os.replace(tmp, target)
        except OSError as e:  # full disk, folder gone read-only: name the file (pyarrow does not)
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, cause(e), str(target)) from e
        self._fresh_since += 1
        if self.compact_every and self._fresh_since >= self.compact_every:
            self.compact()
        return True

    def auto_compact(self, every: int | None) -> None:
        """Compact whenever ``every`` fresh files have accumulated (counted from now, the files
        already there included); None turns it off. The caller holds the run's lock."""
        self.compact_every = every
        self._fresh_since = len(self.fresh_files()) if every else 0

    def clean_temporaries(self) -> int:
        """Remove temp files a crash left behind (they were never renamed, so never counted), and
        finish or undo a compaction a crash interrupted (``recover``). Call it under the run's lock."""
        leftovers = list(self.rows_dir.glob(".*.tmp"))
        for f in leftovers:
            f.unlink(missing_ok=True)
        return len(leftovers) + self.recover()

    # ---- compaction ---------------------------------------------------------------------------
    def recover(self) -> int:
        """Finish or undo a compaction that was killed (call it under the run's lock). With a
        journal (the compaction had committed): roll forward -- move its parts into place, delete
        the parts it rewrote and the fresh files it holds (each only if unchanged since). Without
        one: delete the half-written parts under ``.compact/`` (nothing visible had changed).
        Returns the number of leftover files handled."""
        if not self.work_dir.is_dir():
            return 0
        journal = self.work_dir / JOURNAL
        handled = 0
        if journal.exists():
            self._roll_forward(json.loads(journal.read_text()))
            handled += 1
        for f in self.work_dir.iterdir():
            f.unlink(missing_ok=True)
            handled += 1
        self._remove_work_dir()
        return handled

    def _remove_work_dir(self) -> None:
        try:
            self.work_dir.rmdir()
            _fsync_dir(self.rows_dir)
        except OSError:
            pass

    def _roll_forward(self, plan: dict) -> None:
        """Apply a committed compaction's journal; each step can be repeated (a kill mid-way)."""
        self.parts_dir.mkdir(exist_ok=True)
        for tmp, final in plan["parts"]:
            src, dst = self.work_dir / tmp, self.rows_dir / final
            if src.exists():
                os.replace(src, dst)
            elif not dst.exists():
                raise RuntimeError(f"compaction journal {self.work_dir / JOURNAL} names part {dst}, which "
                                   "is neither written nor in place; nothing was deleted")
        _fsync_dir(self.parts_dir)
        _pause("renamed")
        for name in plan["dropped"]:
            (self.rows_dir / name).unlink(missing_ok=True)
        _pause("dropped")
        for i, (name, size, mtime_ns, ino) in enumerate(plan["sources"]):
            f = self.rows_dir / name
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            if (st.st_size, st.st_mtime_ns, st.st_ino) == (size, mtime_ns, ino):  # else a newer row
                f.unlink()
            if i == 0:
                _pause("deleting")
        _fsync_dir(self.parts_dir)
        _fsync_dir(self.rows_dir)
        _pause("deleted")
        (self.work_dir / JOURNAL).unlink(missing_ok=True)
        _fsync_dir(self.work_dir)
        self._compacted = None

    def compact(self, part_bytes: int = PART_BYTES) -> Compaction:
        """Fold every fresh row file into new parts under ``rows/compacted/`` (call it under the
        run's lock). A part that holds a cell a fresh file supersedes is rewritten without it, so a
        finished compaction leaves each cell in one file and ``pd.read_parquet(rows_dir)`` reads
        each row once. Journaled: parts are written under ``.compact/`` and fsynced, then a journal
        naming them, the parts they replace and the fresh files they hold is committed (written and
        renamed), then parts are moved into place and the sources deleted. Killed before the commit
        nothing visible changed; after it, ``recover`` rolls it forward. Unreadable sources are set
        aside (see ``damaged``)."""
        self.recover()
        result = Compaction()
        fresh = self.fresh_files()
        if not fresh:
            self._fresh_since = 0
            return result
        parts = self.part_files()
        next_seq = max([s for s, _ in parts] + [0]) + 1
        self.work_dir.mkdir(exist_ok=True)
        writer = _PartWriter(self.work_dir, next_seq, part_bytes)
        sources = []
        try:
            for f in fresh:
                try:
                    before = f.stat()
                    with pq.ParquetFile(f) as parquet:
                        if "status" not in parquet.schema_arrow.names:
                            raise ValueError("no status column: not a row file")
                        table = parquet.read()
                    if f.stat().st_ino != before.st_ino:
                        raise RuntimeError(f"{f} was replaced while it was compacted: is another "
                                           "driver writing this run without its lock?")
                except (pa.ArrowException, OSError, ValueError) as e:
                    if f.exists():
                        self._set_aside(f, self._why(e))
                    continue
                conformed = _conform(table)
                if conformed is None:
                    result.kept.append(f)
                    continue
                writer.add(f.stem, conformed)
                sources.append([f.name, before.st_size, before.st_mtime_ns, before.st_ino])
            done = {s[0][: -len(".parquet")] for s in sources}
            # older parts holding a cell now superseded (or shadowed by a newer part) are rewritten
            seen, dropped = set(done), []
            for _, f in reversed(parts):
                try:
                    with pq.ParquetFile(f) as parquet:
                        index = list(self._part_index(parquet))
                        if not any(c in seen for c, _ in index):
                            seen.update(c for c, _ in index)
                            continue
                        table = _conform(parquet.read())
                except (pa.ArrowException, OSError, ValueError) as e:
                    if f.exists():
                        self._set_aside(f, self._why(e))
                    continue
                if table is None:
                    continue   # not in the row schema (not written here): left, readers resolve it
                offset = 0
                for cell, n in index:
                    if cell not in seen:
                        writer.add(cell, table.slice(offset, n))
                        seen.add(cell)
                    offset += n
                dropped.append(f)
            written = writer.close()
            for tmp in written:
                _fsync_file(self.work_dir / tmp)
            _fsync_dir(self.work_dir)
            _pause("written")
            plan = {"parts": [[tmp, f"{PARTS}/{tmp}"] for tmp in written],
                    "dropped": [str(f.relative_to(self.rows_dir)) for f in dropped],
                    "sources": sources}
            journal_tmp = self.work_dir / f".{JOURNAL}.tmp"
            journal_tmp.write_text(json.dumps(plan))
            _fsync_file(journal_tmp)
            os.replace(journal_tmp, self.work_dir / JOURNAL)   # the commit point
            _fsync_dir(self.work_dir)
        except BaseException:
            if not (self.work_dir / JOURNAL).exists():
                writer.abort()
                for f in self.work_dir.iterdir():
                    f.unlink(missing_ok=True)
                self._remove_work_dir()
            raise
        _pause("committed")
        self._roll_forward(plan)
        self._remove_work_dir()
        self._fresh_since = 0
        result.sources = len(sources)
        result.parts = [self.rows_dir / final for _, final in plan["parts"]]
        result.dropped = dropped
        result.rows = writer.rows
        self.compactions.append(result)
        return result


class _PartWriter:
    """Streams cells into ``part-NNNNNN.parquet`` files under the work folder: row groups of about
    ROW_GROUP_BYTES (whole cells), a new part past ``part_bytes``; each part's footer gets its
    ``adgrid.cells`` index. Memory stays about one row group, whatever the number of cells."""

    def __init__(self, work_dir: Path, seq: int, part_bytes: int):
        self.work_dir, self.seq, self.part_bytes = work_dir, seq, part_bytes
        self.writer: pq.ParquetWriter | None = None
        self.name: str | None = None
        self.cells: list[str] = []
        self.counts: list[int] = []
        self.pending: list[pa.Table] = []     # tables as read, up to SQUASH_CELLS
        self.buffer: list[pa.Table] = []      # compact copies, up to a row group
        self.pending_bytes = self.buffered = self.part_written = self.rows = 0
        self.written: list[str] = []

    def add(self, cell: str, table: pa.Table) -> None:
        if self.writer is None:
            self.name = f"part-{self.seq:06d}.parquet"
            self.writer = pq.ParquetWriter(self.work_dir / self.name, table.schema)
            self.seq += 1
        self.pending.append(table)
        self.cells.append(cell)
        self.counts.append(table.num_rows)
        self.pending_bytes += table.nbytes
        self.rows += table.num_rows
        if len(self.pending) >= SQUASH_CELLS:
            self._squash()
        if self.buffered + self.pending_bytes >= min(ROW_GROUP_BYTES, self.part_bytes):
            self._flush()
            if self.part_written >= self.part_bytes:
                self._finish()

    def _squash(self) -> None:
        """Copy the pending tables into one contiguous table, releasing the buffers they held."""
        if self.pending:
            table = pa.concat_tables(self.pending, promote_options="default").combine_chunks()
            self.buffer.append(table)
            self.buffered += table.nbytes
            self.pending, self.pending_bytes = [], 0

    def _flush(self) -> None:
        self._squash()
        if self.buffer:
            self.writer.write_table(pa.concat_tables(self.buffer, promote_options="default"))
            _pause("writing")
            self.part_written += self.buffered
            self.buffer, self.buffered = [], 0

    def _finish(self) -> None:
        if self.writer is None:
            return
        self._flush()
        index = {"cells": self.cells, "rows": self.counts}
        self.writer.add_key_value_metadata({CELLS_KEY.decode(): json.dumps(index, separators=(",", ":"))})
        self.writer.close()
        self.written.append(self.name)
        self.writer, self.cells, self.counts, self.part_written = None, [], [], 0

    def close(self) -> list[str]:
        self._finish()
        return self.written

    def abort(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:   # already failing: the caller removes the file
                pass
            self.writer = None
