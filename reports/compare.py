"""``--compare OTHER``: on the cells both runs share (same ``cell_id``), the change of each metric
(this run minus the other) with a 95% paired bootstrap interval.

Paired: both runs' scores are evaluated on the same resamples of the test samples (the test set of
a cell is the same in both runs when their ``labels`` agree), so the interval reflects how much the
change could be an accident of which test samples were drawn. A cell is *flagged* when that
interval excludes 0 and the change is at least ``min_change`` (0.1 point by default; smaller
shifts, e.g. float noise between two machines, are not a regression worth reading). Metrics with
no per-sample scores (pixel AUROC, PRO, accuracy) get the change without an interval;
``beyond_tolerance`` marks any change larger than the report's tolerance.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from reports.bootstrap import (BOOTSTRAP_METRICS, N_RESAMPLES, DistributionCache, percentile_interval,
                               resample_metrics, resamples_for, row_seed, usable)
from reports.rows import as_array, present_metrics
from reports.tables import row_distributions

MIN_CHANGE = 0.001
CHUNK = 1024  # this run's rows compared at a time (their and the other run's distributions held)
COMPARE_COLUMNS = ["cell_id", "variant", "board", "protocol", "column", "seed", "metric", "this", "other",
                   "change", "ci_low", "ci_high", "flagged", "beyond_tolerance", "paired", "note"]
STATUS_COLUMNS = ["cell_id", "variant", "board", "column", "seed", "this_status", "other_status", "error"]


def change_distribution(a: dict, b: dict, metrics: list[str], n_resamples: int,
                        this: dict | None, other: dict | None) -> tuple[dict, bool]:
    """Bootstrap distribution of (this - other) per metric; paired when the labels agree.

    ``this`` and ``other``: the rows' own distributions (``row_distributions``). A row's resamples
    depend only on its labels, the resample count and its cell's seed, so for two rows of one cell
    with the same labels these are already on the same resamples: their difference is the paired
    one. Rows on different test sets are resampled independently instead (the other at seed + 1).
    """
    la, sa = as_array(a.get("labels"), np.int8), as_array(a.get("image_scores"))
    lb, sb = as_array(b.get("labels"), np.int8), as_array(b.get("image_scores"))
    if not (metrics and usable(la, sa) and usable(lb, sb)):
        return {}, False
    seed = row_seed(a["cell_id"])
    if la.size == lb.size and np.array_equal(la, lb):
        if all(m in (this or {}) and m in (other or {}) for m in metrics):
            return {m: this[m] - other[m] for m in metrics}, True
        out = resample_metrics(la, [sa, sb], metrics, resamples_for(la.size, n_resamples), seed)
        return {m: v[:, 0] - v[:, 1] for m, v in out.items()}, True
    one = resample_metrics(la, [sa], metrics, resamples_for(la.size, n_resamples), seed)
    two = resample_metrics(lb, [sb], metrics, resamples_for(lb.size, n_resamples), seed + 1)
    size = min(len(next(iter(one.values()))), len(next(iter(two.values()))))
    return {m: one[m][:size, 0] - two[m][:size, 0] for m in metrics}, False


def compare_runs(this: pd.DataFrame, other: pd.DataFrame, tolerance: float = 1.0,
                 n_resamples: int = N_RESAMPLES, min_change: float = MIN_CHANGE,
                 cache: DistributionCache | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(changes per shared ok cell and metric, cells whose status differs between the runs); with
    a ``cache``, rows resampled before (for either run's report) are not resampled again."""
    other = other.reset_index(drop=True)
    other_at = {cell_id: i for i, cell_id in enumerate(other["cell_id"])}
    ok_in_both = set(this.loc[this["status"] == "ok", "cell_id"]) & set(other.loc[other["status"] == "ok", "cell_id"])
    changes, statuses = [], []
    metrics_here = present_metrics(this)
    for start in range(0, len(this), CHUNK):  # a chunk's distributions at a time: memory stays flat
        part = this.iloc[start:start + CHUNK]
        positions = [other_at[c] for c in part["cell_id"] if c in other_at]
        if not positions:
            continue
        theirs = other.iloc[positions]
        this_dists = row_distributions(part[part["cell_id"].isin(ok_in_both)], n_resamples, cache)
        other_dists = row_distributions(theirs[theirs["cell_id"].isin(ok_in_both)], n_resamples, cache)
        other_by_id = {r["cell_id"]: r for r in theirs.to_dict("records")}
        _compare_part(part, other_by_id, this_dists, other_dists, metrics_here, tolerance, n_resamples,
                      min_change, changes, statuses)
    table = pd.DataFrame(changes, columns=COMPARE_COLUMNS)
    if len(table):
        table = table.sort_values(["flagged", "board", "variant", "column", "seed", "metric"],
                                  ascending=[False, True, True, True, True, True]).reset_index(drop=True)
    return table, pd.DataFrame(statuses, columns=STATUS_COLUMNS)


def _compare_part(part, other_by_id, this_dists, other_dists, metrics_here, tolerance, n_resamples, min_change,
                  changes: list, statuses: list) -> None:
    """compare_runs on one chunk of this run's rows: appends to ``changes`` and ``statuses``."""
    for a in part.to_dict("records"):
        b = other_by_id.get(a["cell_id"])
        if b is None:
            continue
        identity = {"cell_id": a["cell_id"], "variant": a["variant"], "board": a["board"],
                    "column": a["column"], "seed": a["seed"]}
        if a["status"] != b["status"]:
            statuses.append({**identity, "this_status": a["status"], "other_status": b["status"],
                             "error": a["error"] if a["status"] != "ok" else b["error"]})
            continue
        if a["status"] != "ok":
            continue
        shared = [m for m in metrics_here if pd.notna(a.get(m)) and pd.notna(b.get(m))]
        dists, paired = change_distribution(a, b, [m for m in shared if m in BOOTSTRAP_METRICS], n_resamples,
                                            this_dists.get(a["cell_id"]), other_dists.get(a["cell_id"]))
        for m in shared:
            change = float(a[m]) - float(b[m])
            low, high = percentile_interval(dists[m]) if m in dists else (np.nan, np.nan)
            interval = bool(np.isfinite(low))
            flagged = interval and (low > 0 or high < 0) and abs(change) >= min_change
            note = None if interval else ("no interval: no per-sample scores for this metric"
                                          if m not in BOOTSTRAP_METRICS else "no interval: scores not stored")
            changes.append({**identity, "protocol": a["protocol"], "metric": m, "this": float(a[m]),
                            "other": float(b[m]), "change": change, "ci_low": low, "ci_high": high,
                            "flagged": bool(flagged), "beyond_tolerance": abs(change) > tolerance / 100.0 + 1e-9,
                            "paired": paired if interval else None, "note": note})
