"""The runner on a real local Ray: rows, provenance, failures, worker death, timeouts, resume."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, mounted_tmpfs, run_grid_inprocess, write_grid


def grid_text(name: str, methods: str, classes: str = "[0, 1]", seeds: str = "[0]") -> str:
    return textwrap.dedent(f"""
        name: {name}
        seeds: {seeds}
        datasets:
          - name: digits
            protocol: one_class
            classes: {classes}
        methods:
        """) + textwrap.indent(textwrap.dedent(methods), "  ")


def test_rows_schema_and_provenance(ray_local, tmp_path):
    from orchestrator.store import COLUMNS

    path = write_grid(tmp_path / "g.yaml", grid_text("ok", "- name: noop\n", seeds="[0, 1]"))
    store, summary, cells = run_grid_inprocess(path, tmp_path / "results")
    assert summary.ok == 4 and summary.failed == 0
    df = pd.read_parquet(store.rows_dir)
    assert list(df.columns) == COLUMNS
    assert len(df) == 4 and set(df["cell_id"]) == {c.cell_id for c in cells}
    row = df.iloc[0]
    assert row["status"] == "ok" and 0.0 <= row["image_auroc"] <= 1.0
    assert row["node_ip"] == "127.0.0.1" and row["hostname"] and row["worker_pid"] > 0
    assert row["git_sha"] and "torch" in json.loads(row["versions"]) and "ray" in json.loads(row["versions"])
    assert row["peak_rss_bytes"] > 10 << 20 and row["total_s"] >= row["fit_s"] >= 0
    assert row["device"] == "cpu" and row["n_test"] == len(row["labels"]) == len(row["image_scores"])
    assert row["started_at"] <= row["finished_at"]
    # scores in the row reproduce the metric
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(row["labels"], row["image_scores"]) == pytest.approx(row["image_auroc"])


def test_raising_cell_is_a_failed_row_and_the_grid_goes_on(ray_local, tmp_path):
    path = write_grid(tmp_path / "g.yaml", grid_text("fail", "- name: noop\n  params: {fail: [false, true]}\n"))
    store, summary, _ = run_grid_inprocess(path, tmp_path / "results")
    df = store.read()
    assert summary.ok == 2 and summary.failed == 2 and len(df) == 4
    failed = df[df["status"] == "failed"]
    assert (failed["error"] == "RuntimeError: noop asked to fail").all()
    assert failed["traceback"].str.contains("in fit").all()
    assert failed["image_auroc"].isna().all()


def test_sigkilled_worker_is_replaced_and_its_cell_requeued(ray_local, tmp_path):
    marker = tmp_path / "killed-once"
    methods = f"""
        - name: noop
          params: {{kill_marker: "{marker}"}}
        - name: noop
          params: {{kill: true}}
        - name: noop
        """
    path = write_grid(tmp_path / "g.yaml", grid_text("kill", methods, classes="[0]"))
    store, summary, _ = run_grid_inprocess(path, tmp_path / "results", max_attempts=2)
    df = store.read()
    assert len(df) == 3 and marker.exists()
    survived = df[df["params"].str.contains("kill_marker")].iloc[0]
    assert survived["status"] == "ok" and survived["attempt"] == 2
    killed = df[df["params"].str.contains('"kill":true')].iloc[0]
    assert killed["status"] == "failed" and "worker died 2 time(s)" in killed["error"]
    assert (df[df["params"] == "{}"]["status"] == "ok").all()
    assert summary.retried == 2


def test_hung_cell_times_out_and_others_finish(ray_local, tmp_path):
    path = write_grid(tmp_path / "g.yaml", grid_text("hang", "- name: noop\n  params: {hang: [true, false]}\n",
                                                      classes="[0]"))
    t0 = time.time()
    store, summary, _ = run_grid_inprocess(path, tmp_path / "results", cell_timeout=3)
    df = store.read()
    assert time.time() - t0 < 60
    assert summary.timeout == 1 and summary.ok == 1
    hung = df[df["status"] == "timeout"].iloc[0]
    assert "--cell-timeout 3s" in hung["error"]


def test_a_cell_is_never_written_twice(tmp_path):
    from orchestrator.store import RowStore

    store = RowStore(tmp_path / "run")
    row = {"cell_id": "abc", "status": "ok", "labels": [0, 1], "image_scores": [0.1, 0.9]}
    assert store.write("abc", [row]) is True
    assert store.write("abc", [dict(row, status="failed")]) is False
    assert store.read()["status"].tolist() == ["ok"]
    assert store.write("abc", [dict(row, status="failed")], overwrite=True) is True
    assert store.statuses() == {"abc": "failed"}
    assert not list(store.rows_dir.glob(".*"))


def test_corrupt_row_file_is_treated_as_not_done(tmp_path):
    from orchestrator.store import RowStore

    store = RowStore(tmp_path / "run")
    (store.rows_dir / "deadbeef.parquet").write_bytes(b"PAR1 not really parquet")
    (store.rows_dir / ".x.123.tmp").write_bytes(b"half a file")
    assert store.statuses() == {}
    assert store.clean_temporaries() == 1
    (original, moved, why), = store.damaged
    assert original.name == "deadbeef.parquet" and not original.exists()
    assert moved.parent == store.rows_dir / ".damaged" and moved.read_bytes() == b"PAR1 not really parquet"


def test_resume_reads_the_status_alone_and_readers_set_aside_damage_elsewhere(tmp_path):
    """Planning a resume reads each file's footer and status column only (cheap at 100k rows); a
    file damaged in another column reads as done there, and the first full read (summary, report,
    ``read``) sets it aside, so the next resume runs its cell again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.store import RowStore

    store = RowStore(tmp_path / "run")
    scores = np.random.default_rng(0).normal(size=5000).tolist()
    for cell in ("aaaa", "bbbb"):
        pq.write_table(pa.table({"cell_id": [cell], "status": ["ok"], "image_scores": [scores]}),
                       store.rows_dir / f"{cell}.parquet")
    path = store.rows_dir / "bbbb.parquet"
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(2)
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset + 40: chunk.data_page_offset + 240] = b"\xff" * 200   # a page header
    path.write_bytes(bytes(data))
    assert store.statuses() == {"aaaa": "ok", "bbbb": "ok"} and not store.damaged
    assert list(store.tables()) == ["aaaa"]
    (original, moved, why), = store.damaged
    assert original == path and moved.parent.name == ".damaged" and why.startswith("OSError")
    assert store.statuses() == {"aaaa": "ok"}


def bench_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """bench.py in this process (on the session's Ray where a test has started it)."""
    import bench

    status = bench.main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture
def ray_must_not_start(monkeypatch):
    import orchestrator.runner

    def refuse(*_a, **_k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(orchestrator.runner, "start_ray", refuse)


def test_a_damaged_row_file_is_set_aside_and_its_cell_runs_again(ray_local, tmp_path, capsys):
    """A truncated row file: the next run moves it to rows/.damaged/ (kept, named in the output),
    computes its cell again, and every reader (the summary, the report, pd.read_parquet as the
    README shows it) reads the run; ``bench.py report`` sets a damaged file aside the same way."""
    path = write_grid(tmp_path / "g.yaml", grid_text("damaged", "- name: noop\n"))
    results = tmp_path / "results"
    rows_dir = results / "damaged" / "rows"
    status, out, err = bench_main([path, "--results", results, "--quiet", "--no-report"], capsys)
    assert status == 0, out + err
    first, second = sorted(rows_dir.glob("*.parquet"))
    whole = first.read_bytes()
    first.write_bytes(whole[: len(whole) // 2])  # a disk or copy that lost the end of the file

    status, out, err = bench_main([path, "--results", results, "--quiet"], capsys)
    assert status == 0, out + err
    moved = list((rows_dir / ".damaged").glob(f"{first.stem}.*.parquet"))
    assert len(moved) == 1 and moved[0].read_bytes() == whole[: len(whole) // 2]
    assert f"damaged row file {first}" in out and str(moved[0]) in out, out
    assert "1 already done, 1 to run" in out and "ok 1, failed 0" in out, out
    rows = pd.read_parquet(rows_dir)
    assert sorted(rows["cell_id"]) == [first.stem, second.stem] and (rows["status"] == "ok").all()
    assert (results / "damaged" / "report" / "report.md").exists()

    second.write_bytes(b"PAR1" + b"\0" * 100)  # damaged between runs: the report command sets it aside
    status, out, err = bench_main(["report", results / "damaged"], capsys)
    assert status == 0, out + err
    assert f"damaged row file {second}" in out and not second.exists()
    assert len(list((rows_dir / ".damaged").glob("*.parquet"))) == 2
    assert pd.read_parquet(rows_dir)["cell_id"].tolist() == [first.stem]


@pytest.mark.parametrize("name, run", [("..", None), ("ok", "../escaped"), ("ok", "."), ("ok", "a/b")])
def test_a_run_that_would_land_outside_the_results_folder_exits_2(tmp_path, capsys, ray_must_not_start,
                                                                   name, run):
    path = write_grid(tmp_path / "g.yaml", grid_text(name, "- name: noop\n", classes="[0]"))
    results = tmp_path / "box" / "results"
    status, out, err = bench_main([path, "--results", results, "--quiet", *(["--run", run] if run else [])], capsys)
    assert status == 2, out + err
    assert "error:" in err and (f"{name!r}" in err if run is None else f"{run!r}" in err), err
    assert not (tmp_path / "box" / "rows").exists() and not (tmp_path / "box" / "escaped").exists()
    assert not (results / "a").exists() and not (results / "rows").exists()


def test_an_unwritable_results_folder_is_one_line_exit_2(tmp_path, capsys, ray_must_not_start):
    """A read-only file system under --results (a real one: root writes through file modes)."""
    path = write_grid(tmp_path / "g.yaml", grid_text("ro", "- name: noop\n", classes="[0]"))
    with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        status, out, err = bench_main([path, "--results", ro / "results", "--quiet"], capsys)
    assert status == 2, out + err
    assert err.splitlines() == [f"error: cannot write {ro / 'results'}: Read-only file system"], err


def test_a_full_disk_is_one_line_exit_1_and_the_run_resumes_once_there_is_space(ray_local, tmp_path, capsys):
    """A 16 KiB tmpfs (a real ENOSPC): the run lock fits, the first row file (~22 KB) does not."""
    path = write_grid(tmp_path / "g.yaml", grid_text("full", "- name: noop\n"))
    with mounted_tmpfs(tmp_path / "disk", "size=16k") as disk:
        rows_dir = disk / "full" / "rows"
        status, out, err = bench_main([path, "--results", disk, "--quiet", "--no-report"], capsys)
        assert status == 1, out + err
        (line,) = err.splitlines()
        assert line.startswith(f"error: cannot write {rows_dir}/") and ".parquet: No space left on device" in line
        assert "Traceback" not in out + err and not list(rows_dir.glob(".*.tmp"))
        subprocess.run(["mount", "-o", "remount,size=1m", str(disk)], check=True)
        status, out, err = bench_main([path, "--results", disk, "--quiet", "--no-report"], capsys)
        assert status == 0, out + err
        assert len(pd.read_parquet(rows_dir)) == 2


def test_a_run_whose_every_cell_failed_exits_1_and_names_each_failed_sweep(ray_local, tmp_path, capsys):
    path = write_grid(tmp_path / "g.yaml", grid_text("allfail", "- name: noop\n  params: {fail: true, "
                                                                  "sleep_s: [0.0, 0.01]}\n", classes="[0]"))
    argv = [path, "--results", tmp_path / "results", "--quiet", "--no-report"]
    status, out, err = bench_main(argv, capsys)
    assert status == 1, out + err
    assert "no cell of this run succeeded" in err
    failed = [line for line in out.splitlines() if line.startswith("failed: ")]
    assert set(failed) == {
        'failed: noop {"fail":true,"sleep_s":0.0} digits class=0 seed=0: RuntimeError: noop asked to fail',
        'failed: noop {"fail":true,"sleep_s":0.01} digits class=0 seed=0: RuntimeError: noop asked to fail'}, out
    status, out, err = bench_main(argv, capsys)  # nothing left to run: still no ok cell
    assert status == 1 and "0 to run" in out, out + err


def test_the_summary_counts_only_rows_it_wrote(ray_local, tmp_path):
    """A driver that computed cells whose rows another driver wrote first: the store keeps the first
    rows, and this driver's summary says so instead of reporting them ok."""
    from orchestrator.config import load_grid
    from orchestrator.grid import expand
    from orchestrator.runner import Runner

    path = write_grid(tmp_path / "g.yaml", grid_text("twice", "- name: noop\n"))
    store, summary, cells = run_grid_inprocess(path, tmp_path / "results")
    assert summary.ok == 2
    before = {f.name: f.stat().st_mtime_ns for f in store.rows_dir.glob("*.parquet")}
    late = Runner(expand(load_grid(path)).cells, store, run_id="twice", progress=False).run()
    assert late.ok == 0 and late.failed == 0  # the old summary said ok 2
    assert late.not_written == 2
    assert {f.name: f.stat().st_mtime_ns for f in store.rows_dir.glob("*.parquet")} == before


def _hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from orchestrator.lock import RunLock; "
            "RunLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_the_run_lock_names_its_holder_and_a_sigkilled_holder_never_blocks(tmp_path):
    import socket

    from orchestrator.lock import RunLock, RunLocked

    run_dir = tmp_path / "run"
    child = _hold_lock_in_child(run_dir)
    try:
        with pytest.raises(RunLocked, match=rf"in use by another driver: pid {child.pid} on host "
                                            rf"{re.escape(socket.gethostname())}"):
            RunLock(run_dir).acquire()
    finally:
        child.kill()  # SIGKILL: no clean-up runs, the file still names it
        child.wait()
    with RunLock(run_dir) as lock:
        assert f"driver that is gone: pid {child.pid} on host" in lock.note
        with pytest.raises(RunLocked):  # one process, a second open file: still exclusive
            RunLock(run_dir).acquire()
    with RunLock(run_dir) as lock:  # released cleanly: nothing to take over
        assert lock.note is None
    (run_dir / ".lock").write_text('{"host": "other-node", "pid": 4242, "started": 0}')
    with pytest.raises(RunLocked, match=rf"may still run: pid 4242 on host other-node.*remove {re.escape(str(run_dir))}"):
        RunLock(run_dir).acquire()


def test_a_second_driver_on_a_run_folder_exits_2_naming_the_first(tmp_path, capsys, ray_must_not_start):
    import socket

    path = write_grid(tmp_path / "g.yaml", grid_text("shared", "- name: noop\n", classes="[0]"))
    results = tmp_path / "results"
    child = _hold_lock_in_child(results / "shared")
    try:
        status, out, err = bench_main([path, "--results", results, "--quiet"], capsys)
    finally:
        child.kill()
        child.wait()
    assert status == 2, out + err
    assert f"in use by another driver: pid {child.pid} on host {socket.gethostname()}" in err, err
    assert not list((results / "shared" / "rows").glob("*"))


def test_a_second_local_run_starts_without_a_dashboard(tmp_path):
    """Where another local Ray holds the dashboard agent's fixed port 52365 on 127.0.0.1 (a grid
    already running on this machine), a run still starts on 127.0.0.1 (another loopback address would
    put Ray's servers on every interface), without a dashboard, and says so."""
    import socket

    from orchestrator.runner import node_ip_free

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other_ray:
        other_ray.bind(("127.0.0.40", 52365))
        other_ray.listen()
        assert not node_ip_free("127.0.0.40") and node_ip_free("127.0.0.41")

    path = write_grid(tmp_path / "g.yaml", grid_text("second", "- name: noop\n", classes="[0]"))
    cmd = [sys.executable, str(ROOT / "bench.py"), str(path), "--results", str(tmp_path / "results"),
           "--quiet", "--no-report"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other_ray:
        try:
            other_ray.bind(("127.0.0.1", 52365))
            other_ray.listen()
        except OSError:  # a Ray of this test session holds it already: the same situation
            pass
        run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "another local Ray holds 127.0.0.1:52365" in run.stdout, run.stdout
    assert "Ray dashboard:" not in run.stdout, run.stdout
    rows = pd.read_parquet(tmp_path / "results" / "second" / "rows")
    assert rows["node_ip"].tolist() == ["127.0.0.1"] and rows["status"].tolist() == ["ok"]


def listeners_outside_loopback(pids: set[int]) -> list[str]:
    """Sockets of ``pids`` that accept connections (TCP in LISTEN, bound UDP) on an address outside
    127.0.0.0/8 and ::1 (an IPv4-mapped ::ffff:127.x counts as loopback), as "name pid address:port"."""
    import ipaddress

    import psutil

    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in pids or not conn.laddr:
            continue
        if conn.type == socket.SOCK_STREAM and conn.status != psutil.CONN_LISTEN:
            continue
        ip = ipaddress.ip_address(conn.laddr.ip.split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if not ip.is_loopback:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.Error:
                name = "?"
            found.append(f"{name} {conn.pid} {conn.laddr.ip}:{conn.laddr.port}")
    return found


def ray_pids() -> set[int]:
    """This process and every process it started: the local Ray's GCS, raylet, dashboard, agents
    and workers all descend from the driver that called ``ray.init``."""
    import psutil

    me = psutil.Process()
    return {me.pid} | {p.pid for p in me.children(recursive=True)}


def test_a_local_run_listens_on_loopback_only(ray_local, tmp_path):
    """While a worker actor runs a cell, no socket of the local Ray (GCS, raylet, driver, workers,
    dashboard agent's HTTP and gRPC, runtime-env agent, metrics exports) listens outside loopback:
    on the default node address 127.0.0.1 Ray binds them all there. 127.0.0.2 put the GCS, the
    raylet, the driver, every worker, the agent's gRPC and the metrics exports on 0.0.0.0 / [::]."""
    import psutil

    from orchestrator.grid import expand
    from orchestrator.config import load_grid
    from orchestrator.worker import Worker

    assert ray_local.util.get_node_ip_address() == "127.0.0.1"
    grid = load_grid(write_grid(tmp_path / "g.yaml",
                                grid_text("net", "- name: noop\n  params: {sleep_s: 4}\n", classes="[0]")))
    cell = expand(grid).cells[0]
    worker = ray_local.remote(num_cpus=1)(Worker).remote(0, False, 1)
    worker_pid = ray_local.get(worker.info.remote())["pid"]
    running = worker.run.remote(cell.to_dict(), "net", 1)
    time.sleep(1.0)
    assert not ray_local.wait([running], timeout=0)[0], "the cell ended before the sockets were read"
    pids = ray_pids()
    assert worker_pid in pids
    names = {psutil.Process(pid).name() for pid in pids if psutil.pid_exists(pid)}
    assert {"gcs_server", "raylet"} <= names, names
    outside = listeners_outside_loopback(pids)
    rows = ray_local.get(running)
    ray_local.kill(worker)
    assert rows[0]["status"] == "ok" and rows[0]["node_ip"] == "127.0.0.1"
    assert outside == [], outside


@pytest.mark.slow
def test_bench_run_listens_on_loopback_only_and_keeps_its_token_private(tmp_path):
    """The command line's local run, dashboard included, sampled while its workers run cells: every
    listening socket of the driver and the processes it started is on loopback, and the token Ray
    authenticates with (written for a new home folder) is readable by its owner alone."""
    import psutil

    home = tmp_path / "home"
    home.mkdir()
    path = write_grid(tmp_path / "g.yaml", grid_text("net", "- name: noop\n  params: {sleep_s: 1.5}\n",
                                                      classes="[0, 1, 2, 3]"))
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench.py"), str(path), "--results", str(results),
                             "--quiet", "--no-report", "--workers", "2"], cwd=tmp_path, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        rows_dir = results / "net" / "rows"
        deadline = time.time() + 240
        while time.time() < deadline and not list(rows_dir.glob("*.parquet")) and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
        driver = psutil.Process(proc.pid)
        pids = {proc.pid} | {p.pid for p in driver.children(recursive=True)}
        names = {p.name() for p in driver.children(recursive=True)}
        outside = listeners_outside_loopback(pids)
        out = proc.communicate(timeout=240)[0]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, out
    assert outside == [], outside
    assert {"gcs_server", "raylet"} <= names and any(n.startswith("ray::Worker") for n in names), names
    # with its dashboard, unless another Ray on this machine holds the agent's port (then it says so)
    assert ("Ray dashboard: http://127.0.0.1:" in out) != ("another local Ray holds 127.0.0.1:52365" in out), out
    token = home / ".ray" / "auth_token"
    assert (token.stat().st_mode & 0o777, token.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert len(token.read_text()) == 64


def test_the_token_file_is_private(tmp_path, monkeypatch):
    """Ray writes ~/.ray/auth_token 0644; the runner writes it 0600 first for a local run and
    tightens one that exists, leaving it alone where no file is used."""
    from orchestrator.runner import private_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    token = tmp_path / ".ray" / "auth_token"
    assert private_auth_token(create=False) is None and not token.exists()  # joining a cluster: no file made
    assert private_auth_token(create=True) == token
    assert (token.stat().st_mode & 0o777, token.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    secret = token.read_text()
    assert len(secret) == 64 and int(secret, 16) >= 0
    token.chmod(0o644)
    assert private_auth_token(create=False) == token and token.stat().st_mode & 0o777 == 0o600
    assert token.read_text() == secret  # kept, not replaced
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert private_auth_token(create=True) is None and not other.exists()  # never created there
    other.write_text(secret)
    other.chmod(0o640)
    assert private_auth_token(create=True) == other and other.stat().st_mode & 0o777 == 0o600
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    token.unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert private_auth_token(create=True) is None and not token.exists()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secret)
    assert private_auth_token(create=True) is None and not token.exists()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("stage", ["cells run", "workers start"])
def test_sigterm_while_the_driver_waits_on_ray_exits_143(ray_local, tmp_path, capsys, stage):
    """SIGTERM landing inside ray.wait or ray.get, where the driver spends nearly all of a grid: Ray
    runs the handler there and re-raises what it raised as a plain KeyboardInterrupt, which must
    still exit 143 (terminated), not 130 (Ctrl-C), so a scheduler sees a preemption. The signal
    cannot land anywhere else: the cell hangs, or its worker cannot start while another actor holds
    both CPUs (which must not leave that worker pending behind the driver)."""
    import threading

    from ray._private.state import actors as actor_table  # the GCS's table; no dashboard needed

    import bench
    from orchestrator.config import load_grid
    from orchestrator.grid import expand
    from orchestrator.runner import Runner
    from orchestrator.store import RowStore

    method = "- name: noop\n  params: {hang: true}\n" if stage == "cells run" else "- name: noop\n"
    grid = load_grid(write_grid(tmp_path / "g.yaml", grid_text("wait", method, classes="[0]")))
    store = RowStore(tmp_path / "results" / "wait")
    runner = Runner(expand(grid).cells, store, run_id="wait", progress=False, workers=1)
    before = set(actor_table())
    blocker = None
    if stage == "workers start":  # the runner plans on the node's 2 CPUs; Ray has none free
        blocker = ray_local.remote(num_cpus=2)(type("Blocker", (), {"ping": lambda self: True})).remote()
        ray_local.get(blocker.ping.remote())
        before.add(blocker._actor_id.hex())

    def terminate():
        if stage == "cells run":
            deadline = time.time() + 120
            while runner.summary.startup_s == 0.0 and time.time() < deadline:
                time.sleep(0.1)
        time.sleep(1.5)  # the cell hangs and the driver polls ray.wait, or it waits in ray.get
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate, daemon=True).start()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        status = bench.run_stoppable(runner)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if blocker is not None:
            ray_local.kill(blocker)
    assert status == 143, status
    assert (runner.summary.startup_s > 0) == (stage == "cells run")  # where it stopped
    assert "run the same command again to resume" in capsys.readouterr().out
    assert store.statuses() == {}  # the cell has no row: a resume runs it
    deadline = time.time() + 30
    while time.time() < deadline:
        states = {info["State"] for aid, info in actor_table().items() if aid not in before}
        if states == {"DEAD"}:
            break
        time.sleep(0.5)
    assert states == {"DEAD"}, states  # its worker was killed, started or not


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["sigkill", "sigterm", "ctrl-c"])
def test_resume_after_the_driver_is_killed(tmp_path, sig):
    """Kill the driver mid-grid; the same command then runs only the cells without a row.

    SIGTERM (a scheduler's preemption) and Ctrl-C stop it cleanly: the resume hint, the exit status
    a shell expects, and no process of the Ray it started left behind. The SIGTERM run also has a
    stale ``ray_current_cluster`` file (from a ``ray start`` that is gone) in its Ray temp folder,
    which a local run must ignore rather than wait on."""
    path = write_grid(tmp_path / "g.yaml", grid_text("resume", "- name: noop\n  params: {sleep_s: 0.7}\n",
                                                      classes="[0, 1, 2, 3, 4]", seeds="[0, 1]"))
    results = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench.py"), str(path), "--results", str(results), "--quiet",
           "--no-report"]  # the default node address: every socket on loopback
    env = dict(os.environ)
    if sig == signal.SIGTERM:
        ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths live here
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.4:6391")  # nothing listens there
        env["RAY_TMPDIR"] = str(ray_tmp)
    proc = subprocess.Popen(cmd, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    rows_dir = results / "resume" / "rows"
    deadline = time.time() + 180
    while time.time() < deadline and len(list(rows_dir.glob("*.parquet"))) < 3:
        time.sleep(0.2)
    written = len(list(rows_dir.glob("*.parquet")))
    assert 3 <= written < 10, proc.communicate()[0] if written < 3 else written
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    else:
        proc.send_signal(sig)  # to the driver alone, as Ctrl-C's terminal or a scheduler sends it
    out = proc.communicate(timeout=60)[0]
    if sig != signal.SIGKILL:
        assert "run the same command again to resume" in out, out
        assert "SIGTERM received" not in out, out  # Ray's native handler did not take it
        assert proc.returncode == 128 + sig, (proc.returncode, out)
        deadline = time.time() + 20
        while time.time() < deadline and _group_alive(proc.pid):
            time.sleep(0.5)
        assert not _group_alive(proc.pid), "the driver's Ray outlived it"
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    before = {f.name: f.stat().st_mtime_ns for f in rows_dir.glob("*.parquet")}
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"{len(before)} already done, {10 - len(before)} to run" in second.stdout
    df = pd.read_parquet(rows_dir)
    assert len(df) == 10 and df["cell_id"].is_unique and (df["status"] == "ok").all()
    assert {f.name: f.stat().st_mtime_ns for f in rows_dir.glob("*.parquet") if f.name in before} == before
    assert not list(rows_dir.glob(".*"))
    third = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert "10 already done, 0 to run" in third.stdout
    if "RAY_TMPDIR" in env:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


@pytest.mark.slow
def test_two_drivers_on_one_results_folder(tmp_path, capsys, ray_must_not_start):
    """The issue's case with two real drivers: the second, started while the first runs, exits 2
    naming the first's pid; the first finishes every cell, each written once."""
    import socket

    path = write_grid(tmp_path / "g.yaml", grid_text("two", "- name: noop\n  params: {sleep_s: 4.0}\n",
                                                      classes="[0, 1, 2, 3]"))
    results = tmp_path / "results"
    import bench, methods  # noqa: E401,F401  imported before: the second driver then reaches the lock in ~1 s
    first = subprocess.Popen([sys.executable, str(ROOT / "bench.py"), str(path), "--results", str(results),
                              "--quiet", "--no-report", "--workers", "1"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows_dir = results / "two" / "rows"
    deadline = time.time() + 240
    while time.time() < deadline and not list(rows_dir.glob("*.parquet")) and first.poll() is None:
        time.sleep(0.2)
    status, out, err = bench_main([path, "--results", results, "--quiet"], capsys)
    first_out = first.communicate(timeout=240)[0]
    assert status == 2 and f"pid {first.pid} on host {socket.gethostname()}" in err, out + err + first_out
    assert first.returncode == 0 and "ok 4, failed 0" in first_out, first_out
    df = pd.read_parquet(rows_dir)
    assert len(df) == 4 and df["cell_id"].is_unique
