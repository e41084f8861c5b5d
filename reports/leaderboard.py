"""The report stage: a run's Parquet rows -> ``<run>/report/`` (report.md, report.html, tables as
Parquet, plots as PNG). ``build_report`` is what ``bench.py`` calls.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from reports import plots
from reports.bootstrap import BOOTSTRAP_METRICS, LEVEL, N_RESAMPLES, DistributionCache
from reports.compare import MIN_CHANGE, compare_runs
from reports.cost import cost_table, run_summary
from reports.document import Bullets, Code, Heading, Image, Paragraph, Table, html_page, markdown
from reports.provenance import provenance_blocks
from reports.expected import EXPECTED_CSV, LOWER_IS_BETTER, OOD_GROUPS, load_expected
from reports.rows import annotate, column_order, read_rows
from reports.tables import failures, leaderboards, reproduction, row_distributions

#: The rows' bootstrap distributions, kept beside rows/ so a rebuilt report resamples new rows only.
BOOTSTRAP_CACHE = ".bootstrap-cache.npz"
BAR_METRICS = ("image_auroc", "pixel_auroc", "pro")
#: The report's own file names: tables (<name>.parquet) and plots (plots/<pattern>); _publish
#: replaces these and nothing else.
TABLES = ("leaderboard", "reproduction", "failures", "cost", "compare", "compare_status")
PLOT_PATTERNS = ("bars_*.png", "cost_*.png", "expected_vs_measured.png", "gallery_*.png")
GALLERY_CLASSES = 3   # per method
GALLERY_ROWS = 8      # per board
MARKS = {"reproduced": "✓", "below": "▼", "above": "▲", "setting differs": "≠", "no reference": ""}
PANDAS_LINES = ('import pandas as pd\n'
                'rows = pd.read_parquet("{run}/rows")\n'
                'rows[rows.status == "ok"].pivot_table(index="method", columns="normal_class", '
                'values="image_auroc")')


def build_report(run_dir: Path, compare: str | Path | None = None, tolerance: float = 1.0, *,
                 expected_path: str | Path = EXPECTED_CSV, extra_expected: tuple = (), n_resamples: int = N_RESAMPLES,
                 min_change: float = MIN_CHANGE) -> Path:
    """Write ``<run_dir>/report/`` and return that folder. ``tolerance``: points (metric x 100)
    within which a measured mean counts as reproducing the paper's; ``extra_expected``: the user's
    own reference CSVs, added to ``expected_path``'s numbers (checked before anything is built)."""
    run_dir = Path(run_dir)
    expected = load_expected(expected_path, tuple(extra_expected))
    if compare is not None and not (Path(compare) / "rows").is_dir():
        raise FileNotFoundError(f"--compare {compare}: no rows/ folder there (expected RESULTS/RUN)")
    folder = run_dir / "report"
    building = Path(tempfile.mkdtemp(prefix=".report-building-", dir=run_dir))   # beside report/: same disk
    (building / "plots").mkdir()
    try:
        _write_report(run_dir, building, compare, tolerance, expected, expected_path, tuple(extra_expected),
                      n_resamples, min_change)
        _publish(building, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def own_files(folder: Path) -> list[Path]:
    """The tables and plots a report writes, as found in ``folder``: only names a report gives its
    own files (TABLES, PLOT_PATTERNS), so a rebuild never deletes anything else there."""
    return [*(p for name in TABLES if (p := folder / f"{name}.parquet").is_file()),
            *(p for pattern in PLOT_PATTERNS for p in (folder / "plots").glob(pattern) if p.is_file())]


def _publish(building: Path, folder: Path) -> None:
    """Move a finished report into ``folder``: its plots and tables replace the old ones (a report
    that fails while being built leaves the previous one whole); other files there stay."""
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    for stale in own_files(folder):
        stale.unlink()
    for path in sorted(building.rglob("*"), key=lambda q: q.suffix in (".md", ".html")):   # pages last
        if path.is_file():
            os.replace(path, folder / path.relative_to(building))


def _write_report(run_dir: Path, folder: Path, compare, tolerance: float, expected: pd.DataFrame, expected_path,
                  extra_expected: tuple, n_resamples: int, min_change: float) -> None:
    rows = annotate(read_rows(run_dir))
    cache = DistributionCache(run_dir / BOOTSTRAP_CACHE)
    if compare is not None:
        cache.include(Path(compare) / BOOTSTRAP_CACHE)
    boards = leaderboards(rows, expected, tolerance, row_distributions(rows, n_resamples, cache))
    tables = {"leaderboard": boards, "reproduction": reproduction(boards, expected),
              "failures": failures(rows), "cost": cost_table(rows, boards)}
    if compare is not None:
        other = annotate(read_rows(compare))
        tables["compare"], tables["compare_status"] = compare_runs(rows, other, tolerance, n_resamples, min_change,
                                                                   cache)
    cache.save()
    for name, table in tables.items():
        table.to_parquet(folder / f"{name}.parquet", index=False)
    figures = make_plots(rows, tables, tolerance, folder)
    context = {"run": run_dir, "summary": run_summary(rows), "tolerance": tolerance, "compare": compare,
               "n_resamples": n_resamples, "min_change": min_change, "expected_path": Path(expected_path),
               "extra_expected": [Path(p) for p in extra_expected], "provenance": provenance_blocks(rows)}
    blocks = report_blocks(tables, figures, context)
    (folder / "report.md").write_text(markdown(blocks), encoding="utf-8")
    (folder / "report.html").write_text(html_page(blocks, f"adgrid report: {run_dir.name}", folder),
                                        encoding="utf-8")


# ---------------------------------------------------------------- plots

def slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", "_".join(str(p) for p in parts)).strip("_").lower()


def gallery_items(rows: pd.DataFrame) -> list[tuple[str, dict]]:
    """A few rows with sample maps: up to GALLERY_CLASSES classes per method, lowest seed first."""
    with_maps = rows[(rows["status"] == "ok") & rows["sample_maps"].notna()]
    items = []
    for variant, g in with_maps.groupby("variant", sort=True):
        dataset = g["dataset"].iloc[0]
        for column in column_order(dataset, g["column"])[:GALLERY_CLASSES]:
            row = g[g["column"] == column].sort_values("seed").iloc[0]
            try:
                samples = plots.decode_samples(row["sample_maps"])
            except (ValueError, OSError, KeyError):
                continue
            if len(samples.get("labels", [])):
                items.append((f"{variant}\n{column} (seed {row['seed']})", samples))
    return items[:GALLERY_ROWS]


def make_plots(rows: pd.DataFrame, tables: dict, tolerance: float, folder: Path) -> dict:
    """Every figure; returns {kind: {key: relative path}}."""
    boards, cost = tables["leaderboard"], tables["cost"]
    figures: dict = {"bars": {}, "cost": {}, "gallery": {}, "expected": None}
    for (board, protocol, metric), g in boards.groupby(["board", "protocol", "metric"], sort=True):
        if metric in BAR_METRICS and g["mean"].notna().any():
            rel = Path("plots") / f"bars_{slug(board, protocol, metric)}.png"
            plots.class_bars(g, f"{board} · {protocol} · {metric}", folder / rel)
            figures["bars"][(board, protocol, metric)] = rel
    for (board, protocol), g in cost.groupby(["board", "protocol"], sort=True):
        if g[["total_s", "accuracy"]].notna().all(axis=1).any():
            rel = Path("plots") / f"cost_{slug(board, protocol)}.png"
            plots.accuracy_vs_cost(g, f"{board} · {protocol}: accuracy vs cost", folder / rel)
            figures["cost"][(board, protocol)] = rel
    matched = boards[boards["expected"].notna() & boards["mean"].notna() & (boards["status"] != "setting differs")]
    if len(matched):
        rel = Path("plots") / "expected_vs_measured.png"
        plots.expected_vs_measured(matched, tolerance, folder / rel)
        figures["expected"] = rel
    for (board, protocol), g in rows.groupby(["board", "protocol"], sort=True):
        items = gallery_items(g)
        if items:
            rel = Path("plots") / f"gallery_{slug(board, protocol)}.png"
            plots.gallery(items, folder / rel)
            figures["gallery"][(board, protocol)] = rel
    return figures


# ---------------------------------------------------------------- formatting

def pts(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or pd.isna(value):
        return "—"
    return f"{value * 100:+.1f}" if signed else f"{value * 100:.1f}"


def mean_std(mean, std) -> str:
    return pts(mean) if pd.isna(std) else f"{pts(mean)} ± {std * 100:.1f}"


def interval(low, high) -> str:
    return "—" if pd.isna(low) else f"[{pts(low)}, {pts(high)}]"


def seconds(value) -> str:
    if pd.isna(value):
        return "—"
    return f"{value:.2f} s" if value < 60 else f"{value / 60:.1f} min" if value < 3600 else f"{value / 3600:.2f} h"


class References:
    """Numbers the (setting, source) pairs in the order the report first cites them."""

    def __init__(self):
        self.numbers: dict[tuple[str, str], int] = {}

    def cite(self, setting, source) -> str:
        if not isinstance(source, str):
            return ""
        key = (str(setting), source)
        self.numbers.setdefault(key, len(self.numbers) + 1)
        return f"[{self.numbers[key]}]"

    def bullets(self) -> list[str]:
        return [f"[{n}] {source} — setting: {setting}" for (setting, source), n in self.numbers.items()]


# ---------------------------------------------------------------- blocks

def summary_blocks(context: dict) -> list:
    s = context["summary"]
    hosts = ", ".join(s["hosts"]) or "—"
    devices = ", ".join(s["devices"] + s["gpus"]) or "—"
    started = s["started"].strftime("%Y-%m-%d %H:%M UTC") if pd.notna(s["started"]) else "—"
    return [
        Heading(f"adgrid report: {context['run'].name}", 1),
        Paragraph(f"{s['rows']} rows from {s['cells']} cells: {s['ok']} ok, {s['failed']} failed, "
                  f"{s['timeout']} timed out. Started {started}; wall time {seconds(s['wall_s'])} "
                  f"(first start to last finish), summed cell time {seconds(s['cell_s_sum'])}."),
        Bullets([f"hosts: {hosts}; devices: {devices}; git: {', '.join(s['git_shas']) or '—'}",
                 f"paper numbers: {', '.join(p.name for p in [context['expected_path'], *context['extra_expected']])}; "
                 f"reproduced = within ±{context['tolerance']:g} points of the paper's value, compared only "
                 "where the number's stated setting (backbone, weights, image size, score rule...) is the "
                 "run's; otherwise 'setting differs' names the differences",
                 f"intervals: {LEVEL:.0%} percentile bootstrap, {context['n_resamples']} resamples of the "
                 f"test samples within each seed (stratified), for image-score metrics "
                 f"({', '.join(BOOTSTRAP_METRICS)}); other metrics show mean ± std over seeds only",
                 "values in points (metric x 100); ± is the std over seeds; failed and timed-out cells "
                 "never enter a mean",
                 f"report built {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}"]),
    ]


def reproduction_blocks(table: pd.DataFrame, refs: References) -> list:
    blocks = [Heading("Reproduction"),
              Paragraph("Every method × dataset × metric with a paper number: the measured mean over "
                        "classes against the paper's mean, and per class how many landed within the "
                        "tolerance (✓ reproduced, ▼ below, ▲ above, ≠ setting differs: the number's "
                        "stated setting is not the run's, so it is shown but not judged). On OOD boards with OpenOOD groups, "
                        "each group's mean (near-ood, far-ood) against the paper's group number too.")]
    if table.empty:
        return blocks + [Paragraph("No measured method has a paper number in the reference table.")]
    rows, styles = [], []
    for r in table.to_dict("records"):
        counts = (f"{r['reproduced']}✓ {r['below']}▼ {r['above']}▲ "
                  + (f"{r['setting_differs']}≠ " if r["setting_differs"] else "")
                  + f"of {r['classes_with_reference']}" if r["classes_with_reference"] else "—")
        rows.append([r["variant"], r["board"], r["protocol"], r["metric"], r["average"], pts(r["measured"]),
                     pts(r["expected"]), pts(r["diff"], True), r["status"], counts, pts(r["mean_abs_diff"]),
                     refs.cite(r["setting"], r["source"]), _note(r)])
        styles.append([""] * 8 + [r["status"].replace(" ", "-")] + [""] * 4)
    header = ["method", "dataset", "protocol", "metric", "average", "measured", "paper", "Δ", "status",
              "classes", "mean |Δ| classes", "ref", "note"]
    return blocks + [Table(header, rows, "reproduction", styles, numeric={5, 6, 7, 10})]


def _note(r: dict) -> str:
    """A record's note, led by what differs from the number's stated setting."""
    parts = [f"setting differs: {r['differs']}" if isinstance(r.get("differs"), str) else "",
             r["note"] if isinstance(r.get("note"), str) else ""]
    return "; ".join(p for p in parts if p)


def _class_cell(r: dict, refs: References) -> tuple[str, str, str]:
    """(measured with its status mark, the paper line for HTML, the paper in brackets for Markdown)."""
    main = f"{mean_std(r['mean'], r['std'])} {MARKS.get(r['status'], '')}".strip()
    if pd.isna(r["expected"]):
        return (main, "", "")
    ref = refs.cite(r["setting"], r["source"])
    return (main, f"paper {pts(r['expected'])} {ref} Δ {pts(r['diff'], True)}", f"({pts(r['expected'])} {ref})")


def _group_cell(r: dict, refs: References) -> tuple[str, str, str]:
    """An OpenOOD group mean as a class cell, its set count when incomplete, its interval (HTML)."""
    main, paper, suffix = _class_cell(r, refs)
    if r["classes_measured"] != r["classes_total"]:
        main += f" ({r['classes_measured']}/{r['classes_total']} sets)"
    ci = interval(r["ci_low"], r["ci_high"]) if pd.notna(r["ci_low"]) else ""
    return (main, " · ".join(t for t in (ci, paper) if t), suffix)


def group_blocks(key: tuple, board: pd.DataFrame, means: pd.DataFrame, groups: list[str], refs: References) -> list:
    """The board's OpenOOD group means, method by method in rank order."""
    name, protocol, metric = key
    rank = {v: i for i, v in enumerate(means["variant"])}
    records = sorted(board[board["is_group"].astype(bool)].to_dict("records"),
                     key=lambda r: (rank[r["variant"]], groups.index(r["column"])))
    rows = [[r["variant"], r["column"], f"{r['classes_measured']}/{r['classes_total']}", mean_std(r["mean"], r["std"]),
             interval(r["ci_low"], r["ci_high"]), pts(r["expected"]), pts(r["diff"], True), r["status"],
             refs.cite(r["setting"], r["source"]), _note(r)]
            for r in records]
    styles = [[""] * 7 + [r[7].replace(" ", "-"), "", ""] for r in rows]
    return [Paragraph("OpenOOD groups (per method: the mean over the group's measured OOD sets):"),
            Table(["method", "group", "sets", "mean ± std", f"{LEVEL:.0%} CI", "paper", "Δ", "status", "ref", "note"],
                  rows, f"groups:{name}:{protocol}:{metric}", styles, numeric={2, 3, 4, 5, 6})]


def board_blocks(key: tuple, board: pd.DataFrame, figures: dict, refs: References) -> list:
    name, protocol, metric = key
    dataset = board["dataset"].iloc[0]
    is_class = ~board["is_mean"].astype(bool) & ~board["is_group"].astype(bool)
    columns = column_order(dataset, board.loc[is_class, "column"])
    present = set(board.loc[board["is_group"].astype(bool), "column"])
    groups = [g for g in OOD_GROUPS.get(dataset, {}) if g in present]
    means = board[board["is_mean"].astype(bool)].sort_values("rank")
    direction = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    header = ["#", "method", *columns, *groups, "mean ± std", f"{LEVEL:.0%} CI", "vs leader", "paper", "Δ",
              "status", "seeds", "failed"]
    rows, styles = [], []
    for m in means.to_dict("records"):
        cells = board[(board["variant"] == m["variant"]) & ~board["is_mean"].astype(bool)].set_index("column")
        class_cells, class_styles = [], []
        for c in columns + groups:
            if c in cells.index:
                r = cells.loc[c].to_dict()
                class_cells.append(_group_cell(r, refs) if c in groups else _class_cell(r, refs))
                class_styles.append(r["status"].replace(" ", "-"))
            else:
                class_cells.append("—")
                class_styles.append("")
        coverage = "" if m["classes_measured"] == m["classes_total"] else f" ({m['classes_measured']}/{m['classes_total']} classes)"
        tie = ("leader" if m["leader"] else "—" if m["tied"] is None or pd.isna(m["tied"])
               else "tied" if m["tied"] else "behind")
        rows.append([str(m["rank"]), m["variant"], *class_cells, mean_std(m["mean"], m["std"]) + coverage,
                     interval(m["ci_low"], m["ci_high"]), tie,
                     f"{pts(m['expected'])} {refs.cite(m['setting'], m['source'])}".strip(),
                     pts(m["diff"], True), m["status"], str(m["seeds"]), str(m["failed"])])
        styles.append(["", "leader" if m["leader"] else "", *class_styles, "", "", "", "", "",
                       m["status"].replace(" ", "-"), "", "failed" if m["failed"] else ""])
    numeric = set(range(2, 2 + len(columns) + len(groups) + 2)) | {len(header) - 5, len(header) - 4,
                                                                   len(header) - 2, len(header) - 1}
    blocks = [Heading(f"{name} · {protocol} · {metric}", 3),
              Table(header, rows, f"leaderboard:{name}:{protocol}:{metric}", styles, numeric)]
    notes = [f"Ranked by the mean over classes ({direction}); methods missing classes rank after "
             "the complete ones. A class cell: mean ± std over seeds, its status (✓ reproduced, ▼ below, "
             "▲ above the paper) and the paper's value [reference]."]
    if groups:
        members = "; ".join(f"{g}: {', '.join(OOD_GROUPS[dataset][g])}" for g in groups)
        notes.append(f"{' / '.join(groups)}: the mean over the OOD sets of OpenOOD v1.5's group ({members}) "
                     "that were measured, its interval from the same resamples as the mean; the paper's "
                     "group number is compared only when every set of the group is measured.")
    if metric in BOOTSTRAP_METRICS:
        notes.append("vs leader: 'tied' when the method's interval overlaps the leader's.")
    else:
        notes.append(f"{metric} is not an image-score metric: no bootstrap interval, mean ± std over seeds only.")
    for m in means.to_dict("records"):
        if _note(m):
            notes.append(f"{m['variant']}: {_note(m)}.")
    no_ref = sorted(set(board["variant"]) - set(board.loc[board["expected"].notna(), "variant"]))
    if no_ref:
        notes.append(f"No paper number on this board for: {', '.join(no_ref)}.")
    blocks.append(Bullets(notes))
    if groups:
        blocks += group_blocks(key, board, means, groups, refs)
    matched = board[is_class & board["expected"].notna()]
    if len(matched):
        rows = [[r["variant"], r["column"], mean_std(r["mean"], r["std"]), pts(r["expected"]), pts(r["diff"], True),
                 r["status"] + (f" ({r['differs']})" if isinstance(r["differs"], str) else ""),
                 refs.cite(r["setting"], r["source"])] for r in matched.to_dict("records")]
        styles = [["", "", "", "", "", r["status"].replace(" ", "-"), ""] for r in matched.to_dict("records")]
        blocks += [Paragraph("Per class against the papers:"),
                   Table(["method", "class", "measured", "paper", "Δ", "status", "ref"], rows,
                         f"papers:{name}:{protocol}:{metric}", styles, numeric={2, 3, 4})]
    if key in figures["bars"]:
        blocks.append(Image(figures["bars"][key], f"{name} · {protocol} · {metric}: per class, mean ± std over "
                                                  "seeds; black ticks: paper values"))
    return blocks


def failure_blocks(table: pd.DataFrame) -> list:
    blocks = [Heading("Failed and timed-out cells")]
    if table.empty:
        return blocks + [Paragraph("None: every cell finished ok.")]
    rows = [[r["variant"], r["board"], r["protocol"], str(r["column"]), str(r["seed"]), r["status"],
             str(r["attempt"]) if pd.notna(r["attempt"]) else "—", str(r["error"] or "")[:300], r["cell_id"]]
            for r in table.to_dict("records")]
    styles = [["", "", "", "", "", r[5], "", "", ""] for r in rows]
    return blocks + [Paragraph(f"{len(table)} rows; none of them enters a mean (full tracebacks in the rows)."),
                     Table(["method", "dataset", "protocol", "class", "seed", "status", "attempt", "error",
                            "cell"], rows, "failures", styles)]


def cost_blocks(table: pd.DataFrame, figures: dict, summary: dict) -> list:
    blocks = [Heading("Cost"),
              Paragraph(f"Whole run: wall time {seconds(summary['wall_s'])}, summed cell time "
                        f"{seconds(summary['cell_s_sum'])}. Per method: mean seconds per ok cell "
                        "(fit, score, total), the largest peak memory, and accuracy on the board's "
                        "main metric; ◆ marks the Pareto front of total per cell (nothing else is "
                        "both cheaper and more accurate). A cell served from the worker cache "
                        "(features, a shared pre-training) does not pay to build it, so 'cold fit' "
                        "is the mean fit of the cells that built their own: what one cell costs "
                        "alone ('—' where every cell was a hit).")]
    if table.empty:
        return blocks
    rows = [[r["variant"], r["board"], r["protocol"], f"{r['ok_cells']}/{r['cells']}", seconds(r["fit_s"]),
             seconds(r["cold_fit_s"]), seconds(r["score_s"]), seconds(r["total_s"]), seconds(r["total_s_sum"]),
             f"{r['peak_rss_gib']:.2f}" if pd.notna(r["peak_rss_gib"]) else "—",
             f"{r['peak_gpu_gib']:.2f}" if pd.notna(r["peak_gpu_gib"]) else "—",
             f"{r['cache_hits']:.0%}" if pd.notna(r["cache_hits"]) else "—",
             f"{pts(r['accuracy'])} {r['accuracy_metric'] or ''}".strip(), "◆" if r["pareto"] else ""]
            for r in table.to_dict("records")]
    blocks.append(Table(["method", "dataset", "protocol", "ok cells", "fit", "cold fit", "score",
                         "total / cell", "total", "peak RSS GiB", "peak GPU GiB", "cache hits", "accuracy",
                         "Pareto"], rows, "cost", numeric=set(range(3, 13))))
    for key, rel in figures["cost"].items():
        blocks.append(Image(rel, f"{' · '.join(key)}: accuracy against mean seconds per cell; the Pareto "
                                 "front in red"))
    return blocks


def compare_blocks(tables: dict, context: dict) -> list:
    changes, statuses = tables["compare"], tables["compare_status"]
    other = Path(context["compare"]).name
    blocks = [Heading(f"Comparison with {other}"),
              Paragraph(f"Cells both runs share (same cell_id): change = this run − {other}, with a "
                        f"{LEVEL:.0%} paired bootstrap interval (the same resamples of the test samples "
                        f"for both runs). Flagged: the interval excludes 0 and the change is at least "
                        f"{context['min_change'] * 100:g} point(s). Pixel metrics have no interval; "
                        f"'beyond tolerance' marks changes over ±{context['tolerance']:g} points.")]
    if changes.empty and statuses.empty:
        return blocks + [Paragraph("The runs share no finished cell.")]
    if len(changes):
        g = changes.groupby(["variant", "board", "protocol", "metric"], sort=True)
        summary = g.agg(cells=("cell_id", "nunique"), mean_change=("change", "mean"),
                        flagged=("flagged", "sum"), beyond=("beyond_tolerance", "sum")).reset_index()
        rows = [[r["variant"], r["board"], r["protocol"], r["metric"], str(r["cells"]), pts(r["mean_change"], True),
                 str(int(r["flagged"])), str(int(r["beyond"]))] for r in summary.to_dict("records")]
        styles = [[""] * 6 + ["flagged" if int(r[6]) else "", ""] for r in rows]
        blocks.append(Table(["method", "dataset", "protocol", "metric", "shared cells", "mean Δ", "flagged",
                             "beyond tolerance"], rows, "compare-summary", styles, numeric={4, 5, 6, 7}))
        shown = changes[changes["flagged"] | changes["beyond_tolerance"]]
        if len(shown):
            rows = [[r["variant"], r["board"], str(r["column"]), str(r["seed"]), r["metric"], pts(r["this"]),
                     pts(r["other"]), pts(r["change"], True), interval(r["ci_low"], r["ci_high"]),
                     "yes" if r["flagged"] else "no", r["cell_id"]] for r in shown.to_dict("records")]
            styles = [[""] * 9 + ["flagged" if r[9] == "yes" else "", ""] for r in rows]
            blocks += [Paragraph("Cells flagged or beyond the tolerance:"),
                       Table(["method", "dataset", "class", "seed", "metric", "this", other, "Δ",
                              f"{LEVEL:.0%} CI of Δ", "flagged", "cell"], rows, "compare-flagged", styles,
                             numeric={5, 6, 7, 8})]
        else:
            blocks.append(Paragraph("No cell changed beyond its interval or the tolerance."))
    if len(statuses):
        rows = [[r["variant"], r["board"], str(r["column"]), str(r["seed"]), r["this_status"], r["other_status"],
                 str(r["error"] or "")[:200]] for r in statuses.to_dict("records")]
        blocks += [Paragraph("Cells whose status differs:"),
                   Table(["method", "dataset", "class", "seed", "this", other, "error"], rows, "compare-status")]
    return blocks


def report_blocks(tables: dict, figures: dict, context: dict) -> list:
    refs = References()
    boards = tables["leaderboard"]
    blocks = summary_blocks(context) + context.get("provenance", []) + reproduction_blocks(tables["reproduction"], refs)
    blocks.append(Heading("Leaderboards"))
    if boards.empty:
        blocks.append(Paragraph("No finished ok cell with a metric yet."))
    for key, board in boards.groupby(["board", "protocol", "metric"], sort=False):
        blocks += board_blocks(key, board, figures, refs)
    blocks += failure_blocks(tables["failures"])
    blocks += cost_blocks(tables["cost"], figures, context["summary"])
    if figures["expected"] is not None:
        blocks += [Heading("Measured vs paper"),
                   Image(figures["expected"], f"Every measured value that has a paper number; the grey band "
                                              f"is ±{context['tolerance']:g} points")]
    if figures["gallery"]:
        blocks.append(Heading("Anomaly maps"))
        for key, rel in figures["gallery"].items():
            blocks.append(Image(rel, f"{' · '.join(key)}: test images with their masks and anomaly maps"))
    if "compare" in tables:
        blocks += compare_blocks(tables, context)
    blocks.append(Heading("References"))
    blocks.append(Bullets(refs.bullets()) if refs.numbers else Paragraph("No paper number was cited."))
    blocks += [Heading("Tables for pandas"),
               Paragraph("Every table above is in this folder as Parquet (values as fractions, as in the "
                         "rows): leaderboard, reproduction, failures, cost" +
                         (", compare, compare_status" if "compare" in tables else "") + ". The rows themselves:"),
               Code(PANDAS_LINES.format(run=context["run"].as_posix()), "python")]
    return blocks
