"""Fan cells out over Ray Core worker actors; stream rows to the store as they arrive.

Why actors and not Tune trials: DESIGN.md ("Ray"). One worker per GPU (or per GPU fraction a
method asks for), otherwise one per free CPU slot. A raising cell is a failed row; a worker that
dies is replaced and its cell re-queued up to ``max_attempts``; a cell past ``cell_timeout`` has
its worker killed and becomes a ``timeout`` row. The driver writes every row the moment it
arrives, so killing the driver loses only the cells in flight.
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.cell import failure_row
from orchestrator.grid import Cell
from orchestrator.store import RowStore
from orchestrator.worker import Worker

DEFAULT_NODE_IP = "127.0.0.1"  # the one node address on which Ray's servers bind to loopback alone
DEFAULT_CACHE_BYTES = 4 << 30
POLL_S = 0.25
PIPELINE = 2  # cells in flight per worker: the next one waits in the actor's queue ...
PIPELINE_BELOW_S = 2.0  # ... but only after the worker's last cell took less than this: for
# short cells the driver's round trip matters; long cells stay free for any idle worker.


def git_sha(repo: Path | None = None) -> str | None:
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return os.environ.get("ADGRID_GIT_SHA")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def node_ip_free(ip: str = DEFAULT_NODE_IP) -> bool:
    """Whether no other Ray's dashboard agent holds its fixed HTTP port (52365, which ``ray.init``
    cannot move) on ``ip``. Where one does, a second local Ray still starts, but its dashboard would
    ask that other run's agent for logs and node metrics."""
    from ray._private.ray_constants import DEFAULT_DASHBOARD_AGENT_LISTEN_PORT

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, DEFAULT_DASHBOARD_AGENT_LISTEN_PORT))
        except OSError:
            return False
    return True


def private_auth_token(create: bool) -> Path | None:
    """Ray's token file, readable by its owner alone; returns its path (None: no file is used).

    Ray 2.60 turns token authentication on for a new local ``ray.init`` and writes a fresh token to
    ``~/.ray/auth_token`` with the default umask, 0644 (authentication_token_setup.py:
    ``generate_and_save_token``): any local user could read it and use the cluster. With ``create``
    (a local run) the token is written here first, 0600 in a 0700 folder, as Ray would write it (256
    random bits, hex, ``authentication_token_generator.py``); a file that exists is set to 0600.
    Nothing to do where ``RAY_AUTH_MODE`` is not ``token`` (unset means token for a local run) or the
    token comes from ``RAY_AUTH_TOKEN``; a ``RAY_AUTH_TOKEN_PATH`` file is tightened, never created."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return None
    custom = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(custom) if custom else Path.home() / ".ray" / "auth_token"
    token_mode = os.environ.get("RAY_AUTH_MODE", "token").lower() == "token"
    if create and token_mode and not custom and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another run wrote it meanwhile
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    try:
        st = path.stat()
    except OSError:
        return None
    if st.st_mode & 0o077 and st.st_uid == os.getuid():
        os.chmod(path, 0o600)
    return path


@contextmanager
def _loopback_node(ip: str):
    """Keep a node address of 127.0.0.1 through ``ray.init``.

    Ray binds its servers to loopback only where the node address is exactly 127.0.0.1
    (``is_localhost``: 127.0.0.1, ::1 or localhost), on every interface otherwise, 127.0.0.2
    included: the dashboard agent's gRPC (dashboard/agent.py ``grpc_ip``), the metrics exports of the
    agent, of the dashboard and of the autoscaler monitor (reporter_agent.py ``address=``,
    dashboard/head.py and autoscaler/_private/monitor.py ``start_http_server``), and, as measured with ``ss -ltnp``, the gRPC servers of the GCS, the
    raylet, the driver and every worker. ``ray.init`` however replaces 127.0.0.1 by the machine's
    network address (services.py ``resolve_ip_for_localhost`` -> ``get_node_ip_address``) unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (ray_constants.py ``ENABLE_RAY_CLUSTER``, read when ray is
    imported). Set here for the processes ``ray.init`` starts (their environment) and for this one
    (the constant: ray is imported already); both are restored after, so that a later
    ``ray.init(address=...)`` in this process finds its real address."""
    from ray._private import ray_constants

    if ip != DEFAULT_NODE_IP:
        yield
        return
    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_const = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved_env


def start_ray(address: str | None = None, node_ip: str = DEFAULT_NODE_IP, num_cpus: int | None = None,
              dashboard: bool = True, log_to_driver: bool = False, py_modules: list[str] | None = None) -> str | None:
    """Start a local Ray on a loopback node address, or connect to ``address`` (or the cluster a
    ``ray job submit`` driver runs in). Returns the dashboard URL where there is one.

    On the default node address 127.0.0.1 every socket of the local Ray listens on loopback alone
    (``_loopback_node``; tests/test_runner.py::test_a_local_run_listens_on_loopback_only); any other
    ``node_ip`` makes Ray's servers listen on every interface. Ray's token file is kept 0600
    (``private_auth_token``). ``py_modules``: the grid's plugin files and packages
    (``plugins.loader.ship_paths``), shipped to a cluster's workers with the job."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return None
    repo = str(Path(__file__).resolve().parents[1])
    if address or os.environ.get("RAY_ADDRESS"):
        private_auth_token(create=False)
        runtime_env = None
        if address and not os.environ.get("RAY_JOB_ID"):
            # workers on other nodes need this code: ship the repository as the working dir
            runtime_env = {"working_dir": repo,
                           "excludes": ["results/", ".git/", "**/__pycache__/", "reports/reproductions/"]}
            if py_modules:
                runtime_env["py_modules"] = list(py_modules)
        ctx = ray.init(address=address or None, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        private_auth_token(create=True)
        # "local": a new instance even where ``ray start`` left an address file in /tmp/ray (Ray would
        # otherwise join that cluster, or wait on it for ever once it is gone)
        with _loopback_node(node_ip):
            ctx = ray.init(address="local", num_cpus=num_cpus, _node_ip_address=node_ip,
                           include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                           runtime_env={"env_vars": {"PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}})
        used = ray.util.get_node_ip_address()
        if used != node_ip:
            ray.shutdown()
            raise RuntimeError(f"Ray started on node address {used} instead of {node_ip}: its servers would "
                               "listen on every interface")
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


@dataclass
class Task:
    """A cell sent to a worker. ``started`` is when the worker could begin it: its dispatch, or,
    queued behind another cell, the moment that one finished (the timeout clock)."""

    ref: object
    cell: Cell
    attempt: int
    started: float | None


@dataclass
class Slot:
    """A worker actor, the cells sent to it (in order), and the data groups it has warm."""

    handle: object
    tasks: deque = field(default_factory=deque)
    warm: set = field(default_factory=set)
    booting: object = None  # ref of info() while a replacement worker starts
    last_cell_s: float = float("inf")

    def depth(self) -> int:
        if self.booting is not None:
            return 0
        return PIPELINE if self.last_cell_s < PIPELINE_BELOW_S else 1


@dataclass
class Summary:
    """Counts of the rows this run wrote (``not_written``: cells whose row the store already had,
    a duplicate delivery or another driver's row, so this run's result was dropped)."""

    ok: int = 0
    failed: int = 0
    timeout: int = 0
    retried: int = 0
    not_written: int = 0
    wall_s: float = 0.0
    workers: int = 0
    startup_s: float = 0.0


def affinity(cell: Cell) -> tuple:
    from methods import METHODS

    method_cls = METHODS[cell.method]
    return (cell.data_key, method_cls.affinity_key(method_cls.Params(**cell.params)))


class Runner:
    def __init__(self, cells: list[Cell], store: RowStore, *, run_id: str, max_attempts: int = 2,
                 cell_timeout: float | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 workers: int | None = None, overwrite: set[str] | None = None, progress: bool = True):
        self.cells = cells
        self.store = store
        self.run_id = run_id
        self.max_attempts = max(1, max_attempts)
        self.cell_timeout = cell_timeout
        self.cache_bytes = cache_bytes
        self.n_workers = workers
        self.overwrite = overwrite or set()
        self.progress = progress
        self.git_sha = git_sha()
        self.summary = Summary()
        self.latencies: list[tuple[float, float]] = []  # (dispatch -> row written, cell's own total_s)

    # -- workers -------------------------------------------------------------------------
    def _worker_shape(self) -> tuple[int, dict]:
        import ray

        total = ray.cluster_resources()
        gpus = float(total.get("GPU", 0))
        if gpus > 0:
            asks = [c.resources.get("gpu", 0) for c in self.cells if c.resources.get("gpu", 0) > 0]
            frac = min(asks) if asks else 1.0
            count = max(1, int(gpus / frac + 1e-9))
            cpus = max(1.0, float(total.get("CPU", 1)) // count)
            return count, {"num_gpus": frac, "num_cpus": min(cpus, 1.0)}
        cpu_per = max([c.resources.get("cpu", 1.0) for c in self.cells] or [1.0])
        free = float(ray.available_resources().get("CPU", total.get("CPU", 1)))
        return max(1, int(free // cpu_per)), {"num_cpus": cpu_per}

    def _new_worker(self, opts: dict) -> Slot:
        import ray

        actor_cls = ray.remote(max_restarts=0, max_task_retries=0)(Worker)
        handle = actor_cls.options(scheduling_strategy="SPREAD", **opts).remote(
            self.cache_bytes, opts.get("num_gpus", 0) > 0, int(max(1, opts.get("num_cpus", 1))))
        return Slot(handle=handle)

    @staticmethod
    def _kill(slots: list[Slot]) -> None:
        import ray

        for slot in slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:
                pass

    def _wait_ready(self, slots: list[Slot], opts: dict, timeout_s: float = 600) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            infos = ray.get([s.handle.info.remote() for s in slots], timeout=timeout_s)
        except GetTimeoutError:
            raise RuntimeError(f"{len(slots)} worker(s) with {opts} could not start within {timeout_s:.0f}s: "
                               f"the cluster has {ray.cluster_resources()}") from None
        self.worker_info = infos

    # -- scheduling ----------------------------------------------------------------------
    def _next_cell(self, slot: Slot, queues: dict[tuple, deque], taken: set[tuple]):
        """Prefer a group this worker has warm, then a group nobody works on, then the largest."""
        live = [k for k, q in queues.items() if q]
        if not live:
            return None
        warm = [k for k in live if k in slot.warm]
        fresh = [k for k in live if k not in taken]
        key = (warm or sorted(fresh, key=lambda k: -len(queues[k])) or
               sorted(live, key=lambda k: -len(queues[k])))[0]
        slot.warm.add(key)
        taken.add(key)
        return queues[key].popleft()

    def _record(self, cell: Cell, rows: list[dict]) -> None:
        for row in rows:
            row["run_id"] = self.run_id
            row["git_sha"] = self.git_sha
        written = self.store.write(cell.cell_id, rows, overwrite=cell.cell_id in self.overwrite)
        self.overwrite.discard(cell.cell_id)
        if not written:
            self.summary.not_written += 1
            return
        status = rows[0]["status"] if all(r["status"] == rows[0]["status"] for r in rows) else "failed"
        setattr(self.summary, status, getattr(self.summary, status) + 1)

    def run(self) -> Summary:
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        from tqdm import tqdm

        t0 = time.perf_counter()
        queues: dict[tuple, deque] = {}
        for cell in self.cells:
            queues.setdefault(affinity(cell), deque()).append((cell, 1))
        count, opts = self._worker_shape()
        count = min(self.n_workers or count, max(1, len(self.cells)))
        slots = [self._new_worker(opts) for _ in range(count)]
        self.summary.workers = count
        try:
            self._wait_ready(slots, opts)
        except BaseException as e:  # Ctrl-C, SIGTERM, or workers that cannot start: none left pending
            self._kill(slots)
            if isinstance(e, KeyboardInterrupt):
                print(f"\ninterrupted while {count} worker(s) started: no cell ran; "
                      "run the same command again to resume")
            raise
        self.summary.startup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        taken: set[tuple] = set()
        bar = tqdm(total=len(self.cells), unit="cell", disable=not self.progress, dynamic_ncols=True,
                   file=sys.stdout, mininterval=0.5)

        def requeue(cell: Cell, attempt: int) -> None:
            queues.setdefault(affinity(cell), deque()).appendleft((cell, attempt))

        def replace(slot: Slot) -> None:
            """Kill the worker, start a fresh one; the cells still queued on it go back (the
            caller has taken the lost or timed-out cell off the slot already)."""
            self._kill([slot])
            for queued in reversed(slot.tasks):
                requeue(queued.cell, queued.attempt)
            slot.tasks.clear()
            slot.handle, slot.warm = self._new_worker(opts).handle, set()
            slot.booting, slot.last_cell_s = slot.handle.info.remote(), float("inf")

        def show() -> None:
            s, running = self.summary, sum(1 for sl in slots if sl.tasks)
            bar.set_postfix_str(f"ok={s.ok} failed={s.failed + s.timeout} running={running}", refresh=False)

        def done(slot: Slot, cell: Cell, rows: list[dict], started: float) -> None:
            self._record(cell, rows)
            self.latencies.append((time.perf_counter() - started, rows[0].get("total_s") or 0.0))
            show()
            bar.update(1)

        try:
            while True:
                booting = [sl for sl in slots if sl.booting is not None]
                if booting:  # a replacement worker's start-up does not count against a cell
                    up, _ = ray.wait([sl.booting for sl in booting], num_returns=len(booting), timeout=0)
                    for slot in booting:
                        if slot.booting in up:
                            slot.booting = None
                # every idle worker gets a cell before any worker gets a second one
                for depth in range(1, PIPELINE + 1):
                    for slot in slots:
                        if len(slot.tasks) < min(depth, slot.depth()):
                            nxt = self._next_cell(slot, queues, taken)
                            if nxt is not None:
                                cell, attempt = nxt
                                ref = slot.handle.run.remote(cell.to_dict(), self.run_id, attempt)
                                slot.tasks.append(Task(ref, cell, attempt, None if slot.tasks else time.perf_counter()))
                busy = [sl for sl in slots if sl.tasks]
                if not busy and not any(queues.values()):
                    break
                show()
                waiting = [sl.tasks[0].ref for sl in busy] + [sl.booting for sl in slots if sl.booting is not None]
                ready, _ = ray.wait(waiting, num_returns=1, timeout=POLL_S)
                ready_set = set(ready)
                for slot in busy:
                    head = slot.tasks[0]
                    if head.ref in ready_set:
                        slot.tasks.popleft()
                        if slot.tasks:
                            slot.tasks[0].started = time.perf_counter()
                        try:
                            rows = ray.get(head.ref)
                        except RayActorError as e:
                            replace(slot)
                            if head.attempt < self.max_attempts:
                                self.summary.retried += 1
                                requeue(head.cell, head.attempt + 1)
                                continue
                            rows = [failure_row(head.cell, self.run_id, head.attempt, "failed",
                                                f"worker died {head.attempt} time(s) (max attempts "
                                                f"{self.max_attempts}): {type(e).__name__}: {str(e)[:500]}")]
                        except RayTaskError as e:
                            rows = [failure_row(head.cell, self.run_id, head.attempt, "failed",
                                                f"{type(e).__name__}: {str(e)[:2000]}")]
                        slot.last_cell_s = max((r.get("total_s") or 0.0) for r in rows)
                        done(slot, head.cell, rows, head.started)
                    elif self.cell_timeout and time.perf_counter() - head.started > self.cell_timeout:
                        slot.tasks.popleft()
                        replace(slot)
                        done(slot, head.cell, [failure_row(
                            head.cell, self.run_id, head.attempt, "timeout",
                            f"cell exceeded --cell-timeout {self.cell_timeout:g}s and was cancelled")],
                            head.started)
        except KeyboardInterrupt:
            bar.close()
            print(f"\ninterrupted: {self.summary.ok + self.summary.failed + self.summary.timeout} "
                  f"rows written to {self.store.rows_dir}; run the same command again to resume")
            raise
        finally:
            self._kill(slots)
            bar.close()
        self.summary.wall_s = time.perf_counter() - t0
        return self.summary
