"""The report's tables as pandas frames: leaderboards (long form), reproduction, failures.

Values stay in the rows' units (fractions, 0.973); ``diff`` too. Only the rendering shows points.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from reports.bootstrap import (BOOTSTRAP_METRICS, N_RESAMPLES, mean_of, percentile_interval,
                               resample_metrics, resamples_for, row_seed, usable)
from reports.expected import (LOWER_IS_BETTER, by_key, candidates, choose, class_key, mean_classes,
                              row_params, setting_tokens, status_of)
from reports.rows import MEAN_COLUMN, as_array, column_order, ok_rows, present_metrics

#: Row columns too large to carry through the table code (read from the full rows where needed).
HEAVY_COLUMNS = ["labels", "image_scores", "loss_curve", "sample_maps", "traceback"]
LEADERBOARD_COLUMNS = [
    "board", "dataset", "protocol", "metric", "variant", "method", "column", "column_key", "is_mean",
    "seeds", "mean", "std", "ci_low", "ci_high", "expected", "diff", "status", "setting", "source",
    "rank", "leader", "tied", "classes_measured", "classes_total", "failed", "note",
]


def row_distributions(rows: pd.DataFrame, n_resamples: int = N_RESAMPLES) -> dict[str, dict[str, np.ndarray]]:
    """``{cell_id: {metric: bootstrap values}}`` for every ok row with usable labels and scores."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for r in ok_rows(rows).to_dict("records"):
        metrics = [m for m in BOOTSTRAP_METRICS if _finite(r.get(m))]
        labels, scores = as_array(r.get("labels"), np.int8), as_array(r.get("image_scores"))
        if not metrics or not usable(labels, scores):
            continue
        sampled = resample_metrics(labels, [scores], metrics, resamples_for(labels.size, n_resamples),
                                   row_seed(r["cell_id"]))
        out[r["cell_id"]] = {m: v[:, 0] for m, v in sampled.items()}
    return out


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float, np.floating)) and math.isfinite(value)


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if values.size >= 2 else float("nan")


def _reference(index, method, dataset, protocol, key, metric, tokens, ood_sets) -> dict:
    ref = choose(candidates(index, method, dataset, protocol, key, metric), tokens, dataset, ood_sets)
    if ref is None:
        return {"expected": np.nan, "setting": None, "source": None}
    return {"expected": float(ref["value"]), "setting": ref["setting"], "source": ref["source"]}


def _seed_std(rows: pd.DataFrame, metric: str, columns: list[str]) -> float:
    """Std over seeds of the per-seed mean over columns (seeds measured on every column only)."""
    table = rows.pivot_table(index="seed", columns="column", values=metric, aggfunc="mean")
    table = table.reindex(columns=columns).dropna()
    return _std(table.mean(axis=1).to_numpy(float))


def _variant_records(vrows, metric, board_columns, dataset, protocol, index, tolerance, dists) -> list[dict]:
    method = vrows["method"].iloc[0]
    tokens = setting_tokens(row_params(vrows.iloc[0]))
    ood_sets = set(vrows["ood_set"].dropna()) if protocol == "ood" else None
    records, column_dists, column_means = [], [], []
    by_column = dict(tuple(vrows.groupby("column", sort=False)))
    measured = [c for c in board_columns if c in by_column]
    for column in measured:
        crows = by_column[column]
        values = crows[metric].to_numpy(float)
        dist = (mean_of([dists.get(cid, {}).get(metric) for cid in crows["cell_id"]])
                if metric in BOOTSTRAP_METRICS else None)
        low, high = percentile_interval(dist) if dist is not None else (np.nan, np.nan)
        ref = _reference(index, method, dataset, protocol, class_key(dataset, column), metric, tokens, ood_sets)
        mean = float(values.mean())
        records.append({"column": column, "column_key": class_key(dataset, column), "is_mean": False,
                        "seeds": int(crows["seed"].nunique()), "mean": mean, "std": _std(values),
                        "ci_low": low, "ci_high": high, **ref})
        column_dists.append(dist)
        column_means.append(mean)
    keys = {class_key(dataset, c) for c in measured}
    mean_dist = mean_of(column_dists) if metric in BOOTSTRAP_METRICS else None
    low, high = percentile_interval(mean_dist) if mean_dist is not None else (np.nan, np.nan)
    note, wanted = None, mean_classes(index, method, dataset, protocol, metric)
    if wanted is None or wanted <= keys:
        ref = _reference(index, method, dataset, protocol, MEAN_COLUMN, metric, tokens, ood_sets)
    else:
        ref = {"expected": np.nan, "setting": None, "source": None}
        if not candidates(index, method, dataset, protocol, MEAN_COLUMN, metric).empty:
            note = (f"paper mean not compared: it averages {len(wanted)} classes, the run measures "
                    f"{len(wanted & keys)} of them")
    if ood_sets and isinstance(ref["setting"], str) and ref["setting"].lower().startswith(("near-ood", "far-ood")):
        group = ref["setting"].split(";")[0].strip()
        note = (f"the paper's {group} value averages OpenOOD's whole {group} group; this run measures "
                f"{', '.join(sorted(ood_sets))}")
    records.append({"column": MEAN_COLUMN, "column_key": MEAN_COLUMN, "is_mean": True,
                    "seeds": int(vrows["seed"].nunique()), "mean": float(np.mean(column_means)),
                    "std": _seed_std(vrows, metric, measured), "ci_low": low, "ci_high": high,
                    "classes_measured": len(measured), "classes_total": len(board_columns), "note": note, **ref})
    for r in records:
        r.update(variant=vrows["variant"].iloc[0], method=method, metric=metric,
                 diff=r["mean"] - r["expected"] if np.isfinite(r["expected"]) else np.nan,
                 status=status_of(r["mean"], r["expected"], tolerance))
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
                 dists: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    """One long table: a record per (board, protocol, metric, variant, column), column ``mean`` included."""
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
                                "is_mean": True, "seeds": 0, "mean": np.nan, "std": np.nan, "ci_low": np.nan,
                                "ci_high": np.nan, "expected": np.nan, "diff": np.nan, "status": "no reference",
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


def reproduction(board_table: pd.DataFrame, expected: pd.DataFrame) -> pd.DataFrame:
    """Every method x dataset x metric that has a paper number: the mean's distance and the classes'."""
    columns = ["variant", "board", "protocol", "metric", "measured", "expected", "diff", "status",
               "classes_with_reference", "reproduced", "below", "above", "mean_abs_diff", "setting",
               "source", "note"]
    out = []
    index = by_key(expected)
    for (variant, board, protocol, metric), g in board_table.groupby(
            ["variant", "board", "protocol", "metric"], sort=True):
        if (g["method"].iloc[0], g["dataset"].iloc[0], protocol, metric) not in index:
            continue
        mean = g[g["is_mean"]].iloc[0]
        classes = g[~g["is_mean"] & g["expected"].notna()]
        counts = classes["status"].value_counts()
        first = mean if pd.notna(mean["expected"]) else (classes.iloc[0] if len(classes) else None)
        note = mean["note"] if isinstance(mean["note"], str) else None
        if first is None:
            note = note or "the paper's classes or setting are not among the measured ones"
        out.append({"variant": variant, "board": board, "protocol": protocol, "metric": metric,
                    "measured": mean["mean"], "expected": mean["expected"], "diff": mean["diff"],
                    "status": mean["status"], "classes_with_reference": len(classes),
                    "reproduced": int(counts.get("reproduced", 0)), "below": int(counts.get("below", 0)),
                    "above": int(counts.get("above", 0)),
                    "mean_abs_diff": float(classes["diff"].abs().mean()) if len(classes) else np.nan,
                    "setting": None if first is None else first["setting"],
                    "source": None if first is None else first["source"], "note": note})
    return pd.DataFrame(out, columns=columns)


def failures(rows: pd.DataFrame) -> pd.DataFrame:
    """Failed and timed-out rows with their error (none of them enters a mean)."""
    columns = ["variant", "board", "protocol", "column", "seed", "status", "attempt", "error", "cell_id",
               "hostname"]
    bad = rows[rows["status"] != "ok"]
    return bad.reindex(columns=columns).sort_values(["board", "variant", "column", "seed"]).reset_index(drop=True)
