"""GCN-l1 + min-max and mean / std input normalisation of the deep one-class methods, with the
constants a split's dataset declares or computed ones (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

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
