"""Cost: fit / score seconds and peak memory per method, the run's wall time, the Pareto front."""
from __future__ import annotations

import numpy as np
import pandas as pd

from reports.expected import LOWER_IS_BETTER

GIB = float(1 << 30)
COST_COLUMNS = ["variant", "board", "protocol", "cells", "ok_cells", "fit_s", "cold_fit_s", "score_s", "total_s",
                "total_s_sum", "peak_rss_gib", "peak_gpu_gib", "cache_hits", "accuracy_metric", "accuracy",
                "pareto"]


def per_cell(rows: pd.DataFrame) -> pd.DataFrame:
    """One record per cell (``base_cell_id``): a unified / ood cell's rows share fit and total time,
    and its scoring time is the sum over its rows."""
    if rows.empty:
        return pd.DataFrame(columns=["base_cell_id", "variant", "board", "protocol", "ok", "fit_s",
                                     "score_s", "total_s", "peak_rss_bytes", "peak_gpu_bytes",
                                     "feature_cache_hit"])
    g = rows.assign(ok=rows["status"] == "ok").groupby("base_cell_id", sort=False)
    return pd.DataFrame({
        "variant": g["variant"].first(), "board": g["board"].first(), "protocol": g["protocol"].first(),
        "ok": g["ok"].all(), "fit_s": g["fit_s"].first(), "score_s": g["score_s"].sum(min_count=1),
        "total_s": g["total_s"].first(), "peak_rss_bytes": g["peak_rss_bytes"].max(),
        "peak_gpu_bytes": g["peak_gpu_bytes"].max(), "feature_cache_hit": g["feature_cache_hit"].first(),
    }).reset_index()


def pareto_front(cost: np.ndarray, accuracy: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """True where no other point is at least as cheap and at least as accurate, one strictly."""
    acc = np.asarray(accuracy, float) * (1.0 if higher_is_better else -1.0)
    cost = np.asarray(cost, float)
    valid = np.isfinite(cost) & np.isfinite(acc)
    front = np.zeros(cost.size, dtype=bool)
    for i in np.flatnonzero(valid):
        others = valid & (cost <= cost[i]) & (acc >= acc[i]) & ((cost < cost[i]) | (acc > acc[i]))
        front[i] = not others.any()
    return front


def cold_fit_seconds(fit_s: pd.Series, cache_hit: pd.Series) -> float:
    """Mean fit seconds of the cells that built their cached artefacts themselves (a miss, or a
    method without a cache): what a cell costs alone. A hit's ``fit_s`` leaves the shared build
    (features, a DCAE pre-training, a classifier) out, charged to the cell that made it. NaN when
    every cell was a hit."""
    cold = fit_s[~cache_hit.eq(True).fillna(False).astype(bool).to_numpy()]
    return float(cold.mean()) if len(cold) else np.nan


def cost_table(rows: pd.DataFrame, board_table: pd.DataFrame) -> pd.DataFrame:
    """Per method variant and board: mean seconds per cell (and per cell that shared nothing,
    ``cold_fit_s``), peak memory, the board's accuracy (image AUROC where measured, else its first
    metric) and whether it is on the Pareto front of the measured mean total per cell."""
    cells = per_cell(rows)
    if cells.empty:
        return pd.DataFrame(columns=COST_COLUMNS)
    out = []
    for (variant, board, protocol), g in cells.groupby(["variant", "board", "protocol"], sort=True):
        ok = g[g["ok"]]
        hits = ok["feature_cache_hit"].dropna()
        out.append({"variant": variant, "board": board, "protocol": protocol, "cells": len(g),
                    "ok_cells": len(ok), "fit_s": ok["fit_s"].mean(),
                    "cold_fit_s": cold_fit_seconds(ok["fit_s"], ok["feature_cache_hit"]),
                    "score_s": ok["score_s"].mean(),
                    "total_s": ok["total_s"].mean(), "total_s_sum": g["total_s"].sum(),
                    "peak_rss_gib": g["peak_rss_bytes"].max() / GIB, "peak_gpu_gib": g["peak_gpu_bytes"].max() / GIB,
                    "cache_hits": float(hits.astype(float).mean()) if len(hits) else np.nan})
    table = pd.DataFrame(out)
    table["accuracy_metric"], table["accuracy"], table["pareto"] = None, np.nan, False
    means = board_table[board_table["is_mean"]] if len(board_table) else board_table
    for (board, protocol), idx in table.groupby(["board", "protocol"]).groups.items():
        here = means[(means["board"] == board) & (means["protocol"] == protocol)]
        if here.empty:
            continue
        metric = "image_auroc" if (here["metric"] == "image_auroc").any() else here["metric"].iloc[0]
        by_variant = here[here["metric"] == metric].set_index("variant")["mean"]
        table.loc[idx, "accuracy_metric"] = metric
        table.loc[idx, "accuracy"] = [by_variant.get(v, np.nan) for v in table.loc[idx, "variant"]]
        table.loc[idx, "pareto"] = pareto_front(table.loc[idx, "total_s"].to_numpy(float),
                                                table.loc[idx, "accuracy"].to_numpy(float),
                                                metric not in LOWER_IS_BETTER)
    return table.reindex(columns=COST_COLUMNS)


def run_summary(rows: pd.DataFrame) -> dict:
    """Counts, wall time (first start to last finish), summed cell time, hosts, devices, git shas."""
    cells = per_cell(rows)
    started = pd.to_datetime(rows["started_at"], utc=True).min() if len(rows) else pd.NaT
    finished = pd.to_datetime(rows["finished_at"], utc=True).max() if len(rows) else pd.NaT
    wall = (finished - started).total_seconds() if pd.notna(started) and pd.notna(finished) else float("nan")
    # a cell's status (orchestrator.store.cell_status): ok when every row is, else its first other
    # row's; here in one pass, no per-cell Python
    keyed = rows[rows["base_cell_id"].notna()] if len(rows) else rows
    first_bad = keyed[keyed["status"] != "ok"].drop_duplicates("base_cell_id")["status"] if len(keyed) else keyed
    n_ok = keyed["base_cell_id"].nunique() - len(first_bad) if len(keyed) else 0

    def distinct(column: str) -> list[str]:
        return sorted({str(v) for v in rows[column].dropna()}) if column in rows else []

    return {"rows": len(rows), "cells": len(cells), "ok": int(n_ok),
            "failed": int((first_bad == "failed").sum()) if len(keyed) else 0,
            "timeout": int((first_bad == "timeout").sum()) if len(keyed) else 0,
            "wall_s": wall, "cell_s_sum": float(cells["total_s"].sum()) if len(cells) else 0.0,
            "started": started, "finished": finished, "hosts": distinct("hostname"),
            "devices": distinct("device"), "gpus": distinct("gpu_name"), "git_shas": distinct("git_sha"),
            "run_ids": distinct("run_id")}
