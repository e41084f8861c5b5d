"""Fan cells out over Ray Core worker actors; stream rows to the store as they arrive.

Why actors and not Tune trials: docs/architecture.md ("Ray"). Workers are shaped per resource request (a
method entry's ``resources: {gpu, cpu}``; see ``Runner``) and the pool never asks for more than
the alive nodes have. A raising cell is a failed row; a worker that dies is replaced and its cell
re-queued up to ``max_attempts``, except where its node was lost (no attempt counted); a cell past
``cell_timeout`` has its worker killed and becomes a ``timeout`` row. The driver writes every row
the moment it arrives, so killing the driver loses only the cells in flight.
"""
from __future__ import annotations

import math
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
from orchestrator.grid import Cell, affinity, canonical
from orchestrator.store import RowStore, cell_status
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
              dashboard: bool = True, log_to_driver: bool = False, py_modules: list[str] | None = None,
              num_gpus: int | None = None) -> str | None:
    """Start a local Ray on a loopback node address, or connect to ``address`` (or the cluster a
    ``ray job submit`` driver runs in). Returns the dashboard URL where there is one.

    On the default node address 127.0.0.1 every socket of the local Ray listens on loopback alone
    (``_loopback_node``; tests/test_runner.py::test_a_local_run_listens_on_loopback_only); any other
    ``node_ip`` makes Ray's servers listen on every interface. Ray's token file is kept 0600
    (``private_auth_token``). ``py_modules``: the grid's plugin files and packages
    (``plugins.loader.ship_paths``), shipped to a cluster's workers with the job. ``num_gpus`` sets a
    local Ray's logical GPU count (tests: Ray accounts for GPUs it does not have; workers still run
    on CPU where CUDA is absent)."""
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
            ctx = ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, _node_ip_address=node_ip,
                           include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=log_to_driver,
                           runtime_env={"env_vars": {"PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}})
        used = ray.util.get_node_ip_address()
        if used != node_ip:
            ray.shutdown()
            raise RuntimeError(f"Ray started on node address {used} instead of {node_ip}: its servers would "
                               "listen on every interface")
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


EPS = 1e-6
NODES_EVERY_S = 1.0  # how often the driver asks the GCS which nodes are alive
LOST_NODE_GRACE_S = 90.0  # a worker gone with its node unreachable but not yet declared dead: how long
# to wait for the GCS's verdict (its health checks take ~15-30 s) before it counts as a crash
STARTUP_S = 600.0  # the first worker must start within this
STARTUP_REST_S = 60.0  # then the run waits this long for the others before it starts dispatching
NO_ROOM_S = 600.0  # cells whose worker shape no alive node can hold wait this long for a node to join


@dataclass(frozen=True, order=True)
class Shape:
    """The resources of one worker (Ray's logical ``num_gpus`` / ``num_cpus``); every cell runs on a
    worker of the shape its method entry asked for."""

    gpu: float
    cpu: float

    def options(self) -> dict:
        return {"num_gpus": self.gpu, "num_cpus": self.cpu}

    def __str__(self) -> str:
        return f"gpu={self.gpu:g} cpu={self.cpu:g}"


def cell_shape(cell: Cell, gpu_cluster: bool) -> Shape:
    """The worker shape a cell asks for (its method entry's ``resources: {gpu, cpu}``). On a cluster
    with GPUs an entry that asks for no GPU gets a whole one (one worker per GPU, the default); on a
    cluster without GPUs every cell runs on CPU with a GPU share of 0."""
    res = cell.resources or {}
    gpu, cpu = float(res.get("gpu") or 0.0), float(res.get("cpu") or 1.0)
    if gpu < 0 or cpu <= 0:
        raise ValueError(f"{cell.method} {canonical(cell.params)}: resources need gpu >= 0 and cpu > 0, not {res}")
    return Shape(gpu=(gpu if gpu > 0 else 1.0) if gpu_cluster else 0.0, cpu=cpu)


@dataclass
class Room:
    """What one alive node has left for workers: CPU slots, and the free share of each GPU (Ray
    gives a fractional GPU request a share of one GPU, a whole request whole GPUs)."""

    node_id: str
    address: str
    cpu: float
    gpus: list

    @classmethod
    def of(cls, node: dict) -> "Room":
        res = node.get("Resources", {})
        return cls(node["NodeID"], f"{node.get('NodeManagerAddress')}:{node.get('NodeManagerPort')}",
                   float(res.get("CPU", 0.0)), [1.0] * int(float(res.get("GPU", 0.0)) + EPS))

    def _whole(self, shape: Shape) -> list[int]:
        return [i for i, g in enumerate(self.gpus) if g >= 1.0 - EPS][: math.ceil(shape.gpu - EPS)]

    def fits(self, shape: Shape) -> bool:
        if self.cpu < shape.cpu - EPS:
            return False
        if shape.gpu <= 0:
            return True
        if shape.gpu < 1:
            return any(g >= shape.gpu - EPS for g in self.gpus)
        return len(self._whole(shape)) >= math.ceil(shape.gpu - EPS)

    def take(self, shape: Shape) -> None:
        self.cpu -= shape.cpu
        if 0 < shape.gpu < 1:
            i = next(i for i, g in enumerate(self.gpus) if g >= shape.gpu - EPS)
            self.gpus[i] -= shape.gpu
        elif shape.gpu >= 1:
            for i in self._whole(shape):
                self.gpus[i] = 0.0


def place(rooms: list[Room], shape: Shape, node_id: str | None = None) -> bool:
    """Take a worker's resources from ``node_id``'s room (where it runs), or the first room that
    holds it (a worker still starting: Ray has not said where); False where none does."""
    for room in rooms:
        if (room.node_id == node_id if node_id else room.fits(shape)):
            if node_id and not room.fits(shape):
                return False
            room.take(shape)
            return True
    return False


class ClusterError(RuntimeError):
    """The cluster cannot run the grid (no node holds a shape, workers cannot start, no room left
    after a node loss): ``bench.py`` prints it in one line; finished rows are kept."""


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
    """A worker actor of one shape, the cells sent to it (in order), the data groups it has warm,
    and its node (known once it has started)."""

    handle: object
    shape: Shape
    tasks: deque = field(default_factory=deque)
    warm: set = field(default_factory=set)
    booting: object = None  # ref of info() while the worker starts
    node_id: str | None = None
    node_ip: str | None = None
    last_cell_s: float = float("inf")

    def depth(self) -> int:
        if self.booting is not None:
            return 0
        return PIPELINE if self.last_cell_s < PIPELINE_BELOW_S else 1


@dataclass
class Suspect:
    """A cell whose worker vanished while its node neither answered nor was declared dead yet: the
    GCS's verdict on the node decides whether the attempt counts (``LOST_NODE_GRACE_S``)."""

    task: Task
    node_id: str
    error: str
    deadline: float


@dataclass
class Summary:
    """Counts of the rows this run wrote (``not_written``: cells whose row the store already had,
    a duplicate delivery or another driver's row, so this run's result was dropped; ``lost``: cells
    re-queued because their worker's node was lost, which costs no attempt; ``workers``: the most
    workers alive at once)."""

    ok: int = 0
    failed: int = 0
    timeout: int = 0
    retried: int = 0
    not_written: int = 0
    lost: int = 0
    wall_s: float = 0.0
    workers: int = 0
    startup_s: float = 0.0


def raylet_answers(address: str, timeout_s: float = 2.0) -> bool | None:
    """Whether a node's raylet accepts a connection on its port: True, False where the connection is
    refused (nothing listens: the raylet is gone), None where it cannot be told (a timeout: the
    host may be down or unreachable)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except ConnectionRefusedError:
        return False
    except (OSError, ValueError):
        return None


class Runner:
    """Runs cells on worker actors shaped per resource request.

    Each distinct ``resources`` of the grid is a worker shape with its own queue; a cell goes only to
    a worker of its shape. The pool is planned on the alive nodes' resources, GPU by GPU: workers are
    started, one shape after the other in turn, while one more fits beside the workers alive, so
    together they never ask for more than the cluster has (no worker is left pending). A worker whose
    shape has no cell left waiting is stopped as soon as another shape has cells waiting, so its
    resources go to that shape. Within a shape the data-group affinity and pipelining hold as before.
    A worker lost with its node (the node declared dead by the GCS, or its raylet refusing
    connections) gives its cells back without counting an attempt; the pool is re-planned on the
    nodes left."""

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
        self.pool_history: list[tuple[float, tuple]] = []  # (time, shapes of the workers alive or starting)
        self.slots: list[Slot] = []
        self.nodes: dict[str, Room] = {}  # alive node id -> its whole room
        self.lost_nodes: set[str] = set()
        self._nodes_at = 0.0

    # -- cluster -------------------------------------------------------------------------
    def _refresh_nodes(self, force: bool = False) -> None:
        """The alive nodes (at most every NODES_EVERY_S), less those found lost meanwhile."""
        import ray

        now = time.perf_counter()
        if not force and now - self._nodes_at < NODES_EVERY_S:
            return
        self._nodes_at = now
        nodes = {n["NodeID"]: Room.of(n) for n in ray.nodes() if n.get("Alive")}
        self.lost_nodes |= {s.node_id for s in self.slots if s.node_id and s.node_id not in nodes}
        self.nodes = {k: v for k, v in nodes.items() if k not in self.lost_nodes}

    def _node_lost(self, node_id: str | None) -> bool | None:
        """True where the node is dead (GCS) or its raylet refuses connections, False where it
        answers, None where that cannot be told yet."""
        if node_id is None:
            return None
        if node_id in self.lost_nodes:
            return True
        self._refresh_nodes(force=True)
        room = self.nodes.get(node_id)
        if room is None:
            self.lost_nodes.add(node_id)
            return True
        answers = raylet_answers(room.address)
        if answers is False:
            self.lost_nodes.add(node_id)
            self.nodes.pop(node_id, None)
            return True
        return None if answers is None else False

    def _free_rooms(self) -> list[Room]:
        """The alive nodes' rooms less the workers alive (on their node) and starting (first fit)."""
        rooms = [Room(r.node_id, r.address, r.cpu, list(r.gpus)) for r in self.nodes.values()]
        for slot in sorted(self.slots, key=lambda s: s.node_id is None):
            place(rooms, slot.shape, slot.node_id)
        return rooms

    def _check_shapes(self, shapes: set[Shape]) -> None:
        """Every shape must fit on one alive node, or its cells could never run."""
        for shape in shapes:
            if not any(Room(r.node_id, r.address, r.cpu, list(r.gpus)).fits(shape) for r in self.nodes.values()):
                methods = sorted({c.method for c in self.cells if self.shape_of[c.cell_id] == shape})
                have = [f"cpu={r.cpu:g} gpu={len(r.gpus)}" for r in self.nodes.values()]
                raise ClusterError(f"no node of the cluster can hold a worker with {shape} (asked by "
                                   f"{', '.join(methods)}); its nodes have: {'; '.join(have) or 'none'}")

    # -- workers -------------------------------------------------------------------------
    def _new_worker(self, shape: Shape) -> Slot:
        import ray

        actor_cls = ray.remote(max_restarts=0, max_task_retries=0)(Worker)
        handle = actor_cls.options(scheduling_strategy="SPREAD", **shape.options()).remote(
            self.cache_bytes, shape.gpu > 0, int(max(1, shape.cpu)))
        slot = Slot(handle=handle, shape=shape)
        slot.booting = handle.info.remote()
        return slot

    @staticmethod
    def _kill(slots: list[Slot]) -> None:
        import ray

        for slot in slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:
                pass

    def _drop(self, slot: Slot, kill: bool = True) -> None:
        if kill:
            self._kill([slot])
        self.slots.remove(slot)
        self._log_pool()

    def _log_pool(self) -> None:
        self.pool_history.append((time.perf_counter(), tuple(s.shape for s in self.slots)))
        self.summary.workers = max(self.summary.workers, len(self.slots))

    def _grow(self, queues: dict[Shape, dict]) -> int:
        """Start workers for the shapes with cells waiting, one shape after the other in turn
        (fewest workers first), while one more fits in the free rooms; never more workers for a
        shape than it has cells left, nor more in all than ``--workers``. Returns how many."""
        rooms = self._free_rooms()
        left = {shape: sum(map(len, q.values())) + sum(len(s.tasks) for s in self.slots if s.shape == shape)
                for shape, q in queues.items() if any(q.values())}
        started = 0
        while True:
            count = {shape: sum(1 for s in self.slots if s.shape == shape) for shape in left}
            wanting = sorted((shape for shape in left if count[shape] < left[shape]),
                             key=lambda sh: (count[sh], -left[sh], sh))
            grew = False
            for shape in wanting:
                if self.n_workers and len(self.slots) >= self.n_workers:
                    return started
                if place(rooms, shape):
                    self.slots.append(self._new_worker(shape))
                    started += 1
                    grew = True
                    self._log_pool()
                    break  # re-rank: the next worker goes to the shape that has fewest now
            if not grew:
                return started

    # -- scheduling ----------------------------------------------------------------------
    @staticmethod
    def _next_cell(slot: Slot, queues: dict[tuple, deque], taken: set[tuple]):
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
        status = cell_status(r["status"] for r in rows)
        setattr(self.summary, status, getattr(self.summary, status) + 1)

    def run(self) -> Summary:
        import ray
        from ray.exceptions import RayActorError, RayTaskError
        from tqdm import tqdm

        if not self.cells:
            return self.summary
        t0 = time.perf_counter()
        self._refresh_nodes(force=True)
        gpu_cluster = any(r.gpus for r in self.nodes.values())
        self.shape_of = {c.cell_id: cell_shape(c, gpu_cluster) for c in self.cells}
        self._check_shapes(set(self.shape_of.values()))
        queues: dict[Shape, dict[tuple, deque]] = {}
        taken: dict[Shape, set] = {}
        for cell in self.cells:
            shape = self.shape_of[cell.cell_id]
            queues.setdefault(shape, {}).setdefault(affinity(cell), deque()).append((cell, 1))
            taken.setdefault(shape, set())
        suspects: list[Suspect] = []
        start_failures = 0

        def requeue(cell: Cell, attempt: int) -> None:
            queues[self.shape_of[cell.cell_id]].setdefault(affinity(cell), deque()).appendleft((cell, attempt))

        self._grow(queues)
        try:  # wait for the first worker; the others get a minute more, then start in the loop
            refs = [s.booting for s in self.slots]
            if not ray.wait(refs, num_returns=1, timeout=STARTUP_S)[0]:
                raise ClusterError(f"no worker ({', '.join(sorted({str(s.shape) for s in self.slots}))}) could "
                                   f"start within {STARTUP_S:.0f}s: the cluster has {ray.cluster_resources()}")
            ray.wait(refs, num_returns=len(refs), timeout=STARTUP_REST_S)
        except BaseException as e:  # Ctrl-C, SIGTERM, or workers that cannot start: none left pending
            self._kill(self.slots)
            if isinstance(e, KeyboardInterrupt):
                print(f"\ninterrupted while {len(self.slots)} worker(s) started: no cell ran; "
                      "run the same command again to resume")
            raise
        self.summary.startup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        bar = tqdm(total=len(self.cells), unit="cell", disable=not self.progress, dynamic_ncols=True,
                   file=sys.stdout, mininterval=0.5)

        def give_back(slot: Slot) -> None:
            """Stop a worker; the cells still queued on it go back (the caller has taken the lost,
            failed or timed-out cell off the slot already). The next ``_grow`` replaces it."""
            for queued in reversed(slot.tasks):
                requeue(queued.cell, queued.attempt)
            slot.tasks.clear()
            self._drop(slot)

        def lose(slot: Slot, head: Task | None) -> None:
            """The worker's node is gone: its cells go back with the attempt they had."""
            if head is not None:
                slot.tasks.appendleft(head)
            self.summary.lost += len(slot.tasks)
            tqdm.write(f"node {slot.node_ip or slot.node_id} lost: its worker's {len(slot.tasks)} cell(s) go back "
                       "to the queue (no attempt counted)", file=sys.stdout)
            give_back(slot)

        def show() -> None:
            s, running = self.summary, sum(1 for sl in self.slots if sl.tasks)
            bar.set_postfix_str(f"ok={s.ok} failed={s.failed + s.timeout} running={running}"
                                + (f" lost={s.lost}" if s.lost else ""), refresh=False)

        def done(shape: Shape, cell: Cell, rows: list[dict], started: float) -> None:
            for row in rows:  # the share the worker held (the worker fills it from Ray where it ran)
                if row.get("gpu_share") is None:
                    row["gpu_share"] = shape.gpu
                if row.get("cpu_share") is None:
                    row["cpu_share"] = shape.cpu
            self._record(cell, rows)
            self.latencies.append((time.perf_counter() - started, rows[0].get("total_s") or 0.0))
            show()
            bar.update(1)

        def crashed(shape: Shape, task: Task, error: str) -> None:
            """A worker died under a cell on a node that is alive: that costs the cell an attempt."""
            if task.attempt < self.max_attempts:
                self.summary.retried += 1
                requeue(task.cell, task.attempt + 1)
                return
            done(shape, task.cell, [failure_row(task.cell, self.run_id, task.attempt, "failed",
                                                f"worker died {task.attempt} time(s) (max attempts "
                                                f"{self.max_attempts}): {error}")], task.started or time.perf_counter())

        no_room_since, judged_at = None, 0.0
        try:
            while True:
                self._refresh_nodes()
                # workers on a node found dead: their cells go back now, without waiting for errors
                for slot in [sl for sl in self.slots if sl.node_id in self.lost_nodes]:
                    lose(slot, None)
                for sus in list(suspects) if time.perf_counter() - judged_at > NODES_EVERY_S else []:
                    judged_at = time.perf_counter()
                    verdict = self._node_lost(sus.node_id)
                    if verdict is not None or time.perf_counter() > sus.deadline:
                        suspects.remove(sus)
                        if verdict:
                            self.summary.lost += 1
                            requeue(sus.task.cell, sus.task.attempt)
                            tqdm.write(f"node {sus.node_id} lost: a cell goes back to the queue (no attempt "
                                       "counted)", file=sys.stdout)
                        else:
                            crashed(self.shape_of[sus.task.cell.cell_id], sus.task, sus.error)
                # starting workers that no longer fit (a node left): withdrawn, re-planned below
                rooms = [Room(r.node_id, r.address, r.cpu, list(r.gpus)) for r in self.nodes.values()]
                for slot in sorted(self.slots, key=lambda s: s.node_id is None):
                    if not place(rooms, slot.shape, slot.node_id) and slot.booting is not None:
                        give_back(slot)
                booting = [sl for sl in self.slots if sl.booting is not None]
                if booting:  # a worker's start-up does not count against a cell
                    up, _ = ray.wait([sl.booting for sl in booting], num_returns=len(booting), timeout=0)
                    for slot in booting:
                        if slot.booting in up:
                            try:
                                info = ray.get(slot.booting)
                                slot.node_id, slot.node_ip = info["node_id"], info["node_ip"]
                                slot.booting, start_failures = None, 0
                            except (RayActorError, RayTaskError) as e:
                                give_back(slot)
                                start_failures += 1
                                if start_failures > 3 + len(self.slots):
                                    raise ClusterError(f"workers with {slot.shape} fail to start: "
                                                       f"{type(e).__name__}: {str(e)[:1000]}") from None
                # a worker whose shape has no cell waiting makes way for shapes that have some
                waiting = {shape for shape, q in queues.items() if any(q.values())}
                if waiting:
                    for slot in [sl for sl in self.slots if not sl.tasks and sl.shape not in waiting]:
                        give_back(slot)
                self._grow(queues)
                # every idle worker gets a cell before any worker gets a second one
                for depth in range(1, PIPELINE + 1):
                    for slot in self.slots:
                        if len(slot.tasks) < min(depth, slot.depth()):
                            nxt = self._next_cell(slot, queues[slot.shape], taken[slot.shape])
                            if nxt is not None:
                                cell, attempt = nxt
                                ref = slot.handle.run.remote(cell.to_dict(), self.run_id, attempt)
                                slot.tasks.append(Task(ref, cell, attempt, None if slot.tasks else time.perf_counter()))
                busy = [sl for sl in self.slots if sl.tasks]
                waiting = {shape for shape, q in queues.items() if any(q.values())}
                if not busy and not waiting and not suspects:
                    break
                if waiting and not self.slots and not suspects:
                    no_room_since = no_room_since or time.perf_counter()
                    if time.perf_counter() - no_room_since > NO_ROOM_S:
                        raise ClusterError(
                            f"cells wait for workers with {', '.join(map(str, sorted(waiting)))} that no alive "
                            f"node can hold (for {NO_ROOM_S:.0f}s); finished rows are kept: run the same "
                            "command again once the cluster has room")
                else:
                    no_room_since = None
                show()
                pending = [sl.tasks[0].ref for sl in busy] + [sl.booting for sl in self.slots if sl.booting is not None]
                if not pending:
                    time.sleep(POLL_S)
                    continue
                ready, _ = ray.wait(pending, num_returns=1, timeout=POLL_S)
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
                            error = f"{type(e).__name__}: {str(e)[:500]}"
                            verdict = self._node_lost(slot.node_id)
                            if verdict:
                                lose(slot, head)
                            elif verdict is None:  # the node may be gone: the GCS will tell
                                suspects.append(Suspect(head, slot.node_id, error,
                                                        time.perf_counter() + LOST_NODE_GRACE_S))
                                give_back(slot)
                            else:
                                give_back(slot)
                                crashed(slot.shape, head, error)
                            continue
                        except RayTaskError as e:
                            rows = [failure_row(head.cell, self.run_id, head.attempt, "failed",
                                                f"{type(e).__name__}: {str(e)[:2000]}")]
                        slot.last_cell_s = max((r.get("total_s") or 0.0) for r in rows)
                        done(slot.shape, head.cell, rows, head.started)
                    elif self.cell_timeout and time.perf_counter() - head.started > self.cell_timeout:
                        slot.tasks.popleft()
                        give_back(slot)
                        done(slot.shape, head.cell, [failure_row(
                            head.cell, self.run_id, head.attempt, "timeout",
                            f"cell exceeded --cell-timeout {self.cell_timeout:g}s and was cancelled")],
                            head.started)
        except KeyboardInterrupt:
            bar.close()
            print(f"\\ninterrupted: {self.summary.ok + self.summary.failed + self.summary.timeout} "
                  f"rows written to {self.store.rows_dir}; run the same command again to resume")
            raise
        finally:
            self._kill(self.slots)
            bar.close()
        self.summary.wall_s = time.perf_counter() - t0
        return self.summary
