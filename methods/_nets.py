"""Networks and input preprocessing shared by the deep one-class methods (dsvdd, dcae, fcdd,
fcdd_hsc, fcdd_ae). Not a method module (leading underscore: not auto-registered).

Sources (architectures and constants transcribed from the official code, layer by layer):

* Deep SVDD / DCAE — Ruff et al., "Deep One-Class Classification", ICML 2018;
  github.com/lukasruff/Deep-SVDD-PyTorch ``src/networks/mnist_LeNet.py``,
  ``src/networks/cifar10_LeNet.py``, ``src/datasets/{mnist,cifar10,preprocessing}.py``; the
  Fashion-MNIST LeNet of the authors' Deep SAD (ICLR 2020), github.com/lukasruff/Deep-SAD-PyTorch
  ``src/networks/fmnist_LeNet.py``.
* FCDD and its HSC / AE baselines — Liznerski et al., "Explainable Deep One-Class
  Classification", ICLR 2021; github.com/liznerski/fcdd ``python/fcdd/models/*.py``,
  ``python/fcdd/datasets/{fmnist,cifar,mvtec}.py``.

Preprocessing: global contrast normalisation with the l1 scale (GCN, per sample: subtract the mean
over all pixels and channels, divide by the mean absolute deviation) followed by min-max scaling
with per-normal-class constants, which the official code pre-computed on the normal training
images after GCN. ``fit_normalizer`` uses the constants the split's dataset declares for its normal
class (``Split.statistics``, ``data.base.ClassStatistics``: MNIST, Fashion-MNIST, CIFAR-10 and
MVTec AD declare the official ones); otherwise it computes min and max over the normal training
images after GCN itself and says so in ``Normalizer.source``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.base import ClassStatistics, Split

# --------------------------------------------------------------------------------------------
# GCN + min-max / mean-std normalisation
# --------------------------------------------------------------------------------------------

def gcn_l1(x: torch.Tensor) -> torch.Tensor:
    """Global contrast normalisation, l1 scale, per sample over all pixels and channels
    (Deep SVDD paper Sec. 4.1; ``global_contrast_normalization(x, scale='l1')``). A constant image
    (scale 0) is only centred, as in fcdd's ``local_contrast_normalization``."""
    x = x - x.mean(dim=(1, 2, 3), keepdim=True)
    scale = x.abs().mean(dim=(1, 2, 3), keepdim=True)
    return x / torch.where(scale == 0, torch.ones_like(scale), scale)


@dataclass
class Normalizer:
    """kind: 'gcn_minmax' (GCN-l1 then (x - lo) / (hi - lo)), 'mean_std' ((x - mean) / std) or
    'none'. Values are per channel. ``source`` says where the constants came from."""

    kind: str
    lo: tuple[float, ...] = ()
    hi: tuple[float, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    source: str = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if self.kind == "gcn_minmax":
            x = gcn_l1(x)
            lo = torch.tensor(_per_channel(self.lo, c), dtype=x.dtype, device=x.device).view(1, c, 1, 1)
            hi = torch.tensor(_per_channel(self.hi, c), dtype=x.dtype, device=x.device).view(1, c, 1, 1)
            return (x - lo) / (hi - lo)
        if self.kind == "mean_std":
            m = torch.tensor(_per_channel(self.mean, c), dtype=x.dtype, device=x.device).view(1, c, 1, 1)
            s = torch.tensor(_per_channel(self.std, c), dtype=x.dtype, device=x.device).view(1, c, 1, 1)
            return (x - m) / s
        return x

    def describe(self) -> dict:
        out = {"kind": self.kind, "source": self.source}
        if self.kind == "gcn_minmax":
            out.update(gcn="l1", min=list(self.lo), max=list(self.hi))
        elif self.kind == "mean_std":
            out.update(mean=list(self.mean), std=list(self.std))
        return out

    def key(self) -> tuple:
        return (self.kind, tuple(self.lo), tuple(self.hi), tuple(self.mean), tuple(self.std))


def _per_channel(values: Sequence[float], c: int) -> list[float]:
    values = list(values)
    if len(values) == c:
        return values
    if len(values) == 1:
        return values * c
    if c == 1:  # colour constants applied to grey input: average
        return [float(np.mean(values))]
    raise ValueError(f"normalisation constants for {len(values)} channels, input has {c}")


def declared_class_statistics(split: Split | None, raw_hw: tuple[int, int] | None,
                              raw_channels: int | None) -> tuple[ClassStatistics, str] | None:
    """(the statistics the split's dataset declares for its one normal class, a tag naming them) when
    the images have the geometry the constants hold at; else None (class sets, no declaration)."""
    if split is None or split.normal_class is None:
        return None
    declared = split.statistics.for_class(split.normal_class)
    if declared is None or not split.statistics.fits(raw_hw, raw_channels):
        return None
    return declared, f"{split.statistics.class_source} {split.dataset}/{split.normal_class.lower()}"


def fit_normalizer(kind: str, normal_images: torch.Tensor, split: Split | None,
                   stats: str = "auto", raw_hw: tuple[int, int] | None = None,
                   raw_channels: int | None = None) -> Normalizer:
    """Build the normaliser for ``kind`` from the constants the split's dataset declares for its
    normal class (``stats='auto'``, at the geometry they hold at) or computed from
    ``normal_images`` (N×C×H×W in [0, 1], the normal training images as the net sees them)."""
    if kind == "none":
        return Normalizer("none", source="no normalisation (inputs in [0, 1])")
    found = declared_class_statistics(split, raw_hw, raw_channels) if stats == "auto" else None
    declared, tag = found if found else (None, None)
    if kind == "gcn_minmax":
        if declared is not None and declared.gcn_min:
            return Normalizer(kind, lo=tuple(declared.gcn_min), hi=tuple(declared.gcn_max), source=tag)
        g = torch.cat([gcn_l1(b) for b in normal_images.split(512)])
        lo, hi = float(g.min()), float(g.max())
        if hi <= lo:
            hi = lo + 1.0
        return Normalizer(kind, lo=(lo,), hi=(hi,),
                          source=f"computed: min/max over {len(g)} normal training images after GCN-l1")
    if kind == "mean_std":
        if declared is not None and declared.mean:
            return Normalizer(kind, mean=tuple(declared.mean), std=tuple(declared.std), source=tag)
        mean = normal_images.mean(dim=(0, 2, 3))
        std = normal_images.std(dim=(0, 2, 3)).clamp_min(1e-6)
        return Normalizer(kind, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                          source=f"computed: channel mean/std over {len(normal_images)} normal training images")
    raise ValueError(f"unknown normalisation {kind!r}")


# --------------------------------------------------------------------------------------------
# Deep SVDD / DCAE LeNet-type networks (bias-free, BN without affine parameters)
# --------------------------------------------------------------------------------------------

def _bn2d(c: int, affine: bool = False) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-4, affine=affine)


def _xavier_lrelu(m: nn.Module) -> nn.Module:
    nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain("leaky_relu"))
    return m


class MnistLeNet(nn.Module):
    """Deep SVDD's MNIST LeNet: conv(8,5×5)-BN-LReLU-pool, conv(4,5×5)-BN-LReLU-pool, fc(196→32).
    No bias anywhere and BN without affine terms (paper Sec. 3.3, Prop. 2)."""

    in_size, in_channels, rep_dim = 28, 1, 32

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, bias=False, padding=2)
        self.bn1 = _bn2d(8)
        self.conv2 = nn.Conv2d(8, 4, 5, bias=False, padding=2)
        self.bn2 = _bn2d(4)
        self.fc1 = nn.Linear(4 * 7 * 7, self.rep_dim, bias=False)

    def forward(self, x):
        x = F.max_pool2d(F.leaky_relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.leaky_relu(self.bn2(self.conv2(x))), 2)
        return self.fc1(x.flatten(1))


class MnistLeNetAE(nn.Module):
    """DCAE for MNIST: the encoder above and a mirrored decoder of nearest up-sampling + deconvs."""

    def __init__(self):
        super().__init__()
        self.encoder = MnistLeNet()
        self.deconv1 = nn.ConvTranspose2d(2, 4, 5, bias=False, padding=2)
        self.bn3 = _bn2d(4)
        self.deconv2 = nn.ConvTranspose2d(4, 8, 5, bias=False, padding=3)
        self.bn4 = _bn2d(8)
        self.deconv3 = nn.ConvTranspose2d(8, 1, 5, bias=False, padding=2)

    def forward(self, x):
        z = self.encoder(x).view(x.size(0), 2, 4, 4)
        x = F.interpolate(F.leaky_relu(z), scale_factor=2)
        x = F.interpolate(F.leaky_relu(self.bn3(self.deconv1(x))), scale_factor=2)
        x = F.interpolate(F.leaky_relu(self.bn4(self.deconv2(x))), scale_factor=2)
        return torch.sigmoid(self.deconv3(x))


class Cifar10LeNet(nn.Module):
    """Deep SVDD's CIFAR-10 LeNet: three conv(5×5)-BN-LReLU-pool blocks (32, 64, 128) and
    fc(2048→128); bias-free."""

    in_size, in_channels, rep_dim = 32, 3, 128

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5, bias=False, padding=2)
        self.bn2d1 = _bn2d(32)
        self.conv2 = nn.Conv2d(32, 64, 5, bias=False, padding=2)
        self.bn2d2 = _bn2d(64)
        self.conv3 = nn.Conv2d(64, 128, 5, bias=False, padding=2)
        self.bn2d3 = _bn2d(128)
        self.fc1 = nn.Linear(128 * 4 * 4, self.rep_dim, bias=False)

    def forward(self, x):
        x = F.max_pool2d(F.leaky_relu(self.bn2d1(self.conv1(x))), 2)
        x = F.max_pool2d(F.leaky_relu(self.bn2d2(self.conv2(x))), 2)
        x = F.max_pool2d(F.leaky_relu(self.bn2d3(self.conv3(x))), 2)
        return self.fc1(x.flatten(1))


class Cifar10LeNetAE(nn.Module):
    """DCAE for CIFAR-10 (official: Xavier-uniform init with the leaky-ReLU gain, BN1d on the code)."""

    def __init__(self):
        super().__init__()
        self.encoder = Cifar10LeNet()
        for conv in (self.encoder.conv1, self.encoder.conv2, self.encoder.conv3):
            _xavier_lrelu(conv)
        self.bn1d = nn.BatchNorm1d(128, eps=1e-4, affine=False)
        self.deconv1 = _xavier_lrelu(nn.ConvTranspose2d(8, 128, 5, bias=False, padding=2))
        self.bn2d4 = _bn2d(128)
        self.deconv2 = _xavier_lrelu(nn.ConvTranspose2d(128, 64, 5, bias=False, padding=2))
        self.bn2d5 = _bn2d(64)
        self.deconv3 = _xavier_lrelu(nn.ConvTranspose2d(64, 32, 5, bias=False, padding=2))
        self.bn2d6 = _bn2d(32)
        self.deconv4 = _xavier_lrelu(nn.ConvTranspose2d(32, 3, 5, bias=False, padding=2))

    def forward(self, x):
        z = self.bn1d(self.encoder(x)).view(x.size(0), 8, 4, 4)
        x = self.deconv1(F.leaky_relu(z))
        x = F.interpolate(F.leaky_relu(self.bn2d4(x)), scale_factor=2)
        x = F.interpolate(F.leaky_relu(self.bn2d5(self.deconv2(x))), scale_factor=2)
        x = F.interpolate(F.leaky_relu(self.bn2d6(self.deconv3(x))), scale_factor=2)
        return torch.sigmoid(self.deconv4(x))


class FmnistLeNet(nn.Module):
    """Deep SAD's Fashion-MNIST LeNet (Ruff et al., ICLR 2020; lukasruff/Deep-SAD-PyTorch
    ``src/networks/fmnist_LeNet.py``): conv(16,5×5)-BN-LReLU-pool, conv(32,5×5)-BN-LReLU-pool,
    fc(1568→128)-BN1d-LReLU, fc(128→64); bias-free, BN without affine terms."""

    in_size, in_channels, rep_dim = 28, 1, 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, bias=False, padding=2)
        self.bn2d1 = _bn2d(16)
        self.conv2 = nn.Conv2d(16, 32, 5, bias=False, padding=2)
        self.bn2d2 = _bn2d(32)
        self.fc1 = nn.Linear(32 * 7 * 7, 128, bias=False)
        self.bn1d1 = nn.BatchNorm1d(128, eps=1e-4, affine=False)
        self.fc2 = nn.Linear(128, self.rep_dim, bias=False)

    def forward(self, x):
        x = F.max_pool2d(F.leaky_relu(self.bn2d1(self.conv1(x))), 2)
        x = F.max_pool2d(F.leaky_relu(self.bn2d2(self.conv2(x))), 2)
        x = F.leaky_relu(self.bn1d1(self.fc1(x.flatten(1))))
        return self.fc2(x)


class FmnistLeNetAE(nn.Module):
    """Deep SAD's Fashion-MNIST autoencoder: the encoder above and its decoder (fc(64→128)-BN1d,
    8×4×4, nearest up-sampling + deconvs 32, 16, 1, sigmoid)."""

    def __init__(self):
        super().__init__()
        self.encoder = FmnistLeNet()
        self.fc3 = nn.Linear(64, 128, bias=False)
        self.bn1d2 = nn.BatchNorm1d(128, eps=1e-4, affine=False)
        self.deconv1 = nn.ConvTranspose2d(8, 32, 5, bias=False, padding=2)
        self.bn2d3 = _bn2d(32)
        self.deconv2 = nn.ConvTranspose2d(32, 16, 5, bias=False, padding=3)
        self.bn2d4 = _bn2d(16)
        self.deconv3 = nn.ConvTranspose2d(16, 1, 5, bias=False, padding=2)

    def forward(self, x):
        z = self.bn1d2(self.fc3(self.encoder(x))).view(x.size(0), 8, 4, 4)
        x = F.interpolate(F.leaky_relu(z), scale_factor=2)
        x = F.interpolate(F.leaky_relu(self.bn2d3(self.deconv1(x))), scale_factor=2)
        x = F.interpolate(F.leaky_relu(self.bn2d4(self.deconv2(x))), scale_factor=2)
        return torch.sigmoid(self.deconv3(x))


DSVDD_NETS = {"mnist_lenet": (MnistLeNet, MnistLeNetAE), "cifar10_lenet": (Cifar10LeNet, Cifar10LeNetAE),
              "fmnist_lenet": (FmnistLeNet, FmnistLeNetAE)}


# --------------------------------------------------------------------------------------------
# Receptive field bookkeeping and FCDD's up-sampling (Algorithm 1)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reception:
    """Receptive field of an output pixel (receptive-field arithmetic as in fcdd models/bases.py):
    n: output side, j: jump (stride w.r.t. the input), r: extent, s: input coordinate of the centre
    of output pixel 0 (output pixel i is centred at s + j·i), in_size: input side."""

    n: int
    j: int
    r: int
    s: float
    in_size: int


def reception_of(modules: Sequence[nn.Module], in_size: int) -> Reception:
    """Walk conv / max-pool layers in forward order and accumulate (n, j, r, s)."""
    n, j, r, s = in_size, 1, 1, 0.0
    for m in modules:
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            st = m.stride if isinstance(m.stride, int) else m.stride[0]
            p = m.padding if isinstance(m.padding, int) else m.padding[0]
            d = m.dilation if isinstance(m.dilation, int) else m.dilation[0]
            k_eff = d * (k - 1) + 1
            n = (n + 2 * p - k_eff) // st + 1
            r = r + (k_eff - 1) * j
            s = s + ((k_eff - 1) / 2 - p) * j
            j = j * st
    return Reception(n=n, j=j, r=r, s=s, in_size=in_size)


def kernel_size_to_std(k: int) -> float:
    """fcdd's default Gaussian std for a kernel of size k (datasets/noise.py)."""
    return math.log10(0.45 * k + 1) + 0.25 if k < 32 else 10.0


def _upsample_matrix(n: int, out: int, rec: Reception, std: float, device, dtype) -> torch.Tensor:
    """out×n matrix: column i is the (peak-1) Gaussian centred at the receptive-field centre of
    low-res pixel i, truncated to the receptive field (|x - c| <= (r - 1) / 2)."""
    centres = rec.s + rec.j * torch.arange(n, device=device, dtype=torch.float64)
    x = torch.arange(out, device=device, dtype=torch.float64)
    d = x[:, None] - centres[None, :]
    g = torch.exp(-0.5 * (d / std) ** 2) * (d.abs() <= (rec.r - 1) / 2 + 1e-9)
    return g.to(dtype)


def receptive_upsample(a: torch.Tensor, rec: Reception, std: float, out_size: int | None = None) -> torch.Tensor:
    """FCDD's receptive-field up-sampling (ICLR 2021, Algorithm 1): A' = Σ_a a · G(c_a, σ), i.e. a
    strided transposed convolution of the low-res heatmap A (N×1×u×v or N×u×v) with a fixed
    Gaussian kernel of std σ and extent r (the receptive field), each low-res pixel's Gaussian
    centred at its receptive-field centre c_a = s + j·i in the input. Computed exactly as the
    separable product K_h · A · K_wᵀ, so half-pixel centres (after 2×2 pooling) are kept."""
    squeeze = a.dim() == 3
    a4 = a if not squeeze else a[:, None]
    out = out_size or rec.in_size
    kh = _upsample_matrix(a4.shape[-2], out, rec, std, a4.device, a4.dtype)
    kw = _upsample_matrix(a4.shape[-1], out, rec, std, a4.device, a4.dtype)
    res = torch.einsum("hu,ncuv,wv->nchw", kh, a4, kw)
    return res[:, 0] if squeeze else res


def gaussian_blur(x: torch.Tensor, k: int, std: float) -> torch.Tensor:
    """Normalised Gaussian blur (N×C×H×W) with an odd kernel k and reflect padding, as kornia's
    ``gaussian_blur2d`` used by fcdd to blur baseline heatmaps."""
    k = k if k % 2 == 1 else k - 1
    if k <= 1:
        return x
    half = k // 2
    t = torch.arange(k, device=x.device, dtype=x.dtype) - half
    g = torch.exp(-0.5 * (t / std) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    mode = "reflect" if half < min(x.shape[-2:]) else "replicate"
    y = F.pad(x, (half, half, half, half), mode=mode)
    y = F.conv2d(y, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(y, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


# --------------------------------------------------------------------------------------------
# FCDD fully convolutional networks (fcdd models/fcdd_cnn_{28,32,224}.py)
# --------------------------------------------------------------------------------------------

def _bn(c: int, affine: bool) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=1e-4, affine=affine)


def _fcdd_features(name: str, in_ch: int, bias: bool) -> tuple[nn.Sequential, int]:
    """Feature extractor (before the final 1×1 conv) of the small FCDD nets; returns (features,
    channels). Layer order = official forward order (which fixes the receptive field)."""
    lrelu = nn.LeakyReLU()
    if name == "cnn28":  # FCDD_CNN28
        layers = [nn.Conv2d(in_ch, 8, 5, padding=2, bias=bias), _bn(8, bias), lrelu, nn.MaxPool2d(2, 2),
                  nn.Conv2d(8, 16, 5, padding=2, bias=bias), nn.MaxPool2d(2, 2)]
        return nn.Sequential(*layers), 16
    if name == "cnn28_w":  # FCDD_CNN28_W (the paper's Fashion-MNIST net)
        layers = [nn.Conv2d(in_ch, 128, 5, padding=2, bias=bias), _bn(128, bias), lrelu, nn.MaxPool2d(2, 2),
                  nn.Conv2d(128, 128, 5, padding=2, bias=bias), nn.MaxPool2d(2, 2)]
        return nn.Sequential(*layers), 128
    if name == "cnn32_s":  # FCDD_CNN32_S
        layers = [nn.Conv2d(in_ch, 32, 3, padding=1, bias=bias), _bn(32, bias), lrelu, nn.MaxPool2d(2, 2),
                  nn.Conv2d(32, 64, 3, padding=1, bias=bias), _bn(64, bias), lrelu, nn.MaxPool2d(2, 2),
                  nn.Conv2d(64, 128, 3, padding=1, bias=bias)]
        return nn.Sequential(*layers), 128
    if name == "cnn32_lw3k":  # FCDD_CNN32_LW3K (the paper's CIFAR-10 net)
        layers = [nn.Conv2d(in_ch, 128, 3, padding=1, bias=bias), _bn(128, bias), lrelu, nn.MaxPool2d(2, 2),
                  nn.Conv2d(128, 256, 3, padding=1, bias=bias), _bn(256, bias), lrelu,
                  nn.Conv2d(256, 256, 3, padding=1, bias=bias), _bn(256, bias), lrelu, nn.MaxPool2d(2, 2),
                  nn.Conv2d(256, 128, 3, padding=1, bias=bias)]
        return nn.Sequential(*layers), 128
    raise ValueError(f"unknown FCDD net {name!r}")


def _vgg11_bn_features() -> nn.Sequential:
    """torchvision's vgg11_bn ``features`` layout (so its state_dict loads by index)."""
    cfg = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(*layers)


def load_vgg11_bn_state(weights: str | None) -> tuple[dict, str]:
    """ImageNet vgg11_bn weights: from ``weights`` (a local .pth) or torchvision's cache.
    Returns (state_dict, sha256 of the file). Offline and absent: a clear error."""
    import hashlib
    import os

    if weights:
        path = os.path.expanduser(weights)
    else:
        try:
            from torchvision.models import VGG11_BN_Weights
            url = VGG11_BN_Weights.IMAGENET1K_V1.url
        except Exception:  # pragma: no cover - very old torchvision
            url = "https://download.pytorch.org/models/vgg11_bn-6002323d.pth"
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
        if not os.path.exists(path):
            try:  # download only, its SHA-256 prefix (in the file name) checked; read below, weights only
                digest = torch.hub.HASH_REGEX.search(os.path.basename(url))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(url, path, hash_prefix=digest.group(1) if digest else None,
                                               progress=False)
            except Exception as exc:
                raise FileNotFoundError(
                    f"pretrained vgg11_bn weights not found and cannot be downloaded ({exc}); place "
                    f"{os.path.basename(url)} at {path} or pass params weights: PATH "
                    "(or set pretrained: false)") from exc
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path} does not exist: place the torchvision vgg11_bn "
                                "ImageNet checkpoint (vgg11_bn-6002323d.pth) there or set pretrained: false")
    with open(path, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state, sha


class FCDDNet(nn.Module):
    """φ: C×H×W → 1×u×v without fully connected layers (FCDD paper Sec. 3). ``features`` holds
    every layer before the final 1×1 conv; ``reception`` the receptive field of an output pixel."""

    def __init__(self, name: str, in_channels: int, in_size: int, bias: bool = True,
                 pretrained_state: dict | None = None, freeze: bool = False):
        super().__init__()
        self.name = name
        if name == "vgg11_224":
            if not bias:
                raise ValueError("the VGG-based FCDD net needs bias: true (official: 'VGG net is only "
                                 "supported with bias')")
            feats = _vgg11_bn_features()
            if pretrained_state is not None:
                feats.load_state_dict({k[len("features."):]: v for k, v in pretrained_state.items()
                                       if k.startswith("features.")})
            self.features = feats[:-8]  # up to block 4 (stride 8), as FCDD_CNN224_VGG
            if freeze:  # FCDD_CNN224_VGG_F: the first 15 modules (blocks 1-3) stay fixed
                for p in self.features[:15].parameters():
                    p.requires_grad_(False)
            ch = 512
        else:
            self.features, ch = _fcdd_features(name, in_channels, bias)
        self.conv_final = nn.Conv2d(ch, 1, 1, bias=bias)
        self.reception = reception_of(list(self.features) + [self.conv_final], in_size)

    def forward(self, x):
        return self.conv_final(self.features(x))


def fcdd_reception(name: str, in_channels: int, in_size: int) -> Reception:
    """Receptive field of the FCDD net ``name`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return FCDDNet(name, in_channels, in_size, bias=True).reception


# --------------------------------------------------------------------------------------------
# HSC baseline networks (fcdd models/shallow_cnn_{28,32,224}.py): conv blocks + dense head
# --------------------------------------------------------------------------------------------

class HSCNet(nn.Module):
    """The FCDD paper's HSC baseline: the FCDD conv blocks followed by fully connected layers
    that pool the spatial map into one feature vector (CNN28 / CNN28_W / CNN32 / CNN32_LW3K /
    CNN224_VGG). ``rep_dim``: output size."""

    def __init__(self, name: str, in_channels: int, bias: bool = True,
                 pretrained_state: dict | None = None, freeze: bool = False):
        super().__init__()
        self.name = name
        lrelu = nn.LeakyReLU()
        if name in ("cnn28", "cnn28_w"):
            c1, c2 = (8, 4) if name == "cnn28" else (128, 64)
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, c1, 5, padding=2, bias=bias), _bn(c1, bias), lrelu, nn.MaxPool2d(2, 2),
                nn.Conv2d(c1, c2, 5, padding=2, bias=bias), _bn(c2, bias), lrelu, nn.MaxPool2d(2, 2))
            self.head = nn.Linear(c2 * 7 * 7, 48, bias=bias)
            self.rep_dim, self.code_shape = 48, (3, 4, 4)
        elif name in ("cnn32_s", "cnn32_lw3k"):
            if name == "cnn32_s":  # CNN32: 5×5 convs 32-64-128
                blocks = [nn.Conv2d(in_channels, 32, 5, padding=2, bias=bias), _bn(32, bias), lrelu, nn.MaxPool2d(2, 2),
                          nn.Conv2d(32, 64, 5, padding=2, bias=bias), _bn(64, bias), lrelu, nn.MaxPool2d(2, 2),
                          nn.Conv2d(64, 128, 5, padding=2, bias=bias), _bn(128, bias), lrelu, nn.MaxPool2d(2, 2)]
            else:  # CNN32_LW3K
                blocks = [nn.Conv2d(in_channels, 128, 3, padding=1, bias=bias), _bn(128, bias), lrelu, nn.MaxPool2d(2, 2),
                          nn.Conv2d(128, 256, 3, padding=1, bias=bias), _bn(256, bias), lrelu,
                          nn.Conv2d(256, 256, 3, padding=1, bias=bias), _bn(256, bias), lrelu, nn.MaxPool2d(2, 2),
                          nn.Conv2d(256, 128, 3, padding=1, bias=bias), _bn(128, bias), lrelu, nn.MaxPool2d(2, 2)]
            self.features = nn.Sequential(*blocks)
            self.head = nn.Sequential(nn.Linear(128 * 4 * 4, 512, bias=bias),
                                      nn.BatchNorm1d(512, eps=1e-4, affine=bias), nn.LeakyReLU(),
                                      nn.Linear(512, 64, bias=bias))
            self.rep_dim, self.code_shape = 64, (4, 4, 4)
        elif name == "vgg11_224":  # CNN224_VGG(_F): vgg11_bn with classifier[:-3] (4096-d output)
            feats = _vgg11_bn_features()
            classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                                       nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
                                       nn.Linear(4096, 1000))
            if pretrained_state is not None:
                feats.load_state_dict({k[9:]: v for k, v in pretrained_state.items() if k.startswith("features.")})
                classifier.load_state_dict({k[11:]: v for k, v in pretrained_state.items()
                                            if k.startswith("classifier.")})
            if freeze:
                for p in feats[:15].parameters():
                    p.requires_grad_(False)
            self.features = nn.Sequential(*feats, nn.AdaptiveAvgPool2d((7, 7)))
            self.head = classifier[:-3]
            self.rep_dim, self.code_shape = 4096, None
        else:
            raise ValueError(f"unknown HSC net {name!r}")

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


# --------------------------------------------------------------------------------------------
# AE baseline networks (fcdd models/shallow_cnn_*.py: AE28, AE28_W, AE32, AE32_LW3K, AE224_VGG)
# --------------------------------------------------------------------------------------------

class FCDDAutoencoder(nn.Module):
    """The FCDD paper's AE baseline: the HSC encoder and an hourglass decoder."""

    ENCODER = {"ae28": "cnn28", "ae28_w": "cnn28_w", "ae32": "cnn32_s", "ae32_lw3k": "cnn32_lw3k",
               "ae224_vgg": "vgg11_224"}
    FCDD_NET = {"ae28": "cnn28", "ae28_w": "cnn28_w", "ae32": "cnn32_s", "ae32_lw3k": "cnn32_lw3k",
                "ae224_vgg": "vgg11_224"}

    def __init__(self, name: str, in_channels: int, bias: bool = True,
                 pretrained_state: dict | None = None, freeze: bool = False):
        super().__init__()
        if name not in self.ENCODER:
            raise ValueError(f"unknown AE net {name!r}")
        self.name = name
        self.encoder = HSCNet(self.ENCODER[name], in_channels, bias, pretrained_state, freeze)
        out_ch = in_channels
        if name in ("ae28", "ae28_w"):
            w1, w2 = (4, 8) if name == "ae28" else (64, 128)
            init = _xavier_lrelu if name == "ae28" else (lambda m: m)
            self.pre = nn.Identity()
            self.decoder = nn.Sequential(
                nn.LeakyReLU(), nn.Upsample(scale_factor=2),
                init(nn.ConvTranspose2d(3, w1, 5, padding=2, bias=bias)), _bn(w1, bias), nn.LeakyReLU(),
                nn.Upsample(scale_factor=2),
                init(nn.ConvTranspose2d(w1, w2, 5, padding=3, bias=bias)), _bn(w2, bias), nn.LeakyReLU(),
                nn.Upsample(scale_factor=2),
                init(nn.ConvTranspose2d(w2, out_ch, 5, padding=2, bias=bias)), nn.Sigmoid())
            self.code_shape = (3, 4, 4)
        elif name == "ae32":
            self.pre = nn.BatchNorm1d(64, eps=1e-4, affine=bias)
            x = _xavier_lrelu
            self.decoder = nn.Sequential(
                nn.LeakyReLU(),
                x(nn.ConvTranspose2d(4, 128, 5, padding=2, bias=bias)), _bn(128, bias), nn.LeakyReLU(),
                nn.Upsample(scale_factor=2),
                x(nn.ConvTranspose2d(128, 64, 5, padding=2, bias=bias)), _bn(64, bias), nn.LeakyReLU(),
                nn.Upsample(scale_factor=2),
                x(nn.ConvTranspose2d(64, 32, 5, padding=2, bias=bias)), _bn(32, bias), nn.LeakyReLU(),
                nn.Upsample(scale_factor=2),
                x(nn.ConvTranspose2d(32, out_ch, 5, padding=2, bias=bias)))
            self.code_shape = (4, 4, 4)
        elif name == "ae32_lw3k":
            self.pre = nn.BatchNorm1d(64, eps=1e-4, affine=bias)
            self.decoder = nn.Sequential(
                nn.LeakyReLU(),
                nn.ConvTranspose2d(4, 128, 3, padding=1, bias=bias), _bn(128, bias), nn.LeakyReLU(),
                nn.Upsample(scale_factor=2),
                nn.ConvTranspose2d(128, 256, 3, padding=1, bias=bias), _bn(256, bias), nn.LeakyReLU(),
                nn.ConvTranspose2d(256, 256, 3, padding=1, bias=bias), _bn(256, bias), nn.LeakyReLU(),
                nn.Upsample(scale_factor=2),
                nn.ConvTranspose2d(256, 128, 3, padding=1, bias=bias), _bn(128, bias), nn.LeakyReLU(),
                nn.Upsample(scale_factor=2),
                nn.ConvTranspose2d(128, out_ch, 3, padding=1, bias=bias))
            self.code_shape = (4, 4, 4)
        else:  # ae224_vgg (AE224_VGG): 4096 → 512×7×7 → five up-sampling stages
            self.pre = nn.Sequential(nn.BatchNorm1d(4096), nn.ReLU(True), nn.Linear(4096, 25088),
                                     nn.BatchNorm1d(25088), nn.ReLU(True))
            self.decoder = nn.Sequential(
                nn.Upsample(scale_factor=2),
                nn.ConvTranspose2d(512, 512, 3, 1, 1), nn.BatchNorm2d(512), nn.ReLU(True),
                nn.ConvTranspose2d(512, 512, 3, 1, 1), nn.BatchNorm2d(512), nn.ReLU(True),
                nn.Upsample(scale_factor=2),
                nn.ConvTranspose2d(512, 512, 3, 1, 1), nn.BatchNorm2d(512), nn.ReLU(True),
                nn.ConvTranspose2d(512, 256, 3, 1, 1), nn.BatchNorm2d(256), nn.ReLU(True),
                nn.Upsample(scale_factor=2),
                nn.ConvTranspose2d(256, 256, 3, 1, 1), nn.BatchNorm2d(256), nn.ReLU(True),
                nn.ConvTranspose2d(256, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.ReLU(True),
                nn.Upsample(scale_factor=2),
                nn.ConvTranspose2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(True),
                nn.Upsample(scale_factor=2),
                nn.ConvTranspose2d(64, out_ch, 3, 1, 1))
            self.code_shape = (512, 7, 7)

    def forward(self, x):
        z = self.pre(self.encoder(x))
        return self.decoder(z.view(x.size(0), *self.code_shape))
