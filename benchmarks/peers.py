"""Equivalence with a peer library: our OOD scores against pytorch-ood 0.4.0's on one network.

    python benchmarks/peers.py [--epochs 6] [--width-scale 0.0625] [--threads 2] [--peers-path DIR]

pytorch-ood is a peer, never a product dependency: it lives in its own directory, installed with
``python -m pip install --no-deps --target /work/peers-env pytorch-ood==0.4.0`` (torch, torchvision,
scipy and numpy come from the product's environment), found through ``--peers-path`` /
``ADGRID_PEERS_PYTHONPATH``. The peer side runs in a subprocess with that directory on PYTHONPATH
(as anomalib runs in its own venv for ``benchmarks/methods.py``); the two sides exchange arrays
through ``.npy`` files and state dicts through ``.pt`` files in a temporary directory.

Here: the shared classifier of ``methods/classifier/`` (ResNet-18 32×32 at ``width_scale``, the
demo grid's tiny recipe) trained on the embedded ``digits`` (ten classes in-distribution, 16 px),
Fashion-MNIST's 10,000 test images OOD (``data/protocols.py`` ``ood``); and the confidence-branch
network of ``methods/conf_branch.py`` trained on the same split. Both state dicts are saved; our
scores come from our methods loading those files (``checkpoint``), the peer's from pytorch-ood's
classes running the same networks (its side rebuilds them from our module code and loads the state
dicts) on the same normalised input tensors. Per method it prints the max abs difference and the
Spearman correlation (ID test + OOD images; for the loss: the training images), both sides' AUROC
(OOD positive), and a verdict: equal / equal up to sign / rank-equivalent / differs.

What is compared (pytorch-ood 0.4.0's classes; its sign convention: larger = more OOD, as ours):

* ``msp``: our ``msp`` (−max softmax) vs ``pytorch_ood.detector.MaxSoftmax(model, t=1)``
  (``detector/softmax.py``: ``-softmax(logits / t).max``).
* ``energy``: our ``vos`` score path (``VOS.score``: −logsumexp(logits), OpenOOD's EBO at T 1) on the
  shared classifier's weights vs ``pytorch_ood.detector.EnergyBased(model, t=1)``
  (``detector/energy.py``: ``-t * logsumexp(logits / t)``).
* ``openmax``: our ``openmax`` vs ``pytorch_ood.detector.OpenMax``, unknown-class probability on both
  sides. Parameters matched: ``tailsize`` 20 (ours: OpenOOD's default; pytorch-ood's default is 25),
  ``alpha`` 3 (ours/OpenOOD; pytorch-ood's default 10), distance euclidean (ours ``distance:
  euclidean``; pytorch-ood ``euclid_weight=1.0``, its cosine weight 1 − 1 = 0); activation vector =
  logits on both sides; the peer is fitted (``fit_logits``) on the correctly classified training
  images only, as our ``setup`` and OpenOOD's ``compute_train_score_and_mavs_and_dists`` do
  (pytorch-ood would take every image given). Not matchable by parameter: pytorch-ood's
  ``LibNotMR`` translates the tail by 10000 before fitting (``detector/openmax/libnotmr.py``,
  ``translation = 10000``, the C++ ``MetaRecognition`` default), ours by 1, as OpenOOD's
  ``libmr.MR()`` does (Vastlab/libMR ``python/libmr.pyx``: ``translate_amount=1`` in ``MR.__cinit__``;
  ``methods/openmax.py`` ``TRANSLATE_AMOUNT``). The row ``openmax@translate10000`` runs ours with
  10000 to isolate that constant; what remains there is the two Weibull fits' optimisers (scipy's
  ``exponweib.fit(f0=1)`` vs ``weibull_min.fit``), and pytorch-ood computes distances only to the
  classes some image of the batch predicts (``numpy.py`` ``predict``: the others stay 0), which is
  why the peer scores all test images in one call.
* ``conf_score``: our ``conf_branch`` score (−c, c = σ(confidence head)) vs ``1 − c``, the outlier
  score pytorch-ood's ``ConfidenceLoss`` documents (it has no confidence-branch detector).
* ``conf_loss``: our ``conf_branch_loss`` (Eqs. 1-3) without hints (all samples interpolated, the
  paper's form; the hint mask all ones) vs ``pytorch_ood.loss.ConfidenceLoss(alpha=λ, eps=1e-12)``,
  which implements neither hints nor the budget (its note), per training image (batches of one).

The network forward runs on both sides (the peer calls ``detector.predict(x)`` with the model), so
the ``logits`` row checks that the state dicts and inputs arrived unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PEERS_PATH = os.environ.get("ADGRID_PEERS_PYTHONPATH", "/work/peers-env")
PEER_VERSION = "0.4.0"
INSTALL_HINT = (f"python -m pip install --no-deps --target {PEERS_PATH} pytorch-ood=={PEER_VERSION} "
                f"(or point --peers-path / ADGRID_PEERS_PYTHONPATH at a directory holding it)")
# The demo grid's tiny classifier recipe (grids/demo.yaml &ood_tiny).
TINY = dict(image_size=16, width_scale=0.0625, epochs=6, batch_size=64, lr=0.05, augment="none",
            checkpoint_val_fraction=0.1)
OPENMAX = dict(tailsize=20, alpha=3, distance="euclidean")
PEER_OPENMAX = dict(tailsize=20, alpha=3, euclid_weight=1.0)
PEER_TRANSLATION = 10000.0      # pytorch-ood's LibNotMR.translation
TOL = 1e-5                      # "equal": max abs difference within TOL × max(1, |score|)
RANK_TOL = 0.9999               # "rank-equivalent": |Spearman| at least this

# Runs in the product's Python with the peer directory first on PYTHONPATH (and this repository for
# the network definitions): loads the state dicts and inputs, scores with pytorch-ood, writes .npy.
PEER_SCRIPT = r'''
import json, sys, time
t0 = time.perf_counter()
cfg = json.loads(sys.argv[1])
import numpy as np, torch
torch.set_num_threads(cfg["threads"])
import pytorch_ood
from pytorch_ood.detector import EnergyBased, MaxSoftmax, OpenMax
from pytorch_ood.loss import ConfidenceLoss
from methods.classifier import build_network
from methods.conf_branch import ConfBranchNet
d = cfg["dir"]
load = lambda name: torch.from_numpy(np.load(f"{d}/{name}.npy"))
x_train, y_train, x_test = load("x_train"), load("y_train"), load("x_test")
net = build_network(cfg["arch"], cfg["num_classes"], cfg["width_scale"])
net.load_state_dict(torch.load(f"{d}/classifier.pt", weights_only=True))
net.eval()

def batched(fn, x, size=500):
    with torch.no_grad():
        return torch.cat([fn(x[s:s + size]) for s in range(0, len(x), size)])

out = {"logits": batched(net, x_test),
       "msp": batched(MaxSoftmax(net, t=1.0).predict, x_test),
       "energy": batched(EnergyBased(net, t=1.0).predict, x_test)}
train_logits = batched(net, x_train)
correct = train_logits.argmax(dim=1) == y_train
om = OpenMax(net, **cfg["openmax"]).fit_logits(train_logits[correct], y_train[correct])
out["openmax"] = om.predict_logits(out["logits"])   # all test images in one call (see docstring)
cb = ConfBranchNet(build_network(cfg["arch"], cfg["num_classes"], cfg["width_scale"]), cfg["num_classes"])
cb.load_state_dict(torch.load(f"{d}/conf_branch.pt", weights_only=True))
cb.eval()
conf = batched(lambda x: torch.sigmoid(cb(x, return_confidence=True)[1]), x_test)[:, 0]
out["conf_score"] = 1.0 - conf           # ConfidenceLoss's documented outlier score
criterion = ConfidenceLoss(alpha=cfg["lmbda"], eps=cfg["eps"])
with torch.no_grad():
    logits_cb, conf_logit = cb(x_train, return_confidence=True)
    c = torch.sigmoid(conf_logit)
    out["conf_loss"] = torch.stack([criterion(logits_cb[i:i + 1], c[i:i + 1], y_train[i:i + 1])
                                    for i in range(len(y_train))])
for name, value in out.items():
    np.save(f"{d}/peer_{name}.npy", value.detach().double().numpy())
print("PEER_RESULT " + json.dumps({"pytorch_ood": pytorch_ood.__version__, "torch": torch.__version__,
                                   "n_fit_openmax": int(correct.sum()), "peer_s": time.perf_counter() - t0}))
'''


def peer_available(path: str) -> bool:
    return (Path(path) / "pytorch_ood" / "__init__.py").is_file()


def run_peer(tmp: str, cfg: dict, peers_path: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([peers_path, str(ROOT)]),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", PEER_SCRIPT, json.dumps({**cfg, "dir": tmp, "threads": threads})],
                          capture_output=True, text=True, env=env, timeout=1800, cwd=tmp)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEER_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"pytorch-ood side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    info = json.loads(lines[-1][len("PEER_RESULT "):])
    if info["pytorch_ood"] != PEER_VERSION:
        raise RuntimeError(f"pytorch-ood {info['pytorch_ood']} found in {peers_path}, expected {PEER_VERSION}")
    return info


def our_side(tmp: str, epochs: int, width_scale: float, seed: int) -> tuple[dict, dict, dict]:
    """Trains the classifier and the confidence-branch network, saves both state dicts and the
    normalised inputs to ``tmp``, and returns (our scores by row name, labels, peer config)."""
    import torch

    import methods.openmax as openmax_mod
    from data.protocols import make_splits
    from methods.classifier import ClassifierParams, predict_logits, train_data
    from methods.base import ArtifactCache, RunContext, create
    from methods.conf_branch import conf_branch_loss

    recipe = {**TINY, "epochs": epochs, "width_scale": width_scale}
    train, tests = make_splits("digits", {"image_size": TINY["image_size"]}, "ood", "all", ood=["fashion_mnist"])
    test = tests[0][1]
    msp = create("msp", recipe, RunContext(seed=seed, cache=ArtifactCache()))
    msp.fit(train)                                   # trains the shared classifier
    torch.save(msp.clf.net.state_dict(), f"{tmp}/classifier.pt")
    cb = create("conf_branch", recipe, RunContext(seed=seed, cache=ArtifactCache()))
    cb.fit(train)
    torch.save(cb.net.state_dict(), f"{tmp}/conf_branch.pt")

    data = train_data(ClassifierParams(**recipe), train)
    x_train = data.inputs.normalize(data.x)
    x_test = data.inputs.normalize(data.inputs.prepare(test.images))
    np.save(f"{tmp}/x_train.npy", x_train.numpy())
    np.save(f"{tmp}/y_train.npy", data.y.numpy())
    np.save(f"{tmp}/x_test.npy", x_test.numpy())

    loaded = {**recipe, "checkpoint": f"{tmp}/classifier.pt"}
    ours = {}

    def scores(name: str, params: dict) -> np.ndarray:
        method = create(name, params, RunContext(seed=seed, cache=ArtifactCache()))
        method.fit(train)
        return np.asarray(method.score(test).image, np.float64)

    ours["msp"] = scores("msp", loaded)
    ours["energy"] = scores("vos", loaded)
    ours["openmax"] = scores("openmax", {**loaded, **OPENMAX})
    saved = openmax_mod.TRANSLATE_AMOUNT
    openmax_mod.TRANSLATE_AMOUNT = PEER_TRANSLATION
    try:
        ours["openmax@translate10000"] = scores("openmax", {**loaded, **OPENMAX})
    finally:
        openmax_mod.TRANSLATE_AMOUNT = saved
    ours["conf_score"] = np.asarray(cb.score(test).image, np.float64)
    ours["logits"] = predict_logits(msp.clf.net, data.inputs, test.images, 500, "cpu").double().numpy()
    with torch.no_grad():
        logits_cb, conf_logit = cb.net(x_train, return_confidence=True)
        ones = torch.ones_like(conf_logit)
        ours["conf_loss"] = np.array([float(conf_branch_loss(logits_cb[i:i + 1], conf_logit[i:i + 1],
                                                             data.y[i:i + 1], cb.params.lmbda, cb.params.eps,
                                                             ones[i:i + 1])[0]) for i in range(len(data.y))])
    labels = {"test": np.asarray(test.labels), "accuracy": float(
        (ours["logits"][test.labels == 0].argmax(1) == np.asarray(test.targets)[test.labels == 0]).mean())}
    cfg = {"arch": msp.params.arch, "num_classes": data.num_classes, "width_scale": width_scale,
           "openmax": PEER_OPENMAX, "lmbda": cb.params.lmbda, "eps": cb.params.eps}
    return ours, labels, cfg


def verdict(ours: np.ndarray, peer: np.ndarray, tol: float = TOL, rank_tol: float = RANK_TOL) -> str:
    """equal / equal up to sign / rank-equivalent (with the constant offset when that is all) / differs."""
    from scipy.stats import spearmanr

    a, b = np.asarray(ours, np.float64).ravel(), np.asarray(peer, np.float64).ravel()
    if a.shape != b.shape:
        return f"differs (shapes {a.shape} vs {b.shape})"
    bound = tol * max(1.0, float(np.abs(a).max(initial=0)), float(np.abs(b).max(initial=0)))
    if np.abs(a - b).max(initial=0) <= bound:
        return "equal"
    if np.abs(a + b).max(initial=0) <= bound:
        return "equal up to sign"
    offset = float(np.median(a - b))
    if np.abs(a - b - offset).max(initial=0) <= bound:
        return f"rank-equivalent (ours = pytorch-ood {offset:+.6g})"
    rho = float(spearmanr(a, b).statistic) if len(a) > 1 else float("nan")
    if rho >= rank_tol:
        return "rank-equivalent"
    if rho <= -rank_tol:
        return "rank-equivalent up to sign"
    return "differs"


def compare(ours: np.ndarray, peer: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Max abs difference, Spearman correlation, both AUROCs (OOD = label 1) and the verdict."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(ours, np.float64), np.asarray(peer, np.float64)
    out = {"max_abs_diff": float(np.abs(a - b).max()),
           "spearman": float(spearmanr(a.ravel(), b.ravel()).statistic), "verdict": verdict(a, b)}
    if labels is not None and a.ndim == 1 and len(np.unique(labels)) == 2:
        out["auroc_ours"] = float(roc_auc_score(labels, a))
        out["auroc_peer"] = float(roc_auc_score(labels, b))
    return out


PEER_OF = {"openmax@translate10000": "openmax"}   # rows whose peer array is another row's


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import pandas as pd
    import torch

    if not peer_available(args.peers_path):
        raise SystemExit(f"pytorch-ood not found in {args.peers_path}: {INSTALL_HINT}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="adgrid-peers-") as tmp:
        ours, labels, cfg = our_side(tmp, args.epochs, args.width_scale, args.seed)
        t_ours = time.perf_counter() - t0
        info = run_peer(tmp, cfg, args.peers_path, args.threads)
        peer = {name: np.load(f"{tmp}/peer_{name}.npy") for name in
                ("logits", "msp", "energy", "openmax", "conf_score", "conf_loss")}
    rows = []
    for name in ("logits", "msp", "energy", "openmax", "openmax@translate10000", "conf_score", "conf_loss"):
        r = compare(ours[name], peer[PEER_OF.get(name, name)], None if name in ("logits", "conf_loss") else labels["test"])
        rows.append({"row": name, **r})
    table = pd.DataFrame.from_records(rows, columns=["row", "max_abs_diff", "spearman", "auroc_ours", "auroc_peer",
                                                     "verdict"])
    print(f"digits (10 classes, 16 px) vs Fashion-MNIST: {len(labels['test'])} test images, classifier "
          f"{cfg['arch']} x{cfg['width_scale']} {args.epochs} epochs (ID test accuracy {labels['accuracy']:.3f}); "
          f"pytorch-ood {info['pytorch_ood']} (torch {info['torch']}), OpenMax fitted on {info['n_fit_openmax']} "
          f"correctly classified training images; ours {t_ours:.1f}s, peer {info['peer_s']:.1f}s")
    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        print(table.to_string(index=False, na_rep="-", formatters={
            "max_abs_diff": "{:.3g}".format, "spearman": "{:.6f}".format,
            "auroc_ours": "{:.4f}".format, "auroc_peer": "{:.4f}".format}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="our OOD scores against pytorch-ood's on one network")
    p.add_argument("--epochs", type=int, default=TINY["epochs"])
    p.add_argument("--width-scale", type=float, default=TINY["width_scale"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peers-path", default=PEERS_PATH,
                   help="directory holding pytorch_ood (default: $ADGRID_PEERS_PYTHONPATH or /work/peers-env)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
