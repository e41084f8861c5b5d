"""The classifier networks (OpenOOD's ResNet-18 32×32, WideResNet-40-2, BiT ResNet-v2), see the
package docstring."""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# constants

ARCHS = ("resnet18_32x32", "wrn40_2", "bit_r50x1", "bit_r101x1")
BIT_LAYERS = {"bit_r50x1": (3, 4, 6, 3), "bit_r101x1": (3, 4, 23, 3)}


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
