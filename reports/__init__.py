"""The report stage: Parquet rows -> leaderboards against paper numbers, intervals, cost, plots,
report.md / report.html (see reports.leaderboard.build_report)."""
