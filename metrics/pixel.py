"""Pixel-level (segmentation) metrics: pixel AUROC and PRO.

Inputs: ``masks`` N x H x W binary ground truth (1 = defect pixel), ``maps``
N x H x W anomaly scores at the same size (higher = more anomalous).

Both metrics are exact and sort-based: ``numpy.sort`` of float arrays is
vectorised (SIMD) and several times faster than ``argsort``, so the algorithms
sort values and use ``searchsorted`` rather than sorting index permutations.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._checks import MetricError, as_pixel_pair

__all__ = ["pixel_auroc", "pro", "PIXEL_VARIANTS"]

#: Which test images a pixel metric is computed over.
#: ``"all"``: every test image (MVTec AD evaluation; normal images contribute
#: only false positives). ``"anomalous_only"``: images with at least one defect
#: pixel (PatchCore's released ``run_patchcore.py`` reports its
#: ``anomaly_pixel_auroc`` this way).
PIXEL_VARIANTS = ("all", "anomalous_only")

# 8-connectivity inside each image and no connection between images: one call to
# ndimage.label numbers the regions of the whole N x H x W stack.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


def _select(masks: np.ndarray, maps: np.ndarray, variant: str):
    if variant not in PIXEL_VARIANTS:
        raise MetricError(f"unknown variant {variant!r}; expected one of {PIXEL_VARIANTS}")
    if variant == "anomalous_only":
        keep = masks.reshape(masks.shape[0], -1).any(axis=1)
        masks, maps = masks[keep], maps[keep]
    return masks, maps


def _auroc_sorted(neg_sorted: np.ndarray, pos_sorted: np.ndarray) -> float:
    """Mann-Whitney AUROC from the sorted scores of negatives and positives.

    AUROC = (#{(p, n): p > n} + 0.5 #{(p, n): p == n}) / (n_pos n_neg). For each
    positive score, ``searchsorted`` counts the negatives below it (left side)
    and at most equal to it (right side); their sum is twice the U statistic,
    kept as an exact integer until the final division.
    """
    below = np.searchsorted(neg_sorted, pos_sorted, side="left")
    below_or_equal = np.searchsorted(neg_sorted, pos_sorted, side="right")
    twice_u = int(below.sum(dtype=np.int64)) + int(below_or_equal.sum(dtype=np.int64))
    return twice_u / (2.0 * pos_sorted.size * neg_sorted.size)


def pixel_auroc(masks, maps, variant: str = "all") -> float:
    """AUROC over all pixels of the test set, defect pixels as the positive class.

    Every pixel of every image is one sample (MVTec AD evaluation, Bergmann et
    al. 2021; "pixel-wise AUROC" of PatchCore, PaDiM, ...). The value is exact:
    the Mann-Whitney U statistic with ties counting 1/2, which is identical to
    ``sklearn.metrics.roc_auc_score`` on the flattened arrays (to float rounding,
    about 1e-15) and about 20x faster on 6.5 M pixels.

    ``variant="anomalous_only"`` restricts it to images with a defect
    (PatchCore's ``anomaly_pixel_auroc``). Raises :class:`MetricError` when the
    selected pixels are all normal or all defective.
    """
    m, a = as_pixel_pair(masks, maps)
    m, a = _select(m, a, variant)
    pos = np.sort(a[m])
    neg = np.sort(a[~m])
    if pos.size == 0 or neg.size == 0:
        raise MetricError(
            "pixel AUROC needs both defect and normal pixels; the masks have "
            f"{pos.size} defect and {neg.size} normal pixel(s)"
        )
    return float(_auroc_sorted(neg, pos))


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under the curve (x, y) from x[0] to ``x_max``.

    ``x`` is non-decreasing and starts at or below ``x_max``. When ``x_max`` is
    not one of the x values, y at ``x_max`` is linearly interpolated between
    its neighbours (the rule of ``trapezoid(x, y, x_max)`` in the MVTec AD
    evaluation code, ``generic_util.py``).
    """
    k = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    xs, ys = x[:k], y[:k]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if k < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_max) * (x_max - x0)
    return area


def pro_curve(masks, maps, fpr_limit: float = 1.0, variant: str = "all"):
    """The exact PRO curve: (fpr, pro) arrays in increasing FPR order.

    One operating point per distinct anomaly score ``t`` (pixels with score
    >= t are predicted defective), plus the start point (0, 0):

    * ``fpr(t)``: fraction of normal pixels (label 0, over all selected images)
      with score >= t;
    * ``pro(t)``: mean over ground-truth regions R_k (8-connected components of
      each mask) of |{p in R_k : score(p) >= t}| / |R_k|.

    Only the part of the curve needed up to ``fpr_limit`` is computed: the
    points down to the first normal-pixel score whose FPR exceeds the limit (at
    least one point beyond the limit, so the curve can be interpolated there).
    Returns ``None`` when there is no region or no normal pixel (the curve is
    undefined).
    """
    m, a = as_pixel_pair(masks, maps)
    m, a = _select(m, a, variant)
    if not 0.0 < fpr_limit <= 1.0:
        raise MetricError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")

    regions, n_regions = ndimage.label(m, structure=_STRUCTURE_8)
    if n_regions == 0 or m.all():
        return None
    regions = regions.ravel()
    flat = a.ravel()

    ok_sorted = np.sort(flat[regions == 0])
    n_ok = ok_sorted.size

    # Region pixels, ascending by score, each weighted 1 / (K |R_k|) so that the
    # weights of the pixels with score >= t sum to pro(t).
    region_idx = np.flatnonzero(regions)
    region_of = regions[region_idx]
    sizes = np.bincount(region_of, minlength=n_regions + 1)
    region_scores = flat[region_idx]
    order = np.argsort(region_scores)
    reg_sorted = region_scores[order]
    weights = 1.0 / (n_regions * sizes[region_of[order]].astype(np.float64))
    suffix = np.zeros(reg_sorted.size + 1)
    suffix[:-1] = np.cumsum(weights[::-1])[::-1]  # suffix[i] = sum of weights[i:]

    # Thresholds at or above the lowest one needed: the normal score ``v`` whose
    # FPR is the first above the limit (all of them when the limit is 1).
    j = max(0, int(np.floor(n_ok * (1.0 - fpr_limit))) - 1)
    v = ok_sorted[j]
    candidates = np.concatenate(
        [ok_sorted[j:], reg_sorted[np.searchsorted(reg_sorted, v, side="left"):]]
    )
    thresholds = np.unique(candidates)  # ascending, distinct
    fpr = (n_ok - np.searchsorted(ok_sorted, thresholds, side="left")) / n_ok
    pro_values = suffix[np.searchsorted(reg_sorted, thresholds, side="left")]
    fpr = np.concatenate([[0.0], fpr[::-1]])
    pro_values = np.concatenate([[0.0], pro_values[::-1]])
    return fpr, pro_values


def pro(masks, maps, fpr_limit: float = 0.3, variant: str = "all") -> float:
    """Normalised area under the PRO curve up to FPR ``fpr_limit`` (AU-PRO).

    Definition (Bergmann et al. 2021, IJCV, "The MVTec Anomaly Detection
    Dataset: A Comprehensive Real-World Dataset for Unsupervised Anomaly
    Detection", Sec. 5.2; official evaluation script ``pro_curve_util.compute_pro``
    with ``generic_util.trapezoid``):

    1. Regions: connected components of each ground-truth mask, 8-connectivity
       (the official code labels with a 3 x 3 all-ones structuring element).
    2. For a threshold t, the per-region overlap of region R_k is the fraction
       of its pixels with score above t; PRO(t) is its mean over all regions of
       the test set, FPR(t) the fraction of normal pixels (all selected images,
       normal images included) with score above t.
    3. The curve PRO vs FPR is integrated with the trapezoidal rule from FPR 0 to
       ``fpr_limit``, PRO at ``fpr_limit`` linearly interpolated between the
       neighbouring points, and the area is divided by ``fpr_limit``.

    Exactness: the curve has one point per distinct score (see
    :func:`pro_curve`); nothing is sampled, so the result is the limit of the
    official script as its ``num_thresholds`` grows. The official script takes
    thresholds only at normal-pixel scores (every step of the FPR); the two
    curves differ only inside single FPR steps of width 1 / n_normal, so the
    values agree to within 0.5 / (n_normal * fpr_limit) (below 3e-7 for
    100 images of 256 x 256). Cost: one sort of the normal pixels, one argsort
    of the defect pixels and searchsorted lookups, O(n log n).

    ``variant="anomalous_only"`` uses only the images that contain a defect.

    Returns ``float('nan')`` when the selected masks contain no defect region or
    no normal pixel: PRO is undefined then (``evaluate`` stores None).
    """
    curve = pro_curve(masks, maps, fpr_limit=fpr_limit, variant=variant)
    if curve is None:
        return float("nan")
    fpr, pro_values = curve
    return _area_up_to(fpr, pro_values, fpr_limit) / fpr_limit
