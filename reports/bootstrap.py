"""Bootstrap intervals for image-level metrics, from a row's stored ``labels`` and ``image_scores``.

A resample is a vector of per-sample counts (how often each test sample was drawn). Drawing is
stratified: ``n_pos`` anomalous / OOD samples with replacement among the anomalous ones and
``n_neg`` among the normal / ID ones, so every resample has both classes and the class ratio of the
test set. Sorting the scores once and taking cumulative sums of the counts at each distinct score
gives every resample's whole ROC curve at once (``B x K`` arrays, K = distinct scores); the
metrics below are exact functions of that curve and agree with ``metrics.image`` (sklearn) when
every count is 1. No per-resample sort, no Python loop over resamples.

The resampling path counts the draws straight into the distinct-score columns (one ``bincount``
of each drawn sample's column), so the per-column steps come out first and the curve is their
cumulative sum; the counts are integers, exact in float32, so this gives bit for bit what the
per-sample weights of ``class_counts`` through ``curves`` give (a test holds the two equal). The
curve arithmetic runs in blocks of resamples small enough to stay in the CPU cache. Test sets of
up to 2^15 samples take ``reports.bootstrap_kernel`` instead: the same arithmetic compiled, 16
resamples per SIMD pass, the same numbers bit for bit (the same test holds it equal).
"""
from __future__ import annotations

import functools
import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reports import bootstrap_kernel

#: Metrics with a bootstrap interval (image-level, computable from labels and scores alone).
BOOTSTRAP_METRICS = ("image_auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_openood", "detection_error")
N_RESAMPLES = 1000
MIN_RESAMPLES = 200
MAX_DRAWS = 10_000_000  # resamples x test samples per row; larger test sets get fewer resamples
LEVEL = 0.95
SEED = 0
CHUNK_ELEMENTS = 4_000_000  # resamples x samples drawn at once (this also fixes the order of the draws)
HELD_WINDOW = 32  # columns fpr95_openood looks ahead at once for a resample's next held score
USE_KERNEL = True  # False: the numpy path for every size (tests compare the two)
BLOCK_ELEMENTS = 200_000  # resamples x distinct scores per block of curve arithmetic (~0.8 MB of float32)


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
    distinct score, with a leading 0 (the 'flag nothing' point); ``pos_column`` / ``neg_column``:
    each positive's / negative's column (1 .. K: its score's rank among the distinct scores, in
    decreasing order; column 0 is the origin)."""

    pos_order: np.ndarray
    neg_order: np.ndarray
    pos_at: np.ndarray
    neg_at: np.ndarray
    pos_column: np.ndarray
    neg_column: np.ndarray

    @property
    def width(self) -> int:
        """Columns of a curve: the distinct scores and the origin."""
        return self.pos_at.size


def ranking(labels: np.ndarray, scores: np.ndarray) -> Ranking:
    pos, neg = scores[labels == 1], scores[labels == 0]
    pos_order, neg_order = np.argsort(-pos, kind="stable"), np.argsort(-neg, kind="stable")
    negated, column = np.unique(-scores, return_inverse=True)  # distinct scores, decreasing
    distinct = -negated
    pos_at = np.searchsorted(-pos[pos_order], -distinct, side="right")
    neg_at = np.searchsorted(-neg[neg_order], -distinct, side="right")
    column = column.reshape(-1) + 1
    return Ranking(pos_order, neg_order, np.append(0, pos_at), np.append(0, neg_at),
                   column[labels == 1], column[labels == 0])


def _cumulative(weights: np.ndarray, order: np.ndarray, at: np.ndarray) -> np.ndarray:
    out = np.zeros((weights.shape[0], order.size + 1), dtype=weights.dtype)
    np.cumsum(weights[:, order], axis=1, out=out[:, 1:])
    return out[:, at]


@dataclass
class Curves:
    """Cumulative weights at each distinct score for ``B`` weightings of one scored test set.

    ``tp[:, k]`` / ``fp[:, k]``: positive / negative weight with score >= the k-th largest distinct
    score, column 0 being the origin (nothing flagged); ``pos`` / ``neg``: the totals (``B``);
    ``tp_steps`` / ``fp_steps``: ``np.diff`` of ``tp`` / ``fp`` along the columns (the weight at each
    distinct score), computed here unless the caller has them.
    """

    tp: np.ndarray
    fp: np.ndarray
    tp_steps: np.ndarray | None = None
    fp_steps: np.ndarray | None = None

    def __post_init__(self):
        if self.tp_steps is None:
            self.tp_steps = np.diff(self.tp, axis=1)
        if self.fp_steps is None:
            self.fp_steps = np.diff(self.fp, axis=1)

    @functools.cached_property
    def flagged(self) -> np.ndarray:
        """``tp + fp``: all weight with score >= each column's (shared by the AP metrics)."""
        return self.tp + self.fp

    @property
    def pos(self) -> np.ndarray:
        return self.tp[:, -1]

    @property
    def neg(self) -> np.ndarray:
        return self.fp[:, -1]


def curves(r: Ranking, pos_weights: np.ndarray, neg_weights: np.ndarray) -> Curves:
    """The curves of ``B`` weightings (``B x n_pos`` and ``B x n_neg``, in label order)."""
    return Curves(_cumulative(pos_weights, r.pos_order, r.pos_at),
                  _cumulative(neg_weights, r.neg_order, r.neg_at))


def _column_counts(columns: np.ndarray, picks: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, cumulative): ``B x width`` float32 counts of the drawn samples (``picks``: ``B x size``
    indices into one class) at each column, the samples' ``columns`` giving where each one counts,
    and their running sums along the columns. Summed in int64 and then cast: exact either way
    (counts are integers), but numpy's float cumsum along rows is ~10x slower than its integer one."""
    n_rows = picks.shape[0]
    draws = np.take(columns, picks)
    draws += (np.arange(n_rows) * width)[:, None]
    steps = np.bincount(draws.ravel(), minlength=n_rows * width).reshape(n_rows, width)
    return steps.astype(np.float32), np.cumsum(steps, axis=1).astype(np.float32)


def resampled_curves(r: Ranking, pos_picks: np.ndarray, neg_picks: np.ndarray) -> Curves:
    """The curves of ``B`` resamples given as drawn indices (``B x n_pos`` among the positives,
    ``B x n_neg`` among the negatives): equal to ``curves`` of the draws' counts, without the
    per-sample weights (each draw is counted at its score's column, then summed along)."""
    tp_steps, tp = _column_counts(r.pos_column, pos_picks, r.width)
    fp_steps, fp = _column_counts(r.neg_column, neg_picks, r.width)
    return Curves(tp, fp, tp_steps[:, 1:], fp_steps[:, 1:])


def auroc(c: Curves) -> np.ndarray:
    """Trapezoid under the exact ROC curve (ties count one half), as roc_auc_score."""
    area = np.sum(c.fp_steps * (c.tp[:, 1:] + c.tp[:, :-1]), axis=1, dtype=np.float64)
    return area / 2.0 / (c.pos.astype(np.float64) * c.neg)


def _precision(kept: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """``kept / predicted``, 0 where ``predicted`` is 0 (so is ``kept`` there): counts are whole
    numbers, so dividing by max(predicted, 1) gives exactly that, without a masked divide."""
    return np.divide(kept, np.maximum(predicted, 1, out=predicted), out=predicted)


def aupr_out(c: Curves) -> np.ndarray:
    """AP with anomalous / OOD positive and the scores as they are: sum_k (R_k - R_{k-1}) P_k over
    thresholds falling (sklearn's step-wise average precision)."""
    terms = c.tp_steps * _precision(c.tp[:, 1:], c.flagged[:, 1:].copy())
    return np.sum(terms, axis=1, dtype=np.float64) / c.pos


def aupr_in(c: Curves) -> np.ndarray:
    """AP with normal / ID positive and the scores negated: thresholds rising from the bottom.

    At the threshold just below column ``k + 1`` (scores <= it kept) the ID weight kept is
    ``neg - fp[:, k]``, all weight kept ``pos + neg - flagged[:, k]``, and the recall step into it
    is ``fp_steps[:, k]``. The terms are summed in the order of rising thresholds (columns right to
    left), from a contiguous copy: a reduction over a reversed view may not add in that order.
    """
    id_kept = c.neg[:, None] - c.fp[:, :-1]
    terms = c.fp_steps * _precision(id_kept, (c.pos + c.neg)[:, None] - c.flagged[:, :-1])
    return np.sum(np.ascontiguousarray(terms[:, ::-1]), axis=1, dtype=np.float64) / c.neg


def fpr95(c: Curves, recall: float = 0.95) -> np.ndarray:
    """OOD weight kept (score <= t) at the smallest t keeping >= 95% of the ID weight (rule at_least)."""
    # ID weight kept grows as t falls through the columns from the right, so the smallest such t is
    # the column left of those keeping too little; counting them avoids a reversed copy
    keeps_too_little = np.count_nonzero((c.neg[:, None] - c.fp) < recall * c.neg[:, None] - 1e-6, axis=1)
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


def _next_held(c: Curves, rows: np.ndarray, column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found, next): per row of ``rows``, the first column after ``column`` at which the resample
    holds a score (a step in either count), or ``column`` itself where none follows. Looks
    ``HELD_WINDOW`` columns ahead at once and searches the rest of a row only where those are all
    empty (each is empty with probability ~1/e, so that is rare)."""
    steps = c.tp_steps.shape[1]
    ahead = column[:, None] + np.arange(HELD_WINDOW)  # step k is the step into column k + 1
    inside = ahead < steps
    ahead = np.minimum(ahead, steps - 1)
    at = rows[:, None]
    held = ((c.tp_steps[at, ahead] != 0) | (c.fp_steps[at, ahead] != 0)) & inside
    found = held.any(axis=1)
    nxt = column + 1 + held.argmax(axis=1)
    for k in np.flatnonzero(~found & (column + HELD_WINDOW < steps)):
        start = column[k] + HELD_WINDOW
        rest = np.flatnonzero((c.tp_steps[rows[k], start:] != 0) | (c.fp_steps[rows[k], start:] != 0))
        if rest.size:
            found[k], nxt[k] = True, start + 1 + rest[0]
    return found, np.where(found, nxt, column)


def fpr95_openood(c: Curves, recall: float = 0.95) -> np.ndarray:
    """ID weight flagged (score >= t) at the first ROC point whose OOD recall reaches 95%, as OpenOOD
    v1.5: ``fpr[argmax(tpr >= 0.95)]`` on ``sklearn.metrics.roc_curve`` with ``drop_intermediate``.

    sklearn drops a point whose steps to its neighbours (among the scores a resample holds) are
    equal in both counts; then the first kept point at or after it is used. So from the first point
    reaching 95%, walk forward while the step into the point equals the step out of it.
    """
    rows = np.arange(c.tp.shape[0])
    d_tp, d_fp = c.tp_steps, c.fp_steps  # [:, k]: the step into column k + 1
    # tp only grows along a row: the first column reaching 95% follows those below it
    needed = _first_count_reaching(c.pos, recall).astype(c.tp.dtype)
    point = np.count_nonzero(c.tp < needed[:, None], axis=1)  # a held column: tp rose to reach it
    # sklearn always keeps the first point: walk only where a score is held before this one
    walking = c.flagged[rows, point - 1] > 0
    while walking.any():
        at = np.flatnonzero(walking)
        here = point[at]
        found, nxt = _next_held(c, at, here)
        same = found & (d_tp[at, here - 1] == d_tp[at, nxt - 1]) & (d_fp[at, here - 1] == d_fp[at, nxt - 1])
        walking[at] = same
        point[at[same]] = nxt[same]
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
    more score vectors for one label vector), which makes a difference between them paired. Test
    sets of up to ``bootstrap_kernel.MAX_SAMPLES`` go through the compiled kernel (same numbers).
    """
    labels = np.asarray(labels)
    rankings = [ranking(labels, np.asarray(s, dtype=np.float64)) for s in score_sets]
    n_pos = int(np.sum(labels == 1))
    rng = np.random.default_rng(seed)
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, labels.size))
    out = {m: np.empty((n_resamples, len(rankings))) for m in metrics}
    compiled = USE_KERNEL and bootstrap_kernel.applies(labels.size)
    for start in range(0, n_resamples, per_chunk):
        stop = min(n_resamples, start + per_chunk)
        # the draws class_counts makes: B x size indices, positives then negatives, chunk by chunk
        pos_picks = rng.integers(0, n_pos, size=(stop - start, n_pos))
        neg_picks = rng.integers(0, labels.size - n_pos, size=(stop - start, labels.size - n_pos))
        for j, r in enumerate(rankings):
            if compiled:
                values = bootstrap_kernel.block_metrics(r.pos_column, r.neg_column, pos_picks, neg_picks, r.width)
                for m in metrics:
                    out[m][start:stop, j] = values[bootstrap_kernel.METRICS.index(m)]
                continue
            per_block = max(1, BLOCK_ELEMENTS // r.width)
            for block in range(0, stop - start, per_block):
                rows = slice(block, block + per_block)
                c = resampled_curves(r, pos_picks[rows], neg_picks[rows])
                for m in metrics:
                    out[m][start + block:start + block + c.tp.shape[0], j] = METRIC_FUNCTIONS[m](c)
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
