"""FCDD's fully convolutional networks and its HSC / AE baselines (fcdd models/*.py), with the
ImageNet vgg11_bn weights of the 224 px nets."""
from __future__ import annotations

import torch
import torch.nn as nn

from methods.deep_one_class.lenet import _xavier_lrelu
from methods.deep_one_class.receptive import Reception, reception_of


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
    from methods.backbones import read_state_dict, sha256_of

    return read_state_dict(path), sha256_of(path)


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
