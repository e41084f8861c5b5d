"""run_cell(cell) -> rows: split ► method.fit ► method.score ► metrics ► timings, memory, provenance.

Pure with respect to the orchestration: it knows the method only through the registry contract
and returns plain dicts in the store's row schema (see orchestrator/store.py).
"""
from __future__ import annotations

import functools
import io
import json
import os
import random
import socket
import time
import traceback
from datetime import datetime, timezone

import numpy as np

from orchestrator.grid import Cell, canonical

SAMPLE_SIDE = 64
SAMPLES_PER_KIND = 2


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def reset_peak_rss() -> None:
    """Reset this process's RSS high-water mark (Linux: writing 5 to clear_refs), so VmHWM
    afterwards is the peak of one cell, not of the worker's whole life."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@functools.lru_cache(maxsize=1)
def library_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "torchvision", "ray", "timm", "faiss-cpu", "faiss-gpu", "numpy",
                "scikit-learn", "FrEIA"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _now() -> datetime:
    return datetime.now(timezone.utc)


def sample_maps_blob(test, scores, masks_small, transform=None) -> bytes | None:
    """A few test images (normal and anomalous) with their maps and masks, down-sampled, as npz.
    Images go through the method's resize and centre crop first, so they align with the maps."""
    if scores.pixel is None:
        return None
    import torch
    import torch.nn.functional as F

    from data.transforms import Transform, to_tensor

    labels = np.asarray(test.labels)
    picks = [*np.flatnonzero(labels == 1)[:SAMPLES_PER_KIND], *np.flatnonzero(labels == 0)[:SAMPLES_PER_KIND]]
    if not picks:
        return None
    images = test.images[picks] if isinstance(test.images, np.ndarray) else [test.images[i] for i in picks]
    view = to_tensor(images, Transform(resize=getattr(transform, "resize", SAMPLE_SIDE),
                                       crop=getattr(transform, "crop", None), channels=3, mean=None, std=None))
    small = F.interpolate(view, size=(SAMPLE_SIDE, SAMPLE_SIDE), mode="bilinear", align_corners=False,
                          antialias=True).clamp(0, 1)
    maps = torch.as_tensor(np.asarray(scores.pixel)[picks], dtype=torch.float32)[:, None]
    maps = F.interpolate(maps, size=(SAMPLE_SIDE, SAMPLE_SIDE), mode="bilinear", align_corners=False)[:, 0]
    out = {"images": (small.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8),
           "maps": maps.numpy().astype(np.float16), "labels": labels[picks].astype(np.int8)}
    if masks_small is not None:
        m = torch.as_tensor(masks_small[picks], dtype=torch.float32)[:, None]
        out["masks"] = (F.interpolate(m, size=(SAMPLE_SIDE, SAMPLE_SIDE), mode="nearest-exact")[:, 0] > 0.5).numpy()
    buf = io.BytesIO()
    np.savez_compressed(buf, **out)
    return buf.getvalue()


def ood_setting(tests) -> dict:
    """What the ood protocol did to the cell's OOD sets, for the report's comparability check:
    ``ood_lists`` "filtered" only when every OOD set was restricted by an image list (OpenOOD's
    benchmark_imglist: TIN and Places365 drop the images overlapping CIFAR), else "full";
    ``ood_resize`` per set."""
    metas = [t.meta or {} for _, t in tests]
    lists = {m.get("ood_set"): m.get("ood_list", "full") for m in metas}
    return {"ood_lists": "filtered" if lists and all(v == "filtered" for v in lists.values()) else "full",
            "ood_list_per_set": lists, "ood_resize": {m.get("ood_set"): m.get("ood_resize") for m in metas}}


class ScoreContractError(ValueError):
    """A method's ``score`` broke the contract: not one finite image score per test image."""


def check_scores(scores, n: int) -> None:
    """What ``score`` returned must be a ``Scores`` with one finite image score per test image (and,
    where given, one finite map / prediction per image); raise ScoreContractError saying which not."""
    from methods.base import Scores

    if not isinstance(scores, Scores):
        raise ScoreContractError(f"score returned {type(scores).__name__}, not methods.base.Scores")
    image = np.asarray(scores.image)
    if image.ndim != 1 or image.dtype == bool or not np.issubdtype(image.dtype, np.number):
        raise ScoreContractError(f"score returned image scores of shape {image.shape} and dtype {image.dtype} "
                                 f"for {n} test images (expected {n} numbers)")
    if len(image) != n:
        raise ScoreContractError(f"score returned {len(image)} image scores for {n} test images")
    bad = int((~np.isfinite(image.astype(np.float64))).sum())
    if bad:
        raise ScoreContractError(f"score returned {bad} non-finite image scores (NaN or inf) of {n}")
    for what, value in (("pixel maps", scores.pixel), ("predictions", scores.pred)):
        if value is None:
            continue
        arr = np.asarray(value) if not isinstance(value, list) else value
        if len(arr) != n:
            raise ScoreContractError(f"score returned {len(arr)} {what} for {n} test images")
        if what == "pixel maps":
            bad = int(sum((~np.isfinite(np.asarray(m, dtype=np.float64))).sum() for m in arr))
            if bad:
                raise ScoreContractError(f"score returned {bad} non-finite pixel scores (NaN or inf)")


def method_source(name: str) -> str | None:
    """Where the method's code came from: "builtin", "file:NAME@sha256:HEX", "package:DIST==VERSION"."""
    from methods.base import METHODS

    return METHODS.source(name)


def base_row(cell: Cell, run_id: str, attempt: int) -> dict:
    return {"run_id": run_id, "cell_id": cell.cell_id, "base_cell_id": cell.cell_id,
            "method_source": method_source(cell.method),
            "method": cell.method, "params": canonical(cell.params), "dataset": cell.dataset,
            "dataset_params": canonical(cell.dataset_params), "protocol": cell.protocol,
            "normal_class": cell.class_label, "seed": cell.seed, "attempt": attempt,
            "hostname": socket.gethostname(), "worker_pid": os.getpid(),
            "versions": canonical(library_versions())}


def failure_row(cell: Cell, run_id: str, attempt: int, status: str, error: str, tb: str = "") -> dict:
    row = base_row(cell, run_id, attempt)
    row.update(status=status, error=error, traceback=tb, started_at=_now(), finished_at=_now(),
               labels=[], image_scores=[], loss_curve=[])
    return row


def run_cell(cell: Cell, *, run_id: str = "", attempt: int = 1, device: str = "cpu", cache=None,
             log=None) -> list[dict]:
    """Run one cell to its rows. Never raises for a method's or the data's failure: the cell
    becomes one ``failed`` row carrying the error and the traceback."""
    import torch

    from data.protocols import make_splits
    from data.transforms import resize_masks
    from methods import create
    from methods.base import ArtifactCache, RunContext
    from metrics import evaluate
    from plugins.loader import ensure_loaded

    started, t0 = _now(), time.perf_counter()
    reset_peak_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    ctx = RunContext(device=device, seed=cell.seed, cache=cache if cache is not None else ArtifactCache(0))
    if log is not None:
        ctx.log = log
    rows: list[dict] = []
    try:
        ensure_loaded(cell.plugins)  # a worker imports the grid's plugins before its first cell
        train, tests = make_splits(cell.dataset, cell.dataset_params, cell.protocol, cell.normal_class,
                                   ood=list(cell.ood) or None, ood_params=cell.ood_params,
                                   outlier_exposure=cell.outlier_exposure or None, seed=cell.seed)
        seed_everything(cell.seed)
        method = create(cell.method, cell.params, ctx)
        t_fit = time.perf_counter()
        method.fit(train)
        fit_s = time.perf_counter() - t_fit
        for subkey, test in tests:
            t_score = time.perf_counter()
            scores = method.score(test)
            score_s = time.perf_counter() - t_score
            check_scores(scores, len(test))
            masks_small = None
            if scores.pixel is not None and test.masks is not None:
                t = method.transform
                masks_small = resize_masks(test.masks, tuple(np.asarray(scores.pixel).shape[1:]),
                                           crop=getattr(t, "crop", None), resize=getattr(t, "resize", None),
                                           rule=method.mask_resize)
            metric_values = evaluate(np.asarray(test.labels), np.asarray(scores.image, dtype=np.float64),
                                     masks=masks_small, pixel=scores.pixel, pred=scores.pred,
                                     targets=np.asarray(test.targets))
            variants = metric_values.pop("metric_variants", {})
            row = base_row(cell, run_id, attempt)
            row.update(metric_values)
            row.update(
                cell_id=cell.row_id(subkey), status="ok", metric_variants=canonical(variants),
                category=subkey if cell.protocol == "unified" else None,
                ood_set=subkey if cell.protocol == "ood" else None,
                labels=np.asarray(test.labels).astype(np.int8),
                image_scores=np.asarray(scores.image, dtype=np.float64),
                sample_maps=sample_maps_blob(test, scores, masks_small, method.transform),
                fit_s=fit_s, score_s=score_s, n_train=len(train), n_test=len(test))
            rows.append(row)
        resolved = method.resolved_params()
        if cell.protocol == "ood" and resolved is not None:
            resolved = {**resolved, **ood_setting(tests)}
    except Exception as exc:  # a failed cell is data, not a crash of the grid
        row = failure_row(cell, run_id, attempt, "failed", f"{type(exc).__name__}: {exc}",
                          traceback.format_exc())
        row["loss_curve"] = list(ctx.loss_curve)
        rows, resolved = [row], None
    total_s = time.perf_counter() - t0
    gpu_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    gpu_name = torch.cuda.get_device_name() if device.startswith("cuda") else None
    for row in rows:
        row.update(started_at=started, finished_at=_now(), total_s=total_s,
                   peak_rss_bytes=peak_rss_bytes(), peak_gpu_bytes=gpu_peak, device=device,
                   gpu_name=gpu_name, feature_cache_hit=ctx.cache_hit,
                   weights_sha256=ctx.weights_sha256, loss_curve=list(ctx.loss_curve),
                   resolved_params=json.dumps(resolved, sort_keys=True, default=str) if resolved else None)
    return rows
