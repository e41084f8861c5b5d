"""The worker actor: holds a device and an artefact cache, runs cells one after another.

Long-lived, so the backbone, the decoded data and the feature cache stay warm between cells.
It is plain Python; the runner wraps it with ``ray.remote`` and its resources. Each row records
the GPU and CPU share Ray gave this worker (``gpu_share``, ``cpu_share``).
"""
from __future__ import annotations

import logging
import os
import sys


class Worker:
    def __init__(self, cache_bytes: int, use_gpu: bool, num_threads: int):
        import ray
        import torch

        torch.set_num_threads(max(1, num_threads))
        from methods.base import ArtifactCache

        self.cache = ArtifactCache(cache_bytes)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        assigned = context.get_assigned_resources()  # what Ray reserved for this actor: its shape
        self.gpu_share = float(assigned.get("GPU", 0.0))
        self.cpu_share = float(assigned.get("CPU", 0.0))
        self.log = logging.getLogger("adgrid.worker")
        if not self.log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
            self.log.addHandler(handler)
            self.log.setLevel(logging.INFO)

    def info(self) -> dict:
        return {"node_id": self.node_id, "node_ip": self.node_ip, "pid": os.getpid(), "device": self.device,
                "gpu_share": self.gpu_share, "cpu_share": self.cpu_share}

    def run(self, cell_dict: dict, run_id: str, attempt: int) -> list[dict]:
        from orchestrator.cell import run_cell
        from orchestrator.grid import Cell

        cell = Cell.from_dict(cell_dict)
        self.log.debug("cell %s start (attempt %d)", cell.describe(), attempt)
        rows = run_cell(cell, run_id=run_id, attempt=attempt, device=self.device, cache=self.cache,
                        log=self.log.getChild(cell.method))
        for row in rows:
            row.update(node_ip=self.node_ip, node_id=self.node_id, gpu_share=self.gpu_share,
                       cpu_share=self.cpu_share)
        self.log.info("cell %s %s in %.2fs (attempt %d)", cell.describe(), rows[0]["status"],
                      rows[0]["total_s"], attempt)
        return rows
