"""FCDD's per-dataset recipes (fcdd runners/argparse_configs.py), the params the three methods share
and the resolved ``Setup``."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from methods.base import LearningRate, MethodParams


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
