"""Deep SVDD / DCAE LeNet-type networks (bias-free, BN without affine parameters) and Deep SAD's
Fashion-MNIST LeNet."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
