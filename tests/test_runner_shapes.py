"""Workers shaped per resource request: each cell runs on a worker of the shape its method entry
asked for, the pool never asks for more than the cluster has, and each row records its share.

Ray accounts logical GPUs without CUDA (``num_gpus=4`` on a CPU machine); the workers run on CPU."""
from __future__ import annotations

import textwrap
import threading
import time

import pandas as pd
import pytest

from conftest import write_grid
from orchestrator.grid import Cell
from orchestrator.runner import Room, Shape, cell_shape, place


def cell(resources: dict) -> Cell:
    return Cell("noop", {}, "digits", {}, "one_class", "0", seed=0, resources=resources)


def test_a_cells_shape_follows_its_request_and_the_cluster():
    assert cell_shape(cell({"gpu": 0.25, "cpu": 2.0}), gpu_cluster=True) == Shape(0.25, 2.0)
    assert cell_shape(cell({"gpu": 0.0, "cpu": 1.0}), gpu_cluster=True) == Shape(1.0, 1.0)  # default: a GPU each
    assert cell_shape(cell({"gpu": 0.5, "cpu": 1.0}), gpu_cluster=False) == Shape(0.0, 1.0)  # no GPU: CPU
    assert cell_shape(cell({}), gpu_cluster=False) == Shape(0.0, 1.0)
    with pytest.raises(ValueError, match="cpu > 0"):
        cell_shape(cell({"gpu": 0.5, "cpu": -1.0}), gpu_cluster=True)


def test_rooms_pack_gpu_shares_gpu_by_gpu():
    """Fractional asks share one GPU; a whole ask needs a GPU nobody holds a share of."""
    room = [Room("n", "127.0.0.1:1", cpu=8.0, gpus=[1.0, 1.0])]
    quarter, whole = Shape(0.25, 1.0), Shape(1.0, 1.0)
    assert place(room, quarter) and place(room, whole)
    assert not place(room, whole)               # GPU 0 holds a quarter: no whole GPU is left
    assert [place(room, quarter) for _ in range(4)] == [True, True, True, False]
    assert room[0].cpu == pytest.approx(3.0) and room[0].gpus == pytest.approx([0.0, 0.0])
    cpu_bound = [Room("n", "127.0.0.1:1", cpu=1.0, gpus=[1.0] * 4)]
    assert place(cpu_bound, quarter) and not place(cpu_bound, quarter)
    # a worker that runs is counted on its own node, not the first that fits
    two = [Room("a", "x:1", cpu=1.0, gpus=[]), Room("b", "x:2", cpu=1.0, gpus=[])]
    assert place(two, Shape(0.0, 1.0), node_id="b") and two[0].cpu == 1.0 and two[1].cpu == 0.0
    assert not place(two, Shape(0.0, 1.0), node_id="b")


@pytest.fixture(scope="module")
def ray_four_gpus():
    """A local Ray with 2 CPUs and 4 logical GPUs; the session's Ray (if one runs) is stopped for
    this module and started again after it."""
    import ray

    from orchestrator.runner import start_ray

    was_running = ray.is_initialized()
    if was_running:
        ray.shutdown()
    start_ray(num_cpus=2, num_gpus=4, dashboard=False)
    yield ray
    ray.shutdown()
    if was_running:
        start_ray(num_cpus=2, dashboard=False)


GRID = """
name: shapes
seeds: [0]
datasets:
  - name: digits
    protocol: one_class
    classes: [0, 1]
methods:
  - name: noop                      # 2 quarter-GPU cells
    params: {sleep_s: 0.2}
    resources: {gpu: 0.25, cpu: 0.25}
  - name: noop                      # 8 whole-GPU cells
    params: {sleep_s: [1.0, 1.01, 1.02, 1.03]}
    resources: {gpu: 1, cpu: 0.25}
"""


def run_shapes(tmp_path, grid_text: str, **kwargs):
    from orchestrator.config import load_grid
    from orchestrator.grid import expand
    from orchestrator.runner import Runner
    from orchestrator.store import RowStore

    cells = expand(load_grid(write_grid(tmp_path / "g.yaml", textwrap.dedent(grid_text)))).cells
    runner = Runner(cells, RowStore(tmp_path / "results" / "shapes"), run_id="shapes", progress=False, **kwargs)
    return runner, runner.run(), cells


@pytest.mark.slow  # five worker processes: ~90 s on a loaded 2-core machine
def test_each_cell_runs_with_its_share_and_the_pool_never_exceeds_the_cluster(ray_four_gpus, tmp_path):
    """Quarter-GPU and whole-GPU cells on 4 logical GPUs: the workers alive or starting never ask
    for more than 4 GPUs (nor 2 CPUs), both shapes run side by side, Ray places the first pool
    whole (its GPUs in use reach 3.5), and each row records the share its cell ran with."""
    ray = ray_four_gpus
    used, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            used.append(4.0 - ray.available_resources().get("GPU", 4.0))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        runner, summary, cells = run_shapes(tmp_path, GRID)
    finally:
        stop.set()
        sampler.join()
    df = pd.read_parquet(runner.store.rows_dir)
    assert len(df) == len(cells) == summary.ok and (df["status"] == "ok").all()
    asked = {c.cell_id: float(c.resources["gpu"]) for c in cells}
    assert sorted(asked.values()) == [0.25] * 2 + [1.0] * 8
    assert (df["gpu_share"] == df["cell_id"].map(asked)).all(), df[["cell_id", "gpu_share"]]
    assert (df["cpu_share"] == 0.25).all()
    assert df.groupby("params")["gpu_share"].nunique().eq(1).all()
    history = [shapes for _, shapes in runner.pool_history]
    assert history and max(sum(s.gpu for s in shapes) for shapes in history) <= 4.0 + 1e-6
    assert max(sum(s.cpu for s in shapes) for shapes in history) <= 2.0 + 1e-6
    assert any({s.gpu for s in shapes} == {0.25, 1.0} for shapes in history), "the shapes never ran side by side"
    # the first pool (2 quarter + 3 whole GPUs) is all placed by Ray at once, none left pending
    assert max(used) >= 3.5 - 1e-6, max(used)


def test_a_shape_no_node_can_hold_fails_before_any_worker(ray_local, tmp_path):
    """3 CPUs per worker on the session's 2-CPU Ray (no GPUs: the GPU share is 0)."""
    grid = GRID.replace("resources: {gpu: 1, cpu: 0.25}", "resources: {gpu: 1, cpu: 3}")
    with pytest.raises(RuntimeError, match=r"no node of the cluster can hold a worker with gpu=0 cpu=3 "
                                           r"\(asked by noop\); its nodes have: cpu=2 gpu=0"):
        run_shapes(tmp_path, grid)
    assert not list((tmp_path / "results" / "shapes" / "rows").glob("*.parquet"))


def test_bench_says_in_one_line_that_no_node_can_hold_a_shape(ray_local, tmp_path, capsys):
    """The same grid through bench.py: exit 1, one ``error:`` line naming the shape and the nodes,
    no traceback, no row."""
    import bench

    grid = write_grid(tmp_path / "g.yaml", textwrap.dedent(GRID.replace("resources: {gpu: 1, cpu: 0.25}",
                                                                        "resources: {gpu: 1, cpu: 3}")))
    status = bench.main([str(grid), "--results", str(tmp_path / "results"), "--quiet", "--no-report"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "error: no node of the cluster can hold a worker with gpu=0 cpu=3 (asked by noop)" in err, err
    assert "Traceback" not in err
    assert not list((tmp_path / "results" / "shapes" / "rows").glob("*.parquet"))
