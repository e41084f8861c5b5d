"""benchmarks/peers.py without pytorch-ood: verdicts, arguments, and the missing-peer message."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verdicts(peers):
    a = np.random.default_rng(0).normal(size=500)
    assert peers.verdict(a, a + 1e-9) == "equal"
    assert peers.verdict(a, -a) == "equal up to sign"
    assert peers.verdict(-np.exp(-a), 1 - np.exp(-a)) == "rank-equivalent (ours = pytorch-ood -1)"
    assert peers.verdict(a, np.exp(a)) == "rank-equivalent"          # monotone, not affine
    assert peers.verdict(a, -np.exp(a)) == "rank-equivalent up to sign"
    assert peers.verdict(a, a + np.random.default_rng(1).normal(size=500)) == "differs"
    assert peers.verdict(a, a[:10]).startswith("differs (shapes")


def test_compare_reports_difference_correlation_and_auroc(peers):
    labels = np.r_[np.zeros(50), np.ones(50)]
    ours = np.r_[np.linspace(0, 1, 50), np.linspace(0.5, 2, 50)]
    r = peers.compare(ours, ours * 2, labels)
    assert r["max_abs_diff"] == pytest.approx(2.0) and r["spearman"] == pytest.approx(1.0)
    assert r["auroc_ours"] == pytest.approx(r["auroc_peer"]) and 0.5 < r["auroc_ours"] < 1
    assert r["verdict"] == "rank-equivalent"
    assert "auroc_ours" not in peers.compare(ours, ours)


def test_arguments_and_missing_peer(peers, tmp_path):
    args = peers.parse_args([])
    assert (args.epochs, args.width_scale, args.threads) == (peers.TINY["epochs"], peers.TINY["width_scale"], 2)
    assert peers.OPENMAX == {"tailsize": 20, "alpha": 3, "distance": "euclidean"}     # matched to
    assert peers.PEER_OPENMAX == {"tailsize": 20, "alpha": 3, "euclid_weight": 1.0}  # each other
    with pytest.raises(SystemExit, match="pip install --no-deps --target .*pytorch-ood==0.4.0"):
        peers.main(["--peers-path", str(tmp_path)])     # nothing trained before the check
