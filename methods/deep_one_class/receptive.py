"""Receptive-field bookkeeping and FCDD's receptive-field up-sampling (Algorithm 1); the Gaussian
blur of the baselines' heatmaps."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


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
