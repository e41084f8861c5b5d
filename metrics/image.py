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
    "FPR95_RULES",
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


#: Rules for choosing the FPR95 operating point (see :func:`fpr95`).
FPR95_RULES = ("at_least", "closest")


def fpr95(labels, scores, recall: float = 0.95, rule: str = "at_least") -> float:
    """FPR at 95% TPR, the classic definition (ID positive; Hendrycks & Gimpel 2017).

    A sample is *kept* as in-distribution when its score is at most a threshold
    ``t``; thresholds run over the distinct scores (no interpolation between
    operating points). The metric is the fraction of OOD samples kept (OOD
    classified as ID) at the chosen threshold.

    ``rule="at_least"`` (default): the **smallest** ``t`` that keeps **at least**
    95% of the ID samples (TPR on ID >= ``recall``)::

        k   = ceil(recall * n_ID)
        t   = k-th smallest ID score
        FPR = #{OOD : score <= t} / n_OOD

    ``rule="closest"``: the operating point whose ID recall is *closest* to
    ``recall``, as in Hendrycks' released code (``fpr_and_fdr_at_recall``:
    ``np.argmin(np.abs(recall - recall_level))``, used by Outlier Exposure,
    Energy-based OOD and their successors). It may pick a point below 95% recall
    (e.g. 9/10 rather than 10/10, since |0.9 - 0.95| < |1.0 - 0.95| in floating
    point); among equally close points it takes the one keeping more samples,
    as that code does.

    Ties: an OOD sample whose score equals ``t`` is kept, i.e. counted as a
    false positive (a threshold cannot separate equal scores).
    """
    y, s = labels_and_scores(labels, scores)
    if not 0.0 < recall <= 1.0:
        raise MetricError(f"recall must lie in (0, 1], got {recall}")
    if rule not in FPR95_RULES:
        raise MetricError(f"unknown rule {rule!r}; expected one of {FPR95_RULES}")
    id_sorted = np.sort(s[y == 0])
    ood_sorted = np.sort(s[y == 1])
    if rule == "at_least":
        t = id_sorted[_recall_count(id_sorted.size, recall) - 1]
        return float(np.searchsorted(ood_sorted, t, side="right") / ood_sorted.size)
    thresholds = np.unique(s)
    thresholds = thresholds[: np.searchsorted(thresholds, id_sorted[-1], side="right")]  # up to full recall
    id_kept = np.searchsorted(id_sorted, thresholds, side="right")
    distance = np.abs(id_kept / id_sorted.size - recall)
    best = distance.size - 1 - int(np.argmin(distance[::-1]))  # the last of equal minima
    return float(np.searchsorted(ood_sorted, thresholds[best], side="right") / ood_sorted.size)


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
