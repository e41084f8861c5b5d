"""Backbones, weights resolution (offline) and the shared feature cache."""
from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.base import Split
from data.transforms import Transform
from methods import backbones as B
from methods.base import ArtifactCache, RunContext, create

S = 48
TINY = dict(backbone="resnet18", pretrained=False, image_size=S, crop=None, batch_size=64)
T = Transform(resize=S)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared, oversubscribed CPU
    OpenMP's spinning barriers make them 10-100x slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _split(n: int, key: str, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(60, 200, size=(n, S, S, 3), dtype=np.uint8)
    labels = np.zeros(n, np.int64)
    labels[n // 2:] = 1
    for i in range(n // 2, n):
        imgs[i, 10:22, 10:22] = 255
    return Split(imgs, labels, np.zeros(n, np.int64), ["x"], key=key)


@pytest.fixture()
def fresh_backbone():
    """A freshly built random-init resnet18 with a counter of forward calls."""
    B.clear_backbone_cache()
    bb = B.get_backbone("resnet18", pretrained=False, device="cpu")
    calls = {"n": 0}
    handle = bb.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    yield bb, calls
    handle.remove()


def _extract(split, cache, layers, seed=0, transform=T):
    ctx = RunContext(seed=seed, cache=cache)
    out = B.extract_features(split, ctx, backbone="resnet18", layers=layers, transform=transform,
                             pretrained=False, batch_size=64)
    return out, ctx


# ----------------------------------------------------------------------------- feature cache
def test_grid_of_three_methods_and_seeds_runs_backbone_once(fresh_backbone):
    _, calls = fresh_backbone
    tr, te = _split(6, "c/train"), _split(4, "c/test", seed=1)
    cache = ArtifactCache(1 << 28)
    hits = []
    for seed in (0, 1, 2):
        for name in ("patchcore", "padim", "orthoad"):
            ctx = RunContext(seed=seed, cache=cache)
            m = create(name, dict(TINY, d=20) if name == "padim" else
                       dict(TINY, k=10) if name == "orthoad" else TINY, ctx)
            m.fit(tr)
            m.score(te)
            hits.append(ctx.cache_hit)
    assert calls["n"] == 2  # one forward call for the train split, one for the test split
    assert hits == [False] + [True] * 8
    # features of both splits, and PatchCore's embedding of both (shared by its three seeds)
    assert sorted(k[0] for k in cache.keys()) == ["features", "features", "patchcore-embedding",
                                                   "patchcore-embedding"]
    assert cache.hits == 16 and cache.misses == 4


def test_union_of_layers(fresh_backbone, monkeypatch):
    _, calls = fresh_backbone
    monkeypatch.setattr(B, "CAPTURE_STAGE_PREFIX", False)
    split, cache = _split(4, "u/train"), ArtifactCache(1 << 28)
    f2, ctx = _extract(split, cache, ["layer2"])
    assert calls["n"] == 1 and ctx.cache_hit is False and list(f2) == ["layer2"]
    (key,) = cache.keys()
    assert set(cache.get(key)) == {"layer2"}
    f1, ctx = _extract(split, cache, ["layer1"])  # not in the entry: recompute the union, replace
    assert calls["n"] == 2 and ctx.cache_hit is False
    assert cache.keys() == [key] and set(cache.get(key)) == {"layer1", "layer2"}
    both, ctx = _extract(split, cache, ["layer1", "layer2"], seed=7)
    assert calls["n"] == 2 and ctx.cache_hit is True
    assert torch.equal(both["layer2"], f2["layer2"]) and torch.equal(both["layer1"], f1["layer1"])
    assert f1["layer1"].shape == (4, 64, S // 4, S // 4) and f2["layer2"].shape == (4, 128, S // 8, S // 8)


def test_stage_prefix_is_captured(fresh_backbone):
    _, calls = fresh_backbone
    split, cache = _split(4, "p/train"), ArtifactCache(1 << 28)
    _extract(split, cache, ["layer2", "layer3"])  # PatchCore first ...
    (key,) = cache.keys()
    assert set(cache.get(key)) == {"layer1", "layer2", "layer3"}
    _, ctx = _extract(split, cache, ["layer1", "layer2", "layer3"])  # ... then PaDiM: a hit
    assert ctx.cache_hit is True and calls["n"] == 1
    _, ctx = _extract(split, cache, ["layer4"])
    assert ctx.cache_hit is False and calls["n"] == 2
    assert set(cache.get(key)) == {"layer1", "layer2", "layer3", "layer4"}
    assert B.capture_layers("resnet18", ["layer2"]) == ["layer1", "layer2"]


def test_zero_budget_caches_nothing(fresh_backbone):
    _, calls = fresh_backbone
    split, cache = _split(4, "z/train"), ArtifactCache(0)
    for i in range(3):
        _, ctx = _extract(split, cache, ["layer1"])
        assert ctx.cache_hit is False and calls["n"] == i + 1
    assert cache.keys() == [] and cache.used_bytes == 0


def test_key_ignores_seed_but_not_transform_or_split(fresh_backbone):
    _, calls = fresh_backbone
    cache = ArtifactCache(1 << 28)
    a = _split(4, "k/train")
    _extract(a, cache, ["layer1"], seed=0)
    _, ctx = _extract(a, cache, ["layer1"], seed=123)
    assert ctx.cache_hit is True and calls["n"] == 1
    _, ctx = _extract(a, cache, ["layer1"], transform=Transform(resize=S, mean=None, std=None))
    assert ctx.cache_hit is False and calls["n"] == 2
    _, ctx = _extract(_split(4, "k/other"), cache, ["layer1"])
    assert ctx.cache_hit is False and calls["n"] == 3
    key = B.feature_key("resnet18", "random-init", T, "k/train")
    assert key in cache and hash(key) is not None and 0 not in key


def test_forward_stops_at_deepest_layer(fresh_backbone):
    bb, _ = fresh_backbone
    ran = []
    h = bb.model.layer3.register_forward_pre_hook(lambda *_: ran.append("layer3"))
    out = bb(torch.zeros(2, 3, S, S), ["layer1", "layer2"])
    h.remove()
    assert set(out) == {"layer1", "layer2"} and ran == []
    with pytest.raises(ValueError, match="no layer"):
        bb(torch.zeros(1, 3, S, S), ["layer9"])


def test_backbone_modules_are_cached_per_worker():
    B.clear_backbone_cache()
    a = B.get_backbone("resnet18", pretrained=False)
    assert B.get_backbone("resnet18", pretrained=False) is a
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    # random init is a fixed function of the name, so its features can be cached
    B.clear_backbone_cache()
    b = B.get_backbone("resnet18", pretrained=False)
    assert b is not a and torch.equal(b.model.conv1.weight, a.model.conv1.weight)


def test_affinity_keys():
    """Cells of the three methods on one backbone / weights / image size share a worker; the
    seed plays no part, and the runner may pass validated params or a plain dict."""
    from methods.base import METHODS

    keys = {METHODS[name].affinity_key(METHODS[name].Params(**TINY)) for name in ("patchcore", "padim", "orthoad")}
    assert keys == {("features", "resnet18", "random-init", S, None)}
    assert METHODS["padim"].affinity_key(dict(TINY)) in keys
    assert METHODS["padim"].affinity_key(dict(TINY, image_size=64)) not in keys
    assert METHODS["padim"].affinity_key(dict(TINY, weights="/w.pth")) not in keys


# ----------------------------------------------------------------------------- weights
@pytest.fixture()
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HTTPS_PROXY", "https_proxy", "HF_ENDPOINT", "HF_HUB_OFFLINE", "ADGRID_OFFLINE",
                "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    B.clear_backbone_cache()
    return tmp_path


def _assert_names_file_and_place(msg: str, tmp_path: Path):
    assert "resnet18-f37072fd.pth" in msg                      # the torchvision file
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in msg  # where to put it
    assert "models--timm--resnet18.tv_in1k" in msg and str(tmp_path / "hf") in msg
    assert "weights: /path/to/" in msg


def test_offline_pretrained_request_fails_fast(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(B.WeightsNotFoundError) as err:
        B.resolve_weights("resnet18", pretrained=True, weights=None)
    assert time.monotonic() - t < 5
    _assert_names_file_and_place(str(err.value), empty_caches)
    # through a method: the cell fails with that message
    m = create("patchcore", dict(TINY, pretrained=True), RunContext())
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth"):
        m.fit(_split(2, "o/train"))


def test_unreachable_network_does_not_hang(empty_caches, monkeypatch):
    """Without HF_HUB_OFFLINE: a probe whose connect (or DNS) hangs is abandoned after the timeout."""
    monkeypatch.setattr(B, "NETWORK_PROBE_TIMEOUT_S", 0.5)

    def hang(*_a, **_k):
        time.sleep(30)
        raise OSError("connect timed out")  # what a real hung connect ends in

    monkeypatch.setattr(socket, "create_connection", hang)
    t = time.monotonic()
    with pytest.raises(B.WeightsNotFoundError) as err:
        B.resolve_weights("resnet18", pretrained=True, weights=None)
    assert time.monotonic() - t < 3
    _assert_names_file_and_place(str(err.value), empty_caches)


def test_network_probe_unresolvable_host():
    t = time.monotonic()
    assert B._network_reachable(host="nonexistent.invalid", timeout=1.0) is False
    assert time.monotonic() - t < 3


def _save_random_resnet18(path: Path, seed: int, wrap: bool) -> dict:
    import timm

    torch.manual_seed(seed)
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # torchvision / DDP style: wrapped and prefixed, fc dropped
        body = {"module." + k: v for k, v in state.items() if not k.startswith("fc.")}
        torch.save({"state_dict": body, "epoch": 3} if wrap else body, path)
    return state


def test_weights_file_loads_and_sha256_recorded(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = empty_caches / "my_resnet18.pth"
    state = _save_random_resnet18(path, seed=123, wrap=True)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    ctx = RunContext(cache=ArtifactCache(1 << 28))
    m = create("padim", dict(TINY, d=20, pretrained=True, weights=str(path)), ctx)
    m.fit(_split(4, "w/train"))
    assert ctx.weights_sha256 == sha
    assert any(k[2] == f"sha256:{sha}" for k in ctx.cache.keys())
    # a PatchCore cell served entirely by its cached embedding still names the weights file
    for seed in (0, 1):
        pc_ctx = RunContext(seed=seed, cache=ctx.cache)
        create("patchcore", dict(TINY, pretrained=True, weights=str(path)), pc_ctx).fit(_split(4, "w/train"))
    assert pc_ctx.cache_hit is True and pc_ctx.weights_sha256 == sha
    bb = B.get_backbone("resnet18", weights=str(path))
    assert torch.equal(bb.model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert torch.equal(bb.model.bn1.running_var, state["bn1.running_var"])
    # safetensors too
    st = empty_caches / "r18.safetensors"
    state2 = _save_random_resnet18(st, seed=5, wrap=False)
    bb2 = B.get_backbone("resnet18", weights=str(st))
    assert torch.equal(bb2.model.layer1[0].conv1.weight, state2["layer1.0.conv1.weight"])
    # a missing file names the path; a file of another architecture is refused
    with pytest.raises(B.WeightsNotFoundError, match="nope.pth"):
        B.resolve_weights("resnet18", True, str(empty_caches / "nope.pth"))
    bad = empty_caches / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="does not fit"):
        B.get_backbone("resnet18", weights=str(bad))


def test_pretrained_served_from_local_caches_without_network(empty_caches, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # torch hub cache (torchvision's file name)
    ckpt = empty_caches / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    ckpt.parent.mkdir(parents=True)
    _save_random_resnet18(ckpt, seed=9, wrap=False)
    ref = B.resolve_weights("resnet18", True, None)
    assert ref.path == str(ckpt) and ref.id == "timm:resnet18.tv_in1k"
    assert ref.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # Hugging Face hub cache layout (preferred over the torch hub file)
    snap = empty_caches / "hf" / "models--timm--resnet18.tv_in1k" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    state = _save_random_resnet18(snap / "model.safetensors", seed=10, wrap=False)
    ref = B.resolve_weights("resnet18", True, None)
    assert ref.path == str(snap / "model.safetensors")
    ctx = RunContext()
    m = create("patchcore", dict(TINY, pretrained=True), ctx)
    m.fit(_split(4, "h/train"))
    assert ctx.weights_sha256 == ref.sha256
    bb = B.get_backbone("resnet18", pretrained=True)
    assert torch.equal(bb.model.conv1.weight, state["conv1.weight"])


class _RunsShell:
    """A pickle payload: unpickling it runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("loader", ["backbone weights", "classifier checkpoint", "vgg11_bn weights",
                                    "vgg11_bn download"])
def test_weight_files_are_read_without_running_code(empty_caches, monkeypatch, loader):
    """Every torch file a grid can name (or a download can leave) goes through torch.load(weights_only=True)."""
    import methods.classifier as C
    import methods.deep_one_class as N

    marker = empty_caches / "marker"
    crafted = empty_caches / "crafted.pth"
    torch.save({"state_dict": _RunsShell(marker)}, crafted)

    def fake_download(url, dst, hash_prefix=None, progress=True):  # a tampered cache or mirror
        torch.save({"features.0.weight": _RunsShell(marker)}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    read = {"backbone weights": lambda: B.read_state_dict(str(crafted)),
            "classifier checkpoint": lambda: C.read_state_dict(crafted),
            "vgg11_bn weights": lambda: N.load_vgg11_bn_state(str(crafted)),
            "vgg11_bn download": lambda: N.load_vgg11_bn_state(None)}[loader]
    with pytest.raises(Exception, match="Weights only load failed"):
        read()
    assert not marker.exists()
