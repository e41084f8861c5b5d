"""The paper's training augmentation per recipe family."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.fcdd_family.recipes import FAMILIES


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

def _random_crop(x: torch.Tensor, gt: torch.Tensor | None, out: int, pad: int,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
        gt = F.pad(gt, (pad, pad, pad, pad)) if gt is not None else None
    h, w = x.shape[-2:]
    oy = torch.randint(0, h - out + 1, (len(x),), generator=g)
    ox = torch.randint(0, w - out + 1, (len(x),), generator=g)
    xs = torch.stack([x[i, :, oy[i]:oy[i] + out, ox[i]:ox[i] + out] for i in range(len(x))]) if len(x) else x[..., :out, :out]
    gs = None
    if gt is not None:
        gs = torch.stack([gt[i, :, oy[i]:oy[i] + out, ox[i]:ox[i] + out] for i in range(len(gt))]) if len(gt) else gt[..., :out, :out]
    return xs, gs


def _hflip(x, gt, g):
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if gt is not None:
        gt = torch.where(flip[:, None, None, None], gt.flip(-1), gt)
    return x, gt


def to_net_size(x: torch.Tensor, size: int) -> torch.Tensor:
    """Test-time geometry: nearest resize (the 224 family's Resize(224, NEAREST) of 240 px raws)."""
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="nearest")


def augment(x: torch.Tensor, gt: torch.Tensor | None, family: str, g: torch.Generator,
            enabled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The paper's training augmentation on [0, 1] images (see ``AUGMENTATION``)."""
    size = FAMILIES[family]["size"]
    if family == "224":
        if not enabled:
            return to_net_size(x, size), (to_net_size(gt, size) if gt is not None else None)
        cx, cg = _random_crop(x, gt, size, 0, g)
        rx, rg = to_net_size(x, size), (to_net_size(gt, size) if gt is not None else None)
        pick = (torch.rand(len(x), generator=g) < 0.5)[:, None, None, None]
        x = torch.where(pick, cx, rx)
        gt = torch.where(pick, cg, rg) if gt is not None else None
        on = (torch.rand(len(x), generator=g) < 0.5).float()[:, None, None, None]
        std = x.flatten(1).std(1)[:, None, None, None]
        noise = torch.randn(x.shape, generator=g)
        return (x + noise * on * std * 0.1).clamp(0, 1), gt
    if not enabled:
        return x, gt
    pad = 2 if family == "28" else 4
    x, gt = _random_crop(x, gt, size, pad, g)
    x, gt = _hflip(x, gt, g)
    if family == "32":
        x = x + 0.001 * torch.randn(x.shape, generator=g)
    return x, gt
