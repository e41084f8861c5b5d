"""bench.py on a real local Ray over a compacted run: resume over a mix of compacted and per-cell
rows, and ``--rerun failed`` replacing a compacted failed row."""
from __future__ import annotations

import pandas as pd
import pyarrow.parquet as pq

from conftest import write_grid
from test_runner import bench_main, grid_text as runner_grid_text


def grid_text(classes: str, methods: str = "- name: noop\n", seeds: str = "[0]") -> str:
    """A grid named ``mix`` of ``methods`` on digits (test_runner's grid_text)."""
    return runner_grid_text("mix", methods, classes, seeds)


def test_resume_over_compacted_and_per_cell_rows_runs_only_the_missing_cells(ray_local, tmp_path, capsys):
    """A run of 4 cells compacting every 3 files (once during the run, the rest at its end); then one
    compacted cell gets a newer per-cell file (as --rerun writes) and one part is deleted: the
    grown grid's resume runs only the cells with no row anywhere, and every reader sees each cell
    once, the newer copy winning."""
    from orchestrator.store import RowStore

    results = tmp_path / "results"
    store = RowStore(results / "mix")
    common = ["--results", results, "--quiet", "--no-report"]
    status, out, err = bench_main([write_grid(tmp_path / "a.yaml", grid_text("[0, 1]", seeds="[0, 1]")),
                                   *common, "--compact-every", "3"], capsys)
    assert status == 0, out + err
    assert "compacted 4 row file(s) during the run into 2 part(s)" in out, out
    assert store.fresh_files() == [] and len(store.part_files()) == 2

    (_, first), (_, second) = store.part_files()
    (lost,) = pd.read_parquet(second)["cell_id"]
    second.unlink()                                         # a deleted row: its cell runs again
    rerun = pq.read_table(first).slice(0, 1).to_pylist()[0]   # a newer row of a compacted cell
    store.write(rerun["cell_id"], [dict(rerun, total_s=1234.0)], overwrite=True)

    grown = write_grid(tmp_path / "b.yaml", grid_text("[0, 1, 2]", seeds="[0, 1]"))
    status, out, err = bench_main([grown, *common], capsys)
    assert status == 0 and "6 cells, 3 already done, 3 to run" in out and "ok 3, failed 0" in out, out + err
    assert len(store.fresh_files()) == 4 and "row file(s)" not in out   # 6 cells < 1000: per-cell files stay
    df = RowStore(store.run_dir).read()
    assert len(df) == 6 and df["cell_id"].is_unique and (df["status"] == "ok").all() and lost in set(df["cell_id"])
    assert df.set_index("cell_id").loc[rerun["cell_id"], "total_s"] == 1234.0
    assert "noop (chance baseline)     6   6" in out, out       # the summary read each cell once

    status, out, err = bench_main(["compact", store.run_dir], capsys)
    assert status == 0 and "compacted 4 row file(s) into 1 part(s)" in out, out + err
    assert "rewrote 1 older part(s)" in out, out
    df = pd.read_parquet(store.rows_dir)
    assert len(df) == 6 and df["cell_id"].is_unique
    assert df.set_index("cell_id").loc[rerun["cell_id"], "total_s"] == 1234.0
    status, out, err = bench_main([grown, *common], capsys)
    assert status == 0 and "6 already done, 0 to run" in out, out + err


def test_rerun_failed_after_compaction_replaces_the_compacted_failed_row(ray_local, tmp_path, capsys):
    """A cell whose worker died (one attempt) is compacted as failed; ``--rerun failed`` computes it
    again, its new row wins over the compacted one at once, and the run's closing compaction rewrites
    the part, so plain pandas reads one ok row for it."""
    from orchestrator.store import RowStore

    marker = tmp_path / "killed-once"
    methods = f"""
        - name: noop
          params: {{kill_marker: "{marker}"}}
        - name: noop
        """
    path = write_grid(tmp_path / "g.yaml", grid_text("[0]", methods))
    results = tmp_path / "results"
    store = RowStore(results / "mix")
    common = [path, "--results", results, "--quiet", "--no-report", "--compact-every", "1", "--max-attempts", "1"]
    status, out, err = bench_main(common, capsys)
    assert status == 0 and "ok 1, failed 1" in out, out + err
    assert store.fresh_files() == [] and store.part_files()
    assert sorted(store.statuses().values()) == ["failed", "ok"]
    assert any(line.startswith("failed: noop") and "worker died" in line for line in out.splitlines()), out

    status, out, err = bench_main([*common, "--rerun", "failed"], capsys)
    assert status == 0 and "1 already done, 1 to run" in out and "ok 1, failed 0" in out, out + err
    assert "failed: " not in out, out
    df = pd.read_parquet(store.rows_dir)
    assert len(df) == 2 and (df["status"] == "ok").all() and df["cell_id"].is_unique
    assert store.fresh_files() == [] and set(store.statuses().values()) == {"ok"}
