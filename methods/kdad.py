"""KDAD: Salehi, Sadjadi, Baselizadeh, Rohban, Rabiee, "Multiresolution Knowledge Distillation for
Anomaly Detection", CVPR 2021 (arXiv:2011.11108); official code rohban-lab/Knowledge_Distillation_AD
(``configs/config.yaml``, ``loss_functions.py``, ``test_functions.py``, ``models/network.py``).

* Source S: an ImageNet-pretrained VGG-16, frozen; its critical layers CP_i are the max-pools that
  end blocks 2-5 (Sec. 3.2: "the four final layers of each convolutional block, i.e. max-pooling
  layers"; official ``output_real[3], [6], [9], [12]``). Cloner C: a smaller bias-free VGG
  (``methods._kdad_nets.Cloner``), trained on normal images only.
* Losses (Sec. 3.1): L_val = Σ_i 1/N_i Σ_j (a_s^{CP_i}(j) - a_c^{CP_i}(j))² (Eq. 1) and
  L_dir = Σ_i 1 - vec(a_s^{CP_i})ᵀ vec(a_c^{CP_i}) / (‖vec(a_s^{CP_i})‖ ‖vec(a_c^{CP_i})‖) (Eq. 3).
  The paper writes L_total = L_val + λ L_dir (Eq. 4); the official code, which produced its
  tables, weights the other term: L_total = L_dir + λ L_val with λ = 0.01 (0.5 on MVTec AD). The
  two are the same objective up to a positive factor with λ_paper = 1 / λ_code; ``lamda`` here is
  the code's λ.
* Anomaly score (Sec. 3.1: the discrepancy of Eq. 4 is thresholded): L_total of the test image;
  the official ``detection_test`` sums it over the three deepest critical layers (``score_layers``).
* Localisation (Sec. 3.1, Eqs. 5-6; Sec. 4.2.2): the attribution map Λ = ∂L_total/∂x (the
  ``gradients`` method, as in the paper's results; ``smooth_grad`` and ``gbp`` are the
  alternatives of Table 1), reduced over colour channels by Σ_c |Λ_c| (official
  ``convert_to_grayscale``), Gaussian-filtered with σ = 4 and opened (erosion then dilation) with a
  3×3 ellipse. Maps are made for test splits that have masks, at the transform's input size.
  Before the filter each map is rescaled to [0, 1] by its own minimum and 99th percentile and
  clipped (official ``utils/utils.py`` ``convert_to_grayscale``, lines 11-17, called for every
  map by ``test_functions.py`` ``gradients_localization`` line 119 and ``VanillaSaliency``):
  ``map_normalization: per_image`` (default). ``none`` keeps the raw |gradient| scale, comparable
  across images (the official protocol scores anomalous test images only, README: "remove the
  good folder", where per-image scaling matters less). The grey opening of the filtered map
  equals the official binary opening of every thresholded map (``compute_localization_auc``).

Epochs: ``epochs`` counts training passes. The official loop runs ``range(num_epochs + 1)``
(``train.py`` line 51) but checkpoints and evaluates only at epoch indices divisible by 50 / 10
(lines 77-89), so with the config's num_epochs 51 / 201 / 601 (``configs/config.yaml`` line 8) the
last saved and evaluated model is the one after index 50 / 200 / 600, i.e. after num_epochs
passes: the presets' values. Its trailing pass is never saved or evaluated;
``extra_final_epoch: true`` runs it anyway (num_epochs + 1 passes, the loop's last in-memory model).

Per-dataset settings (``preset``; ``auto`` picks by the recipe family the train split's dataset
declares, else by its geometry): official ``configs/config.yaml`` and ``dataloader.py``, paper Sec. 4.1:

==========  ===========================  ==============  ======  ======
preset      input                        normalisation   epochs  lamda
==========  ===========================  ==============  ======  ======
mnist       resize 32 (grey repeated)    none            51      0.01
cifar10     resize 256, centre crop 224  ImageNet        201     0.01
mvtec       resize 128                   none            601     0.5
==========  ===========================  ==============  ======  ======

All presets: Adam, lr 1e-3, batch 64 (Sec. 3.2), no augmentation. ``pretrained: false`` gives a
fixed random frozen source (tests / demo); the paper setting needs the ImageNet weights (a clear
``WeightsNotFoundError`` when they are absent offline, see ``methods.backbones``).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from data.base import Split
from data.protocols import take
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, Transform, to_tensor
from methods._kdad_nets import CLONER_CFG, POOL_LAYERS, Cloner, source_network
from methods.base import LearningRate, Method, MethodParams, RunContext, Scores, check_finite, register

PRESETS = {
    "mnist": dict(image_size=32, crop=None, normalize=False, epochs=51, lamda=0.01),
    "cifar10": dict(image_size=256, crop=224, normalize=True, epochs=201, lamda=0.01),
    "mvtec": dict(image_size=128, crop=None, normalize=False, epochs=601, lamda=0.5),
}
#: The preset for a dataset's declared ``recipe_family`` (``data.base.Split.recipe_family``).
FAMILY_PRESET = {"mnist": "mnist", "cifar10": "cifar10", "cifar_like": "cifar10", "mvtec": "mvtec"}
ELLIPSE_3X3 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)  # cv2 MORPH_ELLIPSE (3, 3)


class KDADParams(MethodParams):
    preset: Literal["auto", "mnist", "cifar10", "mvtec"] = "auto"
    image_size: int | None = Field(None, ge=2)    # None: the preset's (>= 2^deepest block)
    crop: int | None = None                       # None: the preset's (0: no crop)
    normalize: bool | None = None                 # ImageNet mean/std; None: the preset's
    epochs: int | None = Field(None, ge=1)        # None: the preset's
    lamda: float | None = Field(None, ge=0)       # weight of L_val (code convention); None: preset
    batch_size: int = Field(64, ge=1)             # Sec. 3.2
    lr: LearningRate = 1e-3                       # Sec. 3.2 (Adam)
    pretrained: bool = True                       # ImageNet VGG-16 source (Sec. 3.2)
    weights: str | None = None                    # local VGG-16 checkpoint (timm / torchvision)
    cloner: Literal["small", "equal"] = "small"   # official cfg 'B' / 'A' (Sec. 3.3.2)
    critical_layers: list[str] = list(POOL_LAYERS[1:])   # pool2..pool5 (Sec. 3.2)
    score_layers: list[str] = list(POOL_LAYERS[2:])      # official detection_test: pool3..pool5
    direction_only: bool = False                  # official DirectionOnlyLoss ablation
    localization: Literal["gradients", "smooth_grad", "gbp", "none"] = "gradients"  # Sec. 4.2.2
    sigma: float = Field(4.0, ge=0)               # Gaussian filter of the map (Sec. 4.2.2)
    opening: bool = True                          # 3×3 ellipse opening (Sec. 4.2.2)
    map_normalization: Literal["per_image", "none"] = "per_image"   # official convert_to_grayscale
    extra_final_epoch: bool = False               # official loop's unsaved trailing pass (see doc)
    smooth_grad_n: int = Field(50, ge=1)          # official smooth_grad_localization
    smooth_grad_noise: float = Field(0.05, ge=0)  # noise std as a fraction of the input range
    eval_batch_size: int = Field(64, ge=1)
    target_cache_mb: int = Field(1024, ge=0)      # keep S's train activations if they fit

    @field_validator("critical_layers", "score_layers")
    @classmethod
    def _pools(cls, v: list[str]) -> list[str]:
        bad = [layer for layer in v if layer not in POOL_LAYERS]
        if bad or not v or len(set(v)) != len(v):
            raise ValueError(f"distinct VGG-16 block-ending max-pools from {list(POOL_LAYERS)}; got {v}")
        return sorted(v, key=POOL_LAYERS.index)

    @model_validator(mode="after")
    def _score_subset(self):
        if self.cloner == "small" and POOL_LAYERS[0] in self.critical_layers:
            raise ValueError(f"the small cloner's block 1 has 16 channels, not the source's 64: "
                             f"{POOL_LAYERS[0]} can be a critical layer only with cloner: equal")
        if not set(self.score_layers) <= set(self.critical_layers):
            raise ValueError(f"score_layers {self.score_layers} must be critical layers "
                             f"{self.critical_layers} (only those are distilled)")
        return self


def kd_losses(src: list[torch.Tensor], clo: list[torch.Tensor], lamda: float,
              direction_only: bool = False) -> torch.Tensor:
    """Per-sample L_total = Σ_i (1 - cos(vec a_s^i, vec a_c^i)) + λ Σ_i mean_j (a_s^i(j) - a_c^i(j))²
    over the given layers (Eqs. 1, 3, 4 in the official code's weighting); returns B values."""
    total = src[0].new_zeros(src[0].shape[0])
    for s, c in zip(src, clo):
        s2, c2 = s.flatten(1), c.flatten(1)
        total = total + (1 - F.cosine_similarity(c2, s2, dim=1))
        if not direction_only:
            total = total + lamda * (s2 - c2).pow(2).mean(1)
    return total


def auto_preset(split: Split) -> str:
    """The preset for a train split: by the recipe family its dataset declares, else masks/size ->
    mvtec, grey -> mnist, colour -> cifar10."""
    if split.recipe_family in FAMILY_PRESET:
        return FAMILY_PRESET[split.recipe_family]
    if split.masks is not None:
        return "mvtec"
    first = np.asarray(split.images[0])
    if first.ndim == 2 or first.shape[-1] == 1:
        return "mnist"
    return "mvtec" if max(first.shape[:2]) > 64 else "cifar10"


@register("kdad")
class KDAD(Method):
    """Multiresolution knowledge distillation (CVPR 2021, Eqs. 1-6)."""

    Params = KDADParams
    protocols = {"one_class"}
    paper = "Salehi et al., Multiresolution Knowledge Distillation for Anomaly Detection, CVPR 2021"
    reference = ("rohban-lab/Knowledge_Distillation_AD@0c574ae9ad12666982a1ccc2c7148acd6bf442fe: "
                 "configs/config.yaml, train.py, loss_functions.py, test_functions.py, utils/utils.py, "
                 "models/network.py, dataloader.py")

    def __init__(self, params: KDADParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.setup: dict | None = None
        self.cloner: Cloner | None = None
        self.source = None
        self.weights_id: str | None = None
        if params.preset != "auto":
            self._resolve(params.preset)

    # ------------------------------------------------------------------------------- set-up
    def _resolve(self, preset: str) -> None:
        p = self.params
        s = dict(PRESETS[preset], preset=preset)
        for key in ("image_size", "normalize", "epochs", "lamda"):
            if getattr(p, key) is not None:
                s[key] = getattr(p, key)
        if p.crop is not None:
            s["crop"] = p.crop or None
        if s["crop"] is not None and not 0 < s["crop"] <= s["image_size"]:
            raise ValueError(f"kdad: crop {s['crop']} must be in (0, image_size={s['image_size']}]")
        need = 2 ** max(self._blocks(p.critical_layers))
        if (s["crop"] or s["image_size"]) < need:
            raise ValueError(f"kdad: input side {s['crop'] or s['image_size']} is too small for "
                             f"{p.critical_layers[-1]} (block {need.bit_length() - 1} needs >= {need} px)")
        self.setup = s
        norm = s["normalize"]
        self.transform = Transform(resize=s["image_size"], crop=s["crop"], channels=3,
                                   mean=IMAGENET_MEAN if norm else None, std=IMAGENET_STD if norm else None)

    def _blocks(self, layers: list[str]) -> list[int]:
        return [POOL_LAYERS.index(layer) + 1 for layer in layers]

    def _input(self, images, index=None) -> torch.Tensor:
        part = images if index is None else take(images, np.asarray(index))
        return to_tensor(part, self.transform).to(self.ctx.device)

    # ------------------------------------------------------------------------------- fit
    def fit(self, train: Split) -> None:
        p, ctx = self.params, self.ctx
        if self.setup is None:
            self._resolve(auto_preset(train))
        self.source, ref = source_network(p.pretrained, p.weights, ctx.device)
        self.weights_id = ref.id
        if ref.sha256:
            ctx.weights_sha256 = ref.sha256
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.seed))
            self.cloner = Cloner(CLONER_CFG[p.cloner]).to(ctx.device)
        g = torch.Generator().manual_seed(int(ctx.seed))
        blocks = self._blocks(p.critical_layers)
        opt = torch.optim.Adam(self.cloner.parameters(), lr=p.lr)
        n = len(train)
        targets = self._train_targets(train, blocks)
        for epoch in range(self.passes()):
            self.cloner.train()
            losses, order = [], torch.randperm(n, generator=g).numpy()
            for s in range(0, n, p.batch_size):
                idx = order[s:s + p.batch_size]
                x = self._input(train.images, idx)
                if targets is not None:
                    target = [t[torch.from_numpy(idx)].to(ctx.device) for t in targets]
                else:
                    with torch.no_grad():
                        target = self.source(x, blocks)
                loss = kd_losses(target, self.cloner(x, blocks), self.setup["lamda"], p.direction_only).mean()
                check_finite(loss.item(), epoch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            ctx.log_epoch(epoch, float(np.mean(losses)))

    def passes(self) -> int:
        """Training passes: the resolved ``epochs`` (+1 with ``extra_final_epoch``)."""
        return self.setup["epochs"] + int(self.params.extra_final_epoch)

    def _train_targets(self, train: Split, blocks: list[int]) -> list[torch.Tensor] | None:
        """S's critical-layer activations of every training image, computed once (there is no
        augmentation, so they are the same every epoch) through ``ctx.cache`` (seed-independent:
        the seeds of a grid share them) when they fit ``target_cache_mb``; else None."""
        side = self.transform.size
        per_image = sum(min(512, 64 * 2 ** (b - 1)) * (side // 2 ** b) ** 2 for b in blocks) * 4  # float32
        if per_image * len(train) > self.params.target_cache_mb * 2 ** 20:
            return None
        key = ("kdad-source", self.weights_id, tuple(sorted(self.transform.describe().items())),
               train.key, tuple(blocks))

        @torch.no_grad()
        def compute() -> list[torch.Tensor]:
            parts: list[list[torch.Tensor]] = [[] for _ in blocks]
            bs = self.params.eval_batch_size
            for s in range(0, len(train), bs):
                x = self._input(train.images, np.arange(s, min(s + bs, len(train))))
                for acc, t in zip(parts, self.source(x, blocks)):
                    acc.append(t.cpu())
            return [torch.cat(acc) for acc in parts]

        return self.ctx.cached(key, compute)

    # ------------------------------------------------------------------------------- score
    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks(self.params.score_layers)
        return kd_losses(self.source(x, blocks), self.cloner(x, blocks), self.setup["lamda"],
                         self.params.direction_only)

    def _attribution(self, x: torch.Tensor) -> torch.Tensor:
        """B×C×H×W ∂L_total/∂x (Eq. 5) by the selected method; samples are independent (eval
        mode), so the gradient of the summed loss is each sample's own gradient."""
        method = self.params.localization

        def grad_of(inp: torch.Tensor) -> torch.Tensor:
            inp = inp.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._loss(inp).sum(), inp)
            return grad

        if method == "gradients":
            return grad_of(x)
        if method == "gbp":
            self.cloner.set_guided(True)
            try:
                return grad_of(x)
            finally:
                self.cloner.set_guided(False)
        # smooth_grad: average over noisy copies (Smilkov et al.), noise std a fraction of the range
        span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
        g = torch.Generator(device=x.device).manual_seed(int(self.ctx.seed))
        acc = torch.zeros_like(x)
        for _ in range(self.params.smooth_grad_n):
            noise = torch.randn(x.shape, generator=g, device=x.device) * span * self.params.smooth_grad_noise
            acc += grad_of(x + noise)
        return acc / self.params.smooth_grad_n

    def localization_maps(self, attribution: torch.Tensor) -> np.ndarray:
        """B×C×H×W attributions -> B×H×W maps: Σ_c |Λ_c|, optional per-image 99th-percentile
        scaling, Gaussian σ, grey opening with a 3×3 ellipse (Eq. 6)."""
        from scipy.ndimage import gaussian_filter, grey_opening

        maps = attribution.abs().sum(1).cpu().double().numpy()
        out = np.empty(maps.shape, dtype=np.float32)
        for i, m in enumerate(maps):
            if self.params.map_normalization == "per_image":
                lo, hi = m.min(), np.percentile(m, 99)
                m = np.clip((m - lo) / max(hi - lo, 1e-12), 0, 1)
            if self.params.sigma > 0:
                m = gaussian_filter(m, sigma=self.params.sigma)
            if self.params.opening:
                m = grey_opening(m, footprint=ELLIPSE_3X3)
            out[i] = m
        return out

    def score(self, test: Split) -> Scores:
        if self.cloner is None:
            raise RuntimeError("score() before fit()")
        self.cloner.eval()
        want_maps = test.masks is not None and self.params.localization != "none"
        scores, maps = [], []
        bs = self.params.eval_batch_size
        for s in range(0, len(test), bs):
            x = self._input(test.images, np.arange(s, min(s + bs, len(test))))
            with torch.no_grad():
                scores.append(self._loss(x).double().cpu())
            if want_maps:
                maps.append(self.localization_maps(self._attribution(x)))
        image = torch.cat(scores).numpy()
        return Scores(image=image, pixel=np.concatenate(maps) if want_maps else None)

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        if self.setup is not None:
            out.update({k: v for k, v in self.setup.items()})
            out.update(transform=self.transform.describe(), input_size=self.transform.size,
                       passes=self.passes())
        out.update(
            source="VGG-16 features (frozen)", source_weights=self.weights_id,
            cloner_cfg=CLONER_CFG[self.params.cloner], cloner_bias=False, cloner_batch_norm=True,
            optimizer="Adam", loss="sum over critical layers of (1 - cos) + lamda * MSE (official weighting)",
            image_score="l_total", image_score_rule=f"L_total over {self.params.score_layers}",
            pixel_scores=("none" if self.params.localization == "none" else
                          f"{self.params.localization} of L_total w.r.t. the input, sum |.| over channels, "
                          f"gaussian sigma {self.params.sigma}, opening {self.params.opening}, "
                          f"normalisation {self.params.map_normalization}; for test splits with masks"))
        return out
