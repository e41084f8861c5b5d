"""The row store's compaction: layout, precedence of a re-run over a compacted copy, damage, and a
compaction SIGKILLed at every step (a real ``bench.py compact`` process) losing and doubling nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT


def row(cell: str, status: str = "ok", version: int = 0, n: int = 1) -> list[dict]:
    """``n`` rows of a cell; ``seed`` carries a version number so a test can tell copies apart."""
    rng = np.random.default_rng(abs(hash((cell, version))) % (1 << 32))
    return [{"run_id": "t", "cell_id": f"{cell}-{i}" if n > 1 else cell, "base_cell_id": cell, "method": "noop",
             "params": "{}", "dataset": "digits", "protocol": "one_class", "normal_class": "0", "seed": version,
             "status": status, "error": None if status == "ok" else "RuntimeError: x", "image_auroc": 0.5,
             "labels": [0, 1] * 50, "image_scores": rng.normal(size=100)} for i in range(n)]


def fill(store, cells, status="ok", version=0, overwrite=False, n=1):
    for cell in cells:
        assert store.write(cell, row(cell, status, version, n), overwrite=overwrite)


def versions(df: pd.DataFrame) -> dict[str, list[int]]:
    """base cell id -> the versions of its rows, as read (a doubled cell shows two)."""
    return {k: sorted(g["seed"].tolist()) for k, g in df.groupby("base_cell_id")}


def bench(*argv, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *map(str, argv)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120, **kw)


def test_compacted_parts_read_with_pandas_as_one_dataset(tmp_path):
    """Compaction folds the per-cell files into parts under rows/compacted/ that plain
    ``pd.read_parquet(rows)`` reads (no partition column, hidden work folder skipped) with exactly
    the rows and columns the per-cell files had; the store reads the same and resumes from footers."""
    from orchestrator.store import COLUMNS, RowStore

    store = RowStore(tmp_path / "run")
    cells = [f"c{i:02d}" for i in range(12)]
    fill(store, cells[:9])
    fill(store, cells[9:], status="failed")
    fill(store, ["multi"], n=3)   # a cell of several rows (an OOD cell's sets)
    before = store.read()
    statuses = store.statuses()
    done = store.compact(part_bytes=4000)   # ~2 cells a part: several parts
    assert done.sources == 13 and len(done.parts) >= 4 and not done.dropped and done.rows == 15
    assert store.fresh_files() == [] and not (store.rows_dir / ".compact").exists()
    assert [p.name for _, p in store.part_files()] == [f"part-{i:06d}.parquet" for i in range(1, len(done.parts) + 1)]
    df = pd.read_parquet(store.rows_dir)
    assert list(df.columns) == COLUMNS and len(df) == 15
    assert versions(df) == {c: [0] * (3 if c == "multi" else 1) for c in cells + ["multi"]}
    pd.testing.assert_frame_equal(store.read(), before)
    assert store.statuses() == statuses and statuses["c10"] == "failed"
    assert set(store.tables()) == set(cells) | {"multi"} and store.tables()["multi"].num_rows == 3
    assert list(store.read(columns=["cell_id", "status"]).columns) == ["cell_id", "status"]
    assert store.exists("c03") and not store.path("c03").exists()
    assert store.write("c03", row("c03", version=9)) is False   # a duplicate delivery after compaction
    assert store.compact().sources == 0


def test_a_rerun_after_compaction_wins_and_the_next_compaction_drops_the_old_copy(tmp_path):
    """A fresh file written over a compacted cell (``--rerun``) is what the store reads; the next
    compaction rewrites the part that held the old copy, so plain pandas reads one row again."""
    from orchestrator.store import RowStore

    store = RowStore(tmp_path / "run")
    fill(store, ["a", "b", "c"], status="failed")
    store.compact()
    assert store.write("b", row("b", "ok", version=1), overwrite=True)
    assert store.statuses() == {"a": "failed", "b": "ok", "c": "failed"}
    assert versions(store.read()) == {"a": [0], "b": [1], "c": [0]}
    assert versions(pd.read_parquet(store.rows_dir))["b"] == [0, 1]   # until compacted (README says so)
    (old,) = [p for _, p in store.part_files()]
    done = store.compact()
    assert done.sources == 1 and done.dropped == [old] and not old.exists()
    assert versions(pd.read_parquet(store.rows_dir)) == {"a": [0], "b": [1], "c": [0]}
    assert store.statuses() == {"a": "failed", "b": "ok", "c": "failed"}


def test_readers_take_the_newest_copy_of_a_cell_in_any_mix_of_files(tmp_path):
    """Two parts holding one cell (what a compaction killed after its rename leaves) and a fresh
    file: fresh beats parts, a higher part number beats a lower one; read once, never twice."""
    from orchestrator.store import RowStore

    store = RowStore(tmp_path / "run")
    fill(store, ["a", "b"])
    store.compact()
    first = store.part_files()[0][1]
    kept = first.read_bytes()
    fill(store, ["a", "b"], version=1, overwrite=True)
    store.compact()                  # part 2 holds a, b at version 1; part 1 is dropped
    first.write_bytes(kept)          # ... put back, as a kill before the drop would leave it
    fill(store, ["b"], version=2, overwrite=True)
    assert versions(store.read()) == {"a": [1], "b": [2]}
    assert {c: t.column("seed").to_pylist() for c, t in store.tables().items()} == {"a": [1], "b": [2]}
    store.compact()
    assert versions(pd.read_parquet(store.rows_dir)) == {"a": [1], "b": [2]}
    # parts 1 and 2 rewritten into part 3 with b's fresh file
    assert [p.name for _, p in store.part_files()] == ["part-000003.parquet"]


def test_damage_in_a_part_is_set_aside_like_a_row_file(tmp_path):
    """A part whose footer does not read is set aside on the next resume (its cells run again); a
    part damaged in the scores' pages resumes as done, and the first full read sets it aside."""
    from orchestrator.store import RowStore

    store = RowStore(tmp_path / "run")
    fill(store, ["a", "b"])
    store.compact()
    fill(store, ["c", "d"])
    store.compact()
    (_, p1), (_, p2) = store.part_files()
    data = bytearray(p2.read_bytes())
    chunk = pq.ParquetFile(p2).metadata.row_group(0).column(pq.ParquetFile(p2).schema_arrow.names.index("image_scores"))
    data[chunk.data_page_offset + 8: chunk.data_page_offset + 200] = b"\xff" * 192
    p2.write_bytes(bytes(data))
    assert store.statuses() == {c: "ok" for c in "abcd"} and not store.damaged
    assert set(store.tables()) == {"a", "b"}
    (original, moved, why), = store.damaged
    assert original == p2 and moved.parent == store.rows_dir / ".damaged" and not p2.exists()
    p1.write_bytes(p1.read_bytes()[:-30])   # a truncated footer
    assert store.statuses() == {}
    assert [m.parent.name for _, m, _ in store.damaged] == [".damaged", ".damaged"]
    assert store.part_files() == [] and store.read().empty


def test_bench_compact_sets_damaged_files_aside_and_compacts_the_rest(tmp_path):
    """``bench.py compact`` on a folder with a truncated row file, a garbage part and a file of
    foreign columns: the first two go to rows/.damaged/ (named in the output), the third stays as
    it is, the rest is compacted."""
    from orchestrator.store import RowStore

    run = tmp_path / "run"
    store = RowStore(run)
    fill(store, ["a", "b", "c"])
    whole = store.path("a").read_bytes()
    store.path("a").write_bytes(whole[: len(whole) // 2])
    (store.rows_dir / "compacted").mkdir()
    (store.rows_dir / "compacted" / "part-000001.parquet").write_bytes(b"PAR1 garbage")
    pq.write_table(pa.table({"cell_id": ["x"], "status": ["ok"], "extra": [1]}), store.path("x"))
    (store.rows_dir / ".b.123.tmp").write_bytes(b"half")
    done = bench("compact", run)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"damaged row file {store.path('a')}" in done.stdout, done.stdout
    assert f"damaged row file {store.rows_dir / 'compacted' / 'part-000001.parquet'}" in done.stdout
    assert f"kept {store.path('x')} as it is" in done.stdout
    assert "compacted 2 row file(s) into 1 part(s)" in done.stdout, done.stdout
    assert len(list((store.rows_dir / ".damaged").iterdir())) == 2
    assert RowStore(run).statuses() == {"b": "ok", "c": "ok", "x": "ok"}
    assert not list(store.rows_dir.glob(".*.tmp"))
    assert bench("compact", tmp_path / "nowhere").returncode == 2


def test_bench_compact_refuses_a_run_another_driver_holds(tmp_path):
    from orchestrator.lock import RunLock
    from orchestrator.store import RowStore

    store = RowStore(tmp_path / "run")
    fill(store, ["a"])
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from orchestrator.lock import RunLock; "
            "RunLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(store.run_dir)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        done = bench("compact", store.run_dir)
        assert done.returncode == 2 and "in use by another driver" in done.stderr, done.stderr
        assert store.fresh_files() == [store.path("a")]
    finally:
        child.kill()
        child.wait()
    with RunLock(store.run_dir):
        pass


STEPS = ["writing", "written", "committed", "renamed", "dropped", "deleting", "deleted"]


@pytest.mark.parametrize("step", STEPS)
def test_a_compaction_killed_at_any_step_loses_and_doubles_nothing(tmp_path, step):
    """``bench.py compact`` SIGKILLed at each step (before and after its commit point): the store
    reads every cell once, newest copy, right away; the next ``bench.py compact`` (or a run's
    start) finishes or undoes it, after which plain pandas reads exactly one row per cell."""
    from orchestrator.store import PAUSE_ENV, RowStore

    run = tmp_path / "run"
    store = RowStore(run)
    old = [f"o{i:02d}" for i in range(8)]
    new = [f"n{i:02d}" for i in range(5)]
    fill(store, old)
    store.compact(part_bytes=4000)
    fill(store, old[2:5], version=1, overwrite=True)   # re-run: their parts are rewritten
    fill(store, new, version=1)
    want = {c: [1] if c in old[2:5] or c in new else [0] for c in old + new}
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench.py"), "compact", str(run), "--part-mb", "0.004"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, PAUSE_ENV: step})
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"compact paused at {step}", line + proc.stderr.read()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    reader = RowStore(run)                     # a reader (no lock, no recovery): deduplicates
    assert versions(reader.read()) == want
    assert reader.statuses() == {c: "ok" for c in want} and not reader.damaged
    done = bench("compact", run)               # recovery under the lock, then the rest is compacted
    assert done.returncode == 0, done.stdout + done.stderr
    assert "took over the lock of a driver that is gone" in done.stdout, done.stdout
    df = pd.read_parquet(run / "rows")
    assert versions(df) == want and len(df) == len(want)
    assert not (run / "rows" / ".compact").exists() and RowStore(run).fresh_files() == []
    assert not (run / "rows" / ".damaged").exists()


def test_clean_temporaries_undoes_an_uncommitted_compaction_and_rolls_a_committed_one_forward(tmp_path):
    """The start of a run (``clean_temporaries`` under the lock) finishes the job alone: before the
    commit it removes the half-written parts (the fresh files stay), after it the sources go."""
    from orchestrator.store import PAUSE_ENV, RowStore

    for step, fresh_left in (("written", 3), ("renamed", 0)):
        run = tmp_path / step
        store = RowStore(run)
        fill(store, ["a", "b", "c"])
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench.py"), "compact", str(run)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, PAUSE_ENV: step})
        assert proc.stdout.readline().strip() == f"compact paused at {step}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert RowStore(run).clean_temporaries() >= 1
        assert len(store.fresh_files()) == fresh_left and not (run / "rows" / ".compact").exists()
        df = pd.read_parquet(run / "rows")
        assert sorted(df["base_cell_id"]) == ["a", "b", "c"]


def test_a_resume_first_compacts_the_files_a_killed_run_left(tmp_path, capsys, monkeypatch):
    """A run folder holding --compact-every per-cell files (a large run killed before compacting):
    the next run folds them into a part before planning, then finds every cell done (Ray never
    starts); a negative --compact-every is refused."""
    import textwrap

    import bench
    import orchestrator.runner
    from orchestrator.config import load_grid
    from orchestrator.grid import expand
    from orchestrator.store import RowStore

    monkeypatch.setattr(orchestrator.runner, "start_ray", lambda *a, **k: pytest.fail("Ray was started"))
    grid = tmp_path / "g.yaml"
    grid.write_text(textwrap.dedent("""
        name: left
        seeds: [0, 1]
        datasets:
          - name: digits
            protocol: one_class
            classes: [0, 1]
        methods:
          - name: noop
        """))
    cells = expand(load_grid(grid)).cells
    store = RowStore(tmp_path / "results" / "left")
    fill(store, [c.cell_id for c in cells])
    argv = [str(grid), "--results", str(tmp_path / "results"), "--quiet", "--no-report"]
    assert bench.main([*argv, "--compact-every", "-1"]) == 2
    assert "--compact-every must be 0" in capsys.readouterr().err
    assert bench.main([*argv, "--compact-every", "4"]) == 0
    out = capsys.readouterr().out
    assert "compacted 4 row file(s) left by an earlier run into 1 part(s)" in out, out
    assert "4 cells, 4 already done, 0 to run" in out and store.fresh_files() == []


def test_one_status_rule_for_a_cell_in_fresh_files_parts_and_the_report(tmp_path):
    """cell_status is the rule; RowStore.statuses (fresh files and parts, vectorised) and the
    report's run_summary (vectorised) give the same status for every mix of row statuses."""
    from orchestrator.store import RowStore, cell_status
    from reports.cost import run_summary

    mixes = {"a": ["ok"], "b": ["ok", "timeout"], "c": ["timeout", "failed"], "d": ["failed", "ok"],
             "e": ["ok", "ok", "ok"], "f": ["timeout"], "g": ["ok", "failed", "timeout"]}
    assert [cell_status(m) for m in mixes.values()] == ["ok", "timeout", "timeout", "failed", "ok",
                                                         "timeout", "failed"]
    assert cell_status([]) == "failed" and cell_status([None]) == "failed"

    def rows_of(cell, statuses):
        rows = row(cell, n=len(statuses))
        for r, s in zip(rows, statuses):
            r["status"] = s
        return rows

    fresh, parted = RowStore(tmp_path / "fresh"), RowStore(tmp_path / "parted")
    for cell, statuses in mixes.items():
        fresh.write(cell, rows_of(cell, statuses))
        parted.write(cell, rows_of(cell, statuses))
    parted.compact()
    want = {cell: cell_status(m) for cell, m in mixes.items()}
    assert not list(parted.rows_dir.glob("*.parquet")) and parted.part_files()
    assert fresh.statuses() == want and parted.statuses() == want
    from reports.rows import annotate

    summary = run_summary(annotate(parted.read()))
    assert (summary["ok"], summary["failed"], summary["timeout"]) == (2, 2, 3)
