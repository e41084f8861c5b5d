"""Benchmark of the pixel metrics: ``pro`` and ``pixel_auroc`` on 100 maps of 256 x 256.

Usage::

    python benchmarks/metrics.py [--n 100] [--size 256] [--repeats 3] [--seed 0]
                                 [--anomalib-python PATH]

Prints the wall time (best of ``--repeats``) and the value of

* ``metrics.pro`` (exact AU-PRO, FPR limit 0.3) and ``metrics.pixel_auroc``;
* ``sklearn.metrics.roc_auc_score`` on the flattened pixels (reference);
* anomalib's ``AUPRO`` (torchmetrics-based) on the same maps, when anomalib is
  importable here, or through another interpreter that has it
  (``--anomalib-python`` or the ``ADGRID_ANOMALIB_PYTHON`` environment variable;
  e.g. a separate venv, so that anomalib's dependencies stay out of the main one).

The data are seeded: half of the images carry 1-3 elliptical defects, the maps
are smoothed Gaussian noise plus a bump on the defects.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def make_data(n: int = 100, size: int = 256, seed: int = 0):
    """Seeded masks (bool, N x S x S) with blob defects and float32 anomaly maps."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n // 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(2, size / 10, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    noise = rng.standard_normal((n, size, size)).astype(np.float32)
    maps = ndimage.gaussian_filter(noise, sigma=(0, 2, 2))
    maps += 0.25 * ndimage.gaussian_filter(masks.astype(np.float32), sigma=(0, 3, 3))
    return masks, maps.astype(np.float32)


def best_time(fn, repeats: int):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def anomalib_aupro(masks: np.ndarray, maps: np.ndarray, repeats: int) -> dict:
    """Time anomalib.metrics.AUPRO (fpr_limit 0.3) in this interpreter."""
    from types import SimpleNamespace

    import anomalib
    import torch
    from anomalib.metrics import AUPRO

    batch = SimpleNamespace(
        anomaly_map=torch.from_numpy(maps), gt_mask=torch.from_numpy(masks.astype(np.uint8))
    )

    def run():
        metric = AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3)
        metric.update(batch)
        return float(metric.compute())

    seconds, value = best_time(run, repeats)
    return {"seconds": seconds, "value": value, "version": anomalib.__version__,
            "torch_threads": torch.get_num_threads()}


def anomalib_elsewhere(python: str, masks, maps, repeats: int) -> dict:
    """Run :func:`anomalib_aupro` in another interpreter on the same arrays."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "maps.npz")
        np.savez(path, masks=masks, maps=maps)
        out = subprocess.run(
            [python, __file__, "--anomalib-worker", path, "--repeats", str(repeats)],
            capture_output=True, text=True, check=False,
        )
    if out.returncode != 0:
        raise RuntimeError(f"{python} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100, help="number of maps")
    parser.add_argument("--size", type=int, default=256, help="map height and width")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (best is shown)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anomalib-python", default=os.environ.get("ADGRID_ANOMALIB_PYTHON"),
                        help="an interpreter with anomalib installed (when it is not importable here)")
    parser.add_argument("--anomalib-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.anomalib_worker:  # child mode: only numpy, torch and anomalib are needed
        data = np.load(args.anomalib_worker)
        print(json.dumps(anomalib_aupro(data["masks"], data["maps"], args.repeats)))
        return 0

    sys.path.insert(0, str(ROOT))
    from sklearn.metrics import roc_auc_score

    from metrics import pixel_auroc, pro

    masks, maps = make_data(args.n, args.size, args.seed)
    n_regions_note = f"{int(masks.reshape(args.n, -1).any(1).sum())} anomalous images"
    print(f"{args.n} maps of {args.size}x{args.size} ({masks.size / 1e6:.2f} M pixels, "
          f"{masks.mean():.2%} defect pixels, {n_regions_note}); best of {args.repeats}")

    rows = []
    t, v = best_time(lambda: pro(masks, maps), args.repeats)
    rows.append(("adgrid metrics.pro (exact, fpr<=0.3)", t, v))
    t, v = best_time(lambda: pro(masks, maps, variant="anomalous_only"), args.repeats)
    rows.append(("adgrid metrics.pro variant=anomalous_only", t, v))
    t, v = best_time(lambda: pixel_auroc(masks, maps), args.repeats)
    rows.append(("adgrid metrics.pixel_auroc", t, v))
    t, v = best_time(lambda: roc_auc_score(masks.ravel(), maps.ravel()), 1)
    rows.append(("sklearn roc_auc_score (pixels)", t, v))

    anomalib_line = None
    try:
        result = anomalib_aupro(masks, maps, args.repeats)
    except ImportError:
        result = None
        if args.anomalib_python:
            try:
                result = anomalib_elsewhere(args.anomalib_python, masks, maps, args.repeats)
            except Exception as exc:  # report and carry on: the benchmark itself is ours
                anomalib_line = f"anomalib via {args.anomalib_python} failed: {exc}"
        else:
            anomalib_line = "anomalib not installed: pip install anomalib (or pass --anomalib-python)"
    if result is not None:
        rows.append((f"anomalib {result['version']} AUPRO (torch threads {result['torch_threads']})",
                     result["seconds"], result["value"]))

    width = max(len(r[0]) for r in rows)
    for name, seconds, value in rows:
        print(f"{name:<{width}}  {seconds:8.3f} s   value {value:.9f}")
    if anomalib_line:
        print(anomalib_line)
    else:
        print(f"|pro - anomalib AUPRO| = {abs(rows[0][2] - rows[-1][2]):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
