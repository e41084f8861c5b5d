"""Bootstrap intervals for image-level metrics, from a row's stored ``labels`` and ``image_scores``.

A resample is a vector of per-sample counts (how often each test sample was drawn). Drawing is
stratified: ``n_pos`` anomalous / OOD samples with replacement among the anomalous ones and
``n_neg`` among the normal / ID ones, so every resample has both classes and the class ratio of the
test set. Sorting the scores once and taking cumulative sums of the counts at each distinct score
gives every resample's whole ROC curve at once (``B x K`` arrays, K = distinct scores); the
metrics below are exact functions of that curve and agree with ``metrics.image`` (sklearn) when
every count is 1. No per-resample sort, no Python loop over resamples.
"""
from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Metrics with a bootstrap interval (image-level, computable from labels and scores alone).
BOOTSTRAP_METRICS = ("image_auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood", "detection_error")
N_RESAMPLES = 1000
MIN_RESAMPLES = 200
MAX_DRAWS = 10_000_000  # resamples x test samples per row; larger test sets get fewer resamples
LEVEL = 0.95
SEED = 0
CHUNK_ELEMENTS = 4_000_000  # resamples x samples per chunk (memory bound, ~32 MB of float64)


def resamples_for(n_samples: int, n_resamples: int = N_RESAMPLES) -> int:
    """1,000 resamples, fewer (not under 200) for test sets over 10,000 samples, to bound time."""
    if n_samples * n_resamples <= MAX_DRAWS:
        return n_resamples
    return max(min(MIN_RESAMPLES, n_resamples), MAX_DRAWS // max(1, n_samples))


def mean_of(distributions: list[np.ndarray]) -> np.ndarray | None:
    """Element-wise mean of bootstrap distributions (truncated to the shortest); None if any is None."""
    if not distributions or any(d is None for d in distributions):
        return None
    size = min(d.size for d in distributions)
    return np.mean(np.stack([d[:size] for d in distributions]), axis=0)


def row_seed(key: str, seed: int = SEED) -> int:
    """A seed that depends only on the row's id, so a report's intervals never depend on row order."""
    return (zlib.crc32(key.encode()) ^ seed) & 0xFFFFFFFF


def class_counts(size: int, n_resamples: int, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """``n_resamples x size`` draw counts of ``size`` draws with replacement among ``size`` items."""
    offsets = (np.arange(n_resamples) * size)[:, None]
    picks = rng.integers(0, size, size=(n_resamples, size)) + offsets
    return np.bincount(picks.ravel(), minlength=n_resamples * size).astype(dtype).reshape(n_resamples, size)


@dataclass
class Ranking:
    """One score vector sorted once. ``pos_order`` / ``neg_order``: positives / negatives by
    decreasing score; ``pos_at[k]`` / ``neg_at[k]``: how many of them score >= the k-th largest
    distinct score, with a leading 0 (the 'flag nothing' point)."""

    pos_order: np.ndarray
    neg_order: np.ndarray
    pos_at: np.ndarray
    neg_at: np.ndarray


def ranking(labels: np.ndarray, scores: np.ndarray) -> Ranking:
    pos, neg = scores[labels == 1], scores[labels == 0]
    pos_order, neg_order = np.argsort(-pos, kind="stable"), np.argsort(-neg, kind="stable")
    distinct = -np.unique(-scores)  # decreasing
    pos_at = np.searchsorted(-pos[pos_order], -distinct, side="right")
    neg_at = np.searchsorted(-neg[neg_order], -distinct, side="right")
    return Ranking(pos_order, neg_order, np.append(0, pos_at), np.append(0, neg_at))


def _cumulative(weights: np.ndarray, order: np.ndarray, at: np.ndarray) -> np.ndarray:
    out = np.zeros((weights.shape[0], order.size + 1), dtype=weights.dtype)
    np.cumsum(weights[:, order], axis=1, out=out[:, 1:])
    return out[:, at]


@dataclass
class Curves:
    """Cumulative weights at each distinct score for ``B`` weightings of one scored test set.

    ``tp[:, k]`` / ``fp[:, k]``: positive / negative weight with score >= the k-th largest distinct
    score, column 0 being the origin (nothing flagged); ``pos`` / ``neg``: the totals (``B``).
    """

    tp: np.ndarray
    fp: np.ndarray

    @property
    def pos(self) -> np.ndarray:
        return self.tp[:, -1]

    @property
    def neg(self) -> np.ndarray:
        return self.fp[:, -1]


def curves(r: Ranking, pos_weights: np.ndarray, neg_weights: np.ndarray) -> Curves:
    return Curves(_cumulative(pos_weights, r.pos_order, r.pos_at),
                  _cumulative(neg_weights, r.neg_order, r.neg_at))


def auroc(c: Curves) -> np.ndarray:
    """Trapezoid under the exact ROC curve (ties count one half), as roc_auc_score."""
    area = np.sum(np.diff(c.fp, axis=1) * (c.tp[:, 1:] + c.tp[:, :-1]), axis=1, dtype=np.float64)
    return area / 2.0 / (c.pos.astype(np.float64) * c.neg)


def _average_precision(tp: np.ndarray, fp: np.ndarray, total: np.ndarray) -> np.ndarray:
    """sum_k (R_k - R_{k-1}) P_k over thresholds in the given order (sklearn's step-wise AP);
    ``tp`` / ``fp`` start with the origin column."""
    tp_k, predicted = tp[:, 1:], tp[:, 1:] + fp[:, 1:]
    precision = np.divide(tp_k, predicted, out=np.zeros_like(tp_k), where=predicted > 0)
    return np.sum(np.diff(tp, axis=1) * precision, axis=1, dtype=np.float64) / total


def aupr_out(c: Curves) -> np.ndarray:
    """AP with anomalous / OOD positive and the scores as they are."""
    return _average_precision(c.tp, c.fp, c.pos)


def _from_below(c: Curves) -> tuple[np.ndarray, np.ndarray]:
    """(ID weight, OOD weight) with score <= t, thresholds increasing, origin column first (copied
    in that order: the metric's passes over a reversed view take several times longer)."""
    return (np.ascontiguousarray((c.neg[:, None] - c.fp)[:, ::-1]),
            np.ascontiguousarray((c.pos[:, None] - c.tp)[:, ::-1]))


def aupr_in(c: Curves) -> np.ndarray:
    """AP with normal / ID positive and the scores negated: thresholds taken from the bottom."""
    id_kept, ood_kept = _from_below(c)
    return _average_precision(id_kept, ood_kept, c.neg)


def fpr95(c: Curves, recall: float = 0.95) -> np.ndarray:
    """OOD weight kept (score <= t) at the smallest t keeping >= 95% of the ID weight (rule at_least)."""
    # ID weight kept grows as t falls through the columns from the right, so the smallest such t is
    # the column left of those keeping too little; counting them avoids a reversed copy
    keeps_too_little = np.sum((c.neg[:, None] - c.fp) < recall * c.neg[:, None] - 1e-6, axis=1)
    rows = np.arange(keeps_too_little.size)
    ood_kept = c.pos - c.tp[rows, c.tp.shape[1] - 1 - keeps_too_little]
    return ood_kept.astype(np.float64) / c.pos


def _first_count_reaching(total: np.ndarray, recall: float) -> np.ndarray:
    """Per row the smallest integer count ``t`` with ``t / total >= recall`` in float64, as sklearn
    divides: ``ceil(recall * total)`` moved by the one step rounding can put it off."""
    total = total.astype(np.float64)
    t = np.ceil(recall * total)
    t = np.where((t - 1.0) / total >= recall, t - 1.0, t)
    return np.where(t / total < recall, t + 1.0, t)


def fpr95_openood(c: Curves, recall: float = 0.95) -> np.ndarray:
    """ID weight flagged (score >= t) at the first ROC point whose OOD recall reaches 95%, as OpenOOD
    v1.5: ``fpr[argmax(tpr >= 0.95)]`` on ``sklearn.metrics.roc_curve`` with ``drop_intermediate``.

    sklearn drops a point whose steps to its neighbours (among the scores a resample holds) are
    equal in both counts; then the first kept point at or after it is used. So from the first point
    reaching 95%, walk forward while the step into the point equals the step out of it.
    """
    n_rows, width = c.tp.shape
    rows = np.arange(n_rows)
    d_tp, d_fp = np.diff(c.tp, axis=1), np.diff(c.fp, axis=1)  # [:, k]: the step into column k + 1
    steps = width - 1
    # the columns a resample holds a score at, as sorted flat indices into the steps: row r's are
    # contiguous, so "the next one after column k" is one binary search per row
    held = np.flatnonzero((d_tp != 0) | (d_fp != 0))
    row_start = rows * steps
    # tp only grows along a row: the first column reaching 95% follows those below it
    needed = _first_count_reaching(c.pos, recall).astype(c.tp.dtype)
    point = np.sum(c.tp < needed[:, None], axis=1)  # a held column: tp rose to reach it
    first_held = held[np.searchsorted(held, row_start)] - row_start + 1
    walking = first_held < point  # sklearn always keeps the first point
    while walking.any():
        i = np.searchsorted(held, row_start + point - 1, side="right")
        nxt_flat = held[np.minimum(i, held.size - 1)]
        has_next = (i < held.size) & (nxt_flat < row_start + steps)
        nxt = np.where(has_next, nxt_flat - row_start + 1, point)
        walking &= has_next & (d_tp[rows, point - 1] == d_tp[rows, nxt - 1]) \
            & (d_fp[rows, point - 1] == d_fp[rows, nxt - 1])
        point = np.where(walking, nxt, point)
    return c.fp[rows, point].astype(np.float64) / c.neg


def detection_error(c: Curves) -> np.ndarray:
    """min over operating points (with 'flag nothing') of 0.5 (1 - TPR) + 0.5 FPR."""
    return np.min(0.5 * (1.0 - c.tp / c.pos[:, None]) + 0.5 * c.fp / c.neg[:, None], axis=1)


METRIC_FUNCTIONS = {"image_auroc": auroc, "aupr_in": aupr_in, "aupr_out": aupr_out,
                    "fpr95": fpr95, "fpr95_openood": fpr95_openood, "detection_error": detection_error}


def usable(labels, scores) -> bool:
    """Both classes present, one finite score per label."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    return (labels.size > 0 and labels.size == scores.size and bool(np.all(np.isfinite(scores)))
            and 0 < int(np.sum(labels == 1)) < labels.size)


def point_metrics(labels, scores, metrics=BOOTSTRAP_METRICS) -> dict[str, float]:
    """The metrics of the test set itself (every count 1)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    n_pos = int(np.sum(labels == 1))
    c = curves(ranking(labels, scores), np.ones((1, n_pos)), np.ones((1, labels.size - n_pos)))
    return {m: float(METRIC_FUNCTIONS[m](c)[0]) for m in metrics}


def resample_metrics(labels, score_sets, metrics=BOOTSTRAP_METRICS, n_resamples: int = N_RESAMPLES,
                     seed: int = SEED) -> dict[str, np.ndarray]:
    """Bootstrap distribution of each metric: ``{metric: n_resamples x len(score_sets)}``.

    All score sets are scored on the *same* resamples of the test samples (``score_sets``: one or
    more score vectors for one label vector), which makes a difference between them paired.
    """
    labels = np.asarray(labels)
    rankings = [ranking(labels, np.asarray(s, dtype=np.float64)) for s in score_sets]
    n_pos = int(np.sum(labels == 1))
    rng = np.random.default_rng(seed)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, labels.size))
    out = {m: np.empty((n_resamples, len(rankings))) for m in metrics}
    for start in range(0, n_resamples, per_chunk):
        stop = min(n_resamples, start + per_chunk)
        pos_w = class_counts(n_pos, stop - start, rng)
        neg_w = class_counts(labels.size - n_pos, stop - start, rng)
        for j, r in enumerate(rankings):
            c = curves(r, pos_w, neg_w)
            for m in metrics:
                out[m][start:stop, j] = METRIC_FUNCTIONS[m](c)
    return out


class DistributionCache:
    """Bootstrap distributions of rows already resampled, in one ``.npz`` file of a run folder.

    Rows never change once written, so a report rebuilt after a resumed or extended run resamples
    only the new rows. An entry's key hashes everything its values depend on: the labels, the
    scores, the metrics, the resample count, the row's seed and this module's source (a change to
    the resampling invalidates every entry). A missing, truncated or corrupt file is an empty cache
    (a corrupt entry: that row is resampled); ``save`` keeps only the entries used by this build and
    replaces the file atomically.

    Memory stays flat however many rows a run has (100,000 rows are ~5 GB of distributions): the
    file is read an entry at a time when looked up, and a new entry is written at once to the
    partial file that ``save`` completes (with the used old entries) and renames; ``close`` removes
    a partial file a failed build left.
    """

    CODE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.archives: list = []
        # key -> (archive, member, metrics) of the entries on disk (this file's, then include()'s)
        self.stored: dict[str, tuple] = self._index(self.path)
        self.saved = set(self.stored)  # the keys this cache's own file holds
        self.used: set[str] = set()
        self.written: set[str] = set()  # keys already in the partial file
        self.partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        self.writer: zipfile.ZipFile | None = None
        self.misses = 0

    def _index(self, path: Path) -> dict[str, tuple]:
        entries: dict[str, tuple] = {}
        try:
            archive = zipfile.ZipFile(path)
        except Exception:  # absent, truncated, not a zip: only time is lost
            return {}  # every row is resampled and the file rewritten
        self.archives.append(archive)
        for member in archive.namelist():  # KEY/METRIC,METRIC,....npy: a row's metrics x resamples
            name = member[:-4] if member.endswith(".npy") else member
            if "/" in name:
                key, metrics = name.split("/", 1)
                entries[key] = (archive, member, tuple(metrics.split(",")))
        return entries

    def include(self, path: str | Path) -> None:
        """Also look up entries in another run's cache file (``--compare``'s run), never writing
        it; those this build uses are saved in this cache's own file."""
        for key, found in self._index(Path(path)).items():
            self.stored.setdefault(key, found)

    @classmethod
    def key(cls, labels: np.ndarray, scores: np.ndarray, metrics, n_resamples: int, seed: int) -> str:
        h = hashlib.sha256(cls.CODE.encode())
        h.update(np.ascontiguousarray(labels, dtype=np.int8).tobytes())
        h.update(np.ascontiguousarray(scores, dtype=np.float64).tobytes())
        h.update(f"{','.join(metrics)}|{n_resamples}|{seed}".encode())
        return h.hexdigest()[:32]

    @staticmethod
    def _load(where: tuple) -> dict[str, np.ndarray]:
        archive, member, metrics = where
        with archive.open(member) as f:
            values = np.lib.format.read_array(f, allow_pickle=False)
        if values.ndim != 2 or values.shape[0] != len(metrics):
            raise ValueError(f"{member}: shape {values.shape} for {len(metrics)} metrics")
        return dict(zip(metrics, values))

    def get(self, key: str, metrics) -> dict[str, np.ndarray] | None:
        found = self.stored.get(key)
        if found is None or any(m not in found[2] for m in metrics):
            self.misses += 1
            return None
        try:
            values = self._load(found)
        except Exception:  # a damaged entry: resampled (and rewritten) like a missing one
            self.stored.pop(key, None)
            self.misses += 1
            return None
        self.used.add(key)
        return values

    def put(self, key: str, distributions: dict[str, np.ndarray]) -> None:
        """Record a new entry: written now to the partial file (kept out of memory)."""
        self._write(key, distributions)
        self.used.add(key)

    def _write(self, key: str, distributions: dict[str, np.ndarray]) -> None:
        try:
            if self.writer is None:
                self.writer = zipfile.ZipFile(self.partial, "w", zipfile.ZIP_STORED, allowZip64=True)
            metrics = tuple(distributions)
            member = f"{key}/{','.join(metrics)}.npy"
            write_member(self.writer, member, np.stack([distributions[m] for m in metrics]))
        except BaseException:  # a full disk, Ctrl-C, SIGTERM: the old file stays, no partial one
            self.close()
            raise
        self.written.add(key)
        self.stored[key] = (self.writer, member, metrics)  # later lookups in this build read it back

    def save(self) -> None:
        if self.misses == 0 and self.used == self.saved and self.writer is None:
            return  # nothing new, nothing dropped (entries only included from another file are not kept)
        try:
            for key in sorted(self.used - self.written):  # the old entries this build used
                self._write(key, self._load(self.stored[key]))
            if self.writer is None:  # nothing used at all: an empty cache file
                self.writer = zipfile.ZipFile(self.partial, "w", zipfile.ZIP_STORED, allowZip64=True)
            self.writer.close()
            self.writer = None
            os.replace(self.partial, self.path)
            for archive in self.archives:
                archive.close()
            self.archives, self.written, self.misses = [], set(), 0
            self.stored = self._index(self.path)  # entries now read from the saved file
            self.saved = set(self.stored)
        except BaseException:  # a full disk, Ctrl-C, SIGTERM: the old file stays, no partial one
            self.close()
            raise

    def close(self) -> None:
        """Close the files; a partial file not saved is removed (the old cache file stays)."""
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass
            self.writer = None
        self.partial.unlink(missing_ok=True)
        for archive in self.archives:
            archive.close()
        self.archives = []


def write_member(archive: zipfile.ZipFile, name: str, value: np.ndarray) -> None:
    """One array as an ``.npy`` member, as ``np.savez`` writes it (the file reads with ``np.load``)."""
    with archive.open(name, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution (NaN if it has NaNs or is empty)."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.size == 0 or np.isnan(samples).any():
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)
