"""A real two-node Ray cluster on this machine (two loopback addresses): rows from both nodes
land in one results folder, through `--address` and through `ray job submit`."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, write_grid

pytestmark = pytest.mark.slow

GRID = """
name: cluster
seeds: [0, 1, 2]
datasets:
  - name: digits
    protocol: one_class
    classes: [0, 1, 2]
methods:
  - name: noop
    params: {sleep_s: 0.5}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@contextlib.contextmanager
def local_cluster(tmp_path: Path, head_cpus: int, nodes: list[tuple[str, int]]):
    """A head on 127.0.0.2 with ``head_cpus`` CPUs and a node per (loopback address, CPUs), joined
    one after another (nodes on one machine share the head's session folder, and Ray names their
    sockets there by what exists: two starting at once collide). Yields (address, dashboard URL,
    environment, Ray's temp folder)."""
    # as with an activated virtual environment: `python` in a job's entrypoint is this one
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    # every port on its own: another Ray on this machine (a user's run) holds the default ones, and
    # a job agent that cannot bind 52365 leaves `ray job submit` with "No available agent"
    port, dash = free_port(), free_port()
    # Ray's socket paths must stay under the 107-byte Unix limit: pytest's tmp_path is too deep
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    procs = [subprocess.Popen(
        [ray_bin(), "start", "--head", "--block", "--node-ip-address=127.0.0.2", f"--port={port}",
         f"--num-cpus={head_cpus}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={ray_tmp}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    address = f"127.0.0.2:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ok = subprocess.run([ray_bin(), "status", f"--address={address}"], env=env, capture_output=True)
            if ok.returncode == 0:
                break
            time.sleep(1)
        else:
            pytest.fail("the head node did not start within 120 s")
        cpus = head_cpus
        for ip, n_cpus in nodes:
            log = tmp_path / f"node-{ip}.log"
            with open(log, "w") as node_log:
                procs.append(subprocess.Popen(
                    [ray_bin(), "start", "--block", f"--node-ip-address={ip}", f"--address={address}",
                     f"--num-cpus={n_cpus}", f"--dashboard-agent-listen-port={free_port()}"],
                    env=env, start_new_session=True, stdout=node_log, stderr=subprocess.STDOUT))
            cpus += n_cpus
            deadline = time.time() + 120
            while time.time() < deadline:
                status = subprocess.run([ray_bin(), "status", f"--address={address}"], env=env,
                                        capture_output=True, text=True)
                if f"/{cpus:.1f} CPU" in status.stdout:
                    break
                time.sleep(1)
            else:
                pytest.fail(f"node {ip} did not join the cluster within 120 s:\n" + status.stdout + status.stderr
                            + log.read_text()[-3000:])
        yield address, f"http://127.0.0.1:{dash}", env, ray_tmp
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def two_node_cluster(tmp_path):
    with local_cluster(tmp_path, head_cpus=1, nodes=[("127.0.0.3", 1)]) as (address, dashboard, env, _):
        yield address, dashboard, env


def run_or_fail(cmd: list[str], env: dict, cwd: Path, timeout: float = 420) -> str:
    """Run a command; on a non-zero exit or a timeout, fail with everything it printed."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{proc.communicate()[0]}")
    if proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n{out}")
    return out


def assert_rows_from_both_nodes(rows_dir: Path) -> None:
    df = pd.read_parquet(rows_dir)
    assert len(df) == 9 and (df["status"] == "ok").all(), df[["status", "error"]]
    assert set(df["node_ip"]) == {"127.0.0.2", "127.0.0.3"}
    assert df["node_id"].nunique() == 2


def test_grid_over_address_uses_both_nodes(two_node_cluster, tmp_path):
    address, _, env = two_node_cluster
    grid = write_grid(tmp_path / "g.yaml", textwrap.dedent(GRID))
    run_or_fail([sys.executable, str(ROOT / "bench.py"), str(grid), "--address", address,
                 "--results", str(tmp_path / "results"), "--quiet", "--no-report"], env, tmp_path)
    assert_rows_from_both_nodes(tmp_path / "results" / "cluster" / "rows")


def test_ray_job_submit(two_node_cluster, tmp_path):
    _, dashboard, env = two_node_cluster
    work = tmp_path / "repo"
    shutil.copytree(ROOT, work, ignore=shutil.ignore_patterns(".git", "results", ".venv", "__pycache__",
                                                              "reproductions"))
    grid = write_grid(work / "g.yaml", textwrap.dedent(GRID))
    results = tmp_path / "results"
    run_or_fail([ray_bin(), "job", "submit", f"--address={dashboard}", "--working-dir", str(work), "--",
                 "python", "bench.py", grid.name, "--results", str(results), "--quiet", "--no-report"], env, work)
    assert_rows_from_both_nodes(results / "cluster" / "rows")


LOST_GRID = """
name: lost
seeds: [0, 1, 2, 3]
datasets:
  - name: digits
    protocol: one_class
    classes: [0, 1, 2]
methods:
  - name: noop
    params: {sleep_s: 1.5}
"""


def raylet_pid(ray_tmp: str, node_ip: str) -> int:
    """The raylet of the node on ``node_ip`` in this test's cluster (its command line names the
    cluster's session folder and the node's address)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"/raylet") and f"--node_ip_address={node_ip}".encode() in args \
                and any(a.startswith(f"--raylet_socket_name={ray_tmp}/".encode()) for a in args):
            return int(proc.name)
    raise AssertionError(f"no raylet for {node_ip} under {ray_tmp}")


def test_a_lost_worker_node_requeues_its_cells_without_an_attempt(tmp_path):
    """Three nodes (a head with no CPU, two workers); the raylet of one worker node is SIGKILLed
    mid-grid. Its cells go back to the queue without counting an attempt (``--max-attempts 1``:
    an attempt lost with the node would be a failed row) and the grid completes on the node left,
    with exactly one ok row per cell."""
    with local_cluster(tmp_path, head_cpus=0, nodes=[("127.0.0.3", 1), ("127.0.0.4", 1)]) as (address, _, env, ray_tmp):
        grid = write_grid(tmp_path / "g.yaml", textwrap.dedent(LOST_GRID))
        rows_dir = tmp_path / "results" / "lost" / "rows"
        cmd = [sys.executable, str(ROOT / "bench.py"), str(grid), "--address", address, "--results",
               str(tmp_path / "results"), "--quiet", "--no-report", "--max-attempts", "1"]
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None:  # a row from each node: both work
                files = list(rows_dir.glob("*.parquet")) if rows_dir.exists() else []
                if files and set(pd.read_parquet(rows_dir, columns=["node_ip"])["node_ip"]) == {"127.0.0.3", "127.0.0.4"}:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, "the grid ended before the node could be lost:\n" + proc.communicate()[0]
            before = len(list(rows_dir.glob("*.parquet")))
            os.kill(raylet_pid(ray_tmp, "127.0.0.4"), signal.SIGKILL)
            killed_at = pd.Timestamp.now(tz="UTC")
            out = proc.communicate(timeout=300)[0]
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, out
    assert before < 12 and "node 127.0.0.4 lost" in out, out
    df = pd.read_parquet(rows_dir)
    assert len(df) == df["cell_id"].nunique() == 12, df[["cell_id", "status"]]
    assert (df["status"] == "ok").all() and (df["attempt"] == 1).all(), df[["status", "attempt", "error"]]
    late = df[df["started_at"] > killed_at]
    assert len(late) and set(late["node_ip"]) == {"127.0.0.3"}
