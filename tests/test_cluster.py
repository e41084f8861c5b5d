"""A real two-node Ray cluster on this machine (two loopback addresses): rows from both nodes
land in one results folder, through `--address` and through `ray job submit`."""
from __future__ import annotations

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


@pytest.fixture
def two_node_cluster(tmp_path):
    # as with an activated virtual environment: `python` in a job's entrypoint is this one
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    # every port on its own: another Ray on this machine (a user's run) holds the default ones, and
    # a job agent that cannot bind 52365 leaves `ray job submit` with "No available agent"
    port, dash = free_port(), free_port()
    # Ray's socket paths must stay under the 107-byte Unix limit: pytest's tmp_path is too deep
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    head = subprocess.Popen(
        [ray_bin(), "start", "--head", "--block", "--node-ip-address=127.0.0.2", f"--port={port}",
         "--num-cpus=1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={ray_tmp}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.2:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        ok = subprocess.run([ray_bin(), "status", f"--address={address}"], env=env, capture_output=True)
        if ok.returncode == 0:
            break
        time.sleep(1)
    else:
        pytest.fail("the head node did not start within 120 s")
    node_log = open(tmp_path / "node.log", "w")
    node = subprocess.Popen(
        [ray_bin(), "start", "--block", "--node-ip-address=127.0.0.3", f"--address={address}", "--num-cpus=1",
         f"--dashboard-agent-listen-port={free_port()}"],
        env=env, start_new_session=True, stdout=node_log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        status = subprocess.run([ray_bin(), "status", f"--address={address}"], env=env, capture_output=True, text=True)
        if "/2.0 CPU" in status.stdout:
            break
        time.sleep(1)
    else:
        pytest.fail("the second node did not join the cluster within 120 s:\n" + status.stdout + status.stderr
                    + (tmp_path / "node.log").read_text()[-3000:])
    yield address, f"http://127.0.0.1:{dash}", env
    for proc in (node, head):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(ray_tmp, ignore_errors=True)


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
