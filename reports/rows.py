"""A run's rows, read once and labelled for the report (method variant, board, column)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.grid import LOCATION_PARAMS  # dataset params that say where data lives, not what it is
from orchestrator.store import COLUMNS, METRICS, RowStore
from reports.expected import FULL_CLASSES, class_key

MEAN_COLUMN = "mean"


#: What a report reads of the rows: identity, outcome, metrics, cost and provenance. The large
#: columns are read only where needed: the scores for the bootstrap (SCORE_COLUMNS), the sample
#: maps of the few gallery rows; tracebacks, loss curves and package versions never.
REPORT_COLUMNS = ["run_id", "cell_id", "base_cell_id", "method", "params", "dataset", "dataset_params", "protocol",
                  "normal_class", "category", "ood_set", "seed", "resolved_params", "status", "error", "attempt",
                  *METRICS, "metric_variants", "fit_s", "score_s", "total_s", "peak_rss_bytes", "peak_gpu_bytes",
                  "feature_cache_hit", "started_at", "finished_at", "hostname", "device", "gpu_name", "git_sha",
                  "method_source"]
SCORE_COLUMNS = ["labels", "image_scores"]


def read_rows(run_dir: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Every row of a run (``<run_dir>/rows/``), ``columns`` only (default: all), an empty frame
    with those columns if none. An unreadable row file is set aside to ``rows/.damaged/``
    (RowStore) with a warning."""
    unknown = [c for c in columns or () if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown row columns {unknown}; the schema's are {COLUMNS}")
    rows_dir = Path(run_dir) / "rows"
    if not rows_dir.is_dir() or not any(rows_dir.iterdir()):
        return pd.DataFrame(columns=columns or COLUMNS)
    store = RowStore(run_dir)
    rows = store.read(columns).reset_index(drop=True)
    if columns is not None:  # a column no file has (rows written before it existed): all missing
        rows = rows.reindex(columns=columns)
    for original, moved, why in store.damaged:
        warnings.warn(f"unreadable row file {original} moved to {moved} ({why}); "
                      "run the grid again to recompute its cell", stacklevel=2)
    return rows


def _json(text) -> dict:
    if isinstance(text, str) and text:
        try:
            value = json.loads(text)
            return value if isinstance(value, dict) else {}
        except ValueError:
            return {}
    return {}


def _short(value) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def distinguishing_labels(names: pd.Series, params: pd.Series, ignore=frozenset()) -> pd.Series:
    """``name`` when a name has one param set in the run, else ``name (key=value, ...)`` with
    only the keys whose values differ between that name's param sets."""
    labels = pd.Series(list(names), index=names.index, dtype=object)
    frame = pd.DataFrame({"name": list(names), "params": [p if isinstance(p, str) else "" for p in params]},
                         index=names.index)
    for name, group in frame.groupby("name", sort=False):
        distinct = list(dict.fromkeys(group["params"]))
        if len(distinct) < 2:
            continue
        dicts = {p: {k: v for k, v in _json(p).items() if k not in ignore} for p in distinct}
        keys = sorted({k for d in dicts.values() for k in d})
        varying = [k for k in keys if len({_short(d.get(k)) for d in dicts.values()}) > 1]
        for p, d in dicts.items():
            inner = ", ".join(f"{k}={_short(d.get(k))}" for k in varying)
            labels[group.index[group["params"] == p]] = f"{name} ({inner})" if inner else name
    return labels


def column_of(row) -> str:
    """The leaderboard column of a row: the OOD set (ood), the category (unified), else the class."""
    return _column(row["protocol"], row.get("ood_set"), row.get("category"), row["normal_class"])


def _column(protocol, ood_set, category, normal_class) -> str:
    for value in ((ood_set, category) if protocol == "ood" else (category,)):
        if isinstance(value, str) and value:
            return value
    return str(normal_class)


def annotate(rows: pd.DataFrame) -> pd.DataFrame:
    """Adds ``variant`` (method label), ``board`` (dataset label), ``column`` and ``column_key``."""
    out = rows.copy()
    if out.empty:
        for c in ("variant", "board", "column", "column_key"):
            out[c] = pd.Series(dtype=object)
        return out
    out["variant"] = distinguishing_labels(out["method"], out["params"])
    boards = distinguishing_labels(out["dataset"], out["dataset_params"], ignore=LOCATION_PARAMS)
    in_dist = [f" [ID {c}]" if p == "ood" and isinstance(c, str) and c not in ("all", "") else ""
               for p, c in zip(out["protocol"], out["normal_class"])]
    out["board"] = [b + s for b, s in zip(boards, in_dist)]
    missing = pd.Series([None] * len(out), index=out.index, dtype=object)
    out["column"] = [_column(*r) for r in zip(out["protocol"], out.get("ood_set", missing),
                                              out.get("category", missing), out["normal_class"])]
    keys = {}  # one class_key per distinct (dataset, column): a run has few, rows many
    out["column_key"] = [keys[dc] if dc in keys else keys.setdefault(dc, class_key(*dc))
                         for dc in zip(out["dataset"], out["column"])]
    return out


def column_order(dataset: str, columns) -> list[str]:
    """Columns in the dataset's own class order where known, else natural order."""
    known = FULL_CLASSES.get(dataset, ())
    position = {name: i for i, name in enumerate(known)}

    def key(c: str):
        if c in position:
            return (0, position[c], "")
        return (1, int(c), "") if c.isdigit() else (2, 0, c)

    return sorted(dict.fromkeys(columns), key=key)


def ok_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows that enter means: status ok (never a failed or timed-out cell)."""
    return rows[rows["status"] == "ok"]


def present_metrics(rows: pd.DataFrame) -> list[str]:
    return [m for m in METRICS if m in rows.columns and rows[m].notna().any()]


def as_array(value, dtype=np.float64) -> np.ndarray:
    """A list cell (list, array or None) as a numpy array."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return np.zeros(0, dtype=dtype)
    return np.asarray(value, dtype=dtype)
