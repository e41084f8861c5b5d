"""PatchCore, PaDiM and OrthoAD on tiny synthetic textures (resnet18, random init, 64 px)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, mahalanobis as scipy_mahalanobis
from sklearn.metrics import roc_auc_score

from data.base import Split
from methods.base import ArtifactCache, RunContext, create
from methods.padim import gaussian_fit, mahalanobis, precision_from_cov, upsample_concat
from methods.patchcore import coreset_size, greedy_coreset, greedy_k_center, pairwise_l2
from methods.orthoad import fitted_rows, semi_orthogonal
from data.transforms import resize_masks

S = 64
TINY = dict(backbone="resnet18", pretrained=False, image_size=S, crop=None, batch_size=64)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared, oversubscribed CPU
    OpenMP's spinning barriers make them 10-100x slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def textures(n: int, rng: np.random.Generator, size: int = S) -> np.ndarray:
    """Smooth periodic texture with random phase and sensor noise, uint8 N×H×W×3."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        a, b = rng.uniform(0, 2 * np.pi, 2)
        base = 0.5 + 0.2 * np.sin(xx / 3.0 + a) * np.cos(yy / 4.0 + b)
        img = np.stack([base, 0.9 * base, 0.8 * base], -1) + rng.normal(0, 0.03, (size, size, 3))
        out.append(np.clip(img * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


def make_splits(n_train=16, n_norm=8, n_anom=8, seed=0, size=S):
    rng = np.random.default_rng(seed)
    train = textures(n_train, rng, size)
    test = textures(n_norm + n_anom, rng, size)
    masks = np.zeros((n_norm + n_anom, size, size), np.uint8)
    side = size // 5
    for i in range(n_norm, n_norm + n_anom):  # a bright square defect with its exact mask
        y, x = rng.integers(2, size - side - 2, 2)
        test[i, y:y + side, x:x + side] = (250, 240, 200)
        masks[i, y:y + side, x:x + side] = 1
    labels = np.r_[np.zeros(n_norm), np.ones(n_anom)].astype(np.int64)
    tr = Split(train, np.zeros(n_train, np.int64), np.zeros(n_train, np.int64), ["tex"], key=f"tex{size}/train")
    te = Split(test, labels, np.zeros(len(labels), np.int64), ["tex"], key=f"tex{size}/test", masks=masks)
    return tr, te


@pytest.fixture(scope="module")
def splits():
    return make_splits()


@pytest.fixture(scope="module")
def cache():
    return ArtifactCache(1 << 30)


@pytest.mark.parametrize("name", ["patchcore", "padim", "orthoad"])
def test_detects_drawn_defects(name, splits, cache):
    tr, te = splits
    ctx = RunContext(seed=0, cache=cache)
    m = create(name, TINY, ctx)
    m.fit(tr)
    s = m.score(te)
    assert s.image.shape == (len(te),) and np.isfinite(s.image).all()
    assert s.pixel.shape == (len(te), S, S) and s.pixel.dtype == np.float32
    assert roc_auc_score(te.labels, s.image) >= 0.9
    assert roc_auc_score(te.masks.ravel(), s.pixel.ravel()) >= 0.85
    anom = te.labels == 1
    inside = s.pixel[anom][te.masks[anom] == 1].mean()
    outside = s.pixel[anom][te.masks[anom] == 0].mean()
    assert inside > outside
    rp = m.resolved_params()
    assert rp["transform"]["resize"] == S and rp["transform"]["mean"] is not None
    assert rp["backbone"] == "resnet18" and rp["layers"] == m.params.layers
    assert m.affinity_key(m.params) == ("features", "resnet18", "random-init", S, None)


def test_paper_defaults():
    ctx = RunContext()
    pc = create("patchcore", None, ctx)
    assert (pc.params.backbone, pc.params.layers, pc.params.coreset_ratio, pc.params.num_neighbors) == \
        ("wide_resnet50_2", ["layer2", "layer3"], 0.1, 1)
    assert pc.transform.resize == 256 and pc.transform.crop == 224 and pc.params.sigma == 4.0
    pd = create("padim", None, ctx)
    assert pd.d == 550 and pd.params.layers == ["layer1", "layer2", "layer3"]
    assert create("padim", {"backbone": "resnet18"}, ctx).d == 100
    oa = create("orthoad", None, ctx)
    assert oa.k == 300 and create("orthoad", {"backbone": "resnet18"}, ctx).k == 100
    with pytest.raises(ValueError, match="set d explicitly"):
        create("padim", {"backbone": "vgg16"}, ctx)
    with pytest.raises(Exception):
        create("patchcore", {"coreset_ratio": 0}, ctx)
    with pytest.raises(Exception):
        create("patchcore", {"crop": 300}, ctx)
    for name in ("patchcore", "padim", "orthoad"):
        from methods.base import METHODS
        assert METHODS[name].protocols == {"one_class", "unified"}


def test_crop_and_list_images():
    tr, te = make_splits(n_train=6, n_norm=3, n_anom=3, seed=3, size=72)
    # differently sized images as a list (the unified protocol's train split)
    tr = Split([im if i % 2 else im[:64, :70] for i, im in enumerate(tr.images)], tr.labels, tr.targets,
               tr.class_names, key="tex72/list/train")
    m = create("patchcore", dict(TINY, image_size=72, crop=64), RunContext(seed=0))
    m.fit(tr)
    s = m.score(te)
    assert s.pixel.shape == (6, 64, 64)


# ----------------------------------------------------------------------------- PatchCore pieces
def test_greedy_k_center_matches_brute_force():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5))
    z = torch.from_numpy(x)
    init = torch.from_numpy(cdist(x, x[[3, 7, 11]]).mean(1))
    picked = greedy_k_center(z, 12, init)
    # brute force: each step, the point whose distance to the selected set (or the start
    # distance) is largest
    selected: list[int] = []
    for t in range(12):
        dist = init.numpy().copy()
        if selected:
            dist = np.minimum(dist, cdist(x, x[selected]).min(1))
        assert picked[t] == int(np.argmax(dist))
        selected.append(int(np.argmax(dist)))
    assert len(set(picked.tolist())) == 12
    # plain k-center from a first centre (point 0): each pick is the farthest from all centres
    d = pairwise_l2(z, z)
    p2 = greedy_k_center(z, 6, d[:, 0])
    centres = [0]
    for t in range(6):
        assert p2[t] == int(d[:, centres].min(1).values.argmax())
        centres.append(int(p2[t]))


def test_coreset_sizes_and_seeds():
    x = torch.randn(500, 256, generator=torch.Generator().manual_seed(0))
    for ratio in (0.01, 0.1, 0.25):
        n = coreset_size(len(x), ratio)
        assert n == int(500 * ratio)
        idx = greedy_coreset(x, n, seed=0)
        assert len(idx) == n and len(set(idx.tolist())) == n
    assert coreset_size(500, 1.0) == 500 and coreset_size(5, 0.01) == 1
    a = greedy_coreset(x, 50, seed=0)
    assert (a == greedy_coreset(x, 50, seed=0)).all()
    assert not (a == greedy_coreset(x, 50, seed=1)).all()


def test_patchcore_memory_bank_and_reweighting(splits, cache):
    tr, te = splits
    p = dict(TINY, coreset_ratio=0.25)
    m = create("patchcore", dict(p, reweight=True, distance="l2"), RunContext(seed=0, cache=cache))
    m.fit(tr)
    assert len(m.memory_bank) == int(m.bank_size * 0.25)
    assert m.bank_size == len(tr) * 8 * 8  # layer2 grid of a 64 px input
    plain = create("patchcore", dict(p, distance="l2"), RunContext(seed=0, cache=cache))
    plain.fit(tr)
    s_w, s_p = m.score(te), plain.score(te)
    np.testing.assert_allclose(s_w.pixel, s_p.pixel)
    assert (s_w.image <= s_p.image + 1e-9).all() and (s_w.image >= 0).all()  # w in [0, 1]
    # without re-weighting the image score is the largest patch score (nearest-neighbour L2)
    feats = plain.features(te)
    emb, hw = plain.embed([feats[layer] for layer in plain.params.layers])
    d = torch.cdist(emb.reshape(-1, emb.shape[-1]).double(), plain.memory_bank.double()).min(1).values
    np.testing.assert_allclose(s_p.image, d.reshape(len(te), -1).max(1).values.numpy(), rtol=1e-4)
    # the default (the reference code's): the same maximum, of squared distances, no re-weighting
    ref = create("patchcore", p, RunContext(seed=0, cache=cache))
    ref.fit(tr)
    np.testing.assert_allclose(ref.score(te).image, d.reshape(len(te), -1).max(1).values.square().numpy(),
                               rtol=1e-4)
    other_seed = create("patchcore", p, RunContext(seed=1, cache=cache))
    other_seed.fit(tr)
    assert not torch.equal(other_seed.memory_bank, m.memory_bank)


def test_patchcore_embedding_cached_across_seeds_not_across_params(splits, monkeypatch):
    """Eq. 1-2 have no random step: a split's embedded patch matrix is computed once and shared by
    every seed (the coreset, seeded, still differs); a parameter the embedding reads gets its own
    entry, one it does not read shares it, and the backbone runs once for all of them."""
    from methods import backbones as B
    from methods.patchcore import PatchCore

    tr, te = splits
    calls = {"embed": 0, "backbone": 0}
    embed, run_backbone = PatchCore.embed, B.run_backbone

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(PatchCore, "embed", counted("embed", embed))
    monkeypatch.setattr(B, "run_backbone", counted("backbone", run_backbone))
    cache = ArtifactCache(1 << 30)

    def run(seed, **change):
        ctx = RunContext(seed=seed, cache=cache)
        m = create("patchcore", {**TINY, "coreset_ratio": 0.25, **change}, ctx)
        m.fit(tr)
        return m, m.score(te), ctx

    a, _, ctx = run(0)
    assert calls == {"embed": 2, "backbone": 2} and ctx.cache_hit is False  # one batch per split
    b, scores_b, ctx = run(1)
    assert calls == {"embed": 2, "backbone": 2} and ctx.cache_hit is True
    assert not torch.equal(a.memory_bank, b.memory_bank)
    uncached = create("patchcore", dict(TINY, coreset_ratio=0.25), RunContext(seed=1))
    uncached.fit(tr)
    np.testing.assert_allclose(uncached.score(te).image, scores_b.image, rtol=1e-6)
    calls.update(embed=2, backbone=2)
    # seed-dependent and scoring parameters share the entry
    _, _, ctx = run(2, coreset_ratio=0.5, reweight=False, num_neighbors=3, sigma=2.0)
    assert calls["embed"] == 2 and ctx.cache_hit is True
    for change in (dict(patch_size=5), dict(pretrain_embed_dim=256), dict(target_embed_dim=512),
                   dict(aggregation="avg_pool"), dict(layers=["layer1", "layer2"]),
                   dict(aggregation="avg_pool", pretrain_embed_dim=256)):
        before = calls["embed"]
        _, _, ctx = run(0, **change)
        if change == dict(aggregation="avg_pool", pretrain_embed_dim=256):  # avg_pool reads no embed dims
            assert calls["embed"] == before and ctx.cache_hit is True
        else:
            assert calls["embed"] == before + 2 and ctx.cache_hit is False, change
    assert calls["backbone"] == 2
    assert len([k for k in cache.keys() if k[0] == "patchcore-embedding"]) == 2 * 6


def test_patchcore_avg_pool_aggregation_is_anomalibs(splits):
    """``aggregation: avg_pool``: the 3×3 mean of each map (zero padding counted), layer3
    bilinearly up-sampled to layer2's grid, channels concatenated (128 + 256 for resnet18)."""
    tr, _ = splits
    m = create("patchcore", dict(TINY, aggregation="avg_pool"), RunContext())
    feats = m.features(tr)
    emb, hw = m.embed([feats["layer2"][:2], feats["layer3"][:2]])
    assert hw == (8, 8) and emb.shape == (2, 64, 128 + 256)
    f2 = feats["layer2"][:2].double()
    grid = emb.reshape(2, 8, 8, -1).double()
    np.testing.assert_allclose(grid[:, 3, 5, :128], f2[:, :, 2:5, 4:7].mean((-1, -2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grid[:, 0, 0, :128], f2[:, :, :2, :2].sum((-1, -2)) / 9, rtol=1e-5, atol=1e-6)
    pooled3 = torch.nn.AvgPool2d(3, 1, 1)(feats["layer3"][:2])
    up = torch.nn.functional.interpolate(pooled3, size=(8, 8), mode="bilinear")
    np.testing.assert_allclose(grid[..., 128:], up.permute(0, 2, 3, 1).double(), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="aggregation"):
        create("patchcore", dict(TINY, aggregation="max"), RunContext())
    with pytest.raises(Exception, match="odd"):
        create("patchcore", dict(TINY, patch_size=4), RunContext())


# ----------------------------------------------------------------------------- PaDiM / OrthoAD maths
def test_padim_mahalanobis_equals_scipy():
    rng = np.random.default_rng(0)
    n, d, p = 30, 6, 4
    train = rng.normal(size=(n, d, p)) * rng.uniform(0.5, 2, size=(1, d, 1))
    test = rng.normal(size=(5, d, p))
    mean, prec = gaussian_fit(torch.from_numpy(train), eps=0.01)
    dist = mahalanobis(torch.from_numpy(test), mean, prec).numpy()
    for j in range(p):
        cov = np.cov(train[:, :, j], rowvar=False) + 0.01 * np.eye(d)
        vi = np.linalg.inv(cov)
        mu = train[:, :, j].mean(0)
        for i in range(5):
            assert dist[i, j] == pytest.approx(scipy_mahalanobis(test[i, :, j], mu, vi), rel=1e-4)


def test_precision_from_cov_cholesky_and_fallback():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.normal(size=(3, 20, 5)))
    cov = x.transpose(1, 2) @ x / 19
    cov[1] -= 5 * torch.eye(5)               # not positive definite: no Cholesky factor
    assert (torch.linalg.cholesky_ex(cov + 0.01 * torch.eye(5)).info != 0).tolist() == [False, True, False]
    prec = precision_from_cov(cov, 0.01)
    np.testing.assert_allclose(prec.numpy(), np.linalg.inv(cov.numpy() + 0.01 * np.eye(5)), rtol=1e-8, atol=1e-10)


def test_padim_method_matches_direct_computation(splits, cache):
    tr, te = splits
    m = create("padim", dict(TINY, d=20), RunContext(seed=5, cache=cache))
    m.fit(tr)
    assert len(m.index) == 20 and len(set(m.index.tolist())) == 20
    maps = m.distance_maps(te).numpy()
    full_tr = upsample_concat([m.features(tr)[layer] for layer in m.params.layers]).numpy()[:, m.index]
    full_te = upsample_concat([m.features(te)[layer] for layer in m.params.layers]).numpy()[:, m.index]
    for (y, x) in [(0, 0), (5, 9), (15, 15)]:
        xs = full_tr[:, :, y, x].astype(np.float64)
        vi = np.linalg.inv(np.cov(xs, rowvar=False) + 0.01 * np.eye(20))
        for i in (0, 9):
            ref = scipy_mahalanobis(full_te[i, :, y, x], xs.mean(0), vi)
            assert maps[i, y, x] == pytest.approx(ref, rel=2e-3, abs=1e-3)
    other = create("padim", dict(TINY, d=20), RunContext(seed=6, cache=cache))
    other.fit(tr)
    assert not np.array_equal(other.index, m.index)


def test_semi_orthogonal():
    w = semi_orthogonal(40, 7, seed=0)
    np.testing.assert_allclose((w.T @ w).numpy(), np.eye(7), atol=1e-10)
    assert not torch.equal(w, semi_orthogonal(40, 7, seed=1))
    with pytest.raises(ValueError):
        semi_orthogonal(5, 7, seed=0)


def test_orthoad_projection_equals_direct_formula(splits, cache):
    tr, te = splits
    m = create("orthoad", dict(TINY, k=12, eps=0.05), RunContext(seed=2, cache=cache))
    m.fit(tr)
    assert m.prec.shape == (16 * 16, 12, 12)  # memory grows with k, not with F = 448
    maps = m.distance_maps(te).numpy()
    W = m.W.double().numpy()
    kept = [i for i in range(len(tr)) if i % 10]  # the reference's training 90%
    x_tr = upsample_concat([m.features(tr)[layer] for layer in m.params.layers]).double().numpy()[kept]
    x_te = upsample_concat([m.features(te)[layer] for layer in m.params.layers]).double().numpy()
    for (y, x) in [(0, 0), (7, 3), (15, 15)]:
        xs = x_tr[:, :, y, x]                              # N×F, full width
        mu = xs.mean(0)
        sigma = np.cov(xs, rowvar=False, bias=True)        # F×F, biased as the authors' code
        inner = np.linalg.inv(W.T @ sigma @ W + 0.05 * np.eye(12))
        for i in (1, 12):
            delta = x_te[i, :, y, x] - mu
            ref = np.sqrt(delta @ W @ inner @ W.T @ delta)  # the paper's formula through W, full Sigma
            assert maps[i, y, x] == pytest.approx(ref, rel=2e-3, abs=1e-3)
            # equals a plain Mahalanobis distance on the projected features
            zs = xs @ W
            vi = np.linalg.inv(np.cov(zs, rowvar=False, bias=True) + 0.05 * np.eye(12))
            assert ref == pytest.approx(scipy_mahalanobis(x_te[i, :, y, x] @ W, zs.mean(0), vi), rel=1e-6)


def test_same_seed_same_scores(splits, cache):
    tr, te = splits
    fresh = ArtifactCache(1 << 30)  # features recomputed once, outside the shared cache
    for name in ("patchcore", "padim", "orthoad"):
        a = create(name, TINY, RunContext(seed=3, cache=cache))
        b = create(name, TINY, RunContext(seed=3, cache=fresh))
        a.fit(tr)
        b.fit(tr)
        np.testing.assert_allclose(a.score(te).image, b.score(te).image, rtol=1e-5)


# ----------------------------------------------------------------------------- reference defaults
def test_orthoad_reference_frame_split_and_masks():
    """jnhwkim/orthoad dataset.py: Resize(256) + CenterCrop(256) (the whole frame: a 64×64
    layer1 grid, maps at 256), every 10th training image held out, masks bilinear > 0.5."""
    oa = create("orthoad", None, RunContext())
    assert (oa.transform.resize, oa.transform.crop, oa.transform.size) == (256, None, 256)
    assert oa.mask_resize == "bilinear>0.5" and oa.params.hold_out_every == 10
    rng = np.random.default_rng(5)
    tr = Split(textures(12, rng, 256), np.zeros(12, np.int64), np.zeros(12, np.int64), ["tex"], key="tex256/train")
    m = create("orthoad", dict(backbone="resnet18", pretrained=False, k=8), RunContext(seed=0))
    m.fit(tr)
    rp = m.resolved_params()
    assert rp["feature_map"] == [64, 64] and rp["crop"] is None and rp["input_size"] == 256
    assert (rp["train_images_fitted"], rp["train_images_held_out"]) == (10, 2)  # indices 0 and 10 out
    assert rp["mask_resize"] == "bilinear>0.5"
    x = upsample_concat([m.features(tr)[layer] for layer in m.params.layers]).double()
    z = torch.einsum("nchw,ck->nkhw", x[[i for i in range(12) if i % 10]], m.W.double())
    mu = z.mean(0).reshape(8, -1).T  # HW x k
    np.testing.assert_allclose(m.mean.double().numpy(), mu.numpy(), rtol=1e-4, atol=1e-5)
    every = create("orthoad", dict(backbone="resnet18", pretrained=False, k=8, hold_out_every=None),
                   RunContext(seed=0))
    every.fit(tr)
    assert every.resolved_params()["train_images_fitted"] == 12


def test_fitted_rows_per_category():
    """The reference holds out within each category (``merge_categories`` concatenates
    per-category datasets, each splitting its own sorted files)."""
    t = np.array([0] * 12 + [1] * 5)
    assert fitted_rows(t, 10).tolist() == [i for i in range(12) if i not in (0, 10)] + [13, 14, 15, 16]
    assert fitted_rows(t, None).tolist() == list(range(17))
    with pytest.raises(Exception):
        create("orthoad", {"hold_out_every": 1}, RunContext())


def test_patchcore_reference_defaults():
    """amazon-science/patchcore-inspection sample_training.sh (IM224 WR50, the results.csv the
    expected numbers quote): resize 256 / crop 224, layer2+3, 1024 > 1024, p = 3, 10% coreset,
    one neighbour; common.py: faiss squared L2, plain max, sigma 4; masks bilinear, == 1."""
    pc = create("patchcore", None, RunContext())
    p = pc.params
    assert (p.reweight, p.distance, p.num_neighbors, p.sigma) == (False, "squared_l2", 1, 4.0)
    assert (pc.transform.resize, pc.transform.crop, p.layers, p.patch_size) == (256, 224, ["layer2", "layer3"], 3)
    assert (p.pretrain_embed_dim, p.target_embed_dim, p.coreset_ratio) == (1024, 1024, 0.1)
    assert pc.mask_resize == "bilinear==1" and pc.resolved_params()["mask_resize"] == "bilinear==1"
    assert create("padim", None, RunContext()).mask_resize == "nearest"
    assert "fcaa92f124fb1ad74a7acf56726decd4b27cbcad" in pc.reference
    assert "c7eff1739f12038acd8286fc5c4c85581877b826" in create("orthoad", None, RunContext()).reference


def _pil_masks(masks, size, resample, resize=None, crop=None):
    from PIL import Image

    out = []
    for m in masks:
        img = Image.fromarray((m * 255).astype(np.uint8))
        if resize is not None:
            img = img.resize((resize, resize), resample)
            off = (resize - crop) // 2
            img = img.crop((off, off, off + crop, off + crop))
        out.append(np.asarray(img.resize((size, size), resample) if img.size != (size, size) else img))
    return np.stack(out)


@pytest.mark.parametrize("src,dst", [(1024, 256), (1024, 224), (900, 64), (256, 48), (37, 64), (64, 7)])
def test_masks_resize_like_pil_nearest(src, dst):
    """torch's "nearest" samples half a pixel up-left of PIL's NEAREST (the reference codes'),
    and "nearest-exact" still differs where a pixel centre falls on a source border (1024 -> 224)."""
    rng = np.random.default_rng(src + dst)
    masks = (rng.random((3, src, src)) < 0.4).astype(np.uint8)
    np.testing.assert_array_equal(resize_masks(masks, dst), _pil_masks(masks, dst, 0) // 255)


def test_masks_resize_crop_and_bilinear_rules_like_pil():
    from PIL import Image

    rng = np.random.default_rng(0)
    masks = np.zeros((4, 300, 300), np.uint8)
    for m in masks:
        y, x, h, w = rng.integers(20, 150, 4)
        m[y:y + h, x:x + w] = 1
    near = _pil_masks(masks, 224, Image.NEAREST, resize=256, crop=224) // 255
    np.testing.assert_array_equal(resize_masks(masks, 224, crop=224, resize=256), near)
    bil = _pil_masks(masks, 224, Image.BILINEAR, resize=256, crop=224)
    np.testing.assert_array_equal(resize_masks(masks, 224, crop=224, resize=256, rule="bilinear==1"), bil == 255)
    np.testing.assert_array_equal(resize_masks(masks, 224, crop=224, resize=256, rule="bilinear>0.5"),
                                  bil.astype(np.float32) / 255 > 0.5)
    assert (bil == 255).sum() < near.sum() < (bil > 0).sum()  # the rules differ at the borders
    with pytest.raises(ValueError, match="mask resize rule"):
        resize_masks(masks, 32, rule="bicubic")
