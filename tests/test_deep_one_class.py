"""Deep one-class methods: dsvdd, dcae, fcdd, fcdd_hsc, fcdd_ae (real training on tiny data).

Data: scikit-learn's 8×8 digits, up-sampled to 28 px (one channel) or 32 px (three channels).
Normal class 0; test anomalies are other digits.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

import methods
import methods.dcae as dcae_mod
from data.base import Split
from data.datasets.cifar10 import CIFAR10
from data.datasets.fashion_mnist import FashionMNIST
from data.datasets.mnist import MNIST
from methods.fcdd_family import (confetti_noise, fcdd_gt_losses, fcdd_losses, hsc_losses, malform,
                                  pseudo_huber)
from methods.deep_one_class import (FCDDNet, Reception, declared_class_statistics, fit_normalizer, gcn_l1,
                           receptive_upsample)
from methods.base import ArtifactCache, NonFiniteLoss, RunContext, create
from methods.dsvdd import init_center, radius_from_distances

NAMES = [str(i) for i in range(10)]


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return x.reshape(-1, 1, 8, 8).astype(np.float32) / 16.0, y


def upsample(x: np.ndarray, side: int, colour: bool = False) -> np.ndarray:
    t = F.interpolate(torch.from_numpy(x), size=(side, side), mode="bilinear", align_corners=False)
    imgs = (t.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return np.repeat(imgs, 3, axis=-1) if colour else imgs


def make_splits(digits, side=28, colour=False, normal=0, n_train=120, n_anom=150, anomaly_classes=None,
                key="digits"):
    x, y = digits
    rng = np.random.default_rng(0)
    imgs = upsample(x, side, colour)
    normal_idx = rng.permutation(np.flatnonzero(y == normal))
    pool = np.flatnonzero((y != normal) if anomaly_classes is None else np.isin(y, anomaly_classes))
    anom_idx = rng.choice(pool, min(n_anom, len(pool)), replace=False)
    tr = normal_idx[:n_train]
    te = np.concatenate([normal_idx[n_train:], anom_idx])
    train = Split(images=imgs[tr], labels=np.zeros(len(tr), np.int64), targets=y[tr], class_names=NAMES,
                  key=f"{key}/{side}/{normal}/train")
    test = Split(images=imgs[te], labels=(y[te] != normal).astype(np.int64), targets=y[te], class_names=NAMES,
                 key=f"{key}/{side}/{normal}/test")
    return train, test


def auroc(test: Split, scores) -> float:
    return roc_auc_score(test.labels, scores.image)


def falls(curve: list[float]) -> bool:
    return len(curve) >= 2 and min(curve[-2:]) < curve[0]


# ------------------------------------------------------------------------------------------
# registry / params
# ------------------------------------------------------------------------------------------

def test_registered_with_one_class_protocol():
    for name in ("dsvdd", "dcae", "fcdd", "fcdd_hsc", "fcdd_ae"):
        assert name in methods.METHODS
        assert methods.METHODS[name].protocols == {"one_class"}
    with pytest.raises(Exception):
        create("dsvdd", {"objective": "two-class"}, RunContext())
    with pytest.raises(Exception):
        create("fcdd", {"no_such_param": 1}, RunContext())


def test_paper_defaults():
    p = methods.METHODS["dsvdd"].Params()
    assert (p.lr, p.epochs, p.milestones, p.batch_size, p.weight_decay, p.nu) == (1e-4, 150, [50], 200, 0.5e-6, 0.1)
    r = dcae_mod.DCAERecipe.resolve(p, "mnist_lenet")
    assert (r.epochs, r.milestones, r.weight_decay, r.lr, r.batch_size) == (150, (50,), 0.5e-3, 1e-4, 200)
    r = dcae_mod.DCAERecipe.resolve(p, "cifar10_lenet")
    assert (r.epochs, r.milestones, r.weight_decay) == (350, (250,), 0.5e-6)


# ------------------------------------------------------------------------------------------
# Deep SVDD / DCAE
# ------------------------------------------------------------------------------------------

FAST_AE = dict(ae_epochs=12, ae_batch_size=32, ae_lr=1e-3)


def test_dsvdd_one_class_trains_and_detects(digits):
    train, test = make_splits(digits)
    ctx = RunContext(seed=0)
    m = create("dsvdd", dict(FAST_AE, epochs=10, batch_size=32, lr=1e-3), ctx)
    m.fit(train)
    s = m.score(test)
    assert len(ctx.loss_curve) == 10 and falls(ctx.loss_curve)
    assert s.image.shape == (len(test),) and s.pixel is None
    assert auroc(test, s) > 0.9
    rp = m.resolved_params()
    assert rp["net"] == "mnist_lenet" and rp["ae_epochs"] == 12 and rp["ae_milestones"] == [50]
    assert rp["preprocessing"]["image_size"] == 28
    norm = rp["preprocessing"]["normalisation"]
    assert norm["kind"] == "gcn_minmax" and norm["gcn"] == "l1" and norm["source"].startswith("computed")


def test_dsvdd_network_is_bias_free_and_centre_eps_rule(digits):
    for net in ("mnist_lenet", "cifar10_lenet"):
        encoder, ae = methods.deep_one_class.DSVDD_NETS[net]
        for module in (encoder(), ae().encoder):
            assert not [n for n, _ in module.named_parameters() if "bias" in n]
    c = init_center(torch.tensor([0.05, -0.05, 0.2, -0.3, 0.0, 0.1, -0.099]), eps=0.1)
    assert torch.allclose(c, torch.tensor([0.1, -0.1, 0.2, -0.3, 0.0, 0.1, -0.1]))

    train, _ = make_splits(digits, n_train=40)
    m = create("dsvdd", dict(pretrain=False, epochs=0), RunContext(seed=0))
    m.fit(train)
    assert not [n for n, _ in m.net.named_parameters() if "bias" in n]
    assert bool((m.c.abs() >= 0.1 - 1e-7).all() | (m.c == 0).any())


def test_dsvdd_soft_boundary_radius_is_nu_quantile(digits, monkeypatch):
    d = torch.tensor([1.0, 4.0, 9.0, 16.0, 25.0, 36.0, 49.0, 64.0, 81.0, 100.0])
    assert radius_from_distances(d, 0.1) == pytest.approx(np.quantile(np.sqrt(d.numpy()), 0.9))
    assert radius_from_distances(d, 0.5) == pytest.approx(5.5)

    import methods.dsvdd as dsvdd_mod
    updates = []

    def recording(dist, nu):
        r = radius_from_distances(dist, nu)
        updates.append((dist.detach().clone(), nu, r))
        return r

    monkeypatch.setattr(dsvdd_mod, "radius_from_distances", recording)
    train, test = make_splits(digits)
    ctx = RunContext(seed=1)
    m = create("dsvdd", dict(FAST_AE, objective="soft-boundary", nu=0.2, warm_up_epochs=3, epochs=6,
                             batch_size=64, lr=1e-3), ctx)
    m.fit(train)
    # R is re-solved on every mini-batch after the warm-up epochs: 3 epochs x 2 batches
    assert len(updates) == 3 * 2 and all(nu == 0.2 for _, nu, _ in updates)
    last, _, r = updates[-1]
    assert m.R == r > 0
    assert r == pytest.approx(float(np.quantile(np.sqrt(last.numpy()), 0.8)))
    assert float((last > r ** 2).float().mean()) == pytest.approx(0.2, abs=0.05)
    assert len(ctx.loss_curve) == 6 and all(np.isfinite(ctx.loss_curve))
    s = m.score(test)
    np.testing.assert_allclose(s.image, m.distances(test.images).numpy() - m.R ** 2, rtol=1e-5, atol=1e-6)
    assert auroc(test, s) > 0.8


def test_dcae_trains_and_detects(digits):
    train, test = make_splits(digits)
    ctx = RunContext(seed=0)
    m = create("dcae", FAST_AE, ctx)
    m.fit(train)
    assert len(ctx.loss_curve) == 12 and falls(ctx.loss_curve)
    assert auroc(test, m.score(test)) > 0.9


def fmnist_like(digits):
    """digits at 28 px labelled as Fashion-MNIST class 0, with what Fashion-MNIST declares (the
    typed fields ``data.protocols.make_splits`` fills)."""
    train, test = make_splits(digits)
    names = list(FashionMNIST.CLASSES)
    declared = dict(dataset="fashion_mnist", normal_classes=(names[0],), statistics=FashionMNIST.statistics,
                    recipe_family=FashionMNIST.recipe_family)
    return (Split(images=train.images, labels=train.labels, targets=train.targets, class_names=names,
                  key="fashion_mnist:0|train", **declared),
            Split(images=test.images, labels=test.labels, targets=test.targets, class_names=names,
                  key="fashion_mnist:0|test", **declared))


def test_fashion_mnist_auto_recipe_unchanged_and_deep_sad_recipe_labelled(digits):
    """net auto on Fashion-MNIST stays the MNIST LeNet + GCN (the fmnist record's setting);
    net fmnist_lenet is Deep SAD's network on [0, 1] inputs; the row says which."""
    train, test = fmnist_like(digits)
    fast = dict(FAST_AE, ae_epochs=2, epochs=2, batch_size=32)
    auto = create("dsvdd", fast, RunContext(seed=0))
    auto.fit(train)
    rp = auto.resolved_params()
    assert rp["net"] == "mnist_lenet" and rp["rep_dim"] == 32
    norm = rp["preprocessing"]["normalisation"]
    assert norm["kind"] == "gcn_minmax" and norm["source"].lower() == "official constants fashion_mnist/t-shirt/top"
    assert rp["recipe"].startswith("Deep SVDD (ICML 2018) mnist_LeNet") and "no official Fashion-MNIST" in rp["recipe"]
    sad = create("dsvdd", dict(fast, net="fmnist_lenet"), RunContext(seed=0))
    sad.fit(train)
    rp = sad.resolved_params()
    assert (rp["net"], rp["rep_dim"], rp["preprocessing"]["normalisation"]["kind"]) == ("fmnist_lenet", 64, "none")
    assert rp["recipe"].startswith("Deep SAD (ICLR 2020) fmnist_LeNet") and sad.c.shape == (64,)
    assert not [n for n, _ in sad.net.named_parameters() if "bias" in n]
    x = sad.inputs(test.images[:4])
    assert x.shape == (4, 1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1  # ToTensor scale
    assert np.isfinite(sad.score(test).image).all()
    # explicit GCN with Deep SAD's net: a real variant, labelled as no published recipe
    mixed = create("dcae", dict(FAST_AE, ae_epochs=1, net="fmnist_lenet", input_norm="gcn_minmax"), RunContext())
    mixed.fit(train)
    assert "no published recipe" in mixed.resolved_params()["recipe"]
    dcae = create("dcae", dict(FAST_AE, ae_epochs=1, net="fmnist_lenet"), RunContext())
    dcae.fit(train)
    assert dcae.resolved_params()["recipe"].startswith("Deep SAD") and np.isfinite(dcae.score(test).image).all()


def test_deep_sad_fmnist_lenet_layout():
    """Deep-SAD-PyTorch src/networks/fmnist_LeNet.py: shapes of every weight, bias-free, 28 -> 64 -> 28."""
    ae = methods.deep_one_class.FmnistLeNetAE().eval()
    shapes = {k: tuple(v.shape) for k, v in ae.state_dict().items() if k.endswith("weight")}
    assert shapes == {"encoder.conv1.weight": (16, 1, 5, 5), "encoder.conv2.weight": (32, 16, 5, 5),
                      "encoder.fc1.weight": (128, 1568), "encoder.fc2.weight": (64, 128),
                      "fc3.weight": (128, 64), "deconv1.weight": (8, 32, 5, 5),
                      "deconv2.weight": (32, 16, 5, 5), "deconv3.weight": (16, 1, 5, 5)}
    assert not [k for k in ae.state_dict() if k.endswith("bias")]
    x = torch.rand(3, 1, 28, 28)
    assert ae.encoder(x).shape == (3, 64) and ae(x).shape == (3, 1, 28, 28)


def test_dsvdd_and_dcae_share_one_pretraining(digits, monkeypatch):
    calls = []
    real = dcae_mod.train_autoencoder

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dcae_mod, "train_autoencoder", counting)
    train, test = make_splits(digits, n_train=60)
    cache = ArtifactCache(1 << 28)
    ctx1 = RunContext(seed=3, cache=cache)
    create("dsvdd", dict(FAST_AE, epochs=2, batch_size=32), ctx1).fit(train)
    assert len(calls) == 1 and ctx1.cache_hit is False
    ctx2 = RunContext(seed=3, cache=cache)
    m = create("dcae", FAST_AE, ctx2)
    m.fit(train)
    assert len(calls) == 1 and ctx2.cache_hit is True
    assert len(ctx2.loss_curve) == FAST_AE["ae_epochs"]
    # another seed or another recipe pre-trains again
    short = dict(FAST_AE, ae_epochs=1)
    create("dcae", short, RunContext(seed=3, cache=cache)).fit(train)
    create("dcae", short, RunContext(seed=4, cache=cache)).fit(train)
    assert len(calls) == 3
    assert methods.METHODS["dsvdd"].affinity_key(methods.METHODS["dsvdd"].Params(**FAST_AE)) == \
        methods.METHODS["dcae"].affinity_key(methods.METHODS["dcae"].Params(**FAST_AE)) == \
        methods.METHODS["dcae"].affinity_key(dict(FAST_AE))
    # the cached result is the same function of the key: the same seed trains the same DCAE
    a = dcae_mod.train_autoencoder(*_ae_args(train, seed=5))
    b = dcae_mod.train_autoencoder(*_ae_args(train, seed=5))
    assert a["loss_curve"] == b["loss_curve"]


def _ae_args(train, seed):
    inputs, x = dcae_mod.lenet_inputs(train, "auto", "auto")
    recipe = dcae_mod.DCAERecipe.resolve(dcae_mod.AEPretrainParams(ae_epochs=2, ae_batch_size=32), inputs.net)
    return x, recipe, seed, "cpu"


def test_dsvdd_picks_cifar_net_for_colour_images(digits):
    train, test = make_splits(digits, side=32, colour=True, n_train=40, n_anom=20)
    ctx = RunContext(seed=0)
    m = create("dsvdd", dict(ae_epochs=1, ae_batch_size=20, epochs=1, batch_size=20), ctx)
    m.fit(train)
    assert m.resolved_params()["net"] == "cifar10_lenet" and m.c.shape == (128,)
    assert m.score(test).image.shape == (len(test),)


@pytest.mark.parametrize("name, params", [
    ("dsvdd", dict(pretrain=False, lr=1e30, epochs=3, batch_size=16)),
    ("dcae", dict(ae_lr=1e30, ae_epochs=3, ae_batch_size=16)),
    ("fcdd", dict(net="cnn28", lr=1e30, epochs=3, batch_size=16, anomaly_source="confetti")),
])
def test_non_finite_loss_ends_the_cell(digits, name, params):
    train, _ = make_splits(digits, n_train=48)
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at epoch \d+"):
        create(name, params, RunContext(seed=0)).fit(train)


def _declared_split(imgs, dataset_cls, normal: tuple, key: str = "x") -> Split:
    return Split(images=imgs, labels=np.zeros(len(imgs), np.int64), targets=np.zeros(len(imgs), np.int64),
                 class_names=list(dataset_cls.CLASSES), key=key, dataset=dataset_cls.name, normal_classes=normal,
                 statistics=dataset_cls.statistics, recipe_family=dataset_cls.recipe_family)


def test_official_constants_used_where_the_dataset_declares_them():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (8, 28, 28, 1), dtype=np.uint8)
    split = _declared_split(imgs, MNIST, ("3",))
    assert declared_class_statistics(split, (28, 28), 1)[1] == "official constants mnist/3"
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    n = fit_normalizer("gcn_minmax", x, split, "auto", raw_hw=(28, 28), raw_channels=1)
    assert n.lo == (-0.7645772083211267,) and n.hi == (12.895051191467457,) and "official" in n.source
    assert "computed" in fit_normalizer("gcn_minmax", x, split, "computed", (28, 28), 1).source
    # wrong geometry (e.g. the dataset was resized) -> computed
    assert "computed" in fit_normalizer("gcn_minmax", x, split, "auto", (32, 32), 1).source
    fm = fit_normalizer("gcn_minmax", x, _declared_split(imgs, FashionMNIST, ("T-shirt/top",)), "auto", (28, 28), 1)
    assert (fm.lo, fm.hi) == ((-2.681239128112793,), (24.85430908203125,))
    assert fm.source == "official constants fashion_mnist/t-shirt/top"
    colour = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    xc = torch.from_numpy(colour).permute(0, 3, 1, 2).float() / 255
    cat = _declared_split(colour, CIFAR10, ("cat",))
    assert fit_normalizer("gcn_minmax", xc, cat, "auto", (32, 32), 3).lo == (-10.599172931391799,)
    ms = fit_normalizer("mean_std", xc, cat, "auto", (32, 32), 3)
    assert ms.mean == (0.4954785108566284, 0.45636114478111267, 0.4154069721698761) and "official" in ms.source
    # a class set has no per-class constants; neither has a split that declares nothing
    sets = _declared_split(imgs, MNIST, ("0", "1"))
    assert declared_class_statistics(sets, (28, 28), 1) is None
    assert "computed" in fit_normalizer("gcn_minmax", x, sets, "auto", (28, 28), 1).source
    bare = Split(images=imgs, labels=np.zeros(8, np.int64), targets=np.full(8, 3), class_names=NAMES,
                 key="mnist|{}|one_class|3|train")  # the key is never parsed
    assert "computed" in fit_normalizer("gcn_minmax", x, bare, "auto", (28, 28), 1).source
    g = gcn_l1(x)
    assert torch.allclose(g.mean(dim=(1, 2, 3)), torch.zeros(8), atol=1e-5)
    assert torch.allclose(g.abs().mean(dim=(1, 2, 3)), torch.ones(8), atol=1e-5)


# ------------------------------------------------------------------------------------------
# FCDD pieces
# ------------------------------------------------------------------------------------------

def test_pseudo_huber_losses_by_hand():
    out = torch.tensor([[[[0.0, 1.0], [math.sqrt(3.0), 0.0]]]]).repeat(2, 1, 1, 1)
    a = pseudo_huber(out)
    assert torch.allclose(a[0, 0], torch.tensor([[0.0, math.sqrt(2) - 1], [1.0, 0.0]]))
    m = (math.sqrt(2) - 1 + 1.0) / 4
    loss = fcdd_losses(out, torch.tensor([0, 1]))
    assert loss[0].item() == pytest.approx(m, rel=1e-6)
    assert loss[1].item() == pytest.approx(-math.log(1 - math.exp(-m)), rel=1e-5)
    h = hsc_losses(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([0, 1]))
    assert h[0].item() == pytest.approx(math.sqrt(26) - 1)
    assert h[1].item() == pytest.approx(-math.log(1e-31), rel=1e-4)  # h = 0 for an anomaly: the 1e-31 guard
    # Eq. 3 with ground-truth maps: a normal sample (Y = 0) is just the mean of A'
    rec = Reception(n=2, j=2, r=3, s=0.5, in_size=4)
    gt = torch.zeros(1, 1, 4, 4)
    up = receptive_upsample(pseudo_huber(out[:1]), rec, 1.0)
    assert fcdd_gt_losses(out[:1], gt, rec, 1.0).item() == pytest.approx(up.mean().item(), rel=1e-6)
    gt[..., 2:, :2] = 1  # over the low-res pixel with A = 1
    expected = (up * (1 - gt)).mean() - torch.log(1 - torch.exp(-(up * gt).mean()))
    assert 0 < expected.item() < 10
    assert fcdd_gt_losses(out[:1], gt, rec, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_receptive_upsampling_of_a_hot_pixel():
    net = FCDDNet("cnn28", 1, 28)
    rec = net.reception
    assert (rec.n, rec.j, rec.r, rec.s) == (7, 4, 16, 1.5)  # centres 1.5 + 4 i: symmetric in 28 px
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 1, 7, 7)
    a = torch.zeros(1, 1, 7, 7)
    a[0, 0, 3, 2] = 1.0
    std = 1.2
    up = receptive_upsample(a, rec, std, out_size=28)[0, 0]
    cy, cx = 1.5 + 4 * 3, 1.5 + 4 * 2  # (13.5, 9.5): between pixels 13/14 and 9/10
    peak = up.max()
    assert torch.isclose(up[13, 9], peak) and torch.isclose(up[14, 10], peak)
    assert torch.isclose(peak, torch.tensor(math.exp(-0.25 / (2 * std ** 2)) ** 2))
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    gauss = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * std ** 2))
    inside = ((yy - cy).abs() <= 7.5) & ((xx - cx).abs() <= 7.5)  # receptive field r = 16
    assert torch.allclose(up, gauss * inside, atol=1e-6)
    # symmetric about the centre, and linear in A
    assert torch.allclose(up[13 - 4], up[14 + 4]) and torch.allclose(up[:, 9 - 3], up[:, 10 + 3])
    a2 = torch.rand(3, 1, 7, 7)
    assert torch.allclose(receptive_upsample(2 * a2, rec, std), 2 * receptive_upsample(a2, rec, std), atol=1e-6)
    # the VGG net for 224 px (MVTec-AD): stride 8, 28x28 output
    with torch.device("meta"):
        vrec = FCDDNet("vgg11_224", 3, 224).reception
    assert (vrec.n, vrec.j, vrec.r, vrec.s) == (28, 8, 62, 3.5)


def test_confetti_noise_is_sparse_and_deterministic():
    n1 = confetti_noise(8, 1, 28, 28, torch.Generator().manual_seed(7))
    n2 = confetti_noise(8, 1, 28, 28, torch.Generator().manual_seed(7))
    n3 = confetti_noise(8, 1, 28, 28, torch.Generator().manual_seed(8))
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)
    changed = (n1 != 0).float().flatten(1).mean(1)
    assert bool((changed > 0).all()) and bool((changed < 0.5).all())
    x = torch.rand(8, 1, 28, 28) * 0.5 + 0.25
    y = malform(x, n1)
    diff = (y != x).float().flatten(1).mean(1)
    assert bool((diff > 0).all()) and bool((diff < 0.5).all())
    assert torch.equal((y != x), (n1 != 0))
    # black images: darkening blobs are inverted so that the anomaly is visible
    black = malform(torch.zeros(8, 1, 28, 28), n1)
    assert bool((black.flatten(1).max(1).values > 0).all())
    col = confetti_noise(2, 3, 240, 240, torch.Generator().manual_seed(0))
    assert col.shape == (2, 3, 240, 240) and col.max() <= 0 and col.min() >= -512


# ------------------------------------------------------------------------------------------
# FCDD family end to end
# ------------------------------------------------------------------------------------------

def _oe_images(digits, side=28):
    x, y = digits
    return upsample(x[y >= 5][:300], side)  # outlier exposure: digits 5-9 only


def test_fcdd_outlier_exposure_trains_and_detects_unseen_classes(digits):
    train, test = make_splits(digits, anomaly_classes=[1, 2, 3, 4])  # never seen in training
    ctx = RunContext(seed=0)
    m = create("fcdd", dict(net="cnn28", epochs=12, batch_size=32, anomaly_source="oe"), ctx)
    m.set_outlier_exposure(_oe_images(digits), name="digits 5-9")
    m.fit(train)
    s = m.score(test)
    assert len(ctx.loss_curve) == 12 and falls(ctx.loss_curve)
    assert s.pixel.shape == (len(test), 28, 28) and s.pixel.dtype == np.float32
    assert auroc(test, s) > 0.85
    rp = m.resolved_params()
    assert rp["net"] == "cnn28" and rp["gauss_std"] == 1.2 and rp["optimizer"] == "sgd"
    assert rp["lr"] == 1e-2 and rp["lr_decay"] == 0.98 and rp["weight_decay"] == 1e-6
    assert rp["oe_pool_size"] == 300 and rp["anomaly_source"] == "oe" and rp["reception"]["r"] == 16
    assert m.transform.resize == 28 and m.transform.crop is None  # the orchestrator aligns masks with it


def test_fcdd_oe_without_data_says_what_is_missing(digits, tmp_path):
    train, _ = make_splits(digits, n_train=20)
    # the 28 / 32 px recipes' outlier set is CIFAR-100 (fcdd DefaultFmnistConfig noise_mode 'cifar100')
    for source in ("oe", "auto"):
        with pytest.raises(Exception, match="cifar-100-python"):
            create("fcdd", dict(net="cnn28", epochs=1, anomaly_source=source,
                                oe_dataset_params={"root": str(tmp_path)}), RunContext()).fit(train)
    rng = np.random.default_rng(0)
    big = Split(images=rng.integers(0, 255, (2, 100, 100, 3), dtype=np.uint8), labels=np.zeros(2, np.int64),
                targets=np.zeros(2, np.int64), class_names=["a"], key="x")
    with pytest.raises(ValueError, match="oe_dataset"):  # the MVTec-AD recipe names no outlier set
        create("fcdd", dict(pretrained=False, epochs=1, anomaly_source="oe"), RunContext()).fit(big)
    with pytest.raises(NotImplementedError, match="no_such_dataset"):
        create("fcdd", dict(net="cnn28", epochs=1, anomaly_source="oe", oe_dataset="no_such_dataset"),
               RunContext()).fit(train)


def test_fcdd_confetti_defaults_and_localisation(digits):
    """Confetti-trained FCDD finds confetti: image AUROC and pixel AUROC on corrupted test digits."""
    train, _ = make_splits(digits, n_train=150)
    ctx = RunContext(seed=0)
    m = create("fcdd", dict(net="cnn28", epochs=12, batch_size=16, anomaly_source="confetti"), ctx)
    m.fit(train)
    assert m.resolved_params()["anomaly_source"] == "confetti" and falls(ctx.loss_curve)
    x, y = digits
    clean = upsample(x[y == 0][150:], 28)
    t = torch.from_numpy(clean).permute(0, 3, 1, 2).float() / 255
    noisy = malform(t, confetti_noise(len(t), 1, 28, 28, torch.Generator().manual_seed(1)))
    imgs = np.concatenate([clean, (noisy * 255).round().byte().permute(0, 2, 3, 1).numpy()])
    labels = np.r_[np.zeros(len(t)), np.ones(len(t))].astype(np.int64)
    test = Split(images=imgs, labels=labels, targets=np.zeros(len(imgs), np.int64), class_names=NAMES, key="c")
    s = m.score(test)
    assert auroc(test, s) > 0.7
    mask = np.concatenate([np.zeros_like(clean[..., 0]), (noisy != t)[:, 0].numpy()]).astype(np.uint8)
    assert roc_auc_score(mask.ravel(), s.pixel.ravel()) > 0.7


def test_fcdd_semi_supervised_with_masks_uses_eq3(digits):
    x, y = digits
    train, _ = make_splits(digits, n_train=100)
    rng = np.random.default_rng(0)
    base = upsample(x[y == 0][100:160], 28)
    anom, masks = base.copy(), np.zeros(base.shape[:3], np.uint8)
    for i in range(len(anom)):
        r, c = rng.integers(0, 20, 2)
        anom[i, r:r + 8, c:c + 8] = 255 - anom[i, r:r + 8, c:c + 8]
        masks[i, r:r + 8, c:c + 8] = 1
    labelled = Split(images=anom[:10], labels=np.ones(10, np.int64), targets=np.zeros(10, np.int64),
                     class_names=NAMES, key="semi", masks=masks[:10])
    ctx = RunContext(seed=0)
    m = create("fcdd", dict(net="cnn28", epochs=15, batch_size=32, anomaly_source="semi", n_true_anomalies=5,
                            augment=False), ctx)
    m.set_true_anomalies(labelled)
    m.fit(train)
    rp = m.resolved_params()
    assert rp["n_true_anomalies"] == 5 and rp["true_anomaly_masks"] is True and falls(ctx.loss_curve)
    test = Split(images=np.concatenate([base[10:], anom[10:]]), labels=np.r_[np.zeros(50), np.ones(50)].astype(int),
                 targets=np.zeros(100, np.int64), class_names=NAMES, key="semi-test")
    s = m.score(test)
    assert auroc(test, s) > 0.8
    gt = np.concatenate([np.zeros_like(masks[10:]), masks[10:]])
    assert roc_auc_score(gt.ravel(), s.pixel.ravel()) > 0.8


def test_fcdd_semi_without_anomalies_fails_clearly(digits):
    train, _ = make_splits(digits, n_train=20)
    with pytest.raises(ValueError, match="labelled anomalies"):
        create("fcdd", dict(net="cnn28", epochs=1, anomaly_source="semi"), RunContext()).fit(train)


def test_fcdd_hsc_trains_and_gives_gradient_heatmaps(digits):
    train, test = make_splits(digits, anomaly_classes=[1, 2, 3, 4])
    ctx = RunContext(seed=0)
    m = create("fcdd_hsc", dict(net="cnn28", epochs=10, batch_size=32, anomaly_source="oe"), ctx)
    m.set_outlier_exposure(_oe_images(digits))
    m.fit(train)
    s = m.score(test)
    assert falls(ctx.loss_curve) and auroc(test, s) > 0.85
    assert s.pixel.shape == (len(test), 28, 28) and (s.pixel >= 0).all() and s.pixel.max() > 0
    assert m.net(torch.zeros(2, 1, 28, 28)).shape == (2, 48)


def test_fcdd_ae_trains_and_gives_reconstruction_heatmaps(digits):
    train, test = make_splits(digits)
    ctx = RunContext(seed=0)
    m = create("fcdd_ae", dict(epochs=10, batch_size=32), ctx)
    m.fit(train)
    s = m.score(test)
    assert m.resolved_params()["net"] == "ae28" and m.resolved_params()["anomaly_source"] == "none"
    assert falls(ctx.loss_curve) and auroc(test, s) > 0.9
    assert s.pixel.shape == (len(test), 28, 28)
    np.testing.assert_allclose(s.pixel.reshape(len(test), -1).mean(1), s.image, rtol=1e-4)


def test_fcdd_family_32px_colour_nets(digits):
    train, test = make_splits(digits, side=32, colour=True, n_train=20, n_anom=10)
    for name, net in (("fcdd", "cnn32_s"), ("fcdd_hsc", "cnn32_s"), ("fcdd_ae", "ae32")):
        ctx = RunContext(seed=0)
        extra = {} if name == "fcdd_ae" else {"anomaly_source": "confetti"}
        m = create(name, dict(net=net, epochs=1, batch_size=20, **extra), ctx)
        m.fit(train)
        s = m.score(test)
        rp = m.resolved_params()
        assert rp["optimizer"] == "adam" and rp["milestones"] == [400, 500] and rp["image_size"] == 32
        assert rp["preprocessing"]["kind"] == "mean_std"
        assert s.pixel.shape == (len(test), 32, 32) and np.isfinite(s.image).all()


def test_fcdd_vgg_needs_weights_file(digits):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (2, 100, 100, 3), dtype=np.uint8)
    split = Split(images=imgs, labels=np.zeros(2, np.int64), targets=np.zeros(2, np.int64), class_names=["a"], key="x")
    with pytest.raises(FileNotFoundError, match="pretrained: false"):
        create("fcdd", dict(weights="/nonexistent/vgg11_bn.pth", epochs=1), RunContext()).fit(split)


@pytest.mark.slow
def test_fcdd_vgg_224_end_to_end_without_pretraining():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (4, 100, 100, 3), dtype=np.uint8)
    split = Split(images=imgs, labels=np.zeros(4, np.int64), targets=np.zeros(4, np.int64), class_names=["a"], key="x")
    ctx = RunContext(seed=0)
    m = create("fcdd", dict(pretrained=False, epochs=1, batch_size=4, eval_batch_size=4), ctx)
    m.fit(split)
    s = m.score(split)
    assert m.resolved_params()["net"] == "vgg11_224" and s.pixel.shape == (4, 224, 224)


# ------------------------------------------------------------------------------------------
# FCDD recipes pinned to the official code (liznerski/fcdd)
# ------------------------------------------------------------------------------------------

def test_fcdd_auto_anomaly_source_follows_the_runner_configs(digits):
    """auto = outlier exposure (CIFAR-100) at 28 / 32 px, confetti at 224 px (argparse_configs.py)."""
    from methods.fcdd_family import FAMILIES

    assert methods.METHODS["fcdd"].Params().anomaly_source == "auto"
    assert methods.METHODS["fcdd_hsc"].Params().anomaly_source == "auto"
    assert {f: (d["anomaly_source"], d["oe_dataset"]) for f, d in FAMILIES.items()} == {
        "28": ("oe", "cifar100"), "32": ("oe", "cifar100"), "224": ("confetti", None)}
    train, _ = make_splits(digits, n_train=20)
    m = create("fcdd", dict(net="cnn28", epochs=1, batch_size=20), RunContext(seed=0))
    m.set_outlier_exposure(_oe_images(digits), name="digits 5-9")
    m.fit(train)
    rp = m.resolved_params()
    assert rp["anomaly_source"] == "oe" and rp["oe_origin"] == "digits 5-9"


def test_fcdd_grey_outlier_exposure_uses_luma(digits):
    """Colour outlier images for a grey net: torchvision Grayscale's 0.299 R + 0.587 G + 0.114 B
    (fcdd outlier_exposure/cifar100.py:49), not the channel mean."""
    train, _ = make_splits(digits, n_train=20)
    colours = np.zeros((3, 28, 28, 3), np.uint8)
    for i in range(3):
        colours[i, ..., i] = 255  # pure red, green, blue
    m = create("fcdd", dict(net="cnn28", epochs=0, anomaly_source="oe"), RunContext(seed=0))
    m.set_outlier_exposure(colours)
    setup = m._resolve(train)
    assert setup.channels == 1
    pool = m._oe_pool(train, setup, torch.Generator().manual_seed(0))
    assert pool.shape == (3, 1, 28, 28) and pool.dtype == torch.uint8
    assert pool[:, 0, 14, 14].tolist() == [76, 150, 29]  # round(255 * 0.299 / 0.587 / 0.114)
    # grey outlier images stay as they are
    m.set_outlier_exposure(np.full((1, 28, 28, 1), 200, np.uint8))
    assert m._oe_pool(train, setup, torch.Generator())[0].unique().tolist() == [200]


def test_fcdd_enlarge_repeats_the_train_set_per_epoch(digits, monkeypatch):
    """ADMvTec.enlarge (datasets/mvtec.py:14, mvtec_base.py:90-91): the MVTec-AD recipe makes 10
    passes per epoch and decays the lr once per epoch (training/bases.py:204); others make one."""
    from methods.fcdd_family import FAMILIES

    assert {f: d["enlarge"] for f, d in FAMILIES.items()} == {"28": 1, "32": 1, "224": 10}
    rng = np.random.default_rng(0)
    big = Split(images=rng.integers(0, 255, (3, 100, 100, 3), dtype=np.uint8), labels=np.zeros(3, np.int64),
                targets=np.zeros(3, np.int64), class_names=["a"], key="x")
    m = create("fcdd_ae", dict(pretrained=False, epochs=0), RunContext(seed=0))
    assert m._resolve(big).enlarge == 10
    assert create("fcdd", dict(pretrained=False, enlarge=2), RunContext())._resolve(big).enlarge == 2

    steps, lrs = [], []
    real_step = torch.optim.SGD.step

    def counting(self, *a, **k):
        steps.append(1)
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", counting)
    train, _ = make_splits(digits, n_train=20)
    for enlarge, expected in ((None, 2 * 2), (3, 2 * 6)):  # 20 images, batch 10: 2 (6) steps an epoch
        steps.clear(), lrs.clear()
        params = dict(net="ae28", epochs=2, batch_size=10) | ({} if enlarge is None else {"enlarge": enlarge})
        m = create("fcdd_ae", params, RunContext(seed=0))
        m.fit(train)
        assert len(steps) == expected
        per_epoch = expected // 2
        assert lrs[:per_epoch] == [1e-2] * per_epoch and lrs[per_epoch:] == [pytest.approx(1e-2 * 0.98)] * per_epoch
        rp = m.resolved_params()
        # recorded where it repeats; the 28 / 32 px recipes' rows keep their keys (no repeat)
        assert rp.get("enlarge") == enlarge and ("enlarge" in rp) == (enlarge is not None)


@pytest.mark.parametrize("name, params", [
    ("dcae", dict(ae_lr=1e9, ae_epochs=1)),
    ("dsvdd", dict(pretrain=False, lr=1e9, epochs=1, batch_size=1000)),
])
def test_a_learning_rate_that_diverges_on_the_last_step_is_reported_as_divergence(name, params):
    """One optimizer step, one batch: the only loss seen is finite, the step leaves weights whose
    forward pass overflows. The row says the training diverged, not that the scores hold NaN."""
    from orchestrator.cell import run_cell
    from orchestrator.grid import Cell

    (row,) = run_cell(Cell(name, params, "digits", {}, "one_class", "0", 0))
    assert row["status"] == "failed"
    assert row["error"].startswith("NonFiniteLoss: non-finite ") and "training diverged" in row["error"], row["error"]
    assert "at epoch 1" in row["error"] and "image_scores" not in row["error"]
