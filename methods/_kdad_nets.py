"""Networks of KDAD (Salehi et al., "Multiresolution Knowledge Distillation for Anomaly Detection",
CVPR 2021, arXiv:2011.11108; official code rohban-lab/Knowledge_Distillation_AD). Not a method
module.

* ``source_features``: the frozen VGG-16 source S, only its convolutional ``features`` (indices
  as torchvision's / timm's ``vgg16``: max-pools at 4, 9, 16, 23, 30). ImageNet weights come
  through ``methods.backbones.resolve_weights`` (HF / torch hub caches or ``weights: PATH``;
  offline and absent: ``WeightsNotFoundError`` naming the file and where to put it); only the
  ``features.*`` tensors are read, so the 120M-parameter classifier is never built.
  ``pretrained: false`` is a fixed random initialisation (torchvision's VGG init, seed 0): the
  same function in every cell, as the backbones' random init.
* ``Cloner``: the cloner C of the paper's Fig. 2 / the official ``make_arch('B', ...)``: VGG
  blocks with the source's layout whose last convolution per block has the source's width and
  whose other convolutions have 16 channels, batch norm after every convolution except each
  block's last, ReLU, 2×2 max-pool, no bias terms (Sec. 3.2), Xavier-uniform weights.
  ``cloner: equal`` is the official ``'A'`` configuration (the source's widths; ablation 3.3.2).
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

# torchvision VGG-16 ("D") layout; the official cloner configurations (models/network.py).
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
CLONER_CFG = {
    "small": [16, 16, "M", 16, 128, "M", 16, 16, 256, "M", 16, 16, 512, "M", 16, 16, 512, "M"],  # 'B'
    "equal": VGG16_CFG,                                                                           # 'A'
}
# the max-pool ending each block of torchvision's vgg16.features, in block order
POOL_LAYERS = ("features.4", "features.9", "features.16", "features.23", "features.30")


def vgg_features(cfg=VGG16_CFG) -> nn.Sequential:
    """torchvision's ``vgg16().features`` (conv 3×3 with bias, ReLU, max-pool), same indices."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_ch, v, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            in_ch = v
    return nn.Sequential(*layers)


class SourceVGG(nn.Module):
    """Frozen VGG-16 features; ``forward(x, blocks)`` returns the outputs of the requested
    block-ending max-pools (block 1..5) and stops after the deepest one."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features
        self.pool_index = [int(name.split(".")[1]) for name in POOL_LAYERS]

    def forward(self, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        want = {self.pool_index[b - 1]: b for b in blocks}
        last = max(want)
        out: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in want:
                out[want[i]] = x
            if i == last:
                break
        return [out[b] for b in blocks]


_SOURCES: OrderedDict[tuple, SourceVGG] = OrderedDict()
_LOCK = threading.Lock()
MAX_CACHED_SOURCES = 2


def source_network(pretrained: bool, weights: str | None, device: str):
    """(SourceVGG in eval mode with frozen parameters, WeightsRef), built once per (weights,
    device) in this process."""
    from methods.backbones import read_state_dict, resolve_weights

    ref = resolve_weights("vgg16", pretrained, weights)
    key = (ref.id, str(device))
    with _LOCK:
        if key in _SOURCES:
            _SOURCES.move_to_end(key)
            return _SOURCES[key], ref
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random source is a fixed function, not the cell's seed
        features = vgg_features()
    if ref.path is not None:
        state = read_state_dict(ref.path)
        own = features.state_dict()
        sub = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        missing = [k for k in own if k not in sub]
        bad = [k for k in own if k in sub and tuple(sub[k].shape) != tuple(own[k].shape)]
        if missing or bad:
            raise ValueError(f"weights file {ref.path} does not hold VGG-16 features: missing "
                             f"{['features.' + k for k in missing[:4]]}, shape mismatch {bad[:4]}")
        features.load_state_dict({k: sub[k] for k in own})
    net = SourceVGG(features).eval().requires_grad_(False).to(device)
    with _LOCK:
        _SOURCES[key] = net
        while len(_SOURCES) > MAX_CACHED_SOURCES:
            _SOURCES.popitem(last=False)
    return net, ref


class _GuidedReLUFn(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients where the input was positive
    (Guided Backpropagation, Springenberg et al.)."""

    @staticmethod
    def forward(ctx, x):
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return grad.clamp_min(0) * (out > 0).to(grad.dtype)


class SwitchReLU(nn.Module):
    """ReLU that becomes a guided-backprop ReLU while ``guided`` is set (for GBP maps)."""

    def __init__(self):
        super().__init__()
        self.guided = False

    def forward(self, x):
        return _GuidedReLUFn.apply(x) if self.guided else F.relu(x)


class Cloner(nn.Module):
    """The cloner C (see module doc); ``forward(x, blocks)`` returns the requested blocks'
    max-pool outputs, whose shapes equal the source's."""

    def __init__(self, cfg: list, batch_norm: bool = True):
        super().__init__()
        blocks, block, in_ch = [], [], 3
        for i, v in enumerate(cfg):
            if v == "M":
                block.append(nn.MaxPool2d(kernel_size=2, stride=2))
                blocks.append(nn.Sequential(*block))
                block = []
                continue
            conv = nn.Conv2d(in_ch, v, kernel_size=3, padding=1, bias=False)
            nn.init.xavier_uniform_(conv.weight)
            block.append(conv)
            if batch_norm and cfg[i + 1] != "M":
                block.append(nn.BatchNorm2d(v))
            block.append(SwitchReLU())
            in_ch = v
        self.blocks = nn.ModuleList(blocks)

    def set_guided(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, SwitchReLU):
                m.guided = on

    def forward(self, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        last = max(blocks)
        for b, layer in enumerate(self.blocks, start=1):
            x = layer(x)
            out[b] = x
            if b == last:
                break
        return [out[b] for b in blocks]
