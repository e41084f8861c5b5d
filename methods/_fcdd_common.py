"""Shared machinery of ``fcdd``, ``fcdd_hsc`` and ``fcdd_ae`` (Liznerski et al., "Explainable Deep
One-Class Classification", ICLR 2021; official code liznerski/fcdd@4fa850215792b5f4a3405151e30127a5b67dc3b6:
python/fcdd/runners/argparse_configs.py, datasets/mvtec.py, datasets/mvtec_base.py,
datasets/noise_modes.py, datasets/online_supervisor.py, datasets/outlier_exposure/cifar100.py,
training/bases.py, training/setup.py). Not a method module.

What lives here:

* the paper's per-dataset recipes (``FAMILIES``: optimiser, schedule, epochs, batch size, weight
  decay, Gaussian std of the heatmap kernel, preprocessing, augmentation, anomaly source, training-set
  repeats per epoch), chosen by the network's input size: 28 px (Fashion-MNIST config), 32 px
  (CIFAR-10 config), 224 px (MVTec-AD config);
* ``enlarge``: the MVTec-AD recipe repeats the training set 10 times per epoch (``ADMvTec.enlarge =
  True``, datasets/mvtec.py:14; ``MvTec.__init__`` repeats data 10x, mvtec_base.py:90-91) and the
  lr scheduler steps once per such epoch (training/bases.py:204), so its 200 epochs are 2,000
  passes over the images with 200 lr decays;
* confetti noise (``confetti_noise``) and the "malformed normal" anomalies made from it;
* the online supervisor: each training image is replaced with probability ``supervise_p`` (0.5)
  by an anomaly from the selected source (confetti | oe | semi), as fcdd's ``OnlineSupervisor``;
  ``anomaly_source: auto`` is the recipe's: outlier exposure with CIFAR-100 for the 28 / 32 px
  recipes (DefaultFmnistConfig / DefaultCifar10Config: supervise_mode 'noise', noise_mode 'cifar100'),
  confetti-noise malformed normals for the 224 px one (DefaultMvtecConfig); grey outlier images are
  made with ITU-R 601 luma (torchvision ``Grayscale``, outlier_exposure/cifar100.py:49);
* the pseudo-Huber losses (Eq. 1 HSC, Eq. 2 FCDD, Eq. 3 FCDD with ground-truth maps);
* ``FCDDFamily``: the fit / score skeleton the three methods share.

Outlier exposure and semi-supervision hooks (call before ``fit``):

* ``method.set_outlier_exposure(images)``: ``images`` is a ``Split``, an N×H×W×C uint8 array or a
  list of such images; they replace the outlier set below.
* Without the hook the outlier images come from the data side (``data.base.OutlierExposure``,
  read by ``data.protocols.outlier_exposure_split``; the method never loads a dataset itself):
  the set the grid's dataset entry names (``outlier_exposure: {name: cifar100, root: ...}``,
  carried by the train split, part of the cell's identity); else the params' ``oe_dataset`` /
  ``oe_dataset_params`` (existing grids); else the recipe's default, CIFAR-100's train side at
  28 / 32 px. Naming different sets in the entry and the params is an error; an unregistered
  dataset raises NotImplementedError naming what is missing.
* ``method.set_true_anomalies(split)``: labelled anomalies (rows with label 1; with ``split.masks``
  when available, which switches FCDD to the pixel-wise Eq. 3). Rows with label 1 in the train split
  are used too.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from data.base import OutlierExposure, Split
from data.transforms import Transform, resize_masks, to_tensor
from methods._nets import (Normalizer, Reception, fcdd_reception, fit_normalizer, gaussian_blur,
                           load_vgg11_bn_state)
from methods.base import LearningRate, Method, MethodParams, RunContext, Scores, check_finite

# --------------------------------------------------------------------------------------------
# Per-dataset recipes (fcdd python/fcdd/runners/argparse_configs.py)
# --------------------------------------------------------------------------------------------

FAMILIES = {
    # DefaultFmnistConfig: SGD(momentum 0.9, nesterov) lr 1e-2, LambdaLR 0.98^epoch, 400 epochs,
    # batch 128, wd 1e-6, preproc 'lcnaug1' (GCN-l1 + min-max, RandomCrop(28, pad 2), h-flip), σ 1.2,
    # outlier exposure with (grey) CIFAR-100
    "28": dict(size=28, raw_size=28, epochs=400, lr=1e-2, optimizer="sgd", scheduler="lambda",
               lr_decay=0.98, milestones=[], weight_decay=1e-6, batch_size=128, gauss_std=1.2,
               preprocessing="gcn_minmax", anomaly_source="oe", oe_dataset="cifar100", enlarge=1,
               config="fcdd DefaultFmnistConfig"),
    # DefaultCifar10Config: Adam lr 1e-3, MultiStepLR ×0.1 at 400 and 500, 600 epochs, batch
    # 20 × acc_batches 10 = 200, wd 1e-6, preproc 'aug1' (per-class mean/std, RandomCrop(32, pad 4),
    # h-flip, + 0.001·N(0, 1)), σ 1.2, outlier exposure with CIFAR-100
    "32": dict(size=32, raw_size=32, epochs=600, lr=1e-3, optimizer="adam", scheduler="milestones",
               lr_decay=None, milestones=[400, 500], weight_decay=1e-6, batch_size=200, gauss_std=1.2,
               preprocessing="mean_std", anomaly_source="oe", oe_dataset="cifar100", enlarge=1,
               config="fcdd DefaultCifar10Config (batch 20 x acc_batches 10)"),
    # DefaultMvtecConfig: SGD lr 1e-3, LambdaLR 0.985^epoch, 200 epochs, batch 16 × acc 8 = 128,
    # wd 1e-4, preproc 'lcnaug1' at raw 240 px (random 224 crop or resize to 224, noise), σ 12,
    # confetti malformed normals; ADMvTec.enlarge: the train set 10x per epoch (one lr decay each)
    "224": dict(size=224, raw_size=240, epochs=200, lr=1e-3, optimizer="sgd", scheduler="lambda",
                lr_decay=0.985, milestones=[], weight_decay=1e-4, batch_size=128, gauss_std=12.0,
                preprocessing="gcn_minmax", anomaly_source="confetti", oe_dataset=None, enlarge=10,
                config="fcdd DefaultMvtecConfig (batch 16 x acc_batches 8)"),
}
NET_FAMILY = {"cnn28": "28", "cnn28_w": "28", "cnn32_s": "32", "cnn32_lw3k": "32", "vgg11_224": "224"}
AUGMENTATION = {
    "28": "RandomCrop(28, padding=2) + horizontal flip (p=0.5), before normalisation",
    "32": "RandomCrop(32, padding=4) + horizontal flip (p=0.5) + 0.001*N(0,1), before normalisation "
          "(the official ColorJitter(0.01) is omitted)",
    "224": "raw 240 px: random 224 crop or nearest resize to 224 (p=0.5 each) + with p=0.5 "
           "N(0,1)*0.1*std(x), clamp [0,1] (the official ColorJitter is omitted); test: nearest resize",
}


def auto_fcdd_net(images) -> str:
    """The paper's net for the input geometry: ≤28 px → cnn28_w (Fashion-MNIST), ≤64 px →
    cnn32_lw3k (CIFAR-10), larger → vgg11_224 (MVTec-AD)."""
    first = np.asarray(images[0])
    side = max(first.shape[0], first.shape[1])
    return "cnn28_w" if side <= 28 else ("cnn32_lw3k" if side <= 64 else "vgg11_224")


#: ITU-R 601-2 luma, what PIL's convert("L") (torchvision's Grayscale) computes
LUMA = (0.299, 0.587, 0.114)


def grey_luma(x: torch.Tensor) -> torch.Tensor:
    """N×3×H×W → N×1×H×W with the luma weights (fcdd outlier_exposure/cifar100.py:49 greys the
    outlier images with torchvision's Grayscale after resizing them)."""
    w = torch.tensor(LUMA, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def image_channels(images) -> int:
    first = np.asarray(images[0])
    return 1 if first.ndim == 2 else int(first.shape[-1])


# --------------------------------------------------------------------------------------------
# Confetti noise (fcdd datasets/noise.py confetti_noise + noise_modes.py mode 'confetti')
# --------------------------------------------------------------------------------------------

CONFETTI_REF_SIDE = 240  # the official parameters are for MVTec-AD's 240 px raw images


@dataclass(frozen=True)
class ConfettiSpec:
    """Two sets of rotated square blobs (p = blob-centre probability per pixel, at least one blob
    per set): coloured blobs with a random per-channel value in [-256, -1] and black blobs of -255;
    summed and smoothed with a Gaussian (kernel 25, σ 5). Sizes and kernel scale with the image
    side / 240 (identity on MVTec-AD's raw images)."""

    p_colour: float = 0.000018
    p_black: float = 0.000012
    min_side: int = 8
    max_side: int = 54
    rotation: float = 45.0
    smooth_kernel: int = 25
    smooth_std: float = 5.0


def confetti_noise(n: int, channels: int, height: int, width: int, generator: torch.Generator,
                   spec: ConfettiSpec = ConfettiSpec()) -> torch.Tensor:
    """N×C×H×W float noise in pixel units (0..255 scale, mostly negative), deterministic for a
    seeded ``generator``."""
    scale = max(height, width) / CONFETTI_REF_SIDE
    lo = max(1, int(round(spec.min_side * scale)))
    hi = max(lo, int(round(spec.max_side * scale)))
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")
    total = torch.zeros(n, channels, height, width)
    for p, coloured in ((spec.p_colour, True), (spec.p_black, False)):
        layer = torch.zeros(n, channels, height, width)
        counts = torch.binomial(torch.full((n,), float(height * width)), torch.full((n,), p),
                                generator=generator).long().clamp_min(1)
        m = int(counts.sum())
        owner = torch.repeat_interleave(torch.arange(n), counts)
        cy = torch.randint(0, height, (m,), generator=generator).float()
        cx = torch.randint(0, width, (m,), generator=generator).float()
        side = torch.randint(lo, hi + 1, (m,), generator=generator)
        angle = (torch.rand(m, generator=generator) * 2 - 1) * math.radians(spec.rotation)
        if coloured:
            colour = torch.randint(-256, 0, (m, channels if channels == 3 else 1), generator=generator).float()
            colour = colour.expand(m, channels)
        else:
            colour = torch.full((m, channels), -255.0)
        for b in range(m):
            s = int(side[b])
            shift = 0.5 if s % 2 == 0 else 0.0  # even blobs extend one more pixel down/right
            dy, dx = yy - (cy[b] + shift), xx - (cx[b] + shift)
            cos, sin = math.cos(float(angle[b])), math.sin(float(angle[b]))
            u, v = cos * dx + sin * dy, -sin * dx + cos * dy
            half = (s - 1) / 2 + 1e-6
            # the pixels at the centre always belong to the blob (small rotated squares stay visible)
            inside = ((u.abs() <= half) & (v.abs() <= half)) | ((dy.abs() <= 0.5) & (dx.abs() <= 0.5))
            i = int(owner[b])
            layer[i][:, inside] = colour[b][:, None]
        total += layer
    k = max(1, int(round(spec.smooth_kernel * scale)))
    k = k if k % 2 == 1 else k - 1
    if k > 1:
        total = gaussian_blur(total, k, spec.smooth_std * scale).trunc()
    return total


def malform(x: torch.Tensor, noise: torch.Tensor, invert_threshold: float = 0.025) -> torch.Tensor:
    """'malformed normal' anomaly: x (N×C×H×W in [0, 1]) + noise (0..255 units), clamped. Where the
    noise barely changes an image (mean |change| < 0.025 grey levels) and the inverted noise
    changes it more, the noise is inverted (fcdd OnlineSupervisor.__malformed_normal)."""
    x255 = x * 255.0
    per = x[0].numel()
    diff = (((x255 + noise).clamp(0, 255) - x255).flatten(1).sum(1) / per).abs()
    diffi = (((x255 - noise).clamp(0, 255) - x255).flatten(1).sum(1) / per).abs()
    inv = (diff < invert_threshold) & (diffi > diff)
    noise = torch.where(inv[:, None, None, None], -noise, noise)
    return torch.where(noise == 0, x, (x255 + noise).clamp(0, 255) / 255.0)


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

def _random_crop(x: torch.Tensor, gt: torch.Tensor | None, out: int, pad: int,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
        gt = F.pad(gt, (pad, pad, pad, pad)) if gt is not None else None
    h, w = x.shape[-2:]
    oy = torch.randint(0, h - out + 1, (len(x),), generator=g)
    ox = torch.randint(0, w - out + 1, (len(x),), generator=g)
    xs = torch.stack([x[i, :, oy[i]:oy[i] + out, ox[i]:ox[i] + out] for i in range(len(x))]) if len(x) else x[..., :out, :out]
    gs = None
    if gt is not None:
        gs = torch.stack([gt[i, :, oy[i]:oy[i] + out, ox[i]:ox[i] + out] for i in range(len(gt))]) if len(gt) else gt[..., :out, :out]
    return xs, gs


def _hflip(x, gt, g):
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if gt is not None:
        gt = torch.where(flip[:, None, None, None], gt.flip(-1), gt)
    return x, gt


def to_net_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Test-time geometry: nearest resize (the 224 family's Resize(224, NEAREST) of 240 px raws)."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="nearest")


def augment(x: torch.Tensor, gt: torch.Tensor | None, family: str, g: torch.Generator,
            enabled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The paper's training augmentation on [0, 1] images (see ``AUGMENTATION``)."""
    size = FAMILIES[family]["size"]
    if family == "224":
        if not enabled:
            return to_net_size(x, size), (to_net_size(gt, size) if gt is not None else None)
        cx, cg = _random_crop(x, gt, size, 0, g)
        rx, rg = to_net_size(x, size), (to_net_size(gt, size) if gt is not None else None)
        pick = (torch.rand(len(x), generator=g) < 0.5)[:, None, None, None]
        x = torch.where(pick, cx, rx)
        gt = torch.where(pick, cg, rg) if gt is not None else None
        on = (torch.rand(len(x), generator=g) < 0.5).float()[:, None, None, None]
        std = x.flatten(1).std(1)[:, None, None, None]
        noise = torch.randn(x.shape, generator=g)
        return (x + noise * on * std * 0.1).clamp(0, 1), gt
    if not enabled:
        return x, gt
    pad = 2 if family == "28" else 4
    x, gt = _random_crop(x, gt, size, pad, g)
    x, gt = _hflip(x, gt, g)
    if family == "32":
        x = x + 0.001 * torch.randn(x.shape, generator=g)
    return x, gt


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

def pseudo_huber(x: torch.Tensor) -> torch.Tensor:
    """A(X) = sqrt(φ(X)² + 1) − 1, element-wise (FCDD paper Sec. 3)."""
    return torch.sqrt(x ** 2 + 1) - 1


def _anomalous(m: torch.Tensor) -> torch.Tensor:
    """−log(1 − exp(−m)), with fcdd's +1e-31 inside the log."""
    return -torch.log(1 - torch.exp(-m) + 1e-31)


def fcdd_losses(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample FCDD loss (Eq. 2): normal: (1/(u·v))‖A(X)‖₁; anomalous:
    −log(1 − exp(−(1/(u·v))‖A(X)‖₁))."""
    m = pseudo_huber(out).flatten(1).mean(1)
    anom = labels.bool()
    res = m.clone()
    res[anom] = _anomalous(m[anom])
    return res


def fcdd_gt_losses(out: torch.Tensor, gt: torch.Tensor, rec: Reception, std: float) -> torch.Tensor:
    """Per-sample FCDD loss with ground-truth maps (Eq. 3) on the up-sampled heatmap A':
    mean((1 − Y) ⊙ A') − log(1 − exp(−mean(Y ⊙ A'))) (second term only for images with Y ≠ 0)."""
    from methods._nets import receptive_upsample

    up = receptive_upsample(pseudo_huber(out), rec, std, out_size=gt.shape[-1])
    norm = (up * (1 - gt)).flatten(1).mean(1)
    has = gt.flatten(1).sum(1) > 0
    res = norm.clone()
    a = (up * gt).flatten(1).mean(1)
    res[has] = norm[has] + _anomalous(a[has])
    return res


def hsc_losses(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample HSC loss (Eq. 1): h(z) = sqrt(‖z‖² + 1) − 1 for normal samples,
    −log(1 − exp(−h(z))) for anomalous ones."""
    h = torch.sqrt((out ** 2).sum(-1) + 1) - 1
    anom = labels.bool()
    res = h.clone()
    res[anom] = _anomalous(h[anom])
    return res


# --------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------

class FCDDCommonParams(MethodParams):
    """Shared by fcdd, fcdd_hsc and fcdd_ae. ``None`` / 'auto' = the paper's value for the net's
    input size (see ``FAMILIES``); the resolved values are in ``resolved_params()``."""

    net: str = "auto"
    bias: bool = True                 # fcdd DefaultConfig: bias on (VGG requires it)
    pretrained: bool = True           # ImageNet vgg11_bn weights for the 224 px nets
    weights: str | None = None        # local vgg11_bn .pth instead of torchvision's cache
    freeze: bool = True               # freeze VGG blocks 1-3 (the paper's *_VGG_F nets) when pretrained
    epochs: int | None = Field(None, ge=0)
    lr: LearningRate | None = None
    optimizer: Literal["auto", "sgd", "adam"] = "auto"
    scheduler: Literal["auto", "lambda", "milestones"] = "auto"
    lr_decay: float | None = Field(None, gt=0, le=1)   # lambda scheduler: lr · decay^epoch
    milestones: list[int] | None = None                 # milestones scheduler
    gamma: float = Field(0.1, gt=0, le=1)
    weight_decay: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)
    # passes over the training set per epoch (lr decays once per epoch); None = the recipe's:
    # 10 for the 224 px MVTec-AD recipe (fcdd ADMvTec.enlarge), 1 otherwise
    enlarge: int | None = Field(None, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    preprocessing: Literal["auto", "gcn_minmax", "mean_std", "none"] = "auto"
    stats: Literal["auto", "computed"] = "auto"
    augment: bool = True
    gauss_std: float | None = Field(None, gt=0)


class FCDDSupervisedParams(FCDDCommonParams):
    """net: auto | cnn28 | cnn28_w | cnn32_s | cnn32_lw3k | vgg11_224. anomaly_source: auto (the
    recipe's: oe with CIFAR-100 at 28 / 32 px, confetti at 224 px), confetti (malformed normals, the
    paper's MVTec-AD setting), oe (outlier exposure with ``oe_dataset``, None = the recipe's
    cifar100 at 28 / 32 px; the paper's CIFAR-10 / Fashion-MNIST setting), semi (a few true
    anomalies, see ``set_true_anomalies``), none (normal images only)."""

    net: Literal["auto", "cnn28", "cnn28_w", "cnn32_s", "cnn32_lw3k", "vgg11_224"] = "auto"
    anomaly_source: Literal["auto", "confetti", "oe", "semi", "none"] = "auto"
    supervise_p: float = Field(0.5, ge=0, le=1)
    oe_dataset: str | None = None
    oe_dataset_params: dict = {}
    oe_limit: int | None = Field(None, ge=1)
    n_true_anomalies: int | None = Field(None, ge=1)


@dataclass
class Setup:
    net: str
    family: str
    size: int
    raw_size: int
    channels: int
    epochs: int
    lr: float
    optimizer: str
    scheduler: str
    lr_decay: float | None
    milestones: list[int]
    gamma: float
    weight_decay: float
    batch_size: int
    gauss_std: float
    preprocessing: str
    config: str
    enlarge: int = 1

    def describe(self) -> dict:
        d = asdict(self)
        d["image_size"] = d.pop("size")
        if self.enlarge == 1 and self.family != "224":
            d.pop("enlarge")  # the 28 / 32 px recipes never repeat the train set (rows before it was a param)
        if self.optimizer == "sgd":
            d["momentum"], d["nesterov"] = 0.9, True
        if self.scheduler == "lambda":
            d.pop("milestones"), d.pop("gamma")
        else:
            d.pop("lr_decay")
        return d


# --------------------------------------------------------------------------------------------
# The shared method skeleton
# --------------------------------------------------------------------------------------------

def _as_uint8_images(images):
    if isinstance(images, Split):
        return images.images
    return images


class FCDDFamily(Method):
    """fit / score skeleton; subclasses set ``objective`` and implement ``_build``, ``_losses``
    and ``_score_batch``."""

    objective: ClassVar[str] = ""
    NETS: ClassVar[tuple[str, ...]] = ("cnn28", "cnn28_w", "cnn32_s", "cnn32_lw3k", "vgg11_224")
    protocols = {"one_class"}

    def __init__(self, params, ctx: RunContext):
        super().__init__(params, ctx)
        if params.net != "auto" and params.net not in self.NETS:
            raise ValueError(f"net must be 'auto' or one of {', '.join(self.NETS)}; got {params.net!r}")
        self.setup: Setup | None = None
        self.normalizer: Normalizer | None = None
        self.net: torch.nn.Module | None = None
        self.reception: Reception | None = None
        self._oe_images = None
        self._oe_origin = None
        self._true_anomalies: list[Split] = []
        self._supervision: dict = {}
        if params.net != "auto":  # geometry known before fit: declare the input transform now
            family = FAMILIES[NET_FAMILY[self._fcdd_net_name(params.net)]]
            self.transform = Transform(resize=family["size"], channels=3, mean=None, std=None)

    # hooks ----------------------------------------------------------------------------------
    def set_outlier_exposure(self, images, name: str | None = None) -> None:
        """Outlier-exposure images (Split, N×H×W×C uint8 array or list), used instead of oe_dataset."""
        self._oe_images = _as_uint8_images(images)
        self._oe_origin = name or (images.key if isinstance(images, Split) else "set_outlier_exposure()")

    def set_true_anomalies(self, split: Split) -> None:
        """Labelled anomalies for anomaly_source 'semi' (its rows with label 1, masks if present)."""
        self._true_anomalies.append(split)

    # to implement ---------------------------------------------------------------------------
    def _fcdd_net_name(self, net: str) -> str:
        return net

    def _auto_net(self, images) -> str:
        return auto_fcdd_net(images)

    def _build(self, setup: Setup, pretrained_state: dict | None) -> torch.nn.Module:
        raise NotImplementedError

    def _losses(self, out, x, labels, gt) -> torch.Tensor:
        raise NotImplementedError

    def _score_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _anomaly_source(self, setup: Setup) -> str:
        """The params' anomaly source; 'auto' = the recipe's (oe at 28 / 32 px, confetti at 224 px)."""
        source = getattr(self.params, "anomaly_source", "none")
        return FAMILIES[setup.family]["anomaly_source"] if source == "auto" else source

    # resolution -----------------------------------------------------------------------------
    def _resolve(self, train: Split) -> Setup:
        p = self.params
        net = self._auto_net(train.images) if p.net == "auto" else p.net
        family = NET_FAMILY[self._fcdd_net_name(net)]
        d = FAMILIES[family]
        channels = 3 if family == "224" else image_channels(train.images)
        optimizer = d["optimizer"] if p.optimizer == "auto" else p.optimizer
        scheduler = d["scheduler"] if p.scheduler == "auto" else p.scheduler
        # fcdd DefaultConfig's lambda factor is 0.985 where a config sets none
        lr_decay = p.lr_decay if p.lr_decay is not None else (d["lr_decay"] or 0.985)
        milestones = list(p.milestones) if p.milestones is not None else list(d["milestones"])
        return Setup(net=net, family=family, size=d["size"], raw_size=d["raw_size"], channels=channels,
                     epochs=p.epochs if p.epochs is not None else d["epochs"],
                     lr=p.lr if p.lr is not None else d["lr"], optimizer=optimizer, scheduler=scheduler,
                     lr_decay=lr_decay, milestones=milestones, gamma=p.gamma,
                     weight_decay=p.weight_decay if p.weight_decay is not None else d["weight_decay"],
                     batch_size=p.batch_size if p.batch_size is not None else d["batch_size"],
                     gauss_std=p.gauss_std if p.gauss_std is not None else d["gauss_std"],
                     preprocessing=d["preprocessing"] if p.preprocessing == "auto" else p.preprocessing,
                     config=d["config"], enlarge=p.enlarge if p.enlarge is not None else d["enlarge"])

    def _raw(self, images, setup: Setup) -> torch.Tensor:
        return to_tensor(images, Transform(resize=setup.raw_size, channels=setup.channels, mean=None, std=None))

    def _oe_uint8(self, images, setup: Setup) -> torch.Tensor:
        """Outlier images at the raw size as uint8; colour ones for a grey net are resized, then
        greyed with the luma weights (fcdd outlier_exposure/cifar100.py:47-51: Resize, Grayscale)."""
        x = to_tensor(images, Transform(resize=setup.raw_size, channels=3, mean=None, std=None))
        if setup.channels == 1:
            x = grey_luma(x)
        return (x * 255).round().clamp(0, 255).to(torch.uint8)

    # data for the anomaly sources ------------------------------------------------------------
    def _oe_source(self, train: Split, setup: Setup) -> OutlierExposure | None:
        """Which outlier-exposure set the data side provides (``data.protocols.outlier_exposure_source``
        states the rule): the train split's (the grid's dataset entry names it), else the params'
        ``oe_dataset``, else the recipe's (CIFAR-100 at 28 / 32 px, none at 224 px)."""
        p = self.params
        entry = train.outlier_exposure
        if entry is not None:
            if (p.oe_dataset and p.oe_dataset != entry.name) or (p.oe_dataset_params and
                                                                 dict(p.oe_dataset_params) != dict(entry.params)):
                raise ValueError(f"the dataset entry's outlier_exposure ({entry.name} {dict(entry.params)}) and "
                                 f"params oe_dataset / oe_dataset_params ({p.oe_dataset} {p.oe_dataset_params}) "
                                 "disagree: name the outlier set in one place")
            return entry
        name = p.oe_dataset or FAMILIES[setup.family]["oe_dataset"]
        return OutlierExposure(name=name, params=dict(p.oe_dataset_params)) if name else None

    def _oe_pool(self, train: Split, setup: Setup, g: torch.Generator) -> torch.Tensor:
        p = self.params
        if self._oe_images is None:
            source = self._oe_source(train, setup)
            if source is None:
                raise ValueError("anomaly_source 'oe' needs an outlier set: outlier_exposure: {name: DATASET} "
                                 "on the grid's dataset entry, params oe_dataset: NAME (a registered dataset), "
                                 "or images passed with set_outlier_exposure() before fit")
            import data  # registers every dataset module
            if source.name not in data.DATASETS:
                raise NotImplementedError(
                    f"outlier exposure needs the dataset {source.name!r}, which is not registered in "
                    f"data/datasets (registered: {', '.join(sorted(data.DATASETS)) or 'none'}); add it there "
                    "or pass its images with FCDD.set_outlier_exposure(images) before fit")
            key = ("oe-images", source.name, json.dumps(dict(source.params), sort_keys=True),
                   setup.raw_size, setup.channels, "luma")
            pool = self.ctx.cached(key, lambda: self._oe_uint8(source.load().images, setup))
            origin = source.describe()
            self._supervision["oe_dataset"] = source.name
        else:
            pool = self._oe_uint8(self._oe_images, setup)
            origin = self._oe_origin
        if p.oe_limit is not None and p.oe_limit < len(pool):
            pool = pool[torch.randperm(len(pool), generator=g)[:p.oe_limit]]
        if len(pool) == 0:
            raise ValueError("the outlier-exposure set is empty")
        self._supervision.update(oe_origin=origin, oe_pool_size=len(pool))
        return pool

    def _true_pool(self, train: Split, setup: Setup, g: torch.Generator):
        sources = [train] + self._true_anomalies
        xs, masks, have_masks = [], [], True
        for s in sources:
            idx = np.flatnonzero(np.asarray(s.labels) == 1)
            if len(idx) == 0:
                continue
            imgs = s.images[idx] if isinstance(s.images, np.ndarray) else [s.images[i] for i in idx]
            xs.append(self._raw(imgs, setup))
            if s.masks is None:
                have_masks = False
            else:
                m = s.masks[idx] if isinstance(s.masks, np.ndarray) else [s.masks[i] for i in idx]
                masks.append(torch.from_numpy(resize_masks(m, setup.raw_size)).float()[:, None])
        if not xs:
            raise ValueError("anomaly_source 'semi' needs labelled anomalies: rows with label 1 in the train "
                             "split or a split passed with set_true_anomalies() before fit")
        x = torch.cat(xs)
        gt = torch.cat(masks) if (have_masks and masks) else None
        n = self.params.n_true_anomalies
        if n is not None and n < len(x):
            pick = torch.randperm(len(x), generator=g)[:n]
            x, gt = x[pick], (gt[pick] if gt is not None else None)
        self._supervision.update(n_true_anomalies=len(x), true_anomaly_masks=gt is not None)
        return x, gt

    # fit / score ----------------------------------------------------------------------------
    def fit(self, train: Split) -> None:
        p, ctx = self.params, self.ctx
        self.setup = setup = self._resolve(train)
        # the geometry of the maps (resize to image_size, no crop) for the orchestrator's masks
        self.transform = Transform(resize=setup.size, channels=setup.channels, mean=None, std=None)
        g = torch.Generator().manual_seed(ctx.seed)

        labels = np.asarray(train.labels)
        raw = self._raw(train.images, setup)
        normal = raw[torch.from_numpy(labels == 0)]
        if len(normal) == 0:
            raise ValueError("the train split has no normal images (labels == 0)")
        first = np.asarray(train.images[0])
        self.normalizer = fit_normalizer(setup.preprocessing, to_net_size(normal, setup.size), train,
                                         stats=p.stats, raw_hw=(first.shape[0], first.shape[1]),
                                         raw_channels=image_channels(train.images))

        source = self._anomaly_source(setup)
        self._supervision = {"anomaly_source": source}
        oe_pool = true_x = true_gt = None
        if source == "oe":
            oe_pool = self._oe_pool(train, setup, g)
        elif source == "semi":
            true_x, true_gt = self._true_pool(train, setup, g)
        elif source == "confetti":
            self._supervision["confetti"] = asdict(ConfettiSpec()) | {
                "scaled_to": f"{setup.raw_size}/{CONFETTI_REF_SIDE}", "mode": "malformed normal"}
        if source != "none":
            self._supervision["supervise_p"] = p.supervise_p
        use_gt = true_gt is not None and self.objective == "fcdd"

        pretrained_state = None
        if setup.family == "224" and p.pretrained:
            pretrained_state, sha = load_vgg11_bn_state(p.weights)
            ctx.weights_sha256 = sha
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            self.net = self._build(setup, pretrained_state).to(ctx.device)
        self.reception = fcdd_reception(self._fcdd_net_name(setup.net), setup.channels, setup.size)

        trainable = [q for q in self.net.parameters() if q.requires_grad]
        if setup.optimizer == "sgd":
            opt = torch.optim.SGD(trainable, lr=setup.lr, weight_decay=setup.weight_decay, momentum=0.9, nesterov=True)
        else:
            opt = torch.optim.Adam(trainable, lr=setup.lr, weight_decay=setup.weight_decay)
        if setup.scheduler == "lambda":
            decay = setup.lr_decay
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda ep: decay ** ep)
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=setup.milestones, gamma=setup.gamma)

        self.net.train()
        for epoch in range(1, setup.epochs + 1):
            total, count = 0.0, 0
            # the train set repeated ``enlarge`` times and shuffled (fcdd mvtec_base.py:90-91)
            perm = torch.randperm(len(normal) * setup.enlarge, generator=g) % len(normal)
            for start in range(0, len(perm), setup.batch_size):
                idx = perm[start:start + setup.batch_size]
                x = normal[idx].clone()
                y = torch.zeros(len(idx), dtype=torch.long)
                gt = torch.zeros(len(idx), 1, *x.shape[-2:]) if use_gt else None
                if source != "none":
                    rep = torch.rand(len(idx), generator=g) < p.supervise_p
                    k = int(rep.sum())
                    if k:
                        if source == "confetti":
                            noise = confetti_noise(k, x.shape[1], x.shape[2], x.shape[3], g)
                            x[rep] = malform(x[rep], noise)
                        elif source == "oe":
                            x[rep] = oe_pool[torch.randint(0, len(oe_pool), (k,), generator=g)].float() / 255
                        else:
                            j = torch.randint(0, len(true_x), (k,), generator=g)
                            x[rep] = true_x[j]
                            if use_gt:
                                gt[rep] = true_gt[j]
                        y[rep] = 1
                x, gt = augment(x, gt, setup.family, g, p.augment)
                x = self.normalizer(x).to(ctx.device)
                gt = gt.to(ctx.device) if gt is not None else None
                opt.zero_grad(set_to_none=True)
                out = self.net(x)
                loss = self._losses(out, x, y.to(ctx.device), gt).mean()
                check_finite(loss.item(), epoch)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
            ctx.log_epoch(epoch, total / max(count, 1))
            sched.step()
        self.net.eval()

    def score(self, test: Split) -> Scores:
        setup = self.setup
        raw = to_net_size(self._raw(test.images, setup), setup.size)
        images, maps = [], []
        self.net.eval()
        for start in range(0, len(raw), self.params.eval_batch_size):
            x = self.normalizer(raw[start:start + self.params.eval_batch_size]).to(self.ctx.device)
            s, m = self._score_batch(x)
            images.append(s.detach().cpu())
            maps.append(m.detach().cpu())
        image = torch.cat(images).numpy().astype(np.float64) if images else np.zeros(0)
        pixel = torch.cat(maps).numpy().astype(np.float32) if maps else np.zeros((0, setup.size, setup.size), np.float32)
        return Scores(image=image, pixel=pixel)

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        if self.setup is None:
            return out
        out.update(self.setup.describe())
        if "enlarge" not in self.setup.describe():
            out.pop("enlarge", None)
        for k in (("milestones", "gamma") if self.setup.scheduler == "lambda" else ("lr_decay",)):
            if k not in self.setup.describe():
                out.pop(k, None)
        out["preprocessing"] = self.normalizer.describe() if self.normalizer else self.setup.preprocessing
        out["augmentation"] = AUGMENTATION[self.setup.family] if self.params.augment else (
            "none" if self.setup.family != "224" else "nearest resize 240 -> 224")
        out["raw_resize"] = {"side": self.setup.raw_size, "mode": "bilinear (antialias)"}
        out["reception"] = asdict(self.reception) if self.reception else None
        if self.setup.family != "224":
            for k in ("pretrained", "weights", "freeze"):
                out.pop(k, None)
        out.update(self._supervision)
        out["objective"] = self.objective
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        source = getattr(params, "anomaly_source", None)
        if source == "oe" or (source == "auto" and params.net != "vgg11_224"):
            # 'auto' is oe except on the 224 px recipe (a grouping hint: 'auto' nets may still be 224)
            return ("oe-images", params.oe_dataset or "cifar100")
        return ()
