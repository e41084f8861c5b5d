"""UniAD: You et al., "A Unified Model for Multi-class Anomaly Detection", NeurIPS 2022
(arXiv:2206.03687), following the official code zhiyuanyou/UniAD (experiments/*/config.yaml,
models/reconstructions/uniad.py, models/necks/mfcn.py, utils/eval_helper.py, tools/train_val.py).

* Features (Sec. 3 "implementation details", Sec. 4): a frozen ImageNet EfficientNet-B4 at 224×224
  (resize, no crop, ImageNet mean / std); the last block of stages 1, 2, 3 and 5 (official
  ``outlayers [1,2,3,4]`` = blocks 1, 5, 9, 21 of 32; timm ``blocks.0/1/2/4``; 24 + 32 + 56 + 160 =
  272 channels) for MVTec AD, plus stage 7 (``blocks.6``, 448 channels) for CIFAR-10
  (``outlayers [1..5]``), each resized to the stride-16 grid (14×14) and concatenated (MFCN neck).
* Reconstruction (Sec. 3, Fig. 3): the neighbour-masked encoder and layer-wise query decoder of
  ``methods/_uniad_model.py`` (256-d, 8 heads, 4 + 4 layers, FFN 1024, dropout 0.1, 7×7 neighbour
  mask in all three attentions) with feature jittering in training (noise N(0, (20 ||f|| / C)^2) on
  every token, probability 1).
* Loss (Sec. 3): the mean squared error between reconstructed and input features (FeatureMSELoss).
  AdamW (lr 1e-4, weight decay 1e-4), 1000 epochs, lr x 0.1 after 800 (StepLR), gradient norm
  clipped at 0.1; batch 8 per GPU on 8 GPUs for MVTec AD (64) and 16 per GPU (128) for CIFAR-10.
* Anomaly map (Sec. 3): ||f_rec - f||_2 over channels at every position, bilinearly up-sampled
  (align_corners=True) to the input size. Image score (README "Explanation of evaluation results";
  eval_helper.py): the maximum of the 16×16 average-pooled map for MVTec AD, the mean of the map for
  CIFAR-10 (``image_score``; ``auto`` picks by dataset and records the choice).

The ``unified`` protocol trains this one model on the normal images of every category and scores
each category's test split with it; ``one_class`` with a class set (``classes: [[0,1,2,3,4]]``) is
UniAD's CIFAR-10 setting (the set is normal, every other class anomalous).

Known differences from the official code: timm's TF-ported EfficientNet-B4 (dynamic 'same' padding)
instead of lukemelas' port (static padding computed for 380 px); CIFAR-10 up-sampled 32 -> 224 with
antialiased bilinear interpolation (official: PIL Lanczos) and scored on every test image (official:
as many randomly drawn anomalies as normal images); the learning-rate step after epoch 800 (official:
``step(epoch)`` after each epoch, one epoch later); AUROC is not flipped when below 0.5 (official
``eval_helper`` reports 1 - AUROC then).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from data.base import Split
from data.transforms import Transform
from methods._uniad_model import UniADNet, align_features
from methods.backbones import (feature_key, get_backbone, resolve_weights, run_backbone, spec_of,
                               spec_of_cheap, weights_tag)
from methods.base import LearningRate, Method, MethodParams, Scores, check_finite, register

# timm's port of the TensorFlow EfficientNet-B4 ImageNet weights (the official code loads
# lukemelas' port of the same TF release, efficientnet-b4-6ed6700e.pth).
DEFAULT_BACKBONE = "tf_efficientnet_b4.aa_in1k"
EFFICIENTNET_LAYERS = {"mvtec": ["blocks.0", "blocks.1", "blocks.2", "blocks.4"],
                       "cifar10": ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]}
SETTINGS = {  # official experiments/MVTec-AD and experiments/CIFAR-10/*/config.yaml, 8 GPUs
    "mvtec": dict(batch_size=64, image_score="max"),
    "cifar10": dict(batch_size=128, image_score="mean"),
}
RESNET_LAYERS = ["layer1", "layer2", "layer3"]  # official hint for resnets: outlayers [1,2,3]
ALIGN_CHUNK = 256  # images per backbone pass when building aligned features (bounds memory)


def dataset_setting(split: Split) -> str:
    """The official setting a split belongs to: "cifar10" for a dataset of the CIFAR-10 recipe
    family (``Split.recipe_family``), else "mvtec" (defect data)."""
    return "cifar10" if split.recipe_family == "cifar10" else "mvtec"


class UniADParams(MethodParams):
    """None / "auto" = the official setting of the dataset (``setting``: auto picks cifar10 for
    CIFAR-10 splits, mvtec otherwise)."""

    backbone: str = DEFAULT_BACKBONE
    pretrained: bool = True
    weights: str | None = None
    image_size: int = 224
    setting: Literal["auto", "mvtec", "cifar10"] = "auto"
    layers: list[str] | None = None
    feature_stride: int = 16            # MFCN outstrides [16]
    hidden_dim: int = 256
    nhead: int = 8
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    neighbor_size: list[int] | None = [7, 7]     # None: no neighbour mask
    neighbor_mask_in: list[bool] = [True, True, True]  # [encoder, decoder attn 1, decoder attn 2]
    jitter_scale: float = 20.0
    jitter_prob: float = 1.0
    epochs: int = 1000
    batch_size: int | None = None       # 64 (MVTec AD), 128 (CIFAR-10): 8 GPUs x 8 / 16
    lr: LearningRate = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = [0.9, 0.999]
    lr_step: int = 800
    lr_gamma: float = Field(0.1, gt=0, allow_inf_nan=False)
    clip_max_norm: float = 0.1
    image_score: Literal["auto", "max", "mean", "std"] = "auto"
    avgpool_size: int = 16
    feature_batch_size: int = 32        # backbone forward batch (no effect on results)

    @field_validator("image_size", "feature_stride", "hidden_dim", "nhead", "dim_feedforward", "epochs",
                     "lr_step", "avgpool_size", "feature_batch_size")
    @classmethod
    def _positive(cls, v):
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("batch_size")
    @classmethod
    def _positive_opt(cls, v):
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("neighbor_size")
    @classmethod
    def _pair(cls, v):
        if v is not None and (len(v) != 2 or min(v) <= 0):
            raise ValueError("two positive integers [h, w]")
        return v

    @field_validator("neighbor_mask_in")
    @classmethod
    def _three(cls, v):
        if len(v) != 3:
            raise ValueError("three booleans [encoder, decoder 1, decoder 2]")
        return v

    @field_validator("layers")
    @classmethod
    def _nonempty(cls, v):
        if v is not None and not v:
            raise ValueError("at least one layer")
        return v

    @model_validator(mode="after")
    def _checks(self):
        spec_of_cheap(self.backbone)
        if self.hidden_dim % self.nhead:
            raise ValueError(f"hidden_dim {self.hidden_dim} must be divisible by nhead {self.nhead}")
        if self.image_size % self.feature_stride:
            raise ValueError(f"image_size {self.image_size} must be a multiple of feature_stride "
                             f"{self.feature_stride}")
        return self


@register("uniad")
class UniAD(Method):
    Params = UniADParams
    protocols = {"one_class", "unified"}
    paper = "You et al., A Unified Model for Multi-class Anomaly Detection, NeurIPS 2022"
    reference = ("zhiyuanyou/UniAD@a5b9d9d20c2aae680fa00fe5088616b611e05f3c: "
                 "models/reconstructions/uniad.py, models/necks/mfcn.py, experiments/MVTec-AD/config.yaml, utils/eval_helper.py")

    def __init__(self, params: UniADParams, ctx):
        super().__init__(params, ctx)
        self.spec = spec_of(params.backbone)
        self.transform = Transform(resize=params.image_size, crop=None, channels=3,
                                   mean=self.spec.mean, std=self.spec.std)
        self.grid = params.image_size // params.feature_stride
        self.setting: str | None = None if params.setting == "auto" else params.setting
        self.layers: list[str] | None = params.layers
        self.net: UniADNet | None = None
        self.channels: int | None = None

    # -- settings that depend on the dataset (resolved at fit)
    def _resolve(self, train: Split) -> None:
        p = self.params
        if self.setting is None:
            self.setting = dataset_setting(train)
        if self.layers is None:
            arch = self.spec.architecture
            if "efficientnet" in arch:
                self.layers = list(EFFICIENTNET_LAYERS[self.setting])
            elif arch.startswith(("resnet", "wide_resnet")):
                self.layers = list(RESNET_LAYERS)
            else:
                raise ValueError(f"uniad: no default layers for backbone {p.backbone!r}; give `layers:`")

    @property
    def batch_size(self) -> int:
        return self.params.batch_size or SETTINGS[self.setting or "mvtec"]["batch_size"]

    @property
    def image_score(self) -> str:
        return self.params.image_score if self.params.image_score != "auto" \
            else SETTINGS[self.setting or "mvtec"]["image_score"]

    # -- features
    def features(self, split: Split) -> torch.Tensor:
        """N×C×h×w aligned (MFCN) features of the frozen backbone, through the shared cache under
        their own key (the backbone runs in chunks: the raw stage maps of a whole unified MVTec
        train split would not fit in memory, their aligned concatenation does). Raw stage maps
        already cached by another method for the same images and transform are aligned instead."""
        p, ctx = self.params, self.ctx
        ref = resolve_weights(p.backbone, p.pretrained, p.weights)
        if ref.sha256:
            ctx.weights_sha256 = ref.sha256
        base = feature_key(p.backbone, ref.id, self.transform, split.key)
        key = ("uniad-aligned", tuple(self.layers), self.grid) + base[1:]

        def compute() -> torch.Tensor:
            raw = ctx.cache.get(base)  # another method's pass over the same images (e.g. FastFlow's)
            if raw is not None and set(self.layers) <= raw.keys():
                return align_features([raw[layer] for layer in self.layers], (self.grid, self.grid))
            bb = get_backbone(p.backbone, p.pretrained, p.weights, ctx.device, ref=ref)
            bb.check_layers(self.layers)
            ctx.log.info("uniad features %s %s for %d images of %s", p.backbone, self.layers, len(split), split.key)
            images = split.images
            out = None
            for s in range(0, len(split), ALIGN_CHUNK):
                chunk = images[s:s + ALIGN_CHUNK]
                raw = run_backbone(bb, chunk, self.transform, self.layers, p.feature_batch_size)
                aligned = align_features([raw[layer] for layer in self.layers], (self.grid, self.grid))
                if out is None:
                    out = torch.empty((len(split),) + tuple(aligned.shape[1:]), dtype=torch.float32)
                out[s:s + len(aligned)] = aligned
            return out

        return ctx.cached(key, compute)

    # -- training
    def fit(self, train: Split) -> None:
        p, ctx = self.params, self.ctx
        self._resolve(train)
        feats = self.features(train)
        n, c, h, w = feats.shape
        self.channels = c
        self.net = UniADNet(c, h, w, p.hidden_dim, p.nhead, p.num_encoder_layers, p.num_decoder_layers,
                            p.dim_feedforward, p.dropout, p.neighbor_size, p.neighbor_mask_in).to(ctx.device)
        opt = torch.optim.AdamW(self.net.parameters(), lr=p.lr, betas=tuple(p.betas), weight_decay=p.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=p.lr_step, gamma=p.lr_gamma)
        g = torch.Generator().manual_seed(ctx.seed)
        jit = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 1)
        bs = self.batch_size
        self.net.train()
        for epoch in range(1, p.epochs + 1):
            order = torch.randperm(n, generator=g)
            total = 0.0
            for s in range(0, n, bs):  # every image once per epoch (no drop_last, official loader)
                x = feats[order[s:s + bs]].to(ctx.device)
                rec = self.net(x, jitter=(p.jitter_scale, p.jitter_prob), generator=jit)
                loss = F.mse_loss(rec, x)
                check_finite(loss.item(), epoch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if p.clip_max_norm:
                    torch.nn.utils.clip_grad_norm_(self.net.parameters(), p.clip_max_norm)
                opt.step()
                total += loss.item() * len(x)
            ctx.log_epoch(epoch, total / n)
            sched.step()
        self.net.eval()

    # -- inference
    @torch.no_grad()
    def anomaly_maps(self, test: Split) -> np.ndarray:
        """N×S×S maps: ||f_rec - f||_2 per position, up-sampled bilinearly (align_corners=True)."""
        if self.net is None:
            raise RuntimeError("score() before fit()")
        feats = self.features(test)
        self.net.eval()
        size = self.params.image_size
        maps = np.empty((len(test), size, size), np.float32)
        bs = self.batch_size
        for s in range(0, len(test), bs):
            x = feats[s:s + bs].to(self.ctx.device)
            err = torch.sqrt(((self.net(x) - x) ** 2).sum(dim=1, keepdim=True))
            maps[s:s + bs] = F.interpolate(err, size=(size, size), mode="bilinear",
                                           align_corners=True)[:, 0].cpu().numpy()
        return maps

    def image_scores(self, maps: np.ndarray) -> np.ndarray:
        kind = self.image_score
        flat = maps.reshape(len(maps), -1)
        if kind == "mean":
            return flat.mean(axis=1).astype(np.float64)
        if kind == "std":
            return flat.std(axis=1).astype(np.float64)
        k = min(self.params.avgpool_size, maps.shape[-1], maps.shape[-2])
        pooled = F.avg_pool2d(torch.from_numpy(maps)[:, None], k, stride=1)
        return pooled.flatten(1).max(dim=1).values.double().numpy()

    def score(self, test: Split) -> Scores:
        maps = self.anomaly_maps(test)
        return Scores(image=self.image_scores(maps), pixel=maps)

    def resolved_params(self) -> dict:
        p = self.params
        out = p.model_dump(mode="json")
        score = self.image_score
        out.update(setting=self.setting, layers=self.layers, batch_size=self.batch_size,
                   image_score=score,
                   image_score_rule={"max": f"max of the {p.avgpool_size}x{p.avgpool_size} average-pooled map",
                                     "mean": "mean of the map", "std": "std of the map"}[score],
                   timm_model=self.spec.timm_name if (p.pretrained or p.weights) else self.spec.architecture,
                   transform=self.transform.describe(), input_size=self.transform.size,
                   feature_grid=[self.grid, self.grid], feature_channels=self.channels,
                   neck="bilinear (align_corners=True) resize of each stage to the stride-16 grid, concat",
                   optimizer="AdamW", lr_schedule=f"StepLR(step={p.lr_step} epochs, gamma={p.lr_gamma})",
                   loss="MSE(reconstructed, input features)",
                   anomaly_map="L2 over channels of (reconstruction - features), bilinear align_corners=True")
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        return ("features", params.backbone, weights_tag(params), params.image_size, None)
