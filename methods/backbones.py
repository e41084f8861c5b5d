"""Frozen pretrained backbones and the shared feature cache.

* ``BACKBONES`` maps a short name to a timm architecture (with the tag of its default pretrained
  weights) and the module names of its feature stages; adding a backbone is one line.
* ``get_backbone`` builds a backbone once per worker (module-level LRU keyed by name, weights and
  device) and loads pretrained weights from timm's / torch hub's own caches or from a
  ``weights: PATH`` file. Offline and absent, it raises ``WeightsNotFoundError`` quickly, naming
  the file and where to put it.
* ``extract_features`` runs the backbone over a ``Split`` and caches the layer outputs in
  ``ctx.cache`` under (backbone, weights id, transform, split key): seed-independent, so PatchCore,
  PaDiM and OrthoAD over any number of seeds share one forward pass per image. An entry keeps the
  union of the layers asked for (and every stage up to the deepest one asked for), so a later
  request for other layers of the same pass is a hit.
* ``FrozenFeatureMethod.derived`` caches a seed-independent artefact computed from the features
  (PatchCore's embedded patch matrix) in the same cache, under the features' key plus every
  parameter it depends on, so a second seed skips the backbone and that stage too.
* ``FrozenFeatureParams`` / ``FrozenFeatureMethod`` are the common base of the frozen-feature
  methods (transform, affinity key, resolved params).
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator

from data.base import Split
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, MaskResize, Transform, to_tensor
from methods.base import Method, MethodParams, RunContext

log = logging.getLogger("adgrid.backbones")

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class BackboneSpec:
    """timm_name: ``architecture.tag`` whose tag names the default pretrained weights;
    stages: module names of the feature stages in forward order (layers are any module name);
    mean/std: the normalisation the pretrained weights expect."""

    timm_name: str
    stages: tuple[str, ...] = ()
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def architecture(self) -> str:
        return self.timm_name.split(".")[0]


# torchvision's original ImageNet weights (``tv_in1k``) are what the PatchCore / PaDiM / OrthoAD
# papers used. Adding a backbone is one line here.
BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec("resnet18.tv_in1k", RESNET_STAGES),
    "resnet50": BackboneSpec("resnet50.tv_in1k", RESNET_STAGES),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2.tv_in1k", RESNET_STAGES),
    "wide_resnet101_2": BackboneSpec("wide_resnet101_2.tv_in1k", RESNET_STAGES),
    "efficientnet_b4": BackboneSpec("efficientnet_b4.ra2_in1k", tuple(f"blocks.{i}" for i in range(7))),
    "vgg16": BackboneSpec("vgg16.tv_in1k", ("features.3", "features.8", "features.15", "features.22", "features.29")),
}

# Capture every stage up to the deepest one requested (free in compute, it is on the way), so that
# e.g. PatchCore (layer2+3) followed by PaDiM (layer1-3) costs one forward pass, not two.
CAPTURE_STAGE_PREFIX = True
MAX_CACHED_BACKBONES = 2
NETWORK_PROBE_TIMEOUT_S = 3.0


def spec_of(name: str) -> BackboneSpec:
    """The spec of a short name, or of ``arch.tag`` (a short name's architecture with other timm
    pretrained weights, e.g. ``wide_resnet50_2.racm_in1k``: same stages, those weights)."""
    if name in BACKBONES:
        return BACKBONES[name]
    import timm

    arch, _, tag = name.partition(".")
    if tag and arch in BACKBONES:
        if name not in timm.list_pretrained(name):
            raise KeyError(f"timm has no pretrained weights {name!r}; tags of {arch}: "
                           f"{', '.join(timm.list_pretrained(arch + '.*')) or 'none'}")
        return replace(BACKBONES[arch], timm_name=name)
    if timm.is_model(name.split(".")[0]):  # any other timm model: layers are module names
        return BackboneSpec(name)
    raise KeyError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))} "
                   "(or any timm model name)")


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights requested but not available (offline and not cached, or a bad path)."""


# ----------------------------------------------------------------------------- weights resolution
@dataclass(frozen=True)
class WeightsRef:
    """id: what the feature cache keys on ("random-init", "timm:<arch.tag>", "sha256:<hex>");
    path: the file loaded (None for random init); sha256: of that file."""

    id: str
    path: str | None = None
    sha256: str | None = None


_SHA_MEMO: dict[tuple, str] = {}


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime) so a worker hashes each file once."""
    p = Path(path).resolve()
    st = p.stat()
    memo_key = (str(p), st.st_size, st.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_MEMO[memo_key] = h.hexdigest()
    return _SHA_MEMO[memo_key]


def _hf_cache_dir() -> str:
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return os.path.expanduser(env)
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "huggingface", "hub")


def _torch_hub_checkpoints() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _pretrained_cfg(timm_name: str) -> dict:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    if cfg is None:
        raise WeightsNotFoundError(f"timm has no pretrained weights for {timm_name!r}; "
                                   "give a file with `weights: /path/to/file` or set `pretrained: false`")
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _local_candidates(timm_name: str) -> tuple[list[str], list[str], str | None, str | None]:
    """Existing local files for a timm tag, plus the places they are looked for (for messages)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _pretrained_cfg(timm_name)
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    found, places = [], []
    if hub_id:
        repo = hub_id.split("@")[0]
        for fname in ([cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []) + [
                "model.safetensors", "pytorch_model.bin"]:
            hit = try_to_load_from_cache(repo, fname, cache_dir=_hf_cache_dir())
            if isinstance(hit, str) and os.path.isfile(hit):
                found.append(hit)
        places.append(os.path.join(_hf_cache_dir(), "models--" + repo.replace("/", "--"), "snapshots",
                                   "<revision>", "model.safetensors")
                      + f"  (Hugging Face hub cache; on a connected machine: `huggingface-cli download {repo}`"
                      f" and copy {_hf_cache_dir()})")
    if url:
        path = os.path.join(_torch_hub_checkpoints(), os.path.basename(urlparse(url).path))
        if os.path.isfile(path):
            found.append(path)
        places.append(f"{path}  (torch hub cache; download {url})")
    return found, places, hub_id, url


def _network_reachable(host: str | None = None, port: int = 443, timeout: float | None = None) -> bool:
    """Can the hub be reached? Answers within ``timeout`` even when DNS hangs; honours
    HF_HUB_OFFLINE=1 / ADGRID_OFFLINE=1 and probes an HTTPS proxy where one is configured."""
    for var in ("HF_HUB_OFFLINE", "ADGRID_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    timeout = NETWORK_PROBE_TIMEOUT_S if timeout is None else timeout
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        u = urlparse(proxy if "://" in proxy else "http://" + proxy)
        host, port = u.hostname, u.port or 80
    if host is None:
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    result: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result and result[0])


def _download(hub_id: str) -> str:
    from huggingface_hub import hf_hub_download

    repo = hub_id.split("@")[0]
    last: Exception | None = None
    for fname in ("model.safetensors", "pytorch_model.bin"):
        try:
            return hf_hub_download(repo, fname, cache_dir=_hf_cache_dir(), etag_timeout=NETWORK_PROBE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure becomes the "where to put it" error
            last = e
    raise last  # type: ignore[misc]


def resolve_weights(backbone: str, pretrained: bool, weights: str | None) -> WeightsRef:
    """Which weights a (backbone, pretrained, weights) request means, and the file holding them.

    ``weights: PATH`` wins over ``pretrained``; ``pretrained: false`` is a fixed-seed random init.
    A pretrained request is served from the HF hub cache or torch hub cache without touching the
    network; only when neither has the file and the hub is reachable is it downloaded.
    """
    spec = spec_of(backbone)
    if weights:
        path = os.path.expanduser(str(weights))
        if not os.path.isfile(path):
            raise WeightsNotFoundError(
                f"weights file {path!r} for backbone {backbone!r} does not exist: put the file there "
                f"(e.g. torchvision's or timm's checkpoint of {spec.architecture}) or fix `weights:`")
        sha = sha256_of(path)
        return WeightsRef(f"sha256:{sha}", path, sha)
    if not pretrained:
        return WeightsRef("random-init")
    found, places, hub_id, url = _local_candidates(spec.timm_name)
    if not found:
        if hub_id and _network_reachable():
            try:
                found = [_download(hub_id)]
            except Exception as e:  # noqa: BLE001
                raise WeightsNotFoundError(_missing_message(
                    backbone, spec, places, url, f"the download failed ({type(e).__name__}: {e})")) from e
        else:
            raise WeightsNotFoundError(_missing_message(
                backbone, spec, places, url, "the network is unreachable (offline)"))
    path = found[0]
    return WeightsRef(f"timm:{spec.timm_name}", path, sha256_of(path))


def _missing_message(backbone: str, spec: BackboneSpec, places: list[str], url: str | None,
                     reason: str) -> str:
    fname = os.path.basename(urlparse(url).path) if url else "model.safetensors"
    lines = "\n".join(f"  - {p}" for p in places)
    return (f"pretrained weights for backbone {backbone!r} (timm {spec.timm_name!r}) were not found "
            f"locally and {reason}. Put the file in one of:\n{lines}\n"
            f"or give it in the method params: `weights: /path/to/{fname}`; "
            f"`pretrained: false` uses a random initialisation instead.")


# ----------------------------------------------------------------------------- backbone modules
class _StopForward(Exception):
    pass


class Backbone:
    """A frozen timm model in eval mode; ``forward(x, layers)`` returns those modules' outputs
    and stops the forward pass once the last of them has run (no work past the deepest layer)."""

    def __init__(self, name: str, model: torch.nn.Module, ref: WeightsRef, device: str):
        self.name = name
        self.model = model
        self.ref = ref
        self.device = device
        self._modules = dict(model.named_modules())

    def check_layers(self, layers: Sequence[str]) -> None:
        bad = [name for name in layers if name not in self._modules or name == ""]
        if bad:
            stages = spec_of(self.name).stages
            raise ValueError(f"backbone {self.name!r} has no layer(s) {bad}; stages: {list(stages)} "
                             "(any module name of the timm model is accepted)")

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        self.check_layers(layers)
        need = set(layers)
        out: dict[str, torch.Tensor] = {}

        def make_hook(layer):
            def hook(_module, _inp, output):
                out[layer] = output.detach().clone()  # later in-place ops must not touch it
                if need <= out.keys():
                    raise _StopForward

            return hook

        handles = [self._modules[layer].register_forward_hook(make_hook(layer)) for layer in need]
        try:
            self.model(x.to(self.device))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return out

    __call__ = forward


_BACKBONES_LOADED: OrderedDict[tuple, Backbone] = OrderedDict()


def clear_backbone_cache() -> None:
    _BACKBONES_LOADED.clear()


def _head_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    cls = cfg.get("classifier")
    names = [cls] if isinstance(cls, str) else list(cls or [])
    return tuple(n + "." for n in names + ["fc", "classifier", "head", "pre_logits", "global_pool"])


#: Keys under which checkpoints nest their state dict (timm / torchvision training scripts, OpenOOD's
#: and other research code's), tried in this order.
STATE_DICT_KEYS = ("state_dict", "model", "net", "model_state_dict", "state_dict_ema", "model_ema")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The one reader of weight files (backbones, trained classifiers, FCDD's vgg11_bn): a
    ``.safetensors`` file or a torch file read with ``weights_only=True`` (a pickle that names any
    other callable is refused, nothing runs); a state dict nested under one of ``STATE_DICT_KEYS``
    is unwrapped, DataParallel's ``module.`` prefix stripped, non-tensor entries dropped."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in STATE_DICT_KEYS:
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict (got {type(state).__name__})")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items() if torch.is_tensor(v)}


def load_weights_file(model: torch.nn.Module, path: str) -> None:
    """Load a timm or torchvision checkpoint into ``model``; the classifier head may be missing or
    differ (it is never used), every other parameter and buffer must be present and match."""
    state = read_state_dict(path)
    own = model.state_dict()
    heads = _head_prefixes(model)
    use = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    bad_shape = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
                 and not k.startswith(heads)]
    missing = [k for k in own if k not in use and not k.startswith(heads)
               and not k.endswith("num_batches_tracked")]
    if bad_shape or missing:
        raise ValueError(f"weights file {path} does not fit {type(model).__name__}: "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"shape mismatch {bad_shape[:5]}")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        log.info("%s: ignoring %d unexpected keys (e.g. %s)", path, len(unexpected), unexpected[:3])
    model.load_state_dict(use, strict=False)


def get_backbone(name: str, pretrained: bool = True, weights: str | None = None,
                 device: str = "cpu", ref: WeightsRef | None = None) -> Backbone:
    """The frozen backbone, built once per (name, weights, device) in this process."""
    ref = ref or resolve_weights(name, pretrained, weights)
    key = (name, ref.id, str(device))
    if key in _BACKBONES_LOADED:
        _BACKBONES_LOADED.move_to_end(key)
        return _BACKBONES_LOADED[key]
    import timm

    spec = spec_of(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random init is a fixed function of the name: features stay cacheable
        model = timm.create_model(spec.timm_name, pretrained=False)
    if ref.path is not None:
        load_weights_file(model, ref.path)
    model.eval().requires_grad_(False).to(device)
    bb = Backbone(name, model, ref, str(device))
    _BACKBONES_LOADED[key] = bb
    while len(_BACKBONES_LOADED) > MAX_CACHED_BACKBONES:
        _BACKBONES_LOADED.popitem(last=False)
    return bb


# ----------------------------------------------------------------------------- feature cache
def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def feature_key(backbone: str, weights_id: str, transform: Transform, split_key: str) -> tuple:
    """Frozen features are a pure function of these (not of the seed, nor of the layers: an entry
    holds the union of the layers asked for)."""
    return ("features", backbone, weights_id, _hashable(transform.describe()), split_key)


def capture_layers(backbone: str, layers: Sequence[str]) -> list[str]:
    """The layers to keep from one forward pass: those asked for and, with CAPTURE_STAGE_PREFIX,
    every stage of the backbone up to the deepest requested stage."""
    want = list(dict.fromkeys(layers))
    stages = BACKBONES[backbone].stages if backbone in BACKBONES else ()
    if CAPTURE_STAGE_PREFIX and stages:
        deepest = max((stages.index(layer) for layer in want if layer in stages), default=-1)
        want = list(dict.fromkeys(list(stages[:deepest + 1]) + want))
    return want


def run_backbone(bb: Backbone, images, transform: Transform, layers: Sequence[str],
                 batch_size: int) -> dict[str, torch.Tensor]:
    """Forward every image once; returns layer -> N×C×h×w float32 CPU tensor."""
    n = len(images)
    parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    for start in range(0, n, batch_size):
        x = to_tensor(images[start:start + batch_size], transform, batch=batch_size)
        out = bb(x, layers)
        for layer in layers:
            parts[layer].append(out[layer].float().cpu())
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


def extract_features(split: Split, ctx: RunContext, *, backbone: str, layers: Sequence[str],
                     transform: Transform, pretrained: bool = True, weights: str | None = None,
                     batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Layer outputs of a frozen backbone for every image of ``split`` (CPU float32 N×C×h×w),
    through ``ctx.cache``. A miss for a layer the entry lacks recomputes the union of the entry's
    layers and the requested ones and replaces the entry. Records ``ctx.weights_sha256``.
    The returned tensors are shared with the cache: do not modify them in place."""
    layers = list(layers)
    ref = resolve_weights(backbone, pretrained, weights)
    if ref.sha256:
        ctx.weights_sha256 = ref.sha256
    key = feature_key(backbone, ref.id, transform, split.key)

    def compute(want: Sequence[str]) -> dict[str, torch.Tensor]:
        bb = get_backbone(backbone, pretrained, weights, ctx.device, ref=ref)
        bb.check_layers(want)
        ctx.log.info("features %s %s for %d images of %s", backbone, list(want), len(split), split.key)
        return run_backbone(bb, split.images, transform, want, batch_size)

    entry = ctx.cache.get(key)
    if entry is not None and not set(layers) <= entry.keys():
        value = compute(list(dict.fromkeys(list(entry) + capture_layers(backbone, layers))))
        ctx.cache.misses += 1
        ctx.cache.put(key, value)  # replaces the narrower entry
        ctx.cache_hit = False
    else:
        value = ctx.cached(key, lambda: compute(capture_layers(backbone, layers)))
    return {layer: value[layer] for layer in layers}


# ----------------------------------------------------------------------------- method base
def anomaly_maps(patch_scores: torch.Tensor, size: int, sigma: float) -> np.ndarray:
    """N×h×w patch scores -> N×size×size maps: bilinear up-sampling (align_corners=False) then a
    Gaussian filter of std ``sigma`` px (scipy, as the PatchCore / PaDiM reference code)."""
    from scipy.ndimage import gaussian_filter

    maps = F.interpolate(patch_scores[:, None].float(), size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0].cpu().numpy()
    if sigma > 0:
        maps = np.stack([gaussian_filter(m, sigma=sigma) for m in maps]) if len(maps) else maps
    return maps.astype(np.float32, copy=False)


class FrozenFeatureParams(MethodParams):
    """What every frozen-feature method shares. ``weights: PATH`` overrides ``pretrained``."""

    backbone: str = "wide_resnet50_2"
    layers: list[str] = ["layer2", "layer3"]
    pretrained: bool = True
    weights: str | None = None
    image_size: int = 256
    crop: int | None = 224
    batch_size: int = 32
    mask_resize: MaskResize = "nearest"    # how the orchestrator resizes ground truth

    @field_validator("image_size", "batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v


    @field_validator("layers")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one layer")
        return v

    @model_validator(mode="after")
    def _crop_fits(self):
        if self.crop is not None and not 0 < self.crop <= self.image_size:
            raise ValueError(f"crop {self.crop} must be in (0, image_size={self.image_size}]")
        spec_of_cheap(self.backbone)
        return self


def spec_of_cheap(name: str) -> None:
    """Validate a backbone name (ValueError for pydantic) without importing timm for known ones."""
    if name not in BACKBONES:
        try:
            spec_of(name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None


def weights_tag(params: FrozenFeatureParams) -> str:
    """Cheap identity of the requested weights (no file hashing): for affinity keys."""
    if params.weights:
        return f"file:{os.path.expanduser(params.weights)}"
    return "pretrained" if params.pretrained else "random-init"


class FrozenFeatureMethod(Method):
    """Base of methods on frozen backbone features (PatchCore, PaDiM, OrthoAD)."""

    Params = FrozenFeatureParams
    protocols = {"one_class", "unified"}

    def __init__(self, params: FrozenFeatureParams, ctx: RunContext):
        super().__init__(params, ctx)
        spec = spec_of(params.backbone)
        self.spec = spec
        self.transform = Transform(resize=params.image_size, crop=params.crop, channels=3,
                                   mean=spec.mean, std=spec.std)
        self.mask_resize = params.mask_resize

    def features(self, split: Split, layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        p = self.params
        return extract_features(split, self.ctx, backbone=p.backbone, layers=layers or p.layers,
                                transform=self.transform, pretrained=p.pretrained, weights=p.weights,
                                batch_size=p.batch_size)

    def features_key(self, split: Split) -> tuple:
        """The feature cache's key for ``split`` under this method's backbone, weights and transform.
        Records ``ctx.weights_sha256`` as ``extract_features`` does, so a cell served entirely by a
        derived artefact still names the weights file behind it."""
        p = self.params
        ref = resolve_weights(p.backbone, p.pretrained, p.weights)
        if ref.sha256:
            self.ctx.weights_sha256 = ref.sha256
        return feature_key(p.backbone, ref.id, self.transform, split.key)

    def derived(self, split: Split, kind: str, depends_on: dict, compute: Callable[[], Any]) -> Any:
        """A seed-independent artefact computed from ``split``'s features (e.g. PatchCore's patch
        embedding), held in the same per-worker cache under (kind, the features' key, depends_on).
        ``depends_on`` must name every parameter the artefact reads beyond the features, and nothing
        seeded may enter ``compute``. A miss counts against ``ctx.cache_hit`` like a feature miss."""
        key = (kind, self.features_key(split), _hashable(depends_on))
        return self.ctx.cached(key, compute)

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        pretrained = self.params.pretrained and not self.params.weights
        out.update(timm_model=self.spec.timm_name if (self.params.pretrained or self.params.weights)
                   else self.spec.architecture,
                   pretrained_tag=(self.spec.timm_name.partition(".")[2] or None) if pretrained else None,
                   transform=self.transform.describe(), input_size=self.transform.size)
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        return ("features", params.backbone, weights_tag(params), params.image_size, params.crop)
