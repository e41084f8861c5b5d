"""UniAD (methods/uniad.py, methods/_uniad_model.py): the neighbour mask, MFCN alignment and feature
jittering against the official formulas, EfficientNet-B4 stages, the dataset-dependent settings,
and real training (random-init ResNet-18) on the procedural set, on digits, on a class set, and
one unified model over two categories through run_cell."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from data.base import Split
from data.protocols import make_splits
from methods._uniad_model import (QueryDecoderLayer, UniADNet, align_features, feature_jitter,
                                  neighbor_mask)
from methods.base import ArtifactCache, NonFiniteLoss, RunContext, create

# a small decoder on a random-init ResNet-18 (EfficientNet-B4's random-init features carry no signal)
TINY = dict(backbone="resnet18", pretrained=False, image_size=64, neighbor_size=[3, 3], hidden_dim=32, nhead=4,
            dim_feedforward=64, num_encoder_layers=1, num_decoder_layers=1, epochs=60, batch_size=8, lr=3e-3)
SYNTH = dict(image_size=64, n_train=32, n_test_good=12, n_test_defect=16)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def official_mask(h, w, hm, wm):
    """zhiyuanyou/UniAD Transformer.generate_mask, loop for loop (True = -inf = masked)."""
    mask = torch.ones(h, w, h, w)
    for i in range(h):
        for j in range(w):
            mask[i, j, max(i - hm // 2, 0):min(i + hm // 2 + 1, h), max(j - wm // 2, 0):min(j + wm // 2 + 1, w)] = 0
    return mask.view(h * w, h * w) == 0


# ----------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("h, w, hm, wm", [(14, 14, 7, 7), (5, 7, 3, 3), (6, 6, 4, 2)])
def test_neighbor_mask_matches_official(h, w, hm, wm):
    assert torch.equal(neighbor_mask(h, w, (hm, wm)), official_mask(h, w, hm, wm))


def test_neighbor_mask_covering_the_grid_is_refused():
    with pytest.raises(ValueError, match="covers the whole"):
        neighbor_mask(3, 3, (7, 7))


def test_align_equals_upsampling_bilinear2d():
    """MFCN: nn.UpsamplingBilinear2d(scale_factor=stride / 16) of each stage, concatenated."""
    maps = [torch.randn(2, 3, 112, 112), torch.randn(2, 4, 56, 56), torch.randn(2, 5, 14, 14), torch.randn(2, 6, 7, 7)]
    strides = [2, 4, 16, 32]
    ref = torch.cat([torch.nn.UpsamplingBilinear2d(scale_factor=s / 16)(m) for m, s in zip(maps, strides)], dim=1)
    torch.testing.assert_close(align_features(maps, (14, 14)), ref)


def test_feature_jitter_scale_and_probability():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(50, 40, 16) * 3
    out = feature_jitter(tokens, 20.0, 1.0, g)
    noise = (out - tokens) / (tokens.norm(dim=2, keepdim=True) / 16 * 20.0)
    assert abs(noise.std().item() - 1.0) < 0.02 and abs(noise.mean().item()) < 0.02  # N(0, (a ||f|| / C)^2)
    assert torch.equal(feature_jitter(tokens, 20.0, 0.0, g), tokens)
    assert torch.equal(feature_jitter(tokens, 0.0, 1.0, g), tokens)
    net = UniADNet(16, 4, 4, hidden_dim=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                   dim_feedforward=16, neighbor_size=(3, 3)).eval()
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(net(x, jitter=(20.0, 1.0)), net(x))  # no jitter at inference


def test_network_structure_follows_the_official_config():
    net = UniADNet(272, 14, 14)
    assert len(net.encoder) == 4 and len(net.decoder) == 4
    assert all(isinstance(layer, QueryDecoderLayer) for layer in net.decoder)
    queries = [layer.learned_embed.weight for layer in net.decoder]
    assert queries[0].shape == (196, 256) and queries[0].data_ptr() != queries[1].data_ptr()  # one per layer
    assert net.encoder[0].self_attn.num_heads == 8 and net.encoder[0].linear1.out_features == 1024
    assert net.encoder[0].self_attn.dropout == 0.1
    assert net.mask.shape == (196, 196) and net.mask_in == (True, True, True)
    assert net.input_proj.in_features == 272 and net.output_proj.out_features == 272
    assert torch.count_nonzero(net.input_proj.bias) == 0  # xavier weights, zero biases
    y = net(torch.randn(2, 272, 14, 14))
    assert y.shape == (2, 272, 14, 14)


# ----------------------------------------------------------------------------- settings
def test_paper_defaults():
    m = create("uniad", None, RunContext())
    p = m.params
    assert p.backbone == "tf_efficientnet_b4.aa_in1k" and p.image_size == 224 and p.feature_stride == 16
    assert (p.hidden_dim, p.nhead, p.num_encoder_layers, p.num_decoder_layers, p.dim_feedforward, p.dropout) == \
        (256, 8, 4, 4, 1024, 0.1)
    assert p.neighbor_size == [7, 7] and p.neighbor_mask_in == [True, True, True]
    assert (p.jitter_scale, p.jitter_prob) == (20.0, 1.0)
    assert (p.epochs, p.lr, p.weight_decay, p.lr_step, p.lr_gamma, p.clip_max_norm) == (1000, 1e-4, 1e-4, 800, 0.1, 0.1)
    assert p.avgpool_size == 16 and p.image_score == "auto" and p.setting == "auto"
    assert m.transform.resize == 224 and m.transform.crop is None
    assert m.affinity_key(p) == ("features", "tf_efficientnet_b4.aa_in1k", "pretrained", 224, None)
    with pytest.raises(Exception, match="divisible"):
        create("uniad", {"hidden_dim": 250}, RunContext())
    with pytest.raises(Exception, match="multiple"):
        create("uniad", {"image_size": 230}, RunContext())


@pytest.mark.parametrize("setting, channels", [("mvtec", 24 + 32 + 56 + 160), ("cifar10", 24 + 32 + 56 + 160 + 448)])
def test_efficientnet_b4_stages(setting, channels):
    """Official outlayers [1,2,3,4] (MVTec AD) / [1..5] (CIFAR-10) = timm blocks 0,1,2,4 (,6)."""
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), np.zeros(2, np.int64),
                  np.zeros(2, np.int64), ["x"], key=f"b4-{setting}", recipe_family=setting)
    m = create("uniad", dict(pretrained=False, image_size=64, neighbor_size=[3, 3]), RunContext())
    m._resolve(split)
    assert m.setting == setting
    feats = m.features(split)
    assert feats.shape == (2, channels, 4, 4)
    assert m.batch_size == {"mvtec": 64, "cifar10": 128}[setting]
    assert m.image_score == {"mvtec": "max", "cifar10": "mean"}[setting]


def test_image_score_rules():
    m = create("uniad", dict(TINY, image_score="max", avgpool_size=4), RunContext())
    maps = np.zeros((2, 16, 16), np.float32)
    maps[0, 0, 0] = 16.0            # one hot pixel: pooled max 1.0
    maps[1, 4:8, 4:8] = 2.0         # a 4x4 block: pooled max 2.0
    assert m.image_scores(maps).tolist() == [1.0, 2.0]
    m.params.image_score = "mean"
    assert m.image_scores(maps).tolist() == pytest.approx([16 / 256, 32 / 256])


# ----------------------------------------------------------------------------- real training
def test_trains_and_detects_on_synthetic():
    train, tests = make_splits("synthetic", SYNTH, "one_class", "chip")
    test = tests[0][1]
    ctx = RunContext(seed=0, cache=ArtifactCache(1 << 30))
    m = create("uniad", TINY, ctx)
    m.fit(train)
    curve = ctx.loss_curve
    assert len(curve) == TINY["epochs"] and curve[-1] < 0.1 * curve[0]
    s = m.score(test)
    assert s.image.shape == (len(test),) and s.pixel.shape == (len(test), 64, 64)
    assert roc_auc_score(test.labels, s.image) >= 0.75
    r = m.resolved_params()
    assert r["setting"] == "mvtec" and r["image_score"] == "max" and r["layers"] == ["layer1", "layer2", "layer3"]
    assert r["feature_channels"] == 64 + 128 + 256 and r["feature_grid"] == [4, 4] and r["batch_size"] == 8


def test_trains_and_detects_on_digits():
    train, tests = make_splits("digits", None, "one_class", 0)
    test = tests[0][1]
    keep = np.r_[np.flatnonzero(test.labels == 0), np.flatnonzero(test.labels == 1)[::4]]
    test = Split(test.images[keep], test.labels[keep], test.targets[keep], test.class_names, test.key + "|sub")
    ctx = RunContext(seed=0)
    m = create("uniad", dict(TINY, epochs=15, batch_size=16), ctx)
    m.fit(train)
    assert ctx.loss_curve[-1] < 0.2 * ctx.loss_curve[0]
    assert roc_auc_score(test.labels, m.score(test).image) >= 0.9


def test_class_set_one_class_and_cifar_score_rule():
    """UniAD's CIFAR-10 setting on digits: a normal class set; a split named cifar10 switches the
    image score to the map's mean and adds the last stage."""
    train, tests = make_splits("digits", None, "one_class", (0, 1, 2, 3, 4))
    test = tests[0][1]
    assert set(np.unique(train.targets)) == {0, 1, 2, 3, 4} and test.labels.mean() > 0.4
    assert train.meta["normal_class"] == "0+1+2+3+4"
    train = Split(train.images[::3], train.labels[::3], train.targets[::3], train.class_names,
                  train.key + "|sub", meta=train.meta)
    test = Split(test.images[::3], test.labels[::3], test.targets[::3], test.class_names, test.key + "|sub")
    cache = ArtifactCache(1 << 30)
    m = create("uniad", dict(TINY, epochs=8, batch_size=32), RunContext(seed=0, cache=cache))
    m.fit(train)
    s = m.score(test)
    assert m.resolved_params()["image_score"] == "max" and roc_auc_score(test.labels, s.image) > 0.5
    cifar_like = Split(train.images, train.labels, train.targets, train.class_names, key="cifar10|{}|x",
                       dataset="cifar10", recipe_family="cifar10")
    m2 = create("uniad", dict(TINY, epochs=1, batch_size=64, layers=["layer1", "layer2"]), RunContext(cache=cache))
    m2.fit(cifar_like)
    r = m2.resolved_params()
    assert (r["setting"], r["image_score"]) == ("cifar10", "mean")
    assert np.allclose(m2.score(test).image, m2.anomaly_maps(test).reshape(len(test), -1).mean(axis=1))


def test_unified_run_trains_once_and_rows_per_category(monkeypatch):
    from methods.uniad import UniAD
    from orchestrator.cell import run_cell
    from orchestrator.grid import Cell

    fits = []
    original = UniAD.fit
    monkeypatch.setattr(UniAD, "fit", lambda self, train: (fits.append(sorted(set(train.targets.tolist()))),
                                                           original(self, train))[1])
    data = dict(SYNTH, categories=["chip", "disc"])
    cell = Cell(method="uniad", params=dict(TINY, epochs=30), dataset="synthetic", dataset_params=data,
                protocol="unified", normal_class="all", seed=0)
    rows = run_cell(cell)
    assert len(fits) == 1 and len(fits[0]) == 2  # one model, on the normal images of both categories
    assert [r["status"] for r in rows] == ["ok", "ok"], rows[0].get("error")
    assert [r["category"] for r in rows] == ["chip", "disc"]
    assert len({r["cell_id"] for r in rows}) == 2
    assert all(r["n_train"] == 64 and len(r["loss_curve"]) == 30 for r in rows)
    assert all(r["pixel_auroc"] is not None for r in rows)
    assert np.mean([r["image_auroc"] for r in rows]) > 0.6


def test_non_finite_loss_ends_the_cell():
    from orchestrator.cell import run_cell
    from orchestrator.grid import Cell

    cell = Cell(method="uniad", params=dict(TINY, lr=1e30, clip_max_norm=0, epochs=5), dataset="synthetic",
                dataset_params=SYNTH, protocol="one_class", normal_class="chip", seed=0)
    (row,) = run_cell(cell)
    assert row["status"] == "failed" and "NonFiniteLoss: non-finite loss at epoch" in row["error"]
    train, _ = make_splits("synthetic", SYNTH, "one_class", "chip")
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at epoch \d+"):
        create("uniad", dict(TINY, lr=1e30, clip_max_norm=0, epochs=5), RunContext()).fit(train)


def test_aligned_features_are_cached_and_seed_independent():
    train, _ = make_splits("synthetic", SYNTH, "one_class", "chip")
    cache = ArtifactCache(1 << 30)
    hits = []
    for seed in (0, 1):
        ctx = RunContext(seed=seed, cache=cache)
        create("uniad", dict(TINY, epochs=1), ctx).fit(train)
        hits.append(ctx.cache_hit)
    assert hits == [False, True]
    assert any(k[0] == "uniad-aligned" for k in cache.keys())


def test_aligned_features_equal_direct_computation():
    """Chunked alignment equals aligning the full-batch backbone outputs."""
    import methods.uniad as uniad_mod
    from methods.backbones import extract_features

    train, _ = make_splits("synthetic", SYNTH, "one_class", "chip")
    m = create("uniad", TINY, RunContext())
    m._resolve(train)
    old = uniad_mod.ALIGN_CHUNK
    uniad_mod.ALIGN_CHUNK = 5
    try:
        chunked = m.features(train)
    finally:
        uniad_mod.ALIGN_CHUNK = old
    raw = extract_features(train, RunContext(), backbone="resnet18", layers=m.layers, transform=m.transform,
                           pretrained=False)
    direct = align_features([raw[layer] for layer in m.layers], (4, 4))
    torch.testing.assert_close(chunked, direct)
    assert raw["layer3"].shape[-2:] == (4, 4) and chunked.shape == (len(train), 64 + 128 + 256, 4, 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fit_and_score():
    train, tests = make_splits("synthetic", SYNTH, "one_class", "chip")
    m = create("uniad", dict(TINY, epochs=2), RunContext(device="cuda"))
    m.fit(train)
    s = m.score(tests[0][1])
    assert np.isfinite(s.image).all() and s.pixel.shape == (len(tests[0][1]), 64, 64)


def test_aligned_features_reuse_another_methods_cached_pass(monkeypatch):
    """FastFlow and UniAD at the same backbone and transform share one backbone pass (same affinity)."""
    import methods.uniad as uniad_mod
    from methods.fastflow import FastFlow

    train, _ = make_splits("synthetic", SYNTH, "one_class", "chip")
    cache = ArtifactCache(1 << 30)
    ff = create("fastflow", dict(backbone="resnet18", pretrained=False, image_size=64, flow_steps=2, epochs=1),
                RunContext(cache=cache))
    ff.fit(train)
    fresh = create("uniad", dict(TINY, epochs=1), RunContext())
    fresh._resolve(train)
    expected = fresh.features(train)  # computed by running the backbone
    monkeypatch.setattr(uniad_mod, "run_backbone", lambda *a, **k: pytest.fail("backbone run again"))
    m = create("uniad", dict(TINY, epochs=1), RunContext(cache=cache))
    assert uniad_mod.UniAD.affinity_key(m.params) == FastFlow.affinity_key(ff.params)
    m.fit(train)
    torch.testing.assert_close(m.features(train), expected)
