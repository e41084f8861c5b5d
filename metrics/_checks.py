"""Input validation shared by the metric functions.

Every metric converts its inputs here, so that a wrong input fails with a
:class:`MetricError` that says what is wrong, instead of a silent number.
"""
from __future__ import annotations

import numpy as np


class MetricError(ValueError):
    """A metric cannot be computed from the inputs given (and why)."""


def as_labels(labels, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a 1-D int8 array of 0/1, or raise MetricError."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise MetricError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise MetricError(f"{name} is empty")
    if arr.dtype == bool:
        return arr.astype(np.int8)
    if not np.issubdtype(arr.dtype, np.number):
        raise MetricError(f"{name} must be numeric 0/1, got dtype {arr.dtype}")
    bad = ~np.isin(arr, (0, 1))
    if bad.any():
        raise MetricError(
            f"{name} must hold only 0 (normal / in-distribution) and 1 (anomalous / OOD); "
            f"{int(bad.sum())} value(s) are neither, e.g. {arr[bad][0]!r}"
        )
    return arr.astype(np.int8)


def as_scores(scores, name: str = "scores") -> np.ndarray:
    """Return ``scores`` as a float array (any shape), rejecting NaN and inf."""
    arr = np.asarray(scores)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise MetricError(f"{name} must be real numbers, got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise MetricError(f"{name} must be real numbers, got complex values")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    n_nan = int(np.isnan(arr).sum())
    n_inf = int(np.isinf(arr).sum())
    if n_nan or n_inf:
        raise MetricError(
            f"{name} contain {n_nan} NaN and {n_inf} infinite value(s) out of {arr.size}; "
            "every score must be finite"
        )
    return arr


def labels_and_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (labels, scores) pair for an image-level metric.

    Both classes must be present: a ranking metric is not defined on a test set
    with a single label.
    """
    y = as_labels(labels)
    s = as_scores(scores)
    if s.ndim != 1:
        raise MetricError(f"scores must be 1-D, got shape {s.shape}")
    if s.shape != y.shape:
        raise MetricError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous/OOD (1)" if n_pos else "normal/in-distribution (0)"
        raise MetricError(
            f"the test set has a single label: all {y.size} samples are {only}; "
            "the metric needs both normal and anomalous samples"
        )
    return y, s


def as_pixel_pair(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """Validate ground-truth masks and anomaly maps of the same N x H x W shape.

    A single H x W image is accepted as N = 1, and an N x 1 x H x W stack has its
    channel axis dropped. Masks must be binary (bool, or numbers that are all 0
    or 1): a mask resized with bilinear interpolation must be thresholded first.
    Returns (bool masks, float maps), both N x H x W.
    """
    m = np.asarray(masks)
    a = as_scores(maps, "pixel maps")
    m = _as_stack(m, "masks")
    a = _as_stack(a, "pixel maps")
    if m.shape != a.shape:
        raise MetricError(f"masks {m.shape} and pixel maps {a.shape} differ in shape")
    if m.size == 0:
        raise MetricError("masks and pixel maps are empty")
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.number):
            raise MetricError(f"masks must be binary, got dtype {m.dtype}")
        bad = (m != 0) & (m != 1)
        if bad.any():
            raise MetricError(
                f"masks must be binary (0/1); {int(bad.sum())} pixel(s) hold other values, "
                f"e.g. {m[bad][0]!r}: resize masks with data.transforms.resize_masks "
                "(PIL nearest, or a thresholded bilinear resize)"
            )
        m = m == 1
    return m, a


def _as_stack(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 4 and arr.shape[1] == 1:
        return arr[:, 0]
    if arr.ndim != 3:
        raise MetricError(f"{name} must be N x H x W, got shape {arr.shape}")
    return arr
