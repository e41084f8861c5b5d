"""A run's rows, read once and labelled for the report (method variant, board, column)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.store import COLUMNS, METRICS, RowStore
from reports.expected import FULL_CLASSES, class_key

#: Dataset params that say where data lives (as orchestrator.grid.LOCATION_PARAMS), not what it is.
LOCATION_PARAMS = frozenset({"root", "download", "cache_dir"})
MEAN_COLUMN = "mean"


def read_rows(run_dir: str | Path) -> pd.DataFrame:
    """Every row of a run (``<run_dir>/rows/*.parquet``), an empty frame with the schema if none.
    An unreadable row file is set aside to ``rows/.damaged/`` (RowStore) with a warning."""
    rows_dir = Path(run_dir) / "rows"
    if not rows_dir.is_dir() or not any(rows_dir.glob("*.parquet")):
        return pd.DataFrame(columns=COLUMNS)
    store = RowStore(run_dir)
    rows = store.read().reset_index(drop=True)
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
    for field in (("ood_set", "category") if row["protocol"] == "ood" else ("category",)):
        value = row.get(field)
        if isinstance(value, str) and value:
            return value
    return str(row["normal_class"])


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
    out["column"] = [column_of(r) for r in out.to_dict("records")]
    out["column_key"] = [class_key(d, c) for d, c in zip(out["dataset"], out["column"])]
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
