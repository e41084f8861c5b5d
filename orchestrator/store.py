"""Parquet row store: one file per finished cell under ``<results>/<run>/rows/``.

A file is written to a temporary name and renamed, so a crash never leaves half a file, and a
cell's file is never written twice unless a re-run was asked for. ``pd.read_parquet(rows_dir)``
reads the whole run. A file that cannot be read whole (truncated or overwritten by something
else) is moved to ``rows/.damaged/``, which Parquet readers skip (a hidden folder), and its cell
counts as not done, so the next run computes it again.
"""
from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
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


def _plain(value):
    """numpy arrays (labels, scores) -> lists, numpy scalars -> Python, for pyarrow's row builder."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def cause(err: OSError) -> str:
    """The operating system's words for an I/O error ("No space left on device")."""
    return os.strerror(err.errno) if err.errno else str(err)


class RowStore:
    """The rows of one run. Files are named by the cell's id (``<base_cell_id>.parquet``).
    ``damaged`` lists (file, where it was moved, why) for each unreadable file set aside."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.rows_dir = self.run_dir / "rows"
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        self.damaged: list[tuple[Path, Path, str]] = []

    def path(self, cell_id: str) -> Path:
        return self.rows_dir / f"{cell_id}.parquet"

    def exists(self, cell_id: str) -> bool:
        return self.path(cell_id).exists()

    def _set_aside(self, f: Path, why: str) -> None:
        """Move an unreadable row file to ``rows/.damaged/`` (kept for inspection, never read)."""
        aside = self.rows_dir / DAMAGED
        aside.mkdir(exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        dest, n = aside / f"{f.stem}.{stamp}.parquet", 1
        while dest.exists():
            n += 1
            dest = aside / f"{f.stem}.{stamp}.{n}.parquet"
        os.replace(f, dest)
        self.damaged.append((f, dest, why))

    def _readable(self, columns: list[str] | None = None) -> dict[str, pa.Table]:
        """cell id -> its rows (``columns`` only, or all) for every file whose footer and those
        columns read (every page of them); the others are set aside (see ``damaged``)."""
        out = {}
        for f in sorted(self.rows_dir.glob("*.parquet")):
            try:
                with pq.ParquetFile(f) as parquet:   # one open: footer, then the columns' pages
                    if "status" not in parquet.schema_arrow.names:
                        raise ValueError("no status column: not a row file")
                    table = parquet.read(columns=columns)
            except (pa.ArrowException, OSError, ValueError) as e:
                if not f.exists():  # replaced meanwhile (a --rerun of another driver): not damage
                    continue
                self._set_aside(f, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            out[f.stem] = table
        return out

    def tables(self) -> dict[str, pa.Table]:
        """cell id -> its rows, for every file that reads whole (every column, every page, as
        ``pd.read_parquet`` would); the others are set aside (see ``damaged``)."""
        return self._readable()

    def statuses(self) -> dict[str, str]:
        """cell id -> 'ok' | 'failed' | 'timeout' for every finished cell (worst of its rows).
        Reads the status column alone (resuming a large run stays cheap); a file whose footer or
        status column does not read is set aside, so its cell is not done and runs again. Damage
        elsewhere in a file is found by the readers (``tables``), which set it aside the same way."""
        out = {}
        for cell_id, table in self._readable(["status"]).items():
            status = table.column("status").to_pylist()
            out[cell_id] = "ok" if status and all(s == "ok" for s in status) else \
                next((s for s in status if s != "ok"), "failed")
        return out

    def write(self, cell_id: str, rows: list[dict], overwrite: bool = False) -> bool:
        """Write a cell's rows atomically. Returns False (and writes nothing) if the cell already
        has a file and ``overwrite`` is False: a duplicate delivery never makes a second row."""
        target = self.path(cell_id)
        if target.exists() and not overwrite:
            return False
        table = pa.Table.from_pylist([{c: _plain(r.get(c)) for c in COLUMNS} for r in rows], schema=SCHEMA)
        tmp = self.rows_dir / f".{cell_id}.{uuid.uuid4().hex}.tmp"
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except OSError as e:  # full disk, folder gone read-only: name the file (pyarrow does not)
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, cause(e), str(target)) from e
        return True

    def clean_temporaries(self) -> int:
        """Remove temp files a crash left behind (they were never renamed, so never counted)."""
        leftovers = list(self.rows_dir.glob(".*.tmp"))
        for f in leftovers:
            f.unlink(missing_ok=True)
        return len(leftovers)

    def read(self, columns: list[str] | None = None):
        """Every readable row as one DataFrame (what ``pd.read_parquet(rows_dir)`` gives once the
        damaged files are set aside); ``columns`` reads those alone (summaries, reports)."""
        import pandas as pd

        tables = list(self._readable(columns).values())
        if not tables:
            return pd.DataFrame(columns=columns or COLUMNS)
        return pa.concat_tables(tables, promote_options="default").to_pandas()
