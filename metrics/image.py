"""Image-level (sample-level) detection metrics.

Conventions shared by every function here:

* ``labels``: 1 = anomalous / out-of-distribution (OOD), 0 = normal / in-distribution (ID).
* ``scores``: higher = more anomalous / more OOD (negate a confidence before passing it).
* Both classes must be present, scores must be finite; otherwise :class:`MetricError`.
* Each function returns a plain Python ``float``.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from ._checks import MetricError, labels_and_scores

__all__ = [
    "image_auroc",
    "aupr_in",
    "aupr_out",
    "fpr95",
    "fpr95_openood",
    "detection_error",
    "accuracy",
]


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve, anomalous/OOD (label 1) as the positive class.

    Computed with ``sklearn.metrics.roc_auc_score`` (trapezoidal area under the
    exact ROC curve, so tied scores count one half, as in the Mann-Whitney U
    statistic). It equals the probability that a random anomalous sample scores
    higher than a random normal one, ties counting 1/2; constant scores give 0.5.
    """
    y, s = labels_and_scores(labels, scores)
    return float(roc_auc_score(y, s))


def aupr_out(labels, scores) -> float:
    """Area under the precision-recall curve with anomalous/OOD as the positive class.

    ``sklearn.metrics.average_precision_score(labels, scores)``: the step-wise
    average precision sum_n (R_n - R_{n-1}) P_n, not a trapezoid. This is
    "AUPR-Out" of Hendrycks & Gimpel (2017, "A Baseline for Detecting
    Misclassified and Out-of-Distribution Examples") and OpenOOD. Note that
    OpenOOD itself integrates the PR curve with ``sklearn.metrics.auc``
    (trapezoid), which can differ slightly.
    """
    y, s = labels_and_scores(labels, scores)
    return float(average_precision_score(y, s))


def aupr_in(labels, scores) -> float:
    """Area under the precision-recall curve with normal/ID as the positive class.

    ``sklearn.metrics.average_precision_score(1 - labels, -scores)``: ID samples are
    the positives and a lower anomaly score means "more in-distribution"
    ("AUPR-In", Hendrycks & Gimpel 2017).
    """
    y, s = labels_and_scores(labels, scores)
    return float(average_precision_score(1 - y, -s))


def _recall_count(n: int, recall: float) -> int:
    """Smallest integer k with k / n >= recall (robust to float rounding)."""
    return max(1, min(n, math.ceil(recall * n - 1e-9)))


def fpr95(labels, scores, recall: float = 0.95) -> float:
    """FPR at 95% TPR, the classic definition (ID positive; Hendrycks & Gimpel 2017).

    A sample is *kept* as in-distribution when its score is at most a threshold
    ``t``. The threshold is the **smallest** ``t`` that keeps **at least** 95% of the
    ID samples (TPR on ID >= ``recall``); the metric is the fraction of OOD samples
    kept at that threshold (OOD samples classified as ID):

        k   = ceil(recall * n_ID)
        t   = k-th smallest ID score
        FPR = #{OOD : score <= t} / n_OOD

    Ties: an OOD sample whose score equals ``t`` is kept, i.e. counted as a false
    positive (a threshold cannot separate equal scores). No interpolation between
    operating points is done. Hendrycks' released code instead takes the
    operating point whose recall is *closest* to 0.95 (``np.argmin(|recall-0.95|)``),
    which can pick a point just below 95% recall; the rule here never does.
    """
    y, s = labels_and_scores(labels, scores)
    if not 0.0 < recall <= 1.0:
        raise MetricError(f"recall must lie in (0, 1], got {recall}")
    id_sorted = np.sort(s[y == 0])
    ood = s[y == 1]
    t = id_sorted[_recall_count(id_sorted.size, recall) - 1]
    return float(np.count_nonzero(ood <= t) / ood.size)


def fpr95_openood(labels, scores, recall: float = 0.95) -> float:
    """FPR@95 as OpenOOD v1.5 computes it (OOD positive; roles reversed).

    OpenOOD v1.5 (``openood/evaluators/metrics.py``, ``auc_and_fpr_recall``) treats
    OOD as the positive class and reports the fraction of ID samples flagged as
    OOD at the first ROC operating point where the OOD recall reaches 95%::

        fpr, tpr, _ = sklearn.metrics.roc_curve(labels, scores)   # OOD = 1
        FPR = fpr[argmax(tpr >= 0.95)]

    This is reproduced exactly, including ``roc_curve``'s default
    ``drop_intermediate=True``: when the first point reaching 95% lies inside a
    straight run of the ROC curve, sklearn drops it and the next kept point is
    used, as in OpenOOD's tables. Ties between an OOD and an ID score at the
    threshold count the ID sample as a false positive.
    """
    y, s = labels_and_scores(labels, scores)
    if not 0.0 < recall <= 1.0:
        raise MetricError(f"recall must lie in (0, 1], got {recall}")
    fpr, tpr, _ = roc_curve(y, s)
    return float(fpr[np.argmax(tpr >= recall)])


def detection_error(labels, scores) -> float:
    """Minimum detection error, min over thresholds of 0.5 (1 - TPR) + 0.5 FPR.

    As in ODIN (Liang, Li & Srikant 2018, "Enhancing the Reliability of
    Out-of-distribution Image Detection in Neural Networks") and OpenOOD's
    ``detection()``: the misclassification probability when ID and OOD are
    equally likely, at the best threshold. Here the minimum is exact: it is taken
    over every operating point of the ROC curve (every distinct score used as the
    threshold, plus "flag nothing"), not over a grid of 10^5 thresholds as in the
    released code. The value is symmetric in which class is called positive and
    lies in [0, 0.5].
    """
    y, s = labels_and_scores(labels, scores)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))


def accuracy(pred, targets) -> float:
    """Top-1 accuracy: the fraction of samples with ``pred == targets``.

    ``pred`` holds class ids (N) or class scores / logits (N x C, arg-max taken).
    Pass in-distribution samples only (OpenOOD's ``acc``: samples whose label is
    not OOD); :func:`metrics.evaluate` does this selection.
    """
    p = np.asarray(pred)
    t = np.asarray(targets)
    if p.ndim == 2:
        p = p.argmax(axis=1)
    if p.ndim != 1 or t.ndim != 1:
        raise MetricError(f"pred and targets must be 1-D (pred may be N x C), got {p.shape} and {t.shape}")
    if p.shape != t.shape:
        raise MetricError(f"pred ({p.size}) and targets ({t.size}) differ in length")
    if p.size == 0:
        raise MetricError("accuracy of an empty set is undefined")
    return float(np.count_nonzero(p == t) / p.size)
