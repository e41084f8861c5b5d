"""A chance-level baseline that trains nothing: uniform random scores.

It is the orchestrator's measuring stick (``benchmarks/overhead.py`` times 200 of these cells)
and its fault injector for tests: it can sleep, raise, hang, or SIGKILL its own worker process.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np

from methods.base import Method, MethodParams, Scores, register


class NoopParams(MethodParams):
    sleep_s: float = 0.0          # time spent in fit, to emulate work
    fail: bool = False            # raise in fit
    hang: bool = False            # never return from fit (for --cell-timeout)
    kill: bool = False            # SIGKILL the worker process in fit
    kill_marker: str | None = None  # SIGKILL only while this file is absent, creating it first


@register("noop")
class Noop(Method):
    Params = NoopParams
    protocols = {"one_class", "unified", "ood", "osr"}
    paper = "none: a chance baseline (expected AUROC 0.5)"

    def fit(self, train) -> None:
        p = self.params
        if p.kill_marker is not None and not Path(p.kill_marker).exists():
            Path(p.kill_marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if p.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if p.fail:
            raise RuntimeError("noop asked to fail")
        while p.hang:
            time.sleep(0.1)
        if p.sleep_s:
            time.sleep(p.sleep_s)

    def score(self, test) -> Scores:
        rng = np.random.default_rng(self.ctx.seed)
        return Scores(image=rng.random(len(test)))
