"""Classifiers for the OOD / open-set methods (msp, gram, openmax, conf_branch, vos, mos): networks,
input pipeline, the OpenOOD v1.5 training recipe, checkpoint loading, and the shared classifier
that post-hoc methods take from the worker cache. Not a method module (leading underscore).

Networks (module names as in OpenOOD, so its released checkpoints load as they are):

* ``resnet18_32x32`` — OpenOOD v1.5's CIFAR ResNet-18 (``openood/networks/resnet18_32x32.py``):
  3×3 stride-1 stem, no max-pool, four stages of two BasicBlocks (64, 128, 256, 512), global
  average pooling, ``fc``.
* ``wrn40_2`` — WideResNet-40-2 (Zagoruyko & Komodakis 2016) as in ``openood/networks/wrn.py`` and
  the VOS / Outlier-Exposure code (pre-activation blocks, dropout 0.3 inside blocks by default).
* ``bit_r50x1`` / ``bit_r101x1`` — BiT ResNet-v2 (Kolesnikov et al. 2020; MOS uses BiT-S-R101x1):
  pre-activation bottlenecks with weight-standardised convolutions and GroupNorm(32), built with
  timm's ``ResNetV2`` (``stem_type='fixed'``, StdConv2d eps 1e-8, as timm's BiT models); BiT's
  released ``.npz`` weights load through timm's reader (``load_bit_npz``).

``width_scale`` multiplies every channel count (1.0 = the published network); tests and the demo
grid use small scales.

Recipe (OpenOOD v1.5 CIFAR, ``configs/datasets/cifar10/cifar10.yml``, ``openood/trainers/
base_trainer.py``, ``configs/pipelines/train/baseline.yml``): 100 epochs, batch 128, SGD lr 0.1,
momentum 0.9, Nesterov, weight decay 5e-4, cosine annealing stepped every iteration from lr to
1e-6 (``cosine_annealing(step, epochs·len(loader), 1, 1e-6/lr)`` in a LambdaLR); training
transform RandomHorizontalFlip + RandomCrop(32, padding=4) (``base_preprocessor.py``);
checkpoint rule ``best`` (``checkpoint_rule``): after each epoch the accuracy on a held-out
part of the train split, the best epoch's weights kept (``openood/recorders/base_recorder.py``
``save_model``; ``scripts/eval_ood.py`` line 147 loads ``best.ckpt``), ``last`` keeps the final epoch;
normalisation by the mean / std the ID dataset declares (``Split.statistics``; CIFAR-10 and
CIFAR-100 declare OpenOOD's, ``openood/preprocessors/transform.py``: cifar10 [0.4914, 0.4822,
0.4465] / [0.2470, 0.2435, 0.2616], cifar100 [0.5071, 0.4867, 0.4408] / [0.2675, 0.2565, 0.2761]),
other datasets OpenOOD's fallback 0.5 / 0.5. Images enter with three channels (grey
repeated), at ``image_size`` (bilinear resize when they differ).

Sharing: ``shared_classifier`` trains (or loads) the cross-entropy classifier once per
(train split, architecture, recipe, seed) — or per checkpoint file — through ``ctx.cached``; MSP,
Gram, OpenMax and MOS's fine-tuning start all take it from there. ``classifier_affinity`` is the
runner's affinity key for those methods: equal recipes give equal keys.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from data.base import Split
from data.datasets.cifar10 import CIFAR10
from data.datasets.cifar100 import CIFAR100
from data.transforms import Transform, to_tensor
from methods.base import LearningRate, Method, MethodParams, RunContext, check_finite

log = logging.getLogger("adgrid.classifier")

# ---------------------------------------------------------------------------------------------
# constants

#: OpenOOD v1.5 ``normalization_dict`` (openood/preprocessors/transform.py); "half" is its fallback.
NORMALIZATION = {
    "cifar10": (CIFAR10.statistics.mean, CIFAR10.statistics.std),
    "cifar100": (CIFAR100.statistics.mean, CIFAR100.statistics.std),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
ARCHS = ("resnet18_32x32", "wrn40_2", "bit_r50x1", "bit_r101x1")
BIT_LAYERS = {"bit_r50x1": (3, 4, 6, 3), "bit_r101x1": (3, 4, 23, 3)}
CROP_PADDING = 4


def _scaled(channels: int, scale: float) -> int:
    return max(1, int(round(channels * scale)))


# ---------------------------------------------------------------------------------------------
# networks. Common interface: forward(x) -> logits, forward_features(x) -> penultimate features,
# ``fc`` (nn.Linear feature_dim -> num_classes), ``feature_dim``.

class BasicBlock(nn.Module):
    """OpenOOD's ResNet BasicBlock (conv-bn-relu-conv-bn + shortcut, relu)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18_32x32(nn.Module):
    """OpenOOD v1.5's ResNet-18 for 32×32 inputs (state-dict compatible at width_scale 1)."""

    def __init__(self, num_classes: int, width_scale: float = 1.0, in_channels: int = 3):
        super().__init__()
        widths = [_scaled(c, width_scale) for c in (64, 128, 256, 512)]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], 2, 1)
        self.layer2 = self._make_layer(widths[1], 2, 2)
        self.layer3 = self._make_layer(widths[2], 2, 2)
        self.layer4 = self._make_layer(widths[3], 2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[3]
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)

    def forward(self, x):
        return self.fc(self.forward_features(x))


class WRNBlock(nn.Module):
    """WideResNet pre-activation block (OpenOOD ``wrn.py`` / Hendrycks' code, same names)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = None if self.equalInOut else nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        if self.equalInOut:
            out = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(out)))
        else:
            x = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(x)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class WRNStage(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(*[WRNBlock(in_planes if i == 0 else out_planes, out_planes,
                                              stride if i == 0 else 1, drop_rate) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WideResNet-depth-k (default 40-2) with OpenOOD's module names and He-normal init."""

    def __init__(self, num_classes: int, depth: int = 40, widen_factor: int = 2, drop_rate: float = 0.3,
                 width_scale: float = 1.0, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [_scaled(c, width_scale) for c in (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)]
        self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WRNStage(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = WRNStage(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = WRNStage(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.feature_dim = self.nChannels = ch[3]
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward_features(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # = avg_pool2d(out, 8) at 32 px

    def forward(self, x):
        return self.fc(self.forward_features(x))


def _group_norm_act(num_channels: int, **kwargs):
    """BiT's GroupNorm(32) + ReLU; with fewer channels (width_scale < 1) the largest divisor of both."""
    from timm.layers import GroupNormAct

    kwargs.pop("num_groups", None)
    return GroupNormAct(num_channels, num_groups=math.gcd(32, num_channels), **kwargs)


class BiTResNet(nn.Module):
    """BiT ResNet-v2 body (timm ``ResNetV2``: pre-activation bottlenecks, StdConv2d, GroupNorm)
    followed by a linear ``fc`` on the pooled features."""

    def __init__(self, num_classes: int, layers=(3, 4, 23, 3), width_factor: int = 1,
                 width_scale: float = 1.0, in_channels: int = 3):
        super().__init__()
        from timm.layers import StdConv2d
        from timm.models.resnetv2 import ResNetV2

        channels = tuple(_scaled(c * width_factor, width_scale) for c in (256, 512, 1024, 2048))
        self.body = ResNetV2(layers=list(layers), channels=channels, num_classes=0, in_chans=in_channels,
                             stem_chs=max(8, _scaled(64 * width_factor, width_scale)), stem_type="fixed",
                             conv_layer=partial(StdConv2d, eps=1e-8), norm_layer=_group_norm_act)
        self.feature_dim = self.body.num_features
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.forward_features(x))


def build_network(arch: str, num_classes: int, width_scale: float = 1.0, drop_rate: float | None = None,
                  seed: int | None = None) -> nn.Module:
    """A freshly initialised network; with ``seed`` the weights depend on the seed only."""
    def make():
        if arch == "resnet18_32x32":
            return ResNet18_32x32(num_classes, width_scale)
        if arch == "wrn40_2":
            return WideResNet(num_classes, 40, 2, 0.3 if drop_rate is None else drop_rate, width_scale)
        if arch in BIT_LAYERS:
            return BiTResNet(num_classes, BIT_LAYERS[arch], 1, width_scale)
        raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def resolved_drop_rate(arch: str, drop_rate: float | None) -> float:
    if arch == "wrn40_2":
        return 0.3 if drop_rate is None else drop_rate
    return 0.0 if drop_rate is None else drop_rate


# ---------------------------------------------------------------------------------------------
# checkpoints

def sha256_file(path: str | Path) -> str:
    from methods.backbones import sha256_of

    return sha256_of(path)


def resolve_checkpoint(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"checkpoint file {str(p)!r} not found: place the trained model there (e.g. OpenOOD v1.5's "
            f"released checkpoints, cifar10_resnet18_32x32_base_e100_lr0.1_default/s0/best.ckpt) or remove "
            f"`checkpoint` from the grid to train the classifier")
    return p


def read_state_dict(path: str | Path) -> dict:
    """A state dict from a torch file: a bare state dict or one under 'state_dict' / 'model' / 'net'
    (DataParallel's 'module.' prefix stripped)."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "net", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict (got {type(obj).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_state(net: nn.Module, state: dict, source: str) -> None:
    """Strict load with a readable error naming what does not match."""
    own = net.state_dict()
    shape_bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or shape_bad:
        raise ValueError(
            f"{source} does not fit the network ({type(net).__name__}): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
            f"shape mismatches {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shape_bad[:5]]}"
            f" — check arch, width_scale and the number of in-distribution classes")
    net.load_state_dict(state)


def load_bit_npz(net: "BiTResNet", path: str | Path) -> None:
    """BiT's released ``.npz`` weights (e.g. BiT-S-R101x1.npz) into the body of a BiT network."""
    from timm.models.resnetv2 import _load_weights

    _load_weights(net.body, str(path))


def cpu_state(net: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# params

class ClassifierParams(MethodParams):
    """The classifier recipe (OpenOOD v1.5 CIFAR defaults; see the module docstring)."""

    arch: Literal["resnet18_32x32", "wrn40_2", "bit_r50x1", "bit_r101x1"] = "resnet18_32x32"
    width_scale: float = Field(1.0, gt=0, le=4)
    drop_rate: float | None = Field(None, ge=0, lt=1)   # None: the architecture's (WRN 0.3, else 0)
    image_size: int = Field(32, ge=8, le=512)
    normalization: Literal["auto", "cifar10", "cifar100", "imagenet", "half"] = "auto"
    augment: Literal["crop_flip", "crop", "flip", "none"] = "crop_flip"
    epochs: int = Field(100, ge=0)
    batch_size: int = Field(128, ge=2)
    lr: LearningRate = 0.1
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    lr_min: float = Field(1e-6, ge=0, allow_inf_nan=False)
    eval_batch_size: int = Field(200, ge=1)
    checkpoint: str | None = None    # a trained model: loaded instead of training (sha256 recorded)
    #: which epoch's weights training keeps: "best" = highest accuracy on a held-out part of the train
    #: split (OpenOOD's base_recorder.py; its released and evaluated files are best.ckpt), "last" = the
    #: final epoch. A loaded ``checkpoint`` records the rule as given (OpenOOD's files: best).
    checkpoint_rule: Literal["best", "last"] = "best"
    checkpoint_val_fraction: float = Field(0.02, gt=0, lt=1)   # held-out share of each class ("best")

    @model_validator(mode="after")
    def _check(self):
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


RECIPE_FIELDS = ("arch", "width_scale", "drop_rate", "image_size", "normalization", "augment", "epochs",
                 "batch_size", "lr", "momentum", "nesterov", "weight_decay", "lr_min", "checkpoint",
                 "checkpoint_rule", "checkpoint_val_fraction")


def recipe_key(p: ClassifierParams) -> tuple:
    """Every field that decides the shared classifier (not the post-hoc method's own params)."""
    values = []
    for name in RECIPE_FIELDS:
        v = getattr(p, name)
        values.append(str(Path(v).expanduser().resolve()) if name == "checkpoint" and v else v)
    return tuple(values)


def classifier_affinity(params) -> tuple:
    """Affinity key of a method that uses the shared classifier: equal recipes, equal keys."""
    return ("classifier",) + recipe_key(params)


def recipe_dict(p: ClassifierParams) -> dict:
    return {name: getattr(p, name) for name in RECIPE_FIELDS}


# ---------------------------------------------------------------------------------------------
# inputs

@dataclass(frozen=True)
class Inputs:
    """Images -> uint8 N×3×S×S tensors (cached form), and normalisation applied per batch."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def prepare(self, images) -> torch.Tensor:
        """uint8 N×3×S×S (grey repeated to three channels, bilinear resize when sizes differ)."""
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4) \
                and images.shape[1] == self.image_size and images.shape[2] == self.image_size:
            arr = images if images.ndim == 4 else images[..., None]
            arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr)
            x = torch.from_numpy(arr).permute(0, 3, 1, 2)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            return x.contiguous()
        t = to_tensor(images, Transform(resize=self.image_size, channels=3, mean=None, std=None))
        return (t.clamp(0, 1) * 255).round().to(torch.uint8)

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = x_u8.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def describe(self) -> dict:
        return {"image_size": self.image_size, "channels": 3, "resize": "bilinear (antialiased) when sizes differ",
                "mean": list(self.mean), "std": list(self.std), "normalization_source": self.source}


def make_inputs(p: ClassifierParams, split: Split) -> Inputs:
    """The input pipeline; ``normalization: auto`` = the mean / std the split's dataset declares
    (``Split.statistics``: OpenOOD's for CIFAR-10 / CIFAR-100), else OpenOOD's 0.5 / 0.5 fallback."""
    kind = p.normalization
    declared = split.statistics
    if kind == "auto" and declared.mean:
        mean, std = _three_channels(declared.mean), _three_channels(declared.std)
        return Inputs(p.image_size, mean, std, f"auto: {declared.source or f'declared by {split.dataset}'}")
    if kind == "auto":
        kind, source = "half", "auto: OpenOOD normalization_dict['half'] (OpenOOD's fallback for other datasets)"
    else:
        source = f"normalization_dict[{kind!r}]"
    mean, std = NORMALIZATION[kind]
    return Inputs(p.image_size, mean, std, source)


def _three_channels(values: tuple[float, ...]) -> tuple[float, ...]:
    """Declared per-channel values for the classifier's three input channels (grey repeated)."""
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ValueError(f"declared mean / std have {len(values)} channels; the classifier takes 1 or 3")
    return values


def augment_batch(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """OpenOOD's training transform on a float batch in [0, 1]: RandomHorizontalFlip (p 0.5) and
    RandomCrop(size, padding=4) with zero padding, per sample."""
    if kind == "none":
        return x
    n, _, h, w = x.shape
    if kind in ("crop_flip", "flip"):
        flip = torch.rand(n, generator=g) < 0.5
        if flip.any():
            x = x.clone()
            x[flip.to(x.device)] = x[flip.to(x.device)].flip(-1)
    if kind in ("crop_flip", "crop"):
        pad = CROP_PADDING
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
        x = torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])
    return x


# ---------------------------------------------------------------------------------------------
# training

def batches(n: int, batch_size: int, g: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled index batches; a last batch of one sample is dropped (BatchNorm needs two)."""
    perm = torch.randperm(n, generator=g)
    for start in range(0, n, batch_size):
        idx = perm[start:start + batch_size]
        if len(idx) >= 2 or n == 1:
            yield idx


def steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def cosine_factor(step: int, total: int, lr: float, lr_min: float) -> float:
    """OpenOOD's ``cosine_annealing(step, total, 1, lr_min / lr)``: the LambdaLR multiplier."""
    lo = lr_min / lr
    return lo + (1 - lo) * 0.5 * (1 + math.cos(step / max(total, 1) * math.pi))


def sgd(parameters, p, lr: float | None = None, momentum: float | None = None,
        weight_decay: float | None = None, nesterov: bool | None = None) -> torch.optim.SGD:
    momentum = p.momentum if momentum is None else momentum
    nesterov = p.nesterov if nesterov is None else nesterov
    return torch.optim.SGD(list(parameters), lr=p.lr if lr is None else lr, momentum=momentum,
                           weight_decay=p.weight_decay if weight_decay is None else weight_decay,
                           nesterov=bool(nesterov and momentum > 0))


@dataclass
class TrainData:
    x: torch.Tensor          # uint8 N×3×S×S (CPU)
    y: torch.Tensor          # int64 N (CPU)
    num_classes: int
    inputs: Inputs
    fit_idx: torch.Tensor | None = None   # the indices trained on (None: all)
    val_idx: torch.Tensor | None = None   # held out to choose the epoch (checkpoint_rule "best")

    @property
    def n_fit(self) -> int:
        return len(self.y) if self.fit_idx is None else len(self.fit_idx)


VALIDATION_SEED = 0   # the held-out images do not depend on the run's seed (OpenOOD's val list is fixed)


def holdout_indices(y: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): ``round(fraction · n_c)`` images of each class c (at least
    one when the class has two or more), chosen by a fixed-seed permutation; both sorted."""
    rng = np.random.default_rng(VALIDATION_SEED)
    val = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(members)))) if len(members) >= 2 else 0
        val.append(rng.permutation(members)[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    keep = np.ones(len(y), bool)
    keep[val_idx] = False
    return np.flatnonzero(keep), val_idx


def train_data(p: ClassifierParams, train: Split) -> TrainData:
    inputs = make_inputs(p, train)
    y = torch.as_tensor(np.asarray(train.targets), dtype=torch.int64)
    if (y < 0).any():
        raise ValueError("the classifier's train split holds samples without a class (target -1)")
    num_classes = len(train.class_names)
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least two in-distribution classes, got {num_classes}")
    if int(y.max()) >= num_classes:
        raise ValueError(f"train targets reach {int(y.max())} but there are {num_classes} class names")
    data = TrainData(inputs.prepare(train.images), y, num_classes, inputs)
    if p.checkpoint_rule == "best":
        fit_idx, val_idx = holdout_indices(y.numpy(), p.checkpoint_val_fraction)
        data.fit_idx, data.val_idx = torch.from_numpy(fit_idx), torch.from_numpy(val_idx)
    return data


class BestEpoch:
    """OpenOOD's checkpoint rule (``openood/recorders/base_recorder.py`` ``save_model``: after each
    epoch the accuracy on the validation split, ``if acc >= best_acc`` — ties go to the later epoch —
    the weights become best.ckpt; ``scripts/eval_ood.py`` evaluates best.ckpt). Here the validation
    split is ``TrainData.val_idx``; ``predict(x) -> class`` is the method's own prediction (MOS: the
    group-softmax class, as its evaluator); ``restore`` loads the best epoch's weights."""

    def __init__(self, data: TrainData, modules: tuple[nn.Module, ...], predict: Callable[[torch.Tensor], torch.Tensor],
                 device: str, batch_size: int = 200):
        self.data, self.modules, self.predict = data, modules, predict
        self.device, self.batch_size = device, batch_size
        self.best_acc, self.best_epoch, self.state = 0.0, None, None
        self.accuracies: list[float] = []

    @torch.no_grad()
    def accuracy(self) -> float:
        idx = self.data.val_idx
        if idx is None or len(idx) == 0:
            return 0.0
        for m in self.modules:
            m.eval()
        correct = 0
        for s in range(0, len(idx), self.batch_size):
            b = idx[s:s + self.batch_size]
            x = self.data.inputs.normalize(self.data.x[b].to(self.device))
            correct += int((self.predict(x).cpu() == self.data.y[b]).sum())
        for m in self.modules:
            m.train()
        return correct / len(idx)

    def update(self, epoch: int) -> None:
        acc = self.accuracy()
        self.accuracies.append(acc)
        if acc >= self.best_acc:
            self.best_acc, self.best_epoch = acc, epoch
            self.state = [cpu_state(m) for m in self.modules]

    def restore(self) -> None:
        if self.state is not None:
            for m, state in zip(self.modules, self.state):
                m.load_state_dict(state)

    def describe(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_val_acc": self.best_acc if self.best_epoch else None,
                "val_acc_curve": [round(a, 6) for a in self.accuracies]}


def epoch_selector(p: ClassifierParams, data: TrainData | None, modules: tuple[nn.Module, ...],
              predict: Callable[[torch.Tensor], torch.Tensor], device: str) -> BestEpoch | None:
    """The epoch chooser of ``p.checkpoint_rule`` (None for "last")."""
    if p.checkpoint_rule != "best" or data is None:
        return None
    return BestEpoch(data, modules, predict, device, p.eval_batch_size)


def argmax_of(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: net(x).argmax(dim=1)


StepFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def run_training(data: TrainData, step_fn: StepFn, optimizer: torch.optim.Optimizer, *, epochs: int,
                 batch_size: int, augment: str, seed: int, device: str,
                 lr_at: Callable[[int], float | None], on_epoch: Callable[[int, float], None] | None = None,
                 modules: tuple[nn.Module, ...] = (), select: BestEpoch | None = None) -> list[float]:
    """The training loop shared by every classifier here.

    ``step_fn(x, y, epoch, step) -> loss`` (x normalised, on ``device``; epoch from 0) computes the
    loss of one batch; this loop sets the learning rate ``lr_at(step)`` before each step (None
    stops training), back-propagates, steps, and returns the per-epoch mean losses. A NaN / inf
    batch loss raises NonFiniteLoss at once. Batches are drawn from ``data.fit_idx`` (the held-out
    validation images are never trained on); with ``select`` each epoch is validated and the best
    epoch's weights are restored at the end (``checkpoint_rule: best``).
    """
    g = torch.Generator().manual_seed(seed)
    for m in modules:
        m.train()
    curve: list[float] = []
    step = 0
    stop = False
    for epoch in range(epochs):
        total, count = 0.0, 0
        for idx in batches(data.n_fit, batch_size, g):
            if data.fit_idx is not None:
                idx = data.fit_idx[idx]
            lr = lr_at(step)
            if lr is None:
                stop = True
                break
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            xb = augment_batch(data.x[idx].float().div_(255.0), augment, g)
            mean = torch.tensor(data.inputs.mean).view(1, -1, 1, 1)
            std = torch.tensor(data.inputs.std).view(1, -1, 1, 1)
            xb = ((xb - mean) / std).to(device, non_blocking=True)
            yb = data.y[idx].to(device, non_blocking=True)
            loss = step_fn(xb, yb, epoch, step)
            value = float(loss.detach())
            check_finite(value, epoch + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total += value * len(idx)
            count += len(idx)
        if count:
            curve.append(total / count)
            if on_epoch is not None:
                on_epoch(epoch + 1, curve[-1])
            if select is not None:
                select.update(epoch + 1)
        if stop:
            break
    if select is not None:
        select.restore()
    for m in modules:
        m.eval()
    return curve


def cosine_schedule(p, total_steps: int) -> Callable[[int], float]:
    return lambda step: p.lr * cosine_factor(step, total_steps, p.lr, p.lr_min)


def train_cross_entropy(data: TrainData, p: ClassifierParams, seed: int, device: str,
                        log_: logging.Logger | None = None) -> dict:
    """The plain cross-entropy classifier (OpenOOD's BaseTrainer). Returns {'state_dict' (CPU),
    'loss_curve'}."""
    net = build_network(p.arch, data.num_classes, p.width_scale, p.drop_rate, seed).to(device)
    opt = sgd(net.parameters(), p)
    total = p.epochs * steps_per_epoch(data.n_fit, p.batch_size)
    logger = log_ or log
    select = epoch_selector(p, data, (net,), argmax_of(net), device)

    def step_fn(x, y, epoch, step):
        return F.cross_entropy(net(x), y)

    curve = run_training(data, step_fn, opt, epochs=p.epochs, batch_size=p.batch_size, augment=p.augment,
                         seed=seed, device=device, lr_at=cosine_schedule(p, total), modules=(net,),
                         on_epoch=lambda e, l: logger.info("classifier epoch %d loss %.5f", e, l), select=select)
    return {"state_dict": cpu_state(net), "loss_curve": curve,
            "selection": select.describe() if select else None}


# ---------------------------------------------------------------------------------------------
# the shared classifier

@dataclass
class Classifier:
    """A trained classifier ready to score: network (eval mode, on the device) and its inputs."""

    net: nn.Module
    inputs: Inputs
    num_classes: int
    key: tuple
    loss_curve: list[float] = field(default_factory=list)
    source: str = "trained"
    sha256: str | None = None
    eval_batch_size: int = 200
    device: str = "cpu"
    selection: dict | None = None    # BestEpoch.describe() of its training ("best"), else None

    @torch.no_grad()
    def outputs(self, images) -> dict:
        """{'logits': N×K, 'features': N×D} float32 numpy arrays (penultimate features)."""
        x = self.inputs.prepare(images)
        self.net.eval()
        logits, feats = [], []
        for start in range(0, len(x), self.eval_batch_size):
            xb = self.inputs.normalize(x[start:start + self.eval_batch_size].to(self.device))
            f = self.net.forward_features(xb)
            logits.append(self.net.fc(f).float().cpu())
            feats.append(f.float().cpu())
        if not logits:
            k = self.num_classes
            return {"logits": np.zeros((0, k), np.float32), "features": np.zeros((0, 0), np.float32)}
        return {"logits": torch.cat(logits).numpy(), "features": torch.cat(feats).numpy()}


def _load_or_train(p: ClassifierParams, train: Split, data: TrainData, ctx: RunContext) -> dict:
    if p.checkpoint:
        path = resolve_checkpoint(p.checkpoint)
        state = read_state_dict(path)
        net = build_network(p.arch, data.num_classes, p.width_scale, p.drop_rate)
        load_state(net, state, f"checkpoint {path}")
        return {"state_dict": cpu_state(net), "loss_curve": [], "source": f"checkpoint {path}",
                "sha256": sha256_file(path), "selection": None}
    out = train_cross_entropy(data, p, ctx.seed, ctx.device, ctx.log)
    out.update(source="trained", sha256=None)
    return out


def shared_classifier(ctx: RunContext, train: Split, p: ClassifierParams,
                      data: TrainData | None = None, replay_curve: bool = True) -> Classifier:
    """The cross-entropy classifier of (train split, recipe, seed) — or of a checkpoint file — from
    the worker cache, trained or loaded on a miss. Its loss curve is replayed into the row (so
    every post-hoc row shows the curve of the classifier it used); ``ctx.weights_sha256`` is set
    for a checkpoint."""
    data = data or train_data(p, train)
    seed_part = ("checkpoint",) if p.checkpoint else ("seed", ctx.seed)
    key = ("classifier", train.key, data.num_classes) + recipe_key(p) + seed_part
    value = ctx.cached(key, lambda: _load_or_train(p, train, data, ctx))
    net = build_network(p.arch, data.num_classes, p.width_scale, p.drop_rate)
    net.load_state_dict(value["state_dict"])
    net.to(ctx.device).eval()
    if replay_curve:
        for epoch, loss in enumerate(value["loss_curve"], start=1):
            ctx.log_epoch(epoch, loss)
    if value.get("sha256"):
        ctx.weights_sha256 = value["sha256"]
    return Classifier(net=net, inputs=data.inputs, num_classes=data.num_classes, key=key,
                      loss_curve=list(value["loss_curve"]), source=value["source"], sha256=value.get("sha256"),
                      eval_batch_size=p.eval_batch_size, device=ctx.device, selection=value.get("selection"))


def classifier_outputs(ctx: RunContext, clf: Classifier, split: Split) -> dict:
    """Logits and penultimate features of ``split`` under the shared classifier, cached per
    (classifier, split) so MSP and OpenMax run the network once per split. It goes
    to the cache directly, not through ``ctx.cached``: a row's ``feature_cache_hit`` says whether
    the classifier itself came from the cache."""
    value, _ = ctx.cache.get_or_compute(("classifier_outputs", clf.key, split.key), lambda: clf.outputs(split.images))
    return value


def own_checkpoint(ctx: RunContext, p: ClassifierParams, net: nn.Module) -> str | None:
    """Load ``p.checkpoint`` into a method's own network (conf_branch, vos, mos) when given;
    returns the source string, None when there is nothing to load."""
    if not p.checkpoint:
        return None
    path = resolve_checkpoint(p.checkpoint)
    load_state(net, read_state_dict(path), f"checkpoint {path}")
    ctx.weights_sha256 = sha256_file(path)
    return f"checkpoint {path}"


def describe_validation(p: ClassifierParams, data: TrainData | None) -> str:
    """The validation split behind ``checkpoint_rule`` (stated in every row)."""
    if p.checkpoint_rule == "last":
        return "none (the last epoch is kept)"
    n = "" if data is None or data.val_idx is None else f": {len(data.val_idx)} images"
    return (f"held out from the train split, round({p.checkpoint_val_fraction} x class size) images per class "
            f"(fixed seed {VALIDATION_SEED}, never trained on){n}; OpenOOD validates on its ID val imglist "
            f"(benchmark_imglist/<dataset>/val_<dataset>.txt, configs/datasets/cifar10/cifar10.yml), "
            f"which its repository does not ship")


def describe_recipe(p: ClassifierParams, data: TrainData | None, source: str | None,
                    selection: dict | None = None) -> dict:
    """The resolved classifier set-up for ``resolved_params``."""
    out = {"drop_rate": resolved_drop_rate(p.arch, p.drop_rate),
           "optimizer": f"SGD(momentum={p.momentum}, nesterov={p.nesterov}, weight_decay={p.weight_decay})",
           "lr_schedule": f"cosine per iteration from {p.lr} to {p.lr_min} (OpenOOD cosine_annealing)",
           "train_transform": {"crop_flip": "RandomHorizontalFlip + RandomCrop(size, padding=4)",
                               "crop": "RandomCrop(size, padding=4)", "flip": "RandomHorizontalFlip",
                               "none": "none"}[p.augment],
           "classifier_source": source, "checkpoint_rule": p.checkpoint_rule,
           "validation_split": describe_validation(p, data), **(selection or {})}
    if source is not None and source.startswith("checkpoint"):
        out["validation_split"] = "none here: the checkpoint file was trained elsewhere (checkpoint_rule as given)"
    if data is not None:
        out.update(num_classes=data.num_classes, n_train=int(data.n_fit),
                   n_val=0 if data.val_idx is None else int(len(data.val_idx)),
                   steps_per_epoch=steps_per_epoch(data.n_fit, p.batch_size), inputs=data.inputs.describe())
    return out


@torch.no_grad()
def predict_logits(net: nn.Module, inputs: Inputs, images, batch_size: int, device: str,
                   fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``fn`` (default: the network) over images in eval mode; concatenated CPU float output."""
    x = inputs.prepare(images)
    net.eval()
    fn = fn or net
    outs = [fn(inputs.normalize(x[s:s + batch_size].to(device))).float().cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def softmax_np(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class PostHocMethod(Method):
    """A score computed on the shared classifier, in the shape of OpenOOD's post-processors
    (``openood/postprocessors/base_postprocessor.py``: ``setup`` on the training data, then
    ``postprocess`` per batch). ``fit`` trains or loads the classifier once per (split, recipe, seed)
    through the worker cache, then calls ``setup``; subclasses implement ``setup`` (statistics of
    the training set, if any), ``score`` and ``describe`` (what their score is, for
    ``resolved_params``)."""

    Params = ClassifierParams
    protocols = {"ood", "osr"}

    def __init__(self, params: ClassifierParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.clf: Classifier | None = None
        self.data: TrainData | None = None

    def fit(self, train: Split) -> None:
        self.data = train_data(self.params, train)
        self.clf = shared_classifier(self.ctx, train, self.params, self.data)
        self.setup(train)

    def setup(self, train: Split) -> None:
        """Statistics of the training set under ``self.clf`` (none for MSP)."""

    def logits(self, split: Split) -> np.ndarray:
        """The classifier's float64 logits of ``split`` (run once per split, shared in the cache)."""
        return classifier_outputs(self.ctx, self.clf, split)["logits"].astype(np.float64)

    def describe(self) -> dict:
        """The method's own resolved set-up beyond its params (its score, layers...)."""
        return {}

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        out.update(describe_recipe(self.params, self.data, self.clf.source if self.clf else None,
                                   self.clf.selection if self.clf else None), **self.describe())
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        return classifier_affinity(params)
