"""The report's tables as pandas frames: leaderboards (long form), reproduction, failures.

Values stay in the rows' units (fractions, 0.973); ``diff`` too. Only the rendering shows points.
A leaderboard record is a class (or OOD set) cell, the mean over them (``is_mean``), or, on ood
boards of a dataset with OpenOOD groups, the mean over one group's measured sets (``is_group``,
``column`` = ``near-ood`` / ``far-ood``; ``classes_measured`` / ``classes_total`` count its sets).
"""
from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from reports.bootstrap import (BOOTSTRAP_METRICS, N_RESAMPLES, DistributionCache, mean_of, percentile_interval,
                               resample_metrics, resamples_for, row_seed, usable)
from reports.expected import (LOWER_IS_BETTER, OOD_GROUPS, by_key, candidates, choose, class_key, group_complete,
                              group_members, group_of, group_references, mean_classes, ood_set_name, row_params,
                              row_variants, status_of)
from reports.rows import MEAN_COLUMN, as_array, column_order, ok_rows, present_metrics

#: Row columns too large to carry through the table code (read from the full rows where needed).
HEAVY_COLUMNS = ["labels", "image_scores", "loss_curve", "sample_maps", "traceback"]
LEADERBOARD_COLUMNS = [
    "board", "dataset", "protocol", "metric", "variant", "method", "column", "column_key", "is_mean",
    "is_group", "seeds", "mean", "std", "ci_low", "ci_high", "expected", "diff", "status", "differs", "setting",
    "source", "source_kind", "rank", "leader", "tied", "classes_measured", "classes_total", "failed", "note",
]
REPRODUCTION_COLUMNS = [
    "variant", "board", "protocol", "metric", "average", "measured", "expected", "diff", "status",
    "classes_with_reference", "reproduced", "below", "above", "setting_differs", "mean_abs_diff", "differs",
    "setting", "source", "source_kind", "note",
]
#: Metrics of the in-distribution test images alone (the same on every OOD set): no group means.
ID_METRICS = frozenset({"accuracy"})
NO_REFERENCE = {"expected": np.nan, "setting": None, "source": None, "source_kind": None, "ood_group": None,
                "differs": None}


#: Threads resampling rows (numpy releases the GIL in the array work; each row has its own seed,
#: so the values never depend on the thread count or the order rows finish in).
WORKERS = max(1, min(4, os.cpu_count() or 1))
BATCH = 256  # rows looked up and resampled per step (bounds what is held at once)


def _resampled(job) -> dict[str, np.ndarray]:
    labels, scores, metrics, n, seed = job
    return {m: v[:, 0] for m, v in resample_metrics(labels, [scores], metrics, n, seed).items()}


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Let glibc keep freed blocks in the heap instead of unmapping each one over 128 KiB.

    A row's resampling allocates a dozen ``B x n`` arrays (MBs each); with glibc's default every one
    is a fresh mmap whose pages fault in again, ~40% of the bootstrap's time (measured on the 2-core
    machine: 37 -> 20 ms per 719-sample row, bit-identical values; a cold report of 10,000 noop rows
    205 -> 109 s). Process-wide and once; the held
    memory is bounded by the largest working set, and nothing changes where libc is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 256 << 20))


def iter_distributions(rows: pd.DataFrame, n_resamples: int = N_RESAMPLES,
                       cache: DistributionCache | None = None, workers: int = WORKERS):
    """``(position, {metric: bootstrap values})`` for every ok row (position in ``rows``) with usable
    labels and scores, in row order; rows missing from ``cache`` are resampled ``workers`` at a time
    and added to it. Nothing is held beyond one batch."""
    statuses = rows["status"].to_numpy(object) if "status" in rows else np.array([], dtype=object)
    positions = np.flatnonzero(statuses == "ok")
    if not len(positions):
        return
    keep_freed_memory()
    cell_ids = rows["cell_id"].to_numpy(object)
    labels_col = rows["labels"].to_numpy(object) if "labels" in rows else None
    scores_col = rows["image_scores"].to_numpy(object) if "image_scores" in rows else None
    values = {m: rows[m].to_numpy(object) for m in BOOTSTRAP_METRICS if m in rows}
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        for start in range(0, len(positions), BATCH):
            batch, jobs = [], []
            for i in positions[start:start + BATCH]:
                metrics = [m for m in BOOTSTRAP_METRICS if m in values and _finite(values[m][i])]
                labels = as_array(labels_col[i] if labels_col is not None else None, np.int8)
                scores = as_array(scores_col[i] if scores_col is not None else None)
                if not metrics or not usable(labels, scores):
                    continue
                n, seed = resamples_for(labels.size, n_resamples), row_seed(cell_ids[i])
                key = DistributionCache.key(labels, scores, metrics, n, seed) if cache is not None else None
                found = cache.get(key, metrics) if key is not None else None
                if found is None:
                    jobs.append((labels, scores, metrics, n, seed))
                batch.append((i, key, found))
            done = iter(pool.map(_resampled, jobs) if pool is not None else map(_resampled, jobs))
            for i, key, found in batch:
                if found is None:
                    found = next(done)
                    if cache is not None:
                        cache.put(key, found)
                yield int(i), found
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def row_distributions(rows: pd.DataFrame, n_resamples: int = N_RESAMPLES,
                      cache: DistributionCache | None = None) -> dict[str, dict[str, np.ndarray]]:
    """``{cell_id: {metric: bootstrap values}}`` for every ok row with usable labels and scores;
    with a ``cache``, rows resampled by an earlier build are read from it (and new ones added; the
    caller saves it once its build has looked up every row). Holds every row's distributions: for
    a whole run's leaderboards ``column_distributions`` keeps only their sums."""
    cell_ids = rows["cell_id"].to_numpy(object) if len(rows) else []
    return {cell_ids[i]: found for i, found in iter_distributions(rows, n_resamples, cache)}


class ColumnDistributions:
    """The bootstrap distribution of each leaderboard cell's mean over seeds, summed row by row.

    Keyed by (board, protocol, variant, column, metric) over the ok rows whose metric is not NaN,
    as the leaderboard groups them; the running sum in row order, divided by the count, is exactly
    ``mean_of`` of the rows' distributions (``np.mean`` over a stack adds rows in order), truncated
    to the shortest one. A cell with a row that has no distribution for the metric has none."""

    def __init__(self):
        self.sums: dict[tuple, list] = {}  # key -> [sum, count, complete]

    def add(self, key: tuple, dist: np.ndarray | None) -> None:
        entry = self.sums.get(key)
        if entry is None:
            self.sums[key] = [None if dist is None else np.array(dist, dtype=np.float64), 1, dist is not None]
            return
        entry[1] += 1
        if dist is None or not entry[2]:
            entry[0], entry[2] = None, False
            return
        size = min(entry[0].size, dist.size)
        entry[0] = entry[0][:size]
        entry[0] += dist[:size]

    def mean(self, key: tuple) -> np.ndarray | None:
        entry = self.sums.get(key)
        if entry is None or not entry[2]:
            return None
        return entry[0] / entry[1]


def column_distributions(rows: pd.DataFrame, n_resamples: int = N_RESAMPLES,
                         cache: DistributionCache | None = None) -> ColumnDistributions:
    """Each leaderboard cell's bootstrap distribution of the mean over seeds (``rows`` annotated),
    resampling row by row without holding every row's distributions."""
    out = ColumnDistributions()
    if rows.empty:
        return out
    metrics = [m for m in BOOTSTRAP_METRICS if m in rows]
    scored = {m: rows[m].notna().to_numpy() for m in metrics}
    ok = (rows["status"] == "ok").to_numpy()
    ident = list(zip(rows["board"], rows["protocol"], rows["variant"], rows["column"]))
    stream = iter_distributions(rows, n_resamples, cache)
    ahead = next(stream, None)
    for i in np.flatnonzero(ok):
        dists = {}
        if ahead is not None and ahead[0] == i:
            dists, ahead = ahead[1], next(stream, None)
        for m in metrics:
            if scored[m][i]:
                out.add((*ident[i], m), dists.get(m))
    return out


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating)) and math.isfinite(value)


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if values.size >= 2 else float("nan")


def _as_reference(chosen) -> dict:
    """The chosen reference (``expected.choose``'s pair) as a record's columns; ``differs`` names what
    keeps it from being compared (None: comparable)."""
    ref, differ = chosen
    if ref is None:
        return dict(NO_REFERENCE)
    return {"expected": float(ref["value"]), "setting": ref["setting"], "source": ref["source"],
            "source_kind": ref.get("source_kind") or None, "ood_group": group_of(ref),
            "differs": "; ".join(differ) or None}


def _reference(index, method, dataset, protocol, key, metric, params, ood_sets) -> dict:
    found = candidates(index, method, dataset, protocol, key, metric)
    return _as_reference(choose(found, params, dataset, ood_sets))


def board_groups(dataset: str, protocol: str, metric: str) -> dict[str, tuple[str, ...]]:
    """The OpenOOD groups a board also averages over: ood boards of a dataset in ``OOD_GROUPS``,
    metrics that depend on the OOD set (not ``ID_METRICS``)."""
    return OOD_GROUPS.get(dataset, {}) if protocol == "ood" and metric not in ID_METRICS else {}


def _seed_std(rows: pd.DataFrame, metric: str, columns: list[str]) -> float:
    """Std over seeds of the per-seed mean over columns (seeds measured on every column only)."""
    table = rows.groupby(["seed", "column"])[metric].mean().unstack("column")  # pivot_table, 5x faster
    table = table.reindex(columns=columns).dropna()
    return _std(table.mean(axis=1).to_numpy(float))


def _average(vrows, metric: str, columns: list[str], column_means: dict, column_dists: dict) -> dict:
    """Mean over ``columns`` of their means, its std over seeds and the percentile interval of the
    mean of their bootstrap distributions (each resample: the mean over the columns)."""
    dist = mean_of([column_dists[c] for c in columns]) if metric in BOOTSTRAP_METRICS else None
    low, high = percentile_interval(dist) if dist is not None else (np.nan, np.nan)
    return {"mean": float(np.mean([column_means[c] for c in columns])),
            "std": _seed_std(vrows, metric, columns), "ci_low": low, "ci_high": high}


def _group_record(group: str, covered: list[str], vrows, metric, dataset, protocol, index, params,
                  average: dict) -> dict:
    """The mean over one OpenOOD group's measured sets; the paper's number for that group only when
    every set of the group is measured (as a paper's mean needs every class)."""
    members = group_members(dataset, group)
    found = group_references(candidates(index, vrows["method"].iloc[0], dataset, protocol, MEAN_COLUMN, metric),
                             group)
    ref, note = dict(NO_REFERENCE), None
    if group_complete(dataset, group, covered):
        ref = _as_reference(choose(found, params, dataset, set(covered)))
    elif not found.empty:
        missing = [m for m in members if m not in {ood_set_name(c) for c in covered}]
        note = (f"paper {group} value not compared: OpenOOD averages {', '.join(members)}; "
                f"this run misses {', '.join(missing)}")
    return {"column": group, "column_key": group, "is_mean": False, "is_group": True,
            "seeds": int(vrows.loc[vrows["column"].isin(covered), "seed"].nunique()), **average,
            "classes_measured": len(covered), "classes_total": len(members), "note": note, **ref}


def _variant_records(vrows, metric, board_columns, dataset, protocol, index, tolerance, dists) -> list[dict]:
    method = vrows["method"].iloc[0]
    params = {**row_params(vrows.iloc[0]), "metric_variants": row_variants(vrows.iloc[0])}
    ood_sets = set(vrows["ood_set"].dropna()) if protocol == "ood" else None
    records, column_dists, column_means = [], {}, {}
    by_column = dict(tuple(vrows.groupby("column", sort=False)))
    measured = [c for c in board_columns if c in by_column]
    for column in measured:
        crows = by_column[column]
        values = crows[metric].to_numpy(float)
        if metric not in BOOTSTRAP_METRICS:
            dist = None
        elif isinstance(dists, ColumnDistributions):
            dist = dists.mean((crows["board"].iloc[0], protocol, crows["variant"].iloc[0], column, metric))
        else:
            dist = mean_of([dists.get(cid, {}).get(metric) for cid in crows["cell_id"]])
        low, high = percentile_interval(dist) if dist is not None else (np.nan, np.nan)
        ref = _reference(index, method, dataset, protocol, class_key(dataset, column), metric, params, ood_sets)
        mean = float(values.mean())
        records.append({"column": column, "column_key": class_key(dataset, column), "is_mean": False,
                        "is_group": False, "seeds": int(crows["seed"].nunique()), "mean": mean,
                        "std": _std(values), "ci_low": low, "ci_high": high, **ref})
        column_dists[column] = dist
        column_means[column] = mean
    groups = []
    for group, members in board_groups(dataset, protocol, metric).items():
        covered = [c for c in measured if ood_set_name(c) in members]
        if covered:
            groups.append(_group_record(group, covered, vrows, metric, dataset, protocol, index, params,
                                        _average(vrows, metric, covered, column_means, column_dists)))
    records += groups
    keys = {class_key(dataset, c) for c in measured}
    note, wanted = None, mean_classes(index, method, dataset, protocol, metric)
    if wanted is None or wanted <= keys:
        ref = _reference(index, method, dataset, protocol, MEAN_COLUMN, metric, params, ood_sets)
    else:
        ref = dict(NO_REFERENCE)
        if not candidates(index, method, dataset, protocol, MEAN_COLUMN, metric).empty:
            note = (f"paper mean not compared: it averages {len(wanted)} classes, the run measures "
                    f"{len(wanted & keys)} of them")
    group = ref["ood_group"] if ood_sets else None
    if group is not None and not group_complete(dataset, group, ood_sets):
        ref = dict(NO_REFERENCE)  # as a paper's class mean: compared only when every set is measured
        note = (f"paper {group} value not compared: it averages OpenOOD's whole {group} group "
                f"({', '.join(group_members(dataset, group))}); this run measures {', '.join(sorted(ood_sets))}")
    elif np.isnan(ref["expected"]) and any(g["source"] or g["note"] for g in groups):
        note = f"OpenOOD's numbers each average one group: see {' / '.join(g['column'] for g in groups)}"
    records.append({"column": MEAN_COLUMN, "column_key": MEAN_COLUMN, "is_mean": True, "is_group": False,
                    "seeds": int(vrows["seed"].nunique()),
                    **_average(vrows, metric, measured, column_means, column_dists),
                    "classes_measured": len(measured), "classes_total": len(board_columns), "note": note, **ref})
    for r in records:
        r.update(variant=vrows["variant"].iloc[0], method=method, metric=metric,
                 diff=r["mean"] - r["expected"] if np.isfinite(r["expected"]) else np.nan,
                 status=status_of(r["mean"], r["expected"], tolerance, r.get("differs")))
    return records


def _rank(means: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rank, leader and ties on one board's mean records (complete coverage first)."""
    means = means.copy()
    partial = (means["classes_measured"] < means["classes_total"]) | means["mean"].isna()
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    order = sorted(means.index, key=lambda i: (bool(partial[i]), math.inf if np.isnan(means.at[i, "mean"])
                                               else sign * means.at[i, "mean"]))
    means.loc[order, "rank"] = np.arange(1, len(order) + 1)
    leader = order[0]
    means["leader"] = means.index == leader
    lo, hi = means.at[leader, "ci_low"], means.at[leader, "ci_high"]
    means["tied"] = [None if i == leader or np.isnan(lo) or np.isnan(means.at[i, "ci_low"])
                     else bool(means.at[i, "ci_low"] <= hi and lo <= means.at[i, "ci_high"])
                     for i in means.index]
    return means


def leaderboards(rows: pd.DataFrame, expected: pd.DataFrame, tolerance: float,
                 dists: "dict[str, dict[str, np.ndarray]] | ColumnDistributions") -> pd.DataFrame:
    """One long table: a record per (board, protocol, metric, variant, column), column ``mean`` included.
    ``dists``: the rows' bootstrap distributions (``row_distributions``) or their sums per
    leaderboard cell (``column_distributions``, what a report uses: same intervals, flat memory)."""
    out = []
    index = by_key(expected)
    rows = rows.drop(columns=[c for c in HEAVY_COLUMNS if c in rows.columns])
    ok = ok_rows(rows)
    not_ok = rows[rows["status"] != "ok"]
    for (board, protocol), group in ok.groupby(["board", "protocol"], sort=True):
        dataset = group["dataset"].iloc[0]
        failed = not_ok[(not_ok["board"] == board) & (not_ok["protocol"] == protocol)]
        failed_counts = failed.groupby("variant").size()
        for metric in present_metrics(group):
            scored = group[group[metric].notna()]
            columns = column_order(dataset, scored["column"])
            records = []
            for _, vrows in scored.groupby("variant", sort=True):
                records += _variant_records(vrows, metric, columns, dataset, protocol, index, tolerance, dists)
            for variant in sorted(set(failed["variant"]) - set(group["variant"])):
                records.append({"variant": variant, "method": failed[failed["variant"] == variant]["method"].iloc[0],
                                "metric": metric, "column": MEAN_COLUMN, "column_key": MEAN_COLUMN,
                                "is_mean": True, "is_group": False, "seeds": 0, "mean": np.nan, "std": np.nan,
                                "ci_low": np.nan, "ci_high": np.nan, "expected": np.nan, "diff": np.nan,
                                "status": "no reference",
                                "classes_measured": 0, "classes_total": len(columns),
                                "note": "every cell failed or timed out"})
            frame = pd.DataFrame(records)
            frame["board"], frame["dataset"], frame["protocol"] = board, dataset, protocol
            frame["failed"] = [int(failed_counts.get(v, 0)) for v in frame["variant"]]
            means = _rank(frame[frame["is_mean"]], metric)
            for c in ("rank", "leader", "tied"):
                frame[c] = means[c].reindex(frame.index) if c in means else None
            out.append(frame)
    if not out:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    table = pd.concat(out, ignore_index=True).reindex(columns=LEADERBOARD_COLUMNS)
    table["rank"] = table["rank"].astype("Int64")
    for c in ("classes_measured", "classes_total"):
        table[c] = table[c].astype("Int64")
    return table


def _group_reproduction(r: dict) -> dict:
    """A reproduction record for an OpenOOD group mean (no per-class counts: its sets have none)."""
    return {"variant": r["variant"], "board": r["board"], "protocol": r["protocol"], "metric": r["metric"],
            "average": r["column"], "measured": r["mean"], "expected": r["expected"], "diff": r["diff"],
            "status": r["status"], "classes_with_reference": 0, "reproduced": 0, "below": 0, "above": 0,
            "setting_differs": 0, "mean_abs_diff": np.nan, "differs": r["differs"], "setting": r["setting"],
            "source": r["source"], "source_kind": r["source_kind"],
            "note": r["note"] if isinstance(r["note"], str) else None}


def reproduction(board_table: pd.DataFrame, expected: pd.DataFrame) -> pd.DataFrame:
    """Every method x dataset x metric that has a paper number: the mean's distance and the classes'
    (``average`` = ``mean``), then each OpenOOD group mean with a paper number or a note saying why
    it was not compared (``average`` = the group)."""
    out = []
    index = by_key(expected)
    for (variant, board, protocol, metric), g in board_table.groupby(
            ["variant", "board", "protocol", "metric"], sort=True):
        if (g["method"].iloc[0], g["dataset"].iloc[0], protocol, metric) not in index:
            continue
        mean = g[g["is_mean"]].iloc[0]
        classes = g[~g["is_mean"] & ~g["is_group"] & g["expected"].notna()]
        counts = classes["status"].value_counts()
        comparable = classes[classes["status"] != "setting differs"]
        first = mean if pd.notna(mean["expected"]) else (classes.iloc[0] if len(classes) else None)
        note = mean["note"] if isinstance(mean["note"], str) else None
        if first is None:
            note = note or "the paper's classes or setting are not among the measured ones"
        out.append({"variant": variant, "board": board, "protocol": protocol, "metric": metric,
                    "average": MEAN_COLUMN, "measured": mean["mean"], "expected": mean["expected"],
                    "diff": mean["diff"], "status": mean["status"], "classes_with_reference": len(classes),
                    "reproduced": int(counts.get("reproduced", 0)), "below": int(counts.get("below", 0)),
                    "above": int(counts.get("above", 0)), "setting_differs": int(counts.get("setting differs", 0)),
                    "mean_abs_diff": float(comparable["diff"].abs().mean()) if len(comparable) else np.nan,
                    "differs": None if first is None else first["differs"],
                    "setting": None if first is None else first["setting"],
                    "source": None if first is None else first["source"],
                    "source_kind": None if first is None else first["source_kind"], "note": note})
        out += [_group_reproduction(r) for r in g[g["is_group"]].to_dict("records")
                if pd.notna(r["expected"]) or isinstance(r["note"], str)]
    return pd.DataFrame(out, columns=REPRODUCTION_COLUMNS)


def failures(rows: pd.DataFrame) -> pd.DataFrame:
    """Failed and timed-out rows with their error (none of them enters a mean)."""
    columns = ["variant", "board", "protocol", "column", "seed", "status", "attempt", "error", "cell_id",
               "hostname"]
    bad = rows[rows["status"] != "ok"]
    return bad.reindex(columns=columns).sort_values(["board", "variant", "column", "seed"]).reset_index(drop=True)
