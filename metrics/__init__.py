"""Detection and segmentation metrics (pure functions: numpy in, float out).

Conventions: label 1 = anomalous / OOD, 0 = normal / in-distribution; scores
higher = more anomalous. Inputs that make a metric undefined or meaningless
(one class only, NaN / inf scores, mismatched shapes) raise :class:`MetricError`.

``evaluate`` computes every metric column of a result row at once.
"""
from ._checks import MetricError
from .evaluate import METRIC_COLUMNS, evaluate
from .image import FPR95_RULES, accuracy, aupr_in, aupr_out, detection_error, fpr95, fpr95_openood, image_auroc
from .pixel import PIXEL_VARIANTS, pixel_auroc, pro, pro_curve

__all__ = [
    "MetricError",
    "METRIC_COLUMNS",
    "PIXEL_VARIANTS",
    "FPR95_RULES",
    "evaluate",
    "image_auroc",
    "aupr_in",
    "aupr_out",
    "fpr95",
    "fpr95_openood",
    "detection_error",
    "accuracy",
    "pixel_auroc",
    "pro",
    "pro_curve",
]
