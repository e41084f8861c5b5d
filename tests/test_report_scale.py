"""A report of a large run: which row columns it reads, intervals summed row by row equal to the
ones from every row's distribution, the bootstrap cache read and written an entry at a time, and
per-row listings capped with a summary. Timed targets are in benchmarks/report_scale.py."""
from __future__ import annotations

import zipfile

import numpy as np
import pandas as pd
import pytest

from orchestrator.store import RowStore
from tests.test_report import main_run_rows, make_row, write_rows


def many_rows(n_seeds: int, classes=("bottle", "cable", "grid"), methods=("padim", "noop")) -> list[dict]:
    rows = []
    for method in methods:
        for cls in classes:
            for seed in range(n_seeds):
                rows.append(make_row(method, "mvtec", "one_class", cls, seed, shift=1.0 if method == "padim" else 0.0,
                                     n=(20 + seed % 3, 15), rng=np.random.default_rng([seed, len(cls), len(method)])))
    return rows


def recorded_reads(monkeypatch) -> list[list[str] | None]:
    """Every ``columns`` RowStore.read is called with from now on."""
    calls = []
    real = RowStore.read

    def read(self, columns=None):
        calls.append(None if columns is None else list(columns))
        return real(self, columns)

    monkeypatch.setattr(RowStore, "read", read)
    return calls


def test_a_report_reads_only_the_columns_it_uses(tmp_path, monkeypatch):
    from reports.leaderboard import build_report

    rows = main_run_rows()
    for i, r in enumerate(rows):  # the provenance section needs method_source
        r["method_source"] = "builtin" if r["method"] != "noop" else f"file:noop.py@sha256:{i % 2:064d}"
    run = write_rows(tmp_path / "run", rows)
    calls = recorded_reads(monkeypatch)
    report = build_report(run, n_resamples=200)
    assert len(calls) == 1 and calls[0] is not None
    read = set(calls[0])
    assert {"labels", "image_scores", "sample_maps", "status", "image_auroc", "cell_id", "method_source"} <= read
    assert "warning: method noop: its rows come from 2 different sources" in (report / "report.md").read_text()
    assert not read & {"traceback", "loss_curve", "versions", "weights_sha256", "node_id"}
    board = pd.read_parquet(report / "leaderboard.parquet")
    assert board.loc[board["metric"] == "image_auroc", "ci_low"].notna().any()
    assert any(p.name.startswith("gallery_") for p in (report / "plots").iterdir())  # maps were read

    calls.clear()  # no intervals wanted: no score column is read, and none is shown
    report = build_report(run, n_resamples=0)
    assert len(calls) == 1 and not set(calls[0]) & {"labels", "image_scores", "traceback"}
    board = pd.read_parquet(report / "leaderboard.parquet")
    assert board["ci_low"].isna().all() and board["mean"].notna().any()


def test_summed_column_distributions_equal_the_mean_of_every_rows(tmp_path):
    """ColumnDistributions gives bit for bit what mean_of over the rows' own distributions gives,
    truncated to the shortest (a row of over 10,000 samples has fewer resamples), None when a row
    of the cell has none; and the leaderboards built either way are identical."""
    from reports.bootstrap import mean_of
    from reports.expected import load_expected
    from reports.rows import annotate
    from reports.tables import ColumnDistributions, column_distributions, leaderboards, row_distributions

    rows = many_rows(7)
    rows[3]["aupr_in"] = 0.5  # the cell's other rows have no aupr_in: its mean has no interval
    rows[3]["labels"] = rows[3]["labels"][:5]  # the scores no longer fit the labels: no distribution
    frame = annotate(pd.DataFrame(rows))
    per_row = row_distributions(frame, 300)
    summed = column_distributions(frame, 300)
    for (variant, column), g in frame[frame["status"] == "ok"].groupby(["variant", "column"]):
        for metric in ("image_auroc", "aupr_in"):
            scored = g[g[metric].notna()]
            if scored.empty:
                continue
            expected = mean_of([per_row.get(c, {}).get(metric) for c in scored["cell_id"]])
            got = summed.mean((g["board"].iloc[0], "one_class", variant, column, metric))
            assert (got is None) == (expected is None) and (got is None or np.array_equal(got, expected))
    assert {k for k in summed.sums if summed.mean(k) is None} == {("mvtec", "one_class", "padim", "bottle", "aupr_in"),
                                                                 ("mvtec", "one_class", "padim", "bottle", "image_auroc")}
    expected_table = load_expected()
    assert leaderboards(frame, expected_table, 1.0, per_row).equals(leaderboards(frame, expected_table, 1.0, summed))

    sizes = ColumnDistributions()
    a, b = np.arange(5.0), np.arange(3.0) + 0.5
    sizes.add(("k",), a)
    sizes.add(("k",), b)
    assert np.array_equal(sizes.mean(("k",)), mean_of([a, b]))


def test_resampling_threads_change_nothing(tmp_path):
    from reports.rows import annotate
    from reports.tables import iter_distributions

    frame = annotate(pd.DataFrame(many_rows(5)))
    one = list(iter_distributions(frame, 200, workers=1))
    two = list(iter_distributions(frame, 200, workers=3))
    assert [i for i, _ in one] == [i for i, _ in two] == list(range(len(frame)))
    assert all(np.array_equal(d[m], e[m]) for (_, d), (_, e) in zip(one, two) for m in d)


def test_the_cache_reads_a_damaged_entry_as_missing(tmp_path, monkeypatch):
    """One member per row; a member that does not read is that row resampled, the others are not."""
    from reports import bootstrap as b
    from reports import tables
    from reports.rows import annotate

    frame = annotate(pd.DataFrame(many_rows(2, classes=("bottle",), methods=("padim",))))
    path = tmp_path / "cache.npz"
    cache = b.DistributionCache(path)
    first = tables.row_distributions(frame, 200, cache)
    cache.save()
    cache.close()
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        members = {n: z.read(n) for n in names}
    assert len(names) == 2 and all(n.endswith("/image_auroc.npy") for n in names)
    with zipfile.ZipFile(path, "w") as z:  # the first entry's array header overwritten
        for n, data in members.items():
            z.writestr(n, b"garbage" + data[7:] if n == names[0] else data)
    calls = []
    real = tables.resample_metrics
    monkeypatch.setattr(tables, "resample_metrics", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = b.DistributionCache(path)
    again = tables.row_distributions(frame, 200, cache)
    cache.save()
    cache.close()
    assert len(calls) == 1
    assert all(np.array_equal(first[k]["image_auroc"], again[k]["image_auroc"]) for k in first)
    assert len(np.load(path).files) == 2 and not list(tmp_path.glob(".*partial"))


def test_a_failed_build_leaves_no_partial_cache(tmp_path, monkeypatch):
    from reports import leaderboard

    run = write_rows(tmp_path / "run", main_run_rows())

    def broken(*args, **kwargs):
        raise RuntimeError("tables broke")

    monkeypatch.setattr(leaderboard, "leaderboards", broken)  # after every row was resampled
    with pytest.raises(RuntimeError, match="tables broke"):
        leaderboard.build_report(run, n_resamples=200)
    assert sorted(p.name for p in run.iterdir()) == ["rows"]


def test_a_long_failure_listing_is_capped_and_summarised(tmp_path, monkeypatch):
    from reports import leaderboard

    monkeypatch.setattr(leaderboard, "MAX_TABLE_ROWS", 5)
    rows = [make_row("noop", "mvtec", "one_class", "bottle", seed, status="failed" if seed % 2 else "ok",
                     shift=0.0) for seed in range(16)]
    rows += [make_row("padim", "mvtec", "one_class", "cable", seed, status="timeout") for seed in range(3)]
    report = leaderboard.build_report(write_rows(tmp_path / "run", rows), n_resamples=200)
    assert len(pd.read_parquet(report / "failures.parquet")) == 11  # every failed row in the table
    md = (report / "report.md").read_text()
    section = md.split("## Failed and timed-out cells")[1].split("\n## ")[0]
    assert "11 rows; none of them enters a mean" in section
    assert "then the first 5 of the 11 rows; every row is in failures.parquet" in section
    tables = [t for t in section.split("\n\n") if t.startswith("| ")]
    summary, listing = tables
    assert len(summary.strip().splitlines()) == 2 + 2  # header, rule, one line per method x error
    assert "| noop | mvtec | one_class | failed | 8 | RuntimeError: noop broke on bottle |" in summary
    assert "| padim | mvtec | one_class | timeout | 3 | RuntimeError: padim broke on cable |" in summary
    assert len(listing.strip().splitlines()) == 2 + 5
    html = (report / "report.html").read_text()
    assert html.count('data-name="failures"') == 1 and html.count('data-name="failures-summary"') == 1


def test_the_bootstrap_keeps_freed_memory_on_glibc_and_its_values_do_not_change():
    """keep_freed_memory sets glibc's mmap and trim thresholds (mallopt returns 1 for each); the
    resampled values are the same before and after (the allocator never touches the arithmetic)."""
    import platform

    import numpy as np

    from reports.bootstrap import BOOTSTRAP_METRICS, resample_metrics
    from reports.tables import keep_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt thresholds are glibc's")
    rng = np.random.default_rng(0)
    labels, scores = np.repeat([0, 1], 60).astype(np.int8), rng.normal(size=120)
    before = resample_metrics(labels, [scores], BOOTSTRAP_METRICS, 300, 7)
    assert keep_freed_memory() is True
    after = resample_metrics(labels, [scores], BOOTSTRAP_METRICS, 300, 7)
    assert all(np.array_equal(before[m], after[m]) for m in BOOTSTRAP_METRICS)
