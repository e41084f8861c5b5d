"""Tests of metrics/: every metric against an independent computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score, roc_curve

from metrics import (
    METRIC_COLUMNS,
    MetricError,
    accuracy,
    aupr_in,
    aupr_out,
    detection_error,
    evaluate,
    fpr95,
    fpr95_openood,
    image_auroc,
    pixel_auroc,
    pro,
)


# ----------------------------------------------------------------------------
# independent reference computations
# ----------------------------------------------------------------------------
def brute_auroc(labels, scores):
    """Fraction of (anomalous, normal) pairs ranked correctly, ties counting 1/2."""
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def brute_detection_error(labels, scores):
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=float)
    best = 1.0
    for t in list(np.unique(scores)) + [np.inf]:
        flagged = scores >= t
        tpr = flagged[labels == 1].mean()
        fpr = flagged[labels == 0].mean()
        best = min(best, 0.5 * (1 - tpr) + 0.5 * fpr)
    return best


def regions_per_image(masks, structure):
    """List of boolean N x H x W arrays, one per connected region (per-image loop)."""
    out = []
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=structure)
        for k in range(1, n + 1):
            region = np.zeros(masks.shape, dtype=bool)
            region[i] = lab == k
            out.append(region)
    return out


def integrate_to(xs, ys, limit):
    """Trapezoid over a polyline from x=0 to x=limit, written as a plain loop."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs[:-1], ys[:-1]), zip(xs[1:], ys[1:])):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area


def reference_pro(masks, maps, limit=0.3, connectivity=8):
    """AU-PRO by brute force: every distinct score as a threshold, per-region overlap."""
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=float)
    structure = np.ones((3, 3)) if connectivity == 8 else None
    regions = regions_per_image(masks, structure)
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        xs.append((pred & normal).sum() / normal.sum())
        ys.append(np.mean([pred[r].mean() for r in regions]))
    return integrate_to(xs, ys, limit) / limit


def mvtec_style_pro(masks, maps, limit=0.3):
    """The official MVTec AD algorithm (compute_pro + trapezoid) with a threshold
    at every normal-pixel score: thresholds at sorted normal scores, a pixel is
    positive when its score is strictly greater, FPR = 1 - (pos + 1) / n."""
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=float)
    regions = [np.sort(maps[r]) for r in regions_per_image(masks, np.ones((3, 3)))]
    ok = np.sort(maps[~masks])
    fprs, pros = [1.0], [1.0]
    for pos in range(ok.size):
        t = ok[pos]
        fprs.append(1.0 - (pos + 1) / ok.size)
        pros.append(np.mean([1.0 - np.searchsorted(r, t, side="right") / r.size for r in regions]))
    return integrate_to(fprs[::-1], pros[::-1], limit) / limit


def blob_masks(rng, n, h, w, n_anomalous):
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(n_anomalous):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(1, max(2, h // 4))
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return masks


# ----------------------------------------------------------------------------
# image-level metrics
# ----------------------------------------------------------------------------
def test_auroc_matches_pair_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 30)
        y[:2] = [0, 1]
        s = rng.integers(0, 6, 30)  # many ties
        assert image_auroc(y, s) == pytest.approx(brute_auroc(y, s), abs=1e-12)


def test_constant_scores_give_half():
    y = [0, 0, 1, 1, 1]
    assert image_auroc(y, [3.0] * 5) == 0.5
    assert detection_error(y, [3.0] * 5) == 0.5
    assert fpr95(y, [3.0] * 5) == 1.0
    assert fpr95_openood(y, [3.0] * 5) == 1.0


def test_aupr_by_hand():
    y = [1, 0, 1, 0, 1]
    s = [0.9, 0.8, 0.7, 0.6, 0.5]
    # OOD positive: hits at ranks 1, 3, 5 -> precisions 1, 2/3, 3/5
    assert aupr_out(y, s) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # ID positive, ascending score: ID at ranks 2 and 4 -> precisions 1/2, 2/4
    assert aupr_in(y, s) == pytest.approx(0.5)
    # perfect separation
    assert aupr_out([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert aupr_in([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0


def test_fpr95_by_hand():
    id_scores = list(range(20))  # 19 of 20 kept <=> threshold 18
    ood = [18, 18.5, 19, 25, 30]
    y = [0] * 20 + [1] * 5
    assert fpr95(y, id_scores + ood) == pytest.approx(1 / 5)  # only the OOD tie at 18 is kept


def test_fpr95_ties_at_threshold_count_as_false_positives():
    id_scores = list(range(17)) + [17, 17, 17]  # 19th smallest ID score is 17
    ood = [17, 17, 20, 21]
    y = [0] * 20 + [1] * 4
    assert fpr95(y, id_scores + ood) == pytest.approx(2 / 4)


def test_fpr95_needs_at_least_95_percent():
    # 10 ID samples: 95% means 10 of 10 (9 would be 90%)
    y = [0] * 10 + [1] * 2
    s = list(range(10)) + [8.5, 100]
    assert fpr95(y, s) == pytest.approx(1 / 2)


def test_fpr95_matches_mirrored_roc_rule():
    rng = np.random.default_rng(1)
    for _ in range(30):
        n = int(rng.integers(10, 60))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.integers(0, 8, n).astype(float)
        fpr, tpr, _ = roc_curve(1 - y, -s, drop_intermediate=False)  # ID positive
        assert fpr95(y, s) == pytest.approx(fpr[np.argmax(tpr >= 0.95)])


def hendrycks_fpr_at_recall(labels, scores, level=0.95):
    """Hendrycks' procedure: ID positive, operating points at distinct scores up
    to full recall, the point whose recall is closest to the level (on equal
    distance the one keeping more samples)."""
    labels = np.asarray(labels)
    conf = -np.asarray(scores, dtype=float)  # higher = more ID
    id_conf, ood_conf = conf[labels == 0], conf[labels == 1]
    points = []
    for t in sorted(set(conf.tolist()), reverse=True):
        tp = int((id_conf >= t).sum())
        points.append((tp / id_conf.size, (ood_conf >= t).sum() / ood_conf.size))
        if tp == id_conf.size:
            break
    best = None
    for rec, fpr in points:
        if best is None or abs(rec - level) <= abs(best[0] - level):
            best = (rec, fpr)
    return best[1]


def test_fpr95_closest_rule():
    # ID 0..9: recall 0.9 (t in [8, 9)) is closer to 0.95 than 1.0 in floating
    # point; of the two recall-0.9 points (t = 8 and t = 8.5) the one keeping
    # more samples is taken -> OOD 8.5 kept: 1/3. "at_least" keeps 8.5 and 9: 2/3.
    y = [0] * 10 + [1] * 3
    s = list(range(10)) + [8.5, 9, 100]
    assert fpr95(y, s, rule="closest") == pytest.approx(1 / 3)
    assert fpr95(y, s) == pytest.approx(2 / 3)
    assert hendrycks_fpr_at_recall(y, s) == pytest.approx(1 / 3)
    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(10, 60))
        yy = rng.integers(0, 2, n)
        yy[:2] = [0, 1]
        ss = rng.integers(0, 8, n).astype(float)
        assert fpr95(yy, ss, rule="closest") == pytest.approx(hendrycks_fpr_at_recall(yy, ss))
    with pytest.raises(MetricError, match="rule"):
        fpr95(y, s, rule="nearest")


def test_fpr95_openood_by_hand_and_drop_intermediate_quirk():
    # 20 OOD, 20 ID. 17 OOD above everything, then three tied (OOD, ID) pairs,
    # then 17 ID. OOD recall reaches 19/20 at the second tied pair (ID FPR
    # 2/20), but that ROC point lies on a straight run, sklearn's default
    # drop_intermediate removes it, and OpenOOD's code reports the next
    # point: 3/20.
    ood = list(range(100, 83, -1)) + [50, 49, 48]
    ind = [50, 49, 48] + list(range(17))
    y = [1] * 20 + [0] * 20
    assert fpr95_openood(y, ood + ind) == pytest.approx(3 / 20)
    # the classic definition on the same data: 19 ID kept at threshold 49,
    # OOD <= 49 are the tied 49 and 48
    assert fpr95(y, ood + ind) == pytest.approx(2 / 20)


def test_fpr95_openood_simple():
    # OOD scores 10..29 (20), ID 0..9 and 25: OOD recall 19/20 needs threshold 11,
    # the ID sample at 25 is then flagged -> FPR 1/11
    y = [1] * 20 + [0] * 11
    s = list(range(10, 30)) + list(range(10)) + [25]
    assert fpr95_openood(y, s) == pytest.approx(1 / 11)


def test_detection_error_matches_brute_force():
    rng = np.random.default_rng(2)
    for _ in range(20):
        y = rng.integers(0, 2, 25)
        y[:2] = [0, 1]
        s = rng.normal(size=25) + y
        if _ % 2:
            s = np.round(s)  # ties
        assert detection_error(y, s) == pytest.approx(brute_detection_error(y, s), abs=1e-12)
    assert detection_error([0, 0, 1, 1], [0, 1, 2, 3]) == 0.0


def test_accuracy():
    assert accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    logits = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert accuracy(logits, [1, 1]) == 0.5
    with pytest.raises(MetricError):
        accuracy([1, 2], [1])
    with pytest.raises(MetricError):
        accuracy([], [])


def test_single_label_and_bad_scores_raise():
    assert issubclass(MetricError, ValueError)
    for f in (image_auroc, aupr_in, aupr_out, fpr95, fpr95_openood, detection_error):
        with pytest.raises(MetricError, match="single label"):
            f([0, 0, 0], [0.1, 0.2, 0.3])
        with pytest.raises(MetricError, match="1 NaN"):
            f([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(MetricError, match="differ in length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="neither"):
        image_auroc([0, 2], [0.1, 0.2])


# ----------------------------------------------------------------------------
# pixel AUROC
# ----------------------------------------------------------------------------
def test_pixel_auroc_equals_sklearn():
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, 12, 32, 32, 6)
    maps = rng.normal(size=masks.shape) + masks
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)
    # ties (quantised) and float32
    q = np.round(maps * 3).astype(np.float32)
    assert pixel_auroc(masks, q) == pytest.approx(roc_auc_score(masks.ravel(), q.ravel()), abs=1e-9)
    assert pixel_auroc(masks.astype(np.uint8), maps) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_brute_force_and_variant():
    rng = np.random.default_rng(4)
    masks = blob_masks(rng, 4, 6, 6, 2)
    maps = rng.integers(0, 4, masks.shape).astype(float)
    assert pixel_auroc(masks, maps) == pytest.approx(brute_auroc(masks.ravel(), maps.ravel()), abs=1e-12)
    sub = masks[:2]
    assert pixel_auroc(masks, maps, variant="anomalous_only") == pytest.approx(
        brute_auroc(sub.ravel(), maps[:2].ravel()), abs=1e-12
    )
    assert pixel_auroc(masks, np.zeros(masks.shape)) == 0.5


def test_pixel_auroc_errors():
    with pytest.raises(MetricError, match="defect"):
        pixel_auroc(np.zeros((2, 4, 4)), np.ones((2, 4, 4)))
    with pytest.raises(MetricError, match="shape"):
        pixel_auroc(np.zeros((2, 4, 4)), np.ones((2, 4, 5)))
    with pytest.raises(MetricError, match="binary"):
        pixel_auroc(np.full((1, 4, 4), 0.5), np.ones((1, 4, 4)))
    maps = np.ones((1, 4, 4))
    maps[0, 0, :3] = np.inf
    with pytest.raises(MetricError, match="3 infinite"):
        pixel_auroc(np.eye(4)[None], maps)


# ----------------------------------------------------------------------------
# PRO
# ----------------------------------------------------------------------------
def test_pro_single_region_by_hand():
    # 96 normal pixels with uniform scores (i + 0.5) / 96 and one 4-pixel region
    # scoring 0.95, 0.75, 0.55, 0.35. Overlap 1/4 from FPR 5/96, 2/4 from FPR
    # 24/96, the next step (FPR 43/96) is past 0.3:
    # area = 0.25 * 19/96 + 0.5 * (0.3 - 0.25) = 143/1920, / 0.3 = 143/576.
    mask = np.zeros((10, 10), dtype=bool)
    mask[0, :2] = mask[1, :2] = True
    maps = np.zeros((10, 10))
    maps[~mask] = (np.arange(96) + 0.5) / 96
    maps[mask] = [0.95, 0.75, 0.55, 0.35]
    assert pro(mask[None], maps[None]) == pytest.approx(143 / 576, abs=1e-12)
    # a perfect map gives 1, a region below every normal pixel gives 0
    perfect = np.where(mask, 2.0, maps)
    assert pro(mask[None], perfect[None]) == pytest.approx(1.0)
    assert pro(mask[None], np.where(mask, -1.0, maps)[None]) == pytest.approx(0.0)


def test_pro_uses_8_connectivity():
    # R1 = two diagonal pixels (one high, one low score), R2 = one high pixel.
    # 8-connected: overlaps 1/2 and 1 -> 0.75 (4-connected would give 2/3).
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 5, 5] = True
    maps = np.full((1, 8, 8), 0.5)
    maps[0, 0, 0] = maps[0, 5, 5] = 1.0
    maps[0, 1, 1] = 0.0
    assert pro(mask, maps) == pytest.approx(0.75)
    assert reference_pro(mask, maps) == pytest.approx(0.75)
    assert reference_pro(mask, maps, connectivity=4) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_pro_matches_brute_force_on_random_maps(seed):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 6, 16, 16, 4)  # two all-normal images
    maps = ndimage.gaussian_filter(rng.normal(size=masks.shape), (0, 1, 1)) + 0.5 * masks
    assert pro(masks, maps) == pytest.approx(reference_pro(masks, maps), abs=1e-10)
    for limit in (0.05, 1.0):
        assert pro(masks, maps, fpr_limit=limit) == pytest.approx(reference_pro(masks, maps, limit), abs=1e-10)
    # ties: quantised scores
    q = np.round(maps * 4) / 4
    assert pro(masks, q) == pytest.approx(reference_pro(masks, q), abs=1e-10)
    # anomalous images only
    assert pro(masks, maps, variant="anomalous_only") == pytest.approx(
        reference_pro(masks[:4], maps[:4]), abs=1e-10
    )


def test_pro_agrees_with_official_algorithm():
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, 5, 16, 16, 3)
    maps = rng.random(masks.shape) + 0.3 * masks
    n_ok = int((~masks).sum())
    # the official curve puts points only at normal-pixel scores: it differs from
    # the exact one inside single FPR steps, by at most 0.5 / (n_ok * limit)
    assert abs(pro(masks, maps) - mvtec_style_pro(masks, maps)) <= 0.5 / (n_ok * 0.3) + 1e-12


def test_pro_all_normal_and_degenerate():
    assert math.isnan(pro(np.zeros((3, 8, 8)), np.random.default_rng(0).random((3, 8, 8))))
    assert math.isnan(pro(np.ones((1, 8, 8)), np.ones((1, 8, 8))))
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[1, 2:4, 2:4] = True
    assert math.isnan(pro(mask[:1], np.ones((1, 8, 8)), variant="anomalous_only"))
    # all-normal images only add normal pixels
    maps = np.zeros((2, 8, 8))
    maps[1, 2:4, 2:4] = 1.0
    assert pro(mask, maps) == pytest.approx(1.0)
    # constant maps: PRO = FPR on the diagonal -> mean over [0, 0.3] of x = 0.15
    assert pro(mask, np.ones((2, 8, 8))) == pytest.approx(0.15)
    with pytest.raises(MetricError, match="fpr_limit"):
        pro(mask, maps, fpr_limit=0.0)
    with pytest.raises(MetricError, match="variant"):
        pro(mask, maps, variant="some")


# ----------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------
def test_evaluate_image_only():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.2, 0.3, 0.9])
    row = evaluate(y, s)
    assert set(row) == set(METRIC_COLUMNS) | {"metric_variants"}
    assert row["image_auroc"] == pytest.approx(brute_auroc(y, s))
    for key in ("pixel_auroc", "pro", "accuracy"):
        assert row[key] is None
    for key in ("aupr_in", "aupr_out", "fpr95", "fpr95_openood", "detection_error"):
        assert isinstance(row[key], float)
    assert row["metric_variants"]["pro"] == "all"
    assert row["metric_variants"]["fpr95"] == "id_tpr95"
    row = evaluate(y, s, fpr95_rule="closest")
    assert row["fpr95"] == fpr95(y, s, rule="closest")
    assert row["metric_variants"]["fpr95"] == "id_tpr95_closest"


def test_evaluate_pixel_and_accuracy():
    rng = np.random.default_rng(6)
    masks = blob_masks(rng, 6, 16, 16, 3)
    maps = rng.random(masks.shape) + masks
    y = masks.reshape(6, -1).any(1).astype(int)
    row = evaluate(y, maps.max(axis=(1, 2)), masks=masks, pixel=maps, pro_variant="anomalous_only")
    assert row["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert row["pro"] == pytest.approx(reference_pro(masks[:3], maps[:3]), abs=1e-10)
    assert row["metric_variants"]["pro"] == "anomalous_only"
    # masks without any defect pixel: pixel metrics undefined -> None
    row = evaluate(y, maps.max(axis=(1, 2)), masks=np.zeros_like(masks), pixel=maps)
    assert row["pixel_auroc"] is None and row["pro"] is None
    # maps without masks -> None
    assert evaluate(y, maps.max(axis=(1, 2)), pixel=maps)["pro"] is None
    # accuracy on label-0 samples with a target >= 0 only
    labels = [0, 0, 0, 1, 1]
    pred = [1, 2, 3, 4, 5]
    targets = [1, 2, 0, 4, -1]
    row = evaluate(labels, [0, 1, 2, 3, 4], pred=pred, targets=targets)
    assert row["accuracy"] == pytest.approx(2 / 3)
    row = evaluate(labels, [0, 1, 2, 3, 4], pred=pred, targets=[-1, -1, -1, 4, 5])
    assert row["accuracy"] is None


def test_evaluate_errors():
    with pytest.raises(MetricError, match="single label"):
        evaluate([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="2 NaN and 1 infinite"):
        evaluate([0, 1, 1, 0], [np.nan, np.inf, np.nan, 0.0])
    with pytest.raises(MetricError, match="image_scores"):
        evaluate([0, 1], [0.1, 0.2, 0.3])
    masks = np.zeros((2, 4, 4))
    with pytest.raises(MetricError, match="shape"):
        evaluate([0, 1], [0.1, 0.2], masks=masks, pixel=np.zeros((2, 4, 5)))
    with pytest.raises(MetricError, match="3 labels"):
        evaluate([0, 1, 1], [0.1, 0.2, 0.3], masks=masks, pixel=np.zeros((2, 4, 4)))
    bad = np.zeros((2, 4, 4))
    bad[1, 0, 0] = np.nan
    with pytest.raises(MetricError, match="pixel maps contain 1 NaN"):
        evaluate([0, 1], [0.1, 0.2], masks=masks, pixel=bad)
    with pytest.raises(MetricError, match="pro_variant"):
        evaluate([0, 1], [0.1, 0.2], pro_variant="nope")
    with pytest.raises(MetricError, match="one entry per label"):
        evaluate([0, 1], [0.1, 0.2], pred=[1], targets=[1, 2])
