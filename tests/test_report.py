"""The report stage (reports/): hand-made results folders written with RowStore.write (failed and
timed-out cells, several seeds, a method with no paper number, sample_maps blobs), checked number
by number, plus the bootstrap against sklearn, the paper-number matching rule and --compare."""
from __future__ import annotations

import io
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from orchestrator.grid import short_hash
from orchestrator.store import RowStore

# ---------------------------------------------------------------- hand-made runs

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
PATCHCORE_PARAMS = {"backbone": "wide_resnet50_2", "layers": ["layer2", "layer3"], "coreset_ratio": 0.1,
                    "crop": 224, "image_size": 256, "pretrained": True, "patch_size": 3,
                    "pretrain_embed_dim": 1024, "target_embed_dim": 1024}


def scores_with_auroc(rng, n_pos: int, n_neg: int, shift: float) -> tuple[list[int], list[float]]:
    """Labels (positives first) and scores: normal noise plus ``shift`` for the positives."""
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    scores = rng.normal(size=n_pos + n_neg) + shift * labels
    return labels.tolist(), scores.tolist()


def sample_blob(rng, with_masks: bool = True) -> bytes:
    k = 4
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    images = np.stack([np.stack([yy, xx, 0.5 * (yy + xx)], axis=-1)] * k) * 200 + rng.integers(0, 40, (k, 64, 64, 3))
    blob = np.exp(-(((yy - 0.47) ** 2 + (xx - 0.47) ** 2) / 0.02))
    maps = np.stack([blob * (1.0 if i < 2 else 0.1) for i in range(k)]) + 0.05 * rng.random((k, 64, 64))
    out = {"images": images.astype(np.uint8), "maps": maps.astype(np.float16),
           "labels": np.array([1, 1, 0, 0], np.int8)}
    if with_masks:
        masks = np.zeros((k, 64, 64), bool)
        masks[:2, 20:40, 20:40] = True
        out["masks"] = masks
    buf = io.BytesIO()
    np.savez_compressed(buf, **out)
    return buf.getvalue()


def make_row(method: str, dataset: str, protocol: str, normal_class: str, seed: int, *, run_id: str = "run",
             params: dict | None = None, status: str = "ok", shift: float = 2.0, n: tuple[int, int] = (30, 30),
             category: str | None = None, ood_set: str | None = None, maps: bool = False,
             pixel_auroc: float | None = None, scores: tuple | None = None, fit_s: float = 1.0,
             rng=None, minute: int = 0) -> dict:
    """One row in the store's schema; metrics computed from the generated scores."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    params = params or {}
    identity = {"method": method, "params": params, "dataset": dataset, "protocol": protocol,
                "normal_class": normal_class, "seed": seed}
    base_id = short_hash(identity)
    sub = category or ood_set
    row = {"run_id": run_id, "cell_id": base_id if sub is None else short_hash([identity, sub]),
           "base_cell_id": base_id, "method": method, "params": json.dumps(params, sort_keys=True),
           "dataset": dataset, "dataset_params": "{}", "protocol": protocol, "normal_class": normal_class,
           "category": category, "ood_set": ood_set, "seed": seed, "status": status, "attempt": 1,
           "resolved_params": json.dumps(params, sort_keys=True), "hostname": "testhost", "device": "cpu",
           "git_sha": "abc123", "started_at": T0 + timedelta(minutes=minute),
           "finished_at": T0 + timedelta(minutes=minute, seconds=30), "fit_s": fit_s, "score_s": 0.5,
           "total_s": fit_s + 0.6, "peak_rss_bytes": 2 << 30, "peak_gpu_bytes": 0, "feature_cache_hit": seed > 0,
           "loss_curve": [], "labels": [], "image_scores": []}
    if status != "ok":
        row.update(error=f"RuntimeError: {method} broke on {normal_class}", traceback="Traceback ...")
        return row
    labels, values = scores if scores is not None else scores_with_auroc(rng, n[0], n[1], shift)
    row.update(labels=labels, image_scores=values, image_auroc=float(roc_auc_score(labels, values)),
               n_test=len(labels), n_train=100)
    if pixel_auroc is not None:
        row["pixel_auroc"] = pixel_auroc
    if maps:
        row["sample_maps"] = sample_blob(rng)
    return row


def write_rows(run_dir: Path, rows: list[dict]) -> Path:
    store = RowStore(run_dir)
    by_cell: dict[str, list[dict]] = {}
    for r in rows:
        by_cell.setdefault(r["base_cell_id"], []).append(r)
    for cell_id, cell_rows in by_cell.items():
        assert store.write(cell_id, cell_rows)
    return run_dir


def main_run_rows() -> list[dict]:
    """MVTec bottle + cable (patchcore with maps and pixel AUROC, noop without a reference),
    3 seeds, a failed and a timed-out cell; CIFAR-10 'cat' (dsvdd, above its paper number)."""
    rows = []
    for seed in (0, 1, 2):
        rows.append(make_row("patchcore", "mvtec", "one_class", "bottle", seed, params=PATCHCORE_PARAMS,
                             shift=12.0, maps=True, pixel_auroc=0.98 + 0.001 * seed, minute=seed))
        if seed < 2:
            rows.append(make_row("patchcore", "mvtec", "one_class", "cable", seed, params=PATCHCORE_PARAMS,
                                 shift=1.2, maps=True, pixel_auroc=0.90, minute=seed))
        else:
            rows.append(make_row("patchcore", "mvtec", "one_class", "cable", seed, params=PATCHCORE_PARAMS,
                                 status="failed", minute=seed))
        for cls in ("bottle", "cable"):
            status = "timeout" if (cls, seed) == ("bottle", 1) else "ok"
            rows.append(make_row("noop", "mvtec", "one_class", cls, seed, status=status, shift=0.0,
                                 fit_s=0.01, minute=seed))
        rows.append(make_row("dsvdd", "cifar10", "one_class", "cat", seed, params={"objective": "one-class"},
                             shift=1.3, n=(60, 60), minute=10 + seed))
    return rows


def built(tmp_path_factory, name: str, rows: list[dict], **kwargs) -> Path:
    from reports.leaderboard import build_report

    run = write_rows(tmp_path_factory.mktemp(name) / name, rows)
    return build_report(run, **kwargs)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return built(tmp_path_factory, "alpha", main_run_rows())


def board(report: Path, board: str, metric: str) -> pd.DataFrame:
    table = pd.read_parquet(report / "leaderboard.parquet")
    return table[(table["board"] == board) & (table["metric"] == metric)]


def cell(table: pd.DataFrame, variant: str, column: str) -> pd.Series:
    hit = table[(table["variant"] == variant) & (table["column"] == column)]
    assert len(hit) == 1, (variant, column, hit)
    return hit.iloc[0]


def measured(rows: list[dict], method: str, cls: str, metric: str = "image_auroc") -> np.ndarray:
    return np.array([r[metric] for r in rows if r["method"] == method and r["normal_class"] == cls
                     and r["status"] == "ok"])


# ---------------------------------------------------------------- bootstrap

def independent_metrics(labels, scores) -> dict:
    from metrics import image

    return {m: getattr(image, m)(labels, scores) for m in ("image_auroc", "aupr_in", "aupr_out", "fpr95",
                                                           "fpr95_openood", "detection_error")}


@pytest.mark.parametrize("n, ties", [(9, False), (40, True), (301, False), (120, True)])
def test_curve_metrics_equal_sklearn_and_explicit_resamples(n, ties):
    from reports import bootstrap as b

    rng = np.random.default_rng(n)
    labels = (rng.random(n) < 0.35).astype(int)
    labels[:2] = [1, 0]
    scores = rng.normal(size=n) + labels
    if ties:
        scores = np.round(scores, 1)
    point = b.point_metrics(labels, scores)
    assert point == pytest.approx(independent_metrics(labels, scores), abs=1e-12)
    # a resample as counts gives what the metric gives on the explicitly repeated samples
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    pos_w = b.class_counts(pos.size, 3, rng, np.float64)
    neg_w = b.class_counts(neg.size, 3, rng, np.float64)
    curves = b.curves(b.ranking(labels, scores), pos_w, neg_w)
    for i in range(3):
        idx = np.r_[np.repeat(pos, pos_w[i].astype(int)), np.repeat(neg, neg_w[i].astype(int))]
        want = independent_metrics(labels[idx], scores[idx])
        got = {m: float(f(curves)[i]) for m, f in b.METRIC_FUNCTIONS.items()}
        assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("n, frac, ties, n_resamples, block", [
    (719, 0.9, False, 1000, None), (40, 0.35, True, 300, None), (301, 0.5, "all", 200, 7),
    (12_000, 0.5, True, 700, None), (30, 0.05, False, 50, 1), (40_000, 0.3, False, 120, None)])
@pytest.mark.parametrize("compiled", [True, False], ids=["kernel", "numpy"])
def test_resampling_counts_into_columns_exactly_as_the_per_sample_weights_do(monkeypatch, n, frac, ties,
                                                                               n_resamples, block, compiled):
    """resample_metrics gives bit for bit what the plain path gives (class_counts' weights of the
    same draws, chunk by chunk, through curves and the metrics), both through the compiled kernel
    (16 resamples per SIMD pass; up to 2^15 samples) and through the numpy path (draws counted
    straight into the distinct-score columns, curve arithmetic in cache-sized blocks). 12,000
    samples: several chunks of draws; 40,000: past both the kernel and the exact sparse sums."""
    from reports import bootstrap as b
    from reports import bootstrap_kernel

    if compiled and bootstrap_kernel.numba is None:
        pytest.skip("numba is not installed: the numpy path only")
    monkeypatch.setattr(b, "USE_KERNEL", compiled)
    if block is not None:
        monkeypatch.setattr(b, "BLOCK_ELEMENTS", block * (n + 1))  # blocks of `block` resamples
    rng = np.random.default_rng(n)
    labels = (rng.random(n) < frac).astype(np.int8)
    labels[:2] = [1, 0]
    score_sets = [rng.normal(size=n) + labels for _ in range(2)]
    if ties:
        score_sets = [np.round(s, 1 if ties is True else 0) for s in score_sets]
    got = b.resample_metrics(labels, score_sets, b.BOOTSTRAP_METRICS, n_resamples, seed=3)

    draws = np.random.default_rng(3)
    n_pos = int(labels.sum())
    per_chunk = max(1, b.CHUNK_ELEMENTS // n)
    want = {m: np.empty((n_resamples, 2)) for m in b.BOOTSTRAP_METRICS}
    for start in range(0, n_resamples, per_chunk):
        stop = min(n_resamples, start + per_chunk)
        pos_w, neg_w = b.class_counts(n_pos, stop - start, draws), b.class_counts(n - n_pos, stop - start, draws)
        for j, scores in enumerate(score_sets):
            c = b.curves(b.ranking(labels, scores), pos_w, neg_w)
            for m, f in b.METRIC_FUNCTIONS.items():
                want[m][start:stop, j] = f(c)
    assert n != 12_000 or n_resamples > per_chunk  # that case spans chunks; 40,000: past the exact sums
    for m in b.BOOTSTRAP_METRICS:
        assert np.array_equal(got[m], want[m], equal_nan=True), m


def test_openood_fpr95_drops_the_point_inside_a_straight_roc_run_as_sklearn_does():
    from metrics import image
    from reports import bootstrap as b

    # 17 OOD on top, then three (OOD, ID) ties: the point reaching 95% OOD recall (0.5) lies inside
    # a run of equal steps, so roc_curve drops it and OpenOOD reads the next point (0.4): 3/10, not 2/10
    scores = np.r_[np.linspace(2.0, 1.0, 17), [0.6, 0.6, 0.5, 0.5, 0.4, 0.4], np.linspace(0.0, -1.0, 7)]
    labels = np.r_[np.ones(17), [1, 0, 1, 0, 1, 0], np.zeros(7)].astype(int)
    assert image.fpr95_openood(labels, scores) == pytest.approx(0.3)
    assert b.point_metrics(labels, scores, ("fpr95_openood",))["fpr95_openood"] == pytest.approx(0.3)
    # a resample drawing the 0.5 pair twice and the 0.6 OOD never breaks the run: 0.5 is kept, 3 of 11 ID
    pos_w, neg_w = np.ones((1, 20)), np.ones((1, 10))
    pos_w[0, 18], neg_w[0, 1], pos_w[0, 17] = 2, 2, 0
    got = b.fpr95_openood(b.curves(b.ranking(labels, scores), pos_w, neg_w))[0]
    idx = np.r_[np.repeat(np.flatnonzero(labels == 1), pos_w[0].astype(int)),
                np.repeat(np.flatnonzero(labels == 0), neg_w[0].astype(int))]
    assert got == pytest.approx(3 / 11) == image.fpr95_openood(labels[idx], scores[idx])


def test_bootstrap_is_seeded_stratified_and_covers_the_estimate():
    from reports import bootstrap as b

    rng = np.random.default_rng(0)
    labels, scores = scores_with_auroc(rng, 50, 50, 1.0)
    one = b.resample_metrics(labels, [scores], ("image_auroc",), 500, seed=7)["image_auroc"][:, 0]
    two = b.resample_metrics(labels, [scores], ("image_auroc",), 500, seed=7)["image_auroc"][:, 0]
    assert np.array_equal(one, two) and one.size == 500
    low, high = b.percentile_interval(one)
    assert low < roc_auc_score(labels, scores) < high and 0.05 < high - low < 0.3
    counts = b.class_counts(50, 4, rng)
    assert (counts.sum(axis=1) == 50).all()  # each class keeps its size in every resample
    assert b.resamples_for(100) == 1000 and b.resamples_for(50_000) == 200
    assert b.row_seed("abc") == b.row_seed("abc") != b.row_seed("abd")


def cached(rows, n_resamples, cache):
    """row_distributions with a cache, saved as a report build saves it."""
    from reports import tables

    out = tables.row_distributions(rows, n_resamples, cache)
    cache.save()
    return out


def test_a_rebuilt_report_resamples_only_rows_the_cache_does_not_hold(tmp_path, monkeypatch):
    """The cache gives exactly what resampling gives; a new or changed row is resampled, a row that
    left the run is dropped from the file, and a corrupt file is a cold cache, not an error."""
    from reports import bootstrap as b
    from reports import tables
    from reports.rows import annotate

    calls = []
    real = tables.resample_metrics
    monkeypatch.setattr(tables, "resample_metrics", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = [make_row("padim", "mvtec", "one_class", c, seed) for c in ("bottle", "cable") for seed in (0, 1)]
    frame = annotate(pd.DataFrame(rows))
    path = tmp_path / ".bootstrap-cache.npz"
    cold = tables.row_distributions(frame, 300)
    first = cached(frame, 300, b.DistributionCache(path))
    assert len(calls) == 8 and path.is_file()
    warm = cached(frame, 300, b.DistributionCache(path))
    assert len(calls) == 8  # nothing resampled
    for cell_id, dists in cold.items():
        assert set(dists) == set(warm[cell_id]) == {"image_auroc"}
        assert np.array_equal(dists["image_auroc"], warm[cell_id]["image_auroc"])
        assert np.array_equal(first[cell_id]["image_auroc"], warm[cell_id]["image_auroc"])
    changed = [dict(r) for r in rows[:3]]
    changed[0]["image_scores"] = list(np.asarray(changed[0]["image_scores"]) * 2.0 + 1.0)  # ranks kept
    cached(annotate(pd.DataFrame(changed)), 300, b.DistributionCache(path))
    assert len(calls) == 9  # only the changed row
    with np.load(path) as archive:
        assert len(archive.files) == 3  # the build's 3 rows; the fourth is gone
    fewer = cached(frame, 200, b.DistributionCache(path))
    assert len(calls) == 13 and {v["image_auroc"].size for v in fewer.values()} == {200}  # another entry
    path.write_bytes(path.read_bytes()[:100])  # truncated
    again = cached(frame, 300, b.DistributionCache(path))
    assert len(calls) == 17 and all(np.array_equal(again[k]["image_auroc"], v["image_auroc"]) for k, v in cold.items())
    cached(frame, 300, b.DistributionCache(path))
    assert len(calls) == 17  # and the rewritten file is whole again


def test_a_cache_save_that_fails_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    from reports import bootstrap as b
    from reports.rows import annotate

    frame = annotate(pd.DataFrame([make_row("padim", "mvtec", "one_class", "bottle", 0)]))
    path = tmp_path / ".bootstrap-cache.npz"
    cached(frame, 300, b.DistributionCache(path))
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C or SIGTERM while the file is written

    monkeypatch.setattr(b, "write_member", interrupted)
    with pytest.raises(KeyboardInterrupt):  # while a new entry is written (200 resamples: a new key)
        cached(frame, 200, b.DistributionCache(path))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    real, calls = b.np.lib.format.write_array, []

    def second_fails(*args, **kwargs):  # the new entry goes in, copying the old one is interrupted
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.undo()
    two = annotate(pd.DataFrame([make_row("padim", "mvtec", "one_class", c, 0) for c in ("bottle", "cable")]))
    monkeypatch.setattr(b.np.lib.format, "write_array", second_fails)
    cache = b.DistributionCache(path)
    with pytest.raises(KeyboardInterrupt):
        cached(two, 300, cache)
    assert len(calls) == 2 and cache.writer is None
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [path.name]


# ---------------------------------------------------------------- matching paper numbers

def test_class_keys_map_names_to_the_indices_the_reference_file_uses():
    from reports.expected import class_key, expected_class_key

    assert class_key("cifar10", "cat") == "3" == expected_class_key("cifar10", "3")
    assert class_key("cifar10", "deer+airplane+automobile+bird+cat") == expected_class_key("cifar10", "0-1-2-3-4")
    assert class_key("cifar10", "0+1+2+3+4") == "0+1+2+3+4"
    assert class_key("fashion_mnist", "T-shirt/top") == "0" and class_key("fashion_mnist", "Ankle boot") == "9"
    assert class_key("mvtec", "metal_nut") == "metal_nut" and class_key("mvtec", "Mean") == "mean"


def test_class_names_are_one_list_shared_by_the_datasets_and_the_report():
    """data/class_names.py is the one list: the dataset modules and the report hold the very same
    tuples, they agree with torchvision's own lists, and the report reads them without torch."""
    import subprocess
    import sys

    import data.class_names as names
    from data import DATASETS
    from reports.expected import FULL_CLASSES, INDEXED_CLASSES

    assert DATASETS["cifar10"].CLASSES is names.CIFAR10_CLASSES is INDEXED_CLASSES["cifar10"]
    assert DATASETS["fashion_mnist"].CLASSES is names.FASHION_MNIST_CLASSES is INDEXED_CLASSES["fashion_mnist"]
    assert DATASETS["mnist"].CLASSES is names.DIGITS is INDEXED_CLASSES["mnist"] is INDEXED_CLASSES["svhn"]
    assert DATASETS["mvtec"].declared_classes is names.MVTEC_CATEGORIES is FULL_CLASSES["mvtec"]
    from torchvision.datasets import FashionMNIST

    assert names.FASHION_MNIST_CLASSES == tuple(FashionMNIST.classes) and names.DIGITS == tuple("0123456789")
    code = ("import sys; import reports.expected, reports.leaderboard; "
            "print(sorted(m for m in ('torch', 'torchvision', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "[]", out


def test_expected_csv_is_data_with_a_source_for_every_number():
    from reports.expected import ALL_COLUMNS, load_expected

    table = load_expected()
    assert list(pd.read_csv(Path(__file__).parents[1] / "reports" / "expected.csv").columns) == ALL_COLUMNS
    assert table["source"].str.strip().str.len().gt(10).all()
    assert table["value"].between(0, 1).all() and len(table) > 300
    assert (table["source_kind"] != "").all()                     # every number says what produced it


def pick(method, dataset, protocol, key, metric, params=None, ood_sets=None, expected=None):
    """(value, setting, differences) of the reference a run with ``params`` is compared with, or None."""
    from reports.expected import by_key, candidates, choose, load_expected

    index = by_key(expected if expected is not None else load_expected())
    ref, differs = choose(candidates(index, method, dataset, protocol, key, metric), params or {}, dataset, ood_sets)
    return None if ref is None else (round(float(ref["value"]), 4), ref["setting"], differs)


def test_the_setting_that_matches_the_run_wins():
    value, setting, differs = pick("patchcore", "mvtec", "one_class", "mean", "image_auroc", PATCHCORE_PARAMS)
    assert value == 0.9916 and "coreset 10%" in setting and differs == []   # the repo's own results.csv
    value, setting, differs = pick("patchcore", "mvtec", "one_class", "mean", "image_auroc",
                                   {**PATCHCORE_PARAMS, "coreset_ratio": 0.01})
    assert (value, setting, differs) == (0.99, "PatchCore-1% WRN50 224px paper", [])
    params = {"backbone": "wide_resnet50_2", "k": 100, "layers": ["layer1", "layer2", "layer3"]}
    assert pick("orthoad", "mvtec", "one_class", "mean", "pixel_auroc", params)[1] == "WRN50-2 k=100 (paper table)"
    assert pick("orthoad", "mvtec", "one_class", "mean", "pixel_auroc",
                {**params, "backbone": "resnet18"})[1] == "ResNet-18 k=100 (paper table)"
    # the paper's number beats a reproduction when nothing else tells them apart
    assert pick("kdad", "cifar10", "one_class", "3", "image_auroc")[0] == 0.7702
    # UniAD's CIFAR-10 numbers are one_class cells with a normal class set (the grid's [[0, 1, 2, 3, 4]])
    from reports.expected import class_key

    key = class_key("cifar10", "airplane+automobile+bird+cat+deer")
    assert pick("uniad", "cifar10", "one_class", key, "image_auroc")[0] == 0.844
    assert pick("uniad", "cifar10", "one_class", "mean", "image_auroc")[0] == 0.865


def test_a_stated_column_that_differs_is_named_and_an_unstated_one_never_blocks():
    # every PatchCore number states its coreset: at 5% each differs; the closest is shown, named
    value, setting, differs = pick("patchcore", "mvtec", "one_class", "mean", "image_auroc",
                                   {**PATCHCORE_PARAMS, "coreset_ratio": 0.05})
    assert differs == ["coreset_ratio: 0.05 vs 0.1"] and value == 0.9916
    # the weights: a run recording timm's racm weights is not the official torchvision run
    value, setting, differs = pick("patchcore", "mvtec", "one_class", "bottle", "image_auroc",
                                   {**PATCHCORE_PARAMS, "pretrained_tag": "racm_in1k"})
    assert differs == ["weights: racm_in1k vs tv_in1k"]
    # OrthoAD's README numbers state no backbone: any backbone is compared with them
    assert pick("orthoad", "mvtec", "one_class", "mean", "pro", {"backbone": "efficientnet_b5"})[2] == []
    # a variant the run does not have (an ensemble, a patch-level model) is never taken for it
    cutpaste = {"variant": "3way", "backbone": "resnet18", "pretrained": False, "image_size": 256}
    value, setting, differs = pick("cutpaste", "mvtec", "one_class", "carpet", "image_auroc", cutpaste)
    assert differs == [] and "Ensemble" not in setting
    assert pick("cutpaste", "mvtec", "one_class", "carpet", "pixel_auroc", cutpaste)[2] == ["level: — vs patch"]
    # no crop keeps the whole frame: a crop of the image size
    assert pick("patchcore", "mvtec", "one_class", "bottle", "image_auroc",
                {**PATCHCORE_PARAMS, "image_size": 224, "crop": None})[2] == ["image_size: 224 vs 256"]


def test_status_setting_differs_wins_over_the_numbers():
    from reports.expected import status_of

    assert status_of(0.95, 0.95, 1.0, ["weights: tv_in1k vs racm_in1k"]) == "setting differs"
    assert status_of(0.95, 0.95, 1.0, []) == "reproduced" and status_of(float("nan"), 0.9, 1.0, ["x"]) == "no reference"


def test_ood_references_follow_openood_groups():
    assert pick("msp", "cifar10", "ood", "mean", "image_auroc", ood_sets={"svhn", "dtd"})[0] == 0.9073
    assert pick("msp", "cifar10", "ood", "mean", "image_auroc", ood_sets={"cifar100"})[0] == 0.8803
    assert pick("msp", "cifar10", "ood", "mean", "image_auroc", ood_sets={"cifar100", "svhn"}) is None
    assert pick("msp", "cifar10", "ood", "mean", "accuracy", ood_sets={"cifar100", "svhn"})[0] == 0.9506


FCDD_FMNIST = {"net": "cnn28_w", "epochs": 400, "lr": 0.01}


def test_a_reference_trained_on_other_anomalies_is_never_judged_against():
    """FCDD's Fashion-MNIST numbers use outlier exposure: a confetti run is shown the closest number
    with ``setting differs`` naming the anomaly source, never a verdict (the columns' rule 5)."""
    for source in ("confetti", "none", "semi"):
        params = {**FCDD_FMNIST, "anomaly_source": source}
        for key in ("0", "mean"):
            value, setting, differs = pick("fcdd", "fashion_mnist", "one_class", key, "image_auroc", params)
            assert differs == [f"anomaly_source: {source} vs oe"]
    value, setting, differs = pick("fcdd", "fashion_mnist", "one_class", "0", "image_auroc",
                                   {**FCDD_FMNIST, "anomaly_source": "oe", "oe_dataset": "cifar100"})
    assert value == 0.82 and setting.startswith("paper number; WITH outlier exposure") and differs == []
    # outlier exposure from another set: only the reproduction that used that set, or none compared
    value, setting, differs = pick("fcdd", "fashion_mnist", "one_class", "0", "image_auroc",
                                   {**FCDD_FMNIST, "anomaly_source": "oe", "oe_dataset": "emnist"})
    assert value == 0.8192 and "EMNIST" in setting and differs == []
    assert pick("fcdd", "fashion_mnist", "one_class", "0", "image_auroc",
                {**FCDD_FMNIST, "anomaly_source": "oe", "oe_dataset": "mnist"})[2] == ["oe_dataset: mnist vs cifar100"]
    # the AE baseline states anomaly source none, and its runs record none
    assert pick("fcdd_ae", "fashion_mnist", "one_class", "mean", "image_auroc",
                {"epochs": 400, "anomaly_source": "none", "net": "ae28"})[::2] == (0.82, [])
    # FCDD's unsupervised MVTec-AD numbers (confetti noise) are not a semi-supervised run's
    assert pick("fcdd", "mvtec", "one_class", "mean", "pixel_auroc", {"anomaly_source": "confetti"})[::2] == (0.92, [])
    assert pick("fcdd", "mvtec", "one_class", "mean", "pixel_auroc",
                {"anomaly_source": "semi"})[2] == ["anomaly_source: semi vs confetti"]


def test_a_board_says_which_setting_differs_instead_of_a_verdict():
    from reports.expected import INDEXED_CLASSES, load_expected
    from reports.rows import annotate
    from reports.tables import leaderboards, reproduction

    def board_mean(source, **oe):
        rows = annotate(pd.DataFrame([make_row("fcdd", "fashion_mnist", "one_class", c, 0, n=(10, 10),
                                               params={**FCDD_FMNIST, "anomaly_source": source, **oe})
                                      for c in INDEXED_CLASSES["fashion_mnist"]]))
        table = leaderboards(rows, load_expected(), 1.0, {})
        table = table[table["metric"] == "image_auroc"]
        variant = table["variant"].iloc[0]
        return table, table[table["variant"] == variant], cell(table, variant, "mean")

    table, classes, mean = board_mean("confetti")
    assert (classes["status"] == "setting differs").all() and classes["expected"].notna().all()
    assert mean["differs"] == "anomaly_source: confetti vs oe" and mean["status"] == "setting differs"
    repro = reproduction(table, load_expected()).iloc[0]
    assert (repro["status"], repro["setting_differs"], repro["reproduced"] + repro["below"] + repro["above"]) == (
        "setting differs", 10, 0)
    table, classes, mean = board_mean("oe", oe_dataset="cifar100")
    assert mean["expected"] == 0.89 and classes["expected"].notna().all() and pd.isna(mean["differs"])
    assert mean["status"] in ("reproduced", "below", "above")
    table, classes, mean = board_mean("oe", oe_dataset="svhn")
    assert mean["differs"] == "oe_dataset: svhn vs cifar100" and mean["status"] == "setting differs"


def test_added_numbers_join_the_files_and_a_malformed_file_names_its_line(tmp_path):
    from reports.expected import ExpectedFileError, load_expected

    mine = tmp_path / "mine.csv"
    mine.write_text("method,dataset,protocol,normal_class,metric,value,setting,source,source_kind,backbone\n"
                    "noop,digits,one_class,0,image_auroc,0.5,chance,my lab's rerun,reproduction,\n")
    table = load_expected(extra=[mine])
    assert len(table) == len(load_expected()) + 1
    assert pick("noop", "digits", "one_class", "0", "image_auroc", expected=table)[0] == 0.5
    for line, problem in (("noop,digits,one_class,0,image_auroc,high,x,y,paper,", "value 'high' is not a number"),
                          ("noop,digits,one_class,0,image_auroc,0.5,x,y,preprint,", "source_kind 'preprint'"),
                          ("noop,digits,one_class,0,fpr95,0.5,x,y,paper,", "needs its fpr_convention"),
                          ("noop,digits,one_class,0,image_auroc,0.5,x,,paper,", "source is empty")):
        bad = tmp_path / "bad.csv"
        bad.write_text(mine.read_text() + line + "\n")
        with pytest.raises(ExpectedFileError, match=rf"bad.csv line 3: .*{re.escape(problem)}"):
            load_expected(extra=[bad])
    typo = tmp_path / "typo.csv"
    typo.write_text("method,dataset,protocol,normal_class,metric,value,setting,source,backbon\n")
    with pytest.raises(ExpectedFileError, match=r"unknown columns \['backbon'\]"):
        load_expected(extra=[typo])
    # OpenOOD's FPR95 (OOD positive) is compared with fpr95_openood, the ID-positive one with fpr95
    fpr = tmp_path / "fpr.csv"
    fpr.write_text("method,dataset,protocol,normal_class,metric,value,setting,source,fpr_convention\n"
                   "msp,cifar10,ood,all,fpr95,0.3,x,OpenOOD v1.5,ood_positive\n"
                   "msp,cifar10,ood,all,fpr95,0.4,x,an older paper,id_positive\n")
    both = load_expected(fpr, extra=[])
    assert dict(zip(both["metric"], both["value"])) == {"fpr95_openood": 0.3, "fpr95": 0.4}


def test_status_within_tolerance_below_above():
    from reports.expected import status_of

    assert status_of(0.985, 0.99, 1.0) == "reproduced" and status_of(0.98, 0.99, 1.0) == "reproduced"
    assert status_of(0.97, 0.99, 1.0) == "below" and status_of(0.97, 0.99, 2.5) == "reproduced"
    assert status_of(0.999, 0.98, 1.0) == "above" and status_of(0.9, float("nan"), 1.0) == "no reference"


def test_columns_for_unified_and_ood_rows():
    from reports.rows import annotate

    rows = pd.DataFrame([
        make_row("uniad", "mvtec", "unified", "all", 0, category="bottle"),
        make_row("uniad", "mvtec", "unified", "all", 0, category="cable"),
        make_row("msp", "cifar10", "ood", "all", 0, ood_set="svhn"),
        make_row("padim", "mvtec", "one_class", "bottle", 0, params={"backbone": "resnet18"}),
        make_row("padim", "mvtec", "one_class", "bottle", 0, params={"backbone": "wide_resnet50_2"}),
    ])
    out = annotate(rows)
    assert out["column"].tolist() == ["bottle", "cable", "svhn", "bottle", "bottle"]
    assert out["variant"].tolist()[3:] == ["padim (backbone=resnet18)", "padim (backbone=wide_resnet50_2)"]
    assert out["variant"].tolist()[:3] == ["uniad", "uniad", "msp"]


# ---------------------------------------------------------------- the report of a hand-made run

def test_leaderboard_numbers_seeds_and_statuses(report):
    rows = main_run_rows()
    table = board(report, "mvtec", "image_auroc")
    bottle, cable = cell(table, "patchcore", "bottle"), cell(table, "patchcore", "cable")
    values = measured(rows, "patchcore", "bottle")
    assert bottle["seeds"] == 3 and bottle["mean"] == pytest.approx(values.mean())
    assert bottle["std"] == pytest.approx(values.std(ddof=1))
    assert (bottle["expected"], bottle["status"]) == (1.0, "reproduced")
    assert "patchcore-inspection" in bottle["source"] and "coreset 10%" in bottle["setting"]
    values = measured(rows, "patchcore", "cable")
    assert cable["seeds"] == 2 and cable["mean"] == pytest.approx(values.mean())   # the failed seed is out
    assert cable["expected"] == pytest.approx(0.9968) and cable["status"] == "below"
    assert cable["diff"] == pytest.approx(values.mean() - 0.9968)
    mean = cell(table, "patchcore", "mean")
    assert mean["mean"] == pytest.approx((bottle["mean"] + cable["mean"]) / 2)
    per_seed = [(measured(rows, "patchcore", "bottle")[s] + measured(rows, "patchcore", "cable")[s]) / 2
                for s in (0, 1)]                                           # seeds measured on every class
    assert mean["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert mean["status"] == "no reference" and "averages 15 classes" in mean["note"]
    assert mean["ci_low"] < mean["mean"] < mean["ci_high"]
    assert (mean["rank"], mean["leader"], mean["failed"]) == (1, True, 1)
    noop = cell(table, "noop", "mean")
    assert noop["status"] == "no reference" and pd.isna(noop["expected"])
    assert (noop["rank"], noop["tied"], noop["failed"]) == (2, False, 1)
    assert cell(table, "noop", "bottle")["seeds"] == 2                     # the timed-out seed is out
    cat = cell(board(report, "cifar10", "image_auroc"), "dsvdd", "cat")   # 'cat' is class 3 in the file
    assert (cat["expected"], cat["status"]) == (0.591, "above")


def test_pixel_metrics_have_no_interval(report):
    pixel = board(report, "mvtec", "pixel_auroc")
    mean = cell(pixel, "patchcore", "mean")
    assert pd.isna(mean["ci_low"]) and mean["mean"] == pytest.approx((0.981 + 0.90) / 2)
    assert cell(pixel, "patchcore", "bottle")["status"] == "reproduced"   # 98.1 vs 98.48
    assert set(pixel["variant"]) == {"patchcore"}                         # noop has no pixel metric
    assert "no bootstrap interval" in (report / "report.md").read_text()


def test_reproduction_failures_and_cost_tables(report):
    repro = pd.read_parquet(report / "reproduction.parquet")
    row = repro[(repro["variant"] == "patchcore") & (repro["metric"] == "image_auroc")].iloc[0]
    assert (row["classes_with_reference"], row["reproduced"], row["below"], row["above"]) == (2, 1, 1, 0)
    assert "noop" not in set(repro["variant"]) and "dsvdd" in set(repro["variant"])
    fails = pd.read_parquet(report / "failures.parquet")
    assert sorted(zip(fails["variant"], fails["status"])) == [("noop", "timeout"), ("patchcore", "failed")]
    assert fails["error"].str.contains("RuntimeError").all()
    cost = pd.read_parquet(report / "cost.parquet").set_index(["variant", "board"])
    patchcore = cost.loc[("patchcore", "mvtec")]
    assert (patchcore["cells"], patchcore["ok_cells"]) == (6, 5) and patchcore["fit_s"] == pytest.approx(1.0)
    assert patchcore["peak_rss_gib"] == pytest.approx(2.0) and patchcore["accuracy_metric"] == "image_auroc"
    assert cost.loc[("noop", "mvtec"), "pareto"] and cost.loc[("patchcore", "mvtec"), "pareto"]
    md = (report / "report.md").read_text()
    assert "RuntimeError: patchcore broke on cable" in md and "timeout" in md
    assert "wall time 12.5 min" in md


def test_cold_fit_is_what_a_cell_costs_without_the_worker_cache():
    """A cache hit's fit leaves the shared build out (the dcae cells that found dsvdd's pre-training);
    'cold fit' averages the cells that built their own, and says nothing where none did."""
    from reports.cost import cost_table
    from reports.rows import annotate

    rows = []
    for method, fits, hits in [("dcae", (300.0, 4.0, 5.0), (False, True, True)),
                               ("dsvdd", (9.0, 9.0), (True, True)),
                               ("fcdd_ae", (60.0, 80.0), (None, None))]:
        for seed, (fit_s, hit) in enumerate(zip(fits, hits)):
            row = make_row(method, "fashion_mnist", "one_class", "Trouser", seed, fit_s=fit_s)
            rows.append(dict(row, feature_cache_hit=hit))
    no_boards = pd.DataFrame(columns=["board", "protocol", "is_mean", "metric", "variant", "mean"])
    cost = cost_table(annotate(pd.DataFrame(rows)), no_boards).set_index("variant")
    assert cost.loc["dcae", "fit_s"] == pytest.approx(103.0) and cost.loc["dcae", "cold_fit_s"] == 300.0
    assert cost.loc["dcae", "cache_hits"] == pytest.approx(2 / 3)
    assert np.isnan(cost.loc["dsvdd", "cold_fit_s"]) and cost.loc["dsvdd", "fit_s"] == 9.0
    assert cost.loc["fcdd_ae", "cold_fit_s"] == cost.loc["fcdd_ae", "fit_s"] == 70.0


def test_every_plot_is_a_valid_png_and_linked(report):
    from PIL import Image

    names = {p.name for p in (report / "plots").glob("*.png")}
    assert {"bars_mvtec_one_class_image_auroc.png", "bars_mvtec_one_class_pixel_auroc.png",
            "cost_mvtec_one_class.png", "expected_vs_measured.png", "gallery_mvtec_one_class.png"} <= names
    md, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    for name in names:
        with Image.open(report / "plots" / name) as im:
            im.verify()
        assert f"(plots/{name})" in md
    assert page.count('src="data:image/png;base64,') == len(names) and 'src="plots/' not in page


def test_ties_with_the_leader(tmp_path_factory):
    rng = np.random.default_rng(3)
    labels, scores = scores_with_auroc(rng, 60, 60, 1.5)
    close = (np.asarray(scores) + rng.normal(scale=0.3, size=len(scores))).tolist()
    rows = [make_row(m, "mvtec", "one_class", "bottle", 0, scores=(labels, s))
            for m, s in (("a", scores), ("b", close), ("c", (-np.asarray(scores)).tolist()))]
    table = board(built(tmp_path_factory, "ties", rows), "mvtec", "image_auroc")
    means = table[table["is_mean"]].set_index("variant")
    leader = means.index[means["leader"]].tolist()
    assert len(leader) == 1 and leader[0] in ("a", "b") and means.loc["c", "rank"] == 3
    assert means.loc[{"a": "b", "b": "a"}[leader[0]], "tied"] and not means.loc["c", "tied"]


def test_a_paper_mean_is_compared_when_every_class_is_measured():
    from reports.expected import MVTEC_CATEGORIES, load_expected
    from reports.rows import annotate
    from reports.tables import leaderboards

    rows = annotate(pd.DataFrame([make_row("patchcore", "mvtec", "one_class", c, 0, params=PATCHCORE_PARAMS,
                                           shift=20.0, n=(10, 10)) for c in MVTEC_CATEGORIES]))
    expected = load_expected()
    strict = leaderboards(rows, expected, 0.5, {})
    mean = cell(strict[strict["metric"] == "image_auroc"], "patchcore", "mean")
    assert mean["mean"] == 1.0 and mean["expected"] == pytest.approx(0.9916)
    assert mean["status"] == "above" and mean["classes_measured"] == mean["classes_total"] == 15
    loose = leaderboards(rows, expected, 1.0, {})
    assert cell(loose[loose["metric"] == "image_auroc"], "patchcore", "mean")["status"] == "reproduced"


def test_cli_report_passes_tolerance(tmp_path_factory):
    import bench

    run = write_rows(tmp_path_factory.mktemp("cli") / "cli", main_run_rows())
    assert bench.main(["report", str(run), "--tolerance", "30"]) == 0
    assert cell(board(run / "report", "cifar10", "image_auroc"), "dsvdd", "cat")["status"] == "reproduced"
    assert bench.main(["report", str(run / "nowhere")]) == 2


def test_cli_report_adds_the_users_numbers_and_refuses_a_malformed_file(tmp_path_factory, capsys):
    import bench

    run = write_rows(tmp_path_factory.mktemp("cli-expected") / "cli", main_run_rows())
    mine = run.parent / "mine.csv"
    mine.write_text("method,dataset,protocol,normal_class,metric,value,setting,source,source_kind\n"
                    "noop,mvtec,one_class,bottle,image_auroc,0.51,our rerun,lab notebook p. 12,reproduction\n")
    assert bench.main(["report", str(run), "--expected", str(mine)]) == 0
    bottle = cell(board(run / "report", "mvtec", "image_auroc"), "noop", "bottle")
    assert bottle["expected"] == 0.51 and bottle["source"] == "lab notebook p. 12"
    assert "mine.csv" in (run / "report" / "report.md").read_text()
    before = (run / "report" / "report.md").read_text()
    mine.write_text(mine.read_text() + "noop,mvtec,one_class,cable,image_auroc,,x,y,paper\n")
    assert bench.main(["report", str(run), "--expected", str(mine)]) == 2
    assert "mine.csv line 3: value is empty" in capsys.readouterr().err
    assert (run / "report" / "report.md").read_text() == before             # nothing rebuilt


# ---------------------------------------------------------------- --compare

def compare_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Two runs of the same cells: 'shifted' scores worse in the new run, 'steady' is unchanged,
    and one cell failed in the new run."""
    base, new = [], []
    for seed in (0, 1):
        for cls in ("bottle", "cable"):
            labels, scores = scores_with_auroc(np.random.default_rng(seed), 100, 100, 2.5)
            worse = (np.asarray(scores) - 1.5 * np.asarray(labels)).tolist()
            for run, values in ((base, scores), (new, worse)):
                run.append(make_row("shifted", "mvtec", "one_class", cls, seed, scores=(labels, values)))
            for run in (base, new):
                run.append(make_row("steady", "mvtec", "one_class", cls, seed, scores=(labels, scores),
                                    pixel_auroc=0.9))
    base.append(make_row("steady", "mvtec", "one_class", "grid", 0))
    new.append(make_row("steady", "mvtec", "one_class", "grid", 0, status="failed"))
    root = tmp_path_factory.mktemp("cmp")
    return write_rows(root / "base", base), write_rows(root / "new", new)


def test_compare_flags_the_shifted_method_only(tmp_path_factory):
    from reports.leaderboard import build_report

    base, new = compare_pair(tmp_path_factory)
    report = build_report(new, compare=base)
    changes = pd.read_parquet(report / "compare.parquet")
    auroc = changes[changes["metric"] == "image_auroc"]
    shifted, steady = auroc[auroc["variant"] == "shifted"], auroc[auroc["variant"] == "steady"]
    assert len(shifted) == len(steady) == 4 and shifted["paired"].all()
    assert shifted["flagged"].all() and (shifted["change"] < -0.05).all()
    assert (shifted["ci_high"] < 0).all() and (shifted["ci_low"] <= shifted["change"]).all()
    assert not steady["flagged"].any() and (steady["change"] == 0).all()
    pixel = changes[changes["metric"] == "pixel_auroc"]
    assert len(pixel) == 4 and pixel["ci_low"].isna().all() and not pixel["flagged"].any()
    status = pd.read_parquet(report / "compare_status.parquet")
    assert status[["column", "this_status", "other_status"]].values.tolist() == [["grid", "failed", "ok"]]
    md = (report / "report.md").read_text()
    assert "## Comparison with base" in md and "Cells whose status differs" in md


def test_compare_reuses_both_runs_bootstrap_caches(tmp_path_factory, monkeypatch):
    """--compare's paired intervals are the difference of the two rows' own distributions (same
    labels, same seed, so the same resamples): with both runs' reports built, nothing is resampled,
    and the table equals one resampled in pairs from scratch."""
    from reports import compare, tables
    from reports.leaderboard import BOOTSTRAP_CACHE, build_report
    from reports.rows import annotate, read_rows

    base, new = compare_pair(tmp_path_factory)
    build_report(base)
    build_report(new)
    scratch = compare.compare_runs(annotate(read_rows(new)), annotate(read_rows(base)))[0]
    calls = []
    for module in (tables, compare):
        real = module.resample_metrics
        monkeypatch.setattr(module, "resample_metrics", lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    report = build_report(new, compare=base)
    assert calls == []
    assert pd.read_parquet(report / "compare.parquet").equals(scratch)
    written = (new / BOOTSTRAP_CACHE).stat().st_mtime_ns
    build_report(new, compare=base)
    assert (new / BOOTSTRAP_CACHE).stat().st_mtime_ns == written  # nothing new: the file is not rewritten
    # the other run's file is read, never written; its entries go to this run's cache
    before = (base / BOOTSTRAP_CACHE).read_bytes()
    (new / BOOTSTRAP_CACHE).unlink()
    build_report(new, compare=base)
    assert len(calls) == 4 and (base / BOOTSTRAP_CACHE).read_bytes() == before  # new's changed rows only
    with np.load(new / BOOTSTRAP_CACHE) as archive:  # steady's 4 (one key for both runs), shifted's 4 + 4
        assert len({name.split("/")[0] for name in archive.files}) == 12


def test_report_of_an_empty_run(tmp_path):
    from reports.leaderboard import build_report

    RowStore(tmp_path / "empty")
    report = build_report(tmp_path / "empty")
    assert "No finished ok cell" in (report / "report.md").read_text()
    assert (report / "report.html").exists()


def test_a_report_that_fails_while_built_leaves_the_previous_one_whole(tmp_path_factory, monkeypatch):
    from reports import leaderboard

    rows = main_run_rows()
    report = built(tmp_path_factory, "again", rows)
    run = report.parent
    (report / "notes.txt").write_text("mine")
    before = {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}
    assert any(p.suffix == ".png" for p in before) and any(p.suffix == ".parquet" for p in before)

    def broken(*args, **kwargs):
        raise RuntimeError("plotting broke")

    monkeypatch.setattr(leaderboard, "make_plots", broken)
    with pytest.raises(RuntimeError, match="plotting broke"):
        leaderboard.build_report(run)
    after = {p.relative_to(report): p.read_bytes() for p in report.rglob("*") if p.is_file()}
    assert after == before
    # nothing half-built left; the bootstrap cache is whole (written before the plots, atomically)
    assert sorted(p.name for p in run.iterdir()) == [".bootstrap-cache.npz", "report", "rows"]
    monkeypatch.undo()
    # a good rebuild replaces plots and tables (a plot of a board no longer there goes), keeps other files
    stale = report / "plots" / "bars_gone.png"
    stale.write_bytes(b"old")
    leaderboard.build_report(run)
    assert not stale.exists() and (report / "notes.txt").read_text() == "mine"
    assert (report / "report.md").read_bytes() != b"" and (report / "leaderboard.parquet").exists()


def test_a_rebuild_deletes_only_the_reports_own_files(tmp_path_factory):
    """Tables and plots a report no longer makes go; anything else in report/ stays, Parquet and
    PNG files included (a report pointed at a folder it does not own deletes nothing of it)."""
    from reports import leaderboard

    report = built(tmp_path_factory, "own", main_run_rows())
    written = {p.relative_to(report) for p in report.rglob("*") if p.is_file() and p.suffix in (".parquet", ".png")}
    mine = [report / "summary.parquet", report / "plots" / "mine.png", report / "plots" / "nested" / "x.png"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"mine")
    stale = [report / "compare.parquet", report / "plots" / "gallery_gone.png"]   # its own names, no longer made
    for path in stale:
        path.write_bytes(b"old")
    leaderboard.build_report(report.parent)
    assert all(p.read_bytes() == b"mine" for p in mine)
    assert not any(p.exists() for p in stale)
    assert {p.relative_to(report) for p in leaderboard.own_files(report)} == written  # it knows all it writes


def test_compare_with_a_folder_without_rows_fails_clearly(tmp_path):
    from reports.leaderboard import build_report

    run = write_rows(tmp_path / "one", main_run_rows()[:2])
    with pytest.raises(FileNotFoundError, match="no rows/ folder"):
        build_report(run, compare=tmp_path / "missing")


# ---------------------------------------------------------------- OpenOOD near-ood / far-ood groups

NEAR, FAR = ("cifar100", "tin"), ("mnist", "svhn", "dtd", "places365")
OOD_SHIFTS = {"cifar100": 0.8, "tin": 1.1, "mnist": 2.5, "svhn": 1.9, "dtd": 1.6, "places365": 1.3}


def ood_rows(sets, seeds=(0, 1), method: str = "msp") -> list[dict]:
    """One ok row per (seed, OOD set) of a cifar10 ood cell, with an accuracy; shifts differ per set."""
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(100 + seed)
        for name in sets:
            row = make_row(method, "cifar10", "ood", "all", seed, ood_set=name, shift=OOD_SHIFTS[name],
                           n=(40, 50), rng=rng)
            row["accuracy"] = 0.945 + 0.01 * seed
            rows.append(row)
    return rows


def independent_group(rows: list[dict], sets) -> dict:
    """A group's mean, std over seeds and 95% interval recomputed from the rows alone: per seed the
    mean over the group's sets of sklearn's AUROC; per resample the mean over sets of the mean over
    seeds of each row's own bootstrap (the row's seed, as the report draws it)."""
    from reports import bootstrap as b

    here = [r for r in rows if r["ood_set"] in sets]
    seeds = sorted({r["seed"] for r in here})
    auroc = {(r["seed"], r["ood_set"]): roc_auc_score(r["labels"], r["image_scores"]) for r in here}
    per_seed = [np.mean([auroc[(s, o)] for o in sets]) for s in seeds]
    per_set = [np.mean([auroc[(s, o)] for s in seeds]) for o in sets]
    draws = {}
    for r in here:
        labels = np.asarray(r["labels"])
        draws[(r["seed"], r["ood_set"])] = b.resample_metrics(
            labels, [r["image_scores"]], ("image_auroc",), b.resamples_for(labels.size),
            b.row_seed(r["cell_id"]))["image_auroc"][:, 0]
    resampled = np.mean([np.mean([draws[(s, o)] for s in seeds], axis=0) for o in sets], axis=0)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {"mean": float(np.mean(per_set)), "std": float(np.std(per_seed, ddof=1)), "ci_low": low, "ci_high": high}


def group_expected_csv(path: Path, near: float, far: float) -> Path:
    """A small reference table: OpenOOD-style near / far numbers for msp, an ID accuracy, and a
    far-ood number for a method the run does not measure."""
    path.write_text(
        "method,dataset,protocol,normal_class,metric,value,setting,source,ood_group\n"
        f"msp,cifar10,ood,all,image_auroc,{near:.4f},\"near-ood; ResNet18 100ep, postproc=MSP\",test table A,near-ood\n"
        f"msp,cifar10,ood,all,image_auroc,{far:.4f},\"far-ood; ResNet18 100ep, postproc=MSP\",test table A,far-ood\n"
        "msp,cifar10,ood,all,accuracy,0.9506,\"id; ResNet18 100ep\",test table A,\n"
        "gram,cifar10,ood,all,image_auroc,0.7173,\"far-ood; ResNet18 100ep\",test table A,far-ood\n")
    return path


def group_board(rows: list[dict], expected_path: Path, metric: str = "image_auroc") -> pd.DataFrame:
    from reports.expected import load_expected
    from reports.rows import annotate
    from reports.tables import leaderboards, row_distributions

    frame = annotate(pd.DataFrame(rows))
    table = leaderboards(frame, load_expected(expected_path), 1.0, row_distributions(frame))
    return table[table["metric"] == metric]


def test_openood_group_means_equal_an_independent_computation_and_match_the_paper(tmp_path):
    rows = ood_rows(NEAR + FAR)
    near, far = independent_group(rows, NEAR), independent_group(rows, FAR)
    # near reproduced (0.4 points under the measured mean), far below (3 points over it)
    csv = group_expected_csv(tmp_path / "expected.csv", near["mean"] - 0.004, far["mean"] + 0.03)
    table = group_board(rows, csv)
    assert set(table.loc[table["is_group"], "column"]) == {"near-ood", "far-ood"}
    for name, want, status, sets in (("near-ood", near, "reproduced", 2), ("far-ood", far, "below", 4)):
        got = cell(table, "msp", name)
        assert not got["is_mean"] and got["is_group"]
        assert got[["mean", "std", "ci_low", "ci_high"]].astype(float).tolist() == pytest.approx(
            [want["mean"], want["std"], want["ci_low"], want["ci_high"]], abs=1e-9)
        assert got["status"] == status and got["source"] == "test table A"
        assert got["setting"].startswith(name) and got["diff"] == pytest.approx(got["mean"] - got["expected"])
        assert (got["classes_measured"], got["classes_total"], got["seeds"]) == (sets, sets, 2)
    mean = cell(table, "msp", "mean")                  # the overall mean: over all six sets, no group number
    assert mean["mean"] == pytest.approx(independent_group(rows, NEAR + FAR)["mean"])
    assert mean["status"] == "no reference" and "near-ood / far-ood" in mean["note"]
    assert (mean["rank"], mean["classes_measured"]) == (1, 6)
    assert set(table.loc[~table["is_mean"] & ~table["is_group"], "column"]) == set(NEAR + FAR)
    accuracy = group_board(rows, csv, "accuracy")      # the same ID accuracy on every set: no group means
    assert not accuracy["is_group"].any() and cell(accuracy, "msp", "mean")["status"] == "reproduced"


def test_a_partly_measured_group_is_averaged_but_not_compared(tmp_path):
    rows = ood_rows(("cifar100", "mnist", "svhn"))
    csv = group_expected_csv(tmp_path / "expected.csv", 0.5, 0.5)
    table = group_board(rows, csv)
    near, far = cell(table, "msp", "near-ood"), cell(table, "msp", "far-ood")
    assert near["mean"] == pytest.approx(independent_group(rows, ("cifar100",))["mean"])
    assert far["mean"] == pytest.approx(independent_group(rows, ("mnist", "svhn"))["mean"])
    sets = [(g["classes_measured"], g["classes_total"]) for g in (near, far)]
    assert sets == [(1, 2), (2, 4)]
    for got in (near, far):
        assert pd.isna(got["expected"]) and got["status"] == "no reference" and got["ci_low"] < got["mean"]
    assert "misses tin" in near["note"] and "misses dtd, places365" in far["note"]
    # a whole group alone: the overall mean is that group's mean and takes its number, as before
    alone = group_board(ood_rows(NEAR), group_expected_csv(tmp_path / "near.csv", 0.5, 0.5))
    mean, group = cell(alone, "msp", "mean"), cell(alone, "msp", "near-ood")
    assert mean["mean"] == pytest.approx(group["mean"]) and mean["expected"] == group["expected"] == 0.5
    assert pd.isna(mean["note"]) and not (alone["column"] == "far-ood").any()
    # part of one group alone: neither the group column nor the overall mean takes its number
    part = group_board(ood_rows(("cifar100",)), group_expected_csv(tmp_path / "part.csv", 0.5, 0.5))
    for column in ("mean", "near-ood"):
        got = cell(part, "msp", column)
        assert pd.isna(got["expected"]) and got["status"] == "no reference"
        assert "not compared" in got["note"] and "tin" in got["note"]


def test_group_references_and_membership():
    from reports.expected import OOD_GROUPS, group_complete, group_of, ood_group_ok

    assert OOD_GROUPS["cifar10"]["near-ood"] == ("cifar100", "tin")
    assert OOD_GROUPS["cifar100"]["near-ood"] == ("cifar10", "tin")
    far, none = {"ood_group": "far-ood"}, {"ood_group": ""}
    assert group_of(far) == "far-ood" and group_of(none) is None
    assert group_complete("cifar10", "far-ood", {"mnist", "svhn", "textures", "places365"})   # OpenOOD's name
    assert not group_complete("cifar10", "far-ood", {"mnist", "svhn", "dtd"})
    assert ood_group_ok(far, "cifar10", {"textures", "svhn"})
    assert not ood_group_ok(far, "cifar10", {"tin"}) and ood_group_ok(none, "cifar10", {"tin"})


def test_report_shows_group_columns_table_and_reproduction_rows(tmp_path_factory, tmp_path):
    rows = ood_rows(NEAR + FAR)
    csv = group_expected_csv(tmp_path / "expected.csv", independent_group(rows, NEAR)["mean"],
                             independent_group(rows, FAR)["mean"] + 0.03)
    report = built(tmp_path_factory, "groups", rows, expected_path=csv)
    repro = pd.read_parquet(report / "reproduction.parquet")
    auroc = repro[repro["metric"] == "image_auroc"].set_index("average")
    assert auroc.loc["near-ood", "status"] == "reproduced" and auroc.loc["far-ood", "status"] == "below"
    assert auroc.loc["mean", "status"] == "no reference"
    assert set(pd.read_parquet(report / "leaderboard.parquet").query("is_group")["column"]) == {"near-ood", "far-ood"}
    md, page = (report / "report.md").read_text(), (report / "report.html").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| # | method | cifar100"))
    assert "| near-ood | far-ood | mean ± std |" in header
    assert "OpenOOD groups" in md and 'data-name="groups:cifar10:ood:image_auroc"' in page
    groups = md.split("OpenOOD groups (per method")[1].split("\n\n")[1].splitlines()
    near_line = next(line for line in groups if "| near-ood |" in line)
    assert "| 2/2 |" in near_line and "reproduced" in near_line


def test_the_fashion_mnist_record_keeps_its_verdicts():
    """The stored reproduction (reports/reproductions/fmnist): fcdd_ae reproduces the FCDD paper's AE
    baseline (81.7 vs 82.0); dsvdd / dcae have no number at their settings."""
    from reports.expected import load_expected
    from reports.rows import annotate, read_rows
    from reports.tables import leaderboards, reproduction

    rows = annotate(read_rows(Path(__file__).parents[1] / "reports" / "reproductions" / "fmnist"))
    expected = load_expected()
    boards = leaderboards(rows, expected, 1.0, {})
    repro = reproduction(boards, expected).set_index("variant")
    assert repro.loc["fcdd_ae", "status"] == "reproduced" and repro.loc["fcdd_ae", "expected"] == 0.82
    assert round(100 * repro.loc["fcdd_ae", "measured"], 1) == 81.7
    means = boards[boards["is_mean"] & (boards["metric"] == "image_auroc")].set_index("variant")
    assert (means.drop(index="fcdd_ae")["status"] == "no reference").all()


def test_default_runs_are_compared_with_their_reference_codes_numbers():
    """What the methods resolve by default states the columns the official numbers are keyed on:
    PatchCore's plain-maximum score and 10% coreset meet the official results.csv with no difference;
    re-weighting (the paper's Eq. 7) is a setting the official number is not."""
    from methods import create
    from methods.base import RunContext

    params = create("patchcore", {}, RunContext()).resolved_params()
    assert (params["image_score"], params["pretrained_tag"]) == ("max", "tv_in1k")
    value, setting, differs = pick("patchcore", "mvtec", "one_class", "bottle", "image_auroc", params)
    assert (value, differs) == (1.0, []) and "results.csv" in setting
    reweighted = create("patchcore", {"reweight": True}, RunContext()).resolved_params()
    assert pick("patchcore", "mvtec", "one_class", "bottle", "image_auroc", reweighted)[2] == [
        "score: reweighted vs max"]


def test_a_pixel_metric_over_other_images_is_a_setting_that_differs():
    """PatchCore's README PRO is its anomaly_pro (anomalous test images only); a row measured over all
    images (metric_variants) is compared with the all-images number where there is one, and shown
    as differing where there is none."""
    variants = {"pixel_auroc": "all", "pro": "all"}
    params = {**PATCHCORE_PARAMS, "metric_variants": variants}
    value, setting, differs = pick("patchcore", "mvtec", "one_class", "bottle", "pro", params)
    assert differs == ["metric_variant: all vs anomalous_only"]
    value, setting, differs = pick("patchcore", "mvtec", "one_class", "mean", "pro", params)
    assert differs == [] and "full_pro" in setting
    params["metric_variants"] = {"pro": "anomalous_only"}
    assert pick("patchcore", "mvtec", "one_class", "bottle", "pro", params)[::2] == (0.9714, [])


def test_the_bootstrap_kernel_compiles_without_a_writable_cache(monkeypatch):
    """Where numba finds no writable cache location (cache=True raises at decoration), the kernel is
    compiled per process instead, and gives the same numbers."""
    import importlib

    from reports import bootstrap as b
    from reports import bootstrap_kernel

    if bootstrap_kernel.numba is None:
        pytest.skip("numba is not installed: the numpy path only")
    rng = np.random.default_rng(5)
    labels = (rng.random(300) < 0.5).astype(np.int8)
    labels[:2] = [1, 0]
    scores = rng.normal(size=300) + labels
    want = b.resample_metrics(labels, [scores], b.BOOTSTRAP_METRICS, 100, seed=1)
    real_njit, asked = bootstrap_kernel.numba.njit, []

    def no_cache_location(*args, **kwargs):
        asked.append(bool(kwargs.get("cache")))
        if kwargs.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(bootstrap_kernel.numba, "njit", no_cache_location)
    try:
        importlib.reload(bootstrap_kernel)
        assert asked == [True, False, True, False]  # each of the two functions: cached, then not
        got = b.resample_metrics(labels, [scores], b.BOOTSTRAP_METRICS, 100, seed=1)
    finally:
        monkeypatch.undo()
        importlib.reload(bootstrap_kernel)
    assert all(np.array_equal(want[m], got[m]) for m in b.BOOTSTRAP_METRICS)
