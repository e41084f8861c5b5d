"""``evaluate``: every metric of one result row from a cell's scores."""
from __future__ import annotations

import math

import numpy as np

from . import image as _image
from . import pixel as _pixel
from ._checks import MetricError, as_labels, as_pixel_pair, as_scores, labels_and_scores

#: The metric columns of a row, in order (``evaluate`` returns these keys plus
#: ``metric_variants``).
METRIC_COLUMNS = (
    "image_auroc",
    "pixel_auroc",
    "pro",
    "aupr_in",
    "aupr_out",
    "fpr95",
    "fpr95_openood",
    "detection_error",
    "accuracy",
)

#: Names of the fixed definitions, recorded in every row beside the variants
#: chosen per call, so that a row says which definition produced each number.
_FIXED_VARIANTS = {
    "fpr95_openood": "openood_v1.5",  # OOD positive, ID FPR at first ROC point with OOD TPR >= 95%
    "aupr": "average_precision",      # sklearn average_precision_score (step-wise), not trapezoid
    "detection_error": "min_over_thresholds",
    "pro_fpr_limit": "0.3",
}


def evaluate(
    labels,
    image_scores,
    *,
    masks=None,
    pixel=None,
    pred=None,
    targets=None,
    pro_variant: str = "all",
    pixel_auroc_variant: str = "all",
    fpr95_rule: str = "at_least",
) -> dict:
    """Compute the metric columns of a row.

    Args:
        labels: N test labels, 1 = anomalous / OOD, 0 = normal / ID.
        image_scores: N image scores, higher = more anomalous.
        masks: N x H x W binary ground-truth masks, already at the size of
            ``pixel`` (the orchestrator resizes them), or None.
        pixel: N x H x W anomaly maps, or None.
        pred: N predicted class ids (or N x C logits) of a classifier, or None.
        targets: N true class ids; samples with a negative target (e.g. -1 for
            OOD samples) are ignored, as are samples with label 1.
        pro_variant: ``"all"`` (MVTec AD evaluation: every test image) or
            ``"anomalous_only"`` (images with a defect only).
        pixel_auroc_variant: the same choice for pixel AUROC (``"anomalous_only"``
            is PatchCore's released ``anomaly_pixel_auroc``).
        fpr95_rule: ``"at_least"`` (smallest threshold keeping >= 95% of ID,
            recorded as ``"id_tpr95"``) or ``"closest"`` (Hendrycks' released
            code, recorded as ``"id_tpr95_closest"``); see :func:`metrics.fpr95`.

    Returns:
        A dict with exactly the keys of ``METRIC_COLUMNS`` (float or None) and
        ``metric_variants`` (dict of str). None means "not defined here":

        * ``pixel_auroc`` / ``pro``: None unless both ``masks`` and ``pixel`` are
          given, and None when the (selected) masks hold no defect pixel or no
          normal pixel;
        * ``accuracy``: None unless ``pred`` and ``targets`` are given, and None
          when no sample has label 0 and a target >= 0.

    Raises:
        MetricError: the test set has a single label; scores or maps contain NaN
            or infinite values (the message says how many); lengths or shapes
            do not match; masks are not binary; an unknown variant.
    """
    y = as_labels(labels)
    s = as_scores(image_scores, "image_scores")
    if s.ndim != 1 or s.shape != y.shape:
        raise MetricError(f"labels {y.shape} and image_scores {s.shape} must be 1-D of one length")
    for variant_name, variant in (("pro_variant", pro_variant), ("pixel_auroc_variant", pixel_auroc_variant)):
        if variant not in _pixel.PIXEL_VARIANTS:
            raise MetricError(f"unknown {variant_name} {variant!r}; expected one of {_pixel.PIXEL_VARIANTS}")
    if fpr95_rule not in _image.FPR95_RULES:
        raise MetricError(f"unknown fpr95_rule {fpr95_rule!r}; expected one of {_image.FPR95_RULES}")
    y, s = labels_and_scores(y, s)  # single-label check

    row: dict = dict.fromkeys(METRIC_COLUMNS)
    row["image_auroc"] = _image.image_auroc(y, s)
    row["aupr_in"] = _image.aupr_in(y, s)
    row["aupr_out"] = _image.aupr_out(y, s)
    row["fpr95"] = _image.fpr95(y, s, rule=fpr95_rule)
    row["fpr95_openood"] = _image.fpr95_openood(y, s)
    row["detection_error"] = _image.detection_error(y, s)

    if masks is not None and pixel is not None:
        m, a = as_pixel_pair(masks, pixel)
        if m.shape[0] != y.size:
            raise MetricError(f"masks and pixel maps hold {m.shape[0]} images but there are {y.size} labels")
        row["pixel_auroc"] = _pixel_auroc_or_none(m, a, pixel_auroc_variant)
        value = _pixel.pro(m, a, variant=pro_variant)
        row["pro"] = None if math.isnan(value) else value

    if pred is not None and targets is not None:
        p = np.asarray(pred)
        t = np.asarray(targets)
        if p.ndim == 2:
            p = p.argmax(axis=1)
        if p.shape != y.shape or t.shape != y.shape:
            raise MetricError(
                f"pred {np.shape(pred)} and targets {t.shape} must have one entry per label ({y.size})"
            )
        keep = (y == 0) & (t >= 0)
        if keep.any():
            row["accuracy"] = _image.accuracy(p[keep], t[keep])

    row["metric_variants"] = {
        "pixel_auroc": pixel_auroc_variant,
        "pro": pro_variant,
        "fpr95": "id_tpr95" if fpr95_rule == "at_least" else "id_tpr95_closest",
        **_FIXED_VARIANTS,
    }
    return row


def _pixel_auroc_or_none(masks: np.ndarray, maps: np.ndarray, variant: str):
    if variant == "anomalous_only":
        keep = masks.reshape(masks.shape[0], -1).any(axis=1)
        masks, maps = masks[keep], maps[keep]
    n_defect = int(np.count_nonzero(masks))
    if n_defect == 0 or n_defect == masks.size:
        return None
    return _pixel.pixel_auroc(masks, maps)
