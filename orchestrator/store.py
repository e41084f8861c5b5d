"""Parquet row store: one file per finished cell under ``<results>/<run>/rows/``.

A file is written to a temporary name and renamed, so a crash never leaves half a file, and a
cell's file is never written twice unless a re-run was asked for. ``pd.read_parquet(rows_dir)``
reads the whole run.
"""
from __future__ import annotations

import os
import uuid
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
    ]
)
COLUMNS = SCHEMA.names


def _plain(value):
    """numpy arrays (labels, scores) -> lists, numpy scalars -> Python, for pyarrow's row builder."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


class RowStore:
    """The rows of one run. Files are named by the cell's id (``<base_cell_id>.parquet``)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.rows_dir = self.run_dir / "rows"
        self.rows_dir.mkdir(parents=True, exist_ok=True)

    def path(self, cell_id: str) -> Path:
        return self.rows_dir / f"{cell_id}.parquet"

    def exists(self, cell_id: str) -> bool:
        return self.path(cell_id).exists()

    def statuses(self) -> dict[str, str]:
        """cell id -> 'ok' | 'failed' | 'timeout' for every finished cell (worst of its rows)."""
        out = {}
        for f in self.rows_dir.glob("*.parquet"):
            try:
                status = pq.read_table(f, columns=["status"]).column("status").to_pylist()
            except Exception:  # unreadable file: treat as not done, it will be rewritten
                continue
            out[f.stem] = "ok" if status and all(s == "ok" for s in status) else \
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
        pq.write_table(table, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return True

    def clean_temporaries(self) -> int:
        """Remove temp files a crash left behind (they were never renamed, so never counted)."""
        leftovers = list(self.rows_dir.glob(".*.tmp"))
        for f in leftovers:
            f.unlink(missing_ok=True)
        return len(leftovers)

    def read(self):
        import pandas as pd

        files = sorted(self.rows_dir.glob("*.parquet"))
        if not files:
            return pd.DataFrame(columns=COLUMNS)
        return pd.read_parquet(self.rows_dir)
