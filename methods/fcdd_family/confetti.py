"""Confetti noise and the 'malformed normal' anomalies made from it (fcdd datasets/noise.py,
noise_modes.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from methods.deep_one_class import gaussian_blur


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
