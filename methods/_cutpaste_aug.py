"""CutPaste augmentations on [0, 1] image tensors (Li et al., "CutPaste: Self-Supervised Learning
for Anomaly Detection and Localization", CVPR 2021, arXiv:2104.04015). Not a method module.

* ``cut_paste``: CutPaste (Sec. 2.1, Appendix A.2): a rectangle whose area is a fraction
  U(0.02, 0.15) of the image and whose aspect ratio lies in (0.3, 1) ∪ (1, 3.3) (sampled
  log-uniformly, as torchvision's RandomErasing that the paper's implementation follows) is cut
  at a random location, colour-jittered, and pasted at another random location; both boxes lie
  wholly inside the image.
* ``cut_paste_scar``: CutPaste-Scar (Sec. 2.2, Appendix A.2): a thin rectangle of width
  U(2, 16) px and length U(10, 25) px (at 256 px images; scaled with the image side here, the
  identity at the paper's size), colour-jittered, rotated by U(-45, 45) degrees and pasted.
* ``color_jitter``: brightness, contrast, saturation and hue in random order with maximum
  intensity ``strength`` (0.1 in the paper), as torchvision's ColorJitter.
* ``translate``: a random shift of up to ``fraction`` of the side (reflect padding), the paper's
  "random translation" applied before CutPaste (its magnitude is not given in the paper).

Every random draw comes from the caller's ``torch.Generator``, so a seeded cell is reproducible.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

REFERENCE_SIDE = 256  # the paper's image size, at which the scar sizes are given in pixels


@dataclass(frozen=True)
class CutPasteSpec:
    """The augmentation's hyper-parameters (paper Appendix A.2 defaults)."""

    area_ratio: tuple[float, float] = (0.02, 0.15)
    aspect_ratio: float = 0.3              # ratio in (0.3, 1/0.3): log-uniform, RandomErasing-style
    scar_width: tuple[float, float] = (2.0, 16.0)
    scar_length: tuple[float, float] = (10.0, 25.0)
    scar_rotation: float = 45.0            # degrees, U(-45, 45)
    jitter: float = 0.1                    # colour jitter of the pasted patch

    def describe(self) -> dict:
        return asdict(self)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=g)) if hi > lo else lo


def color_jitter(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """C×h×w in [0, 1] -> jittered copy: brightness, contrast, saturation factors in
    [1 - s, 1 + s], hue shift in [-s, s] (capped at 0.5), applied in random order."""
    if strength <= 0 or x.numel() == 0:
        return x
    lo = max(0.0, 1.0 - strength)
    factors = [_uniform(g, lo, 1.0 + strength) for _ in range(3)]
    hue = _uniform(g, -min(strength, 0.5), min(strength, 0.5))
    ops = [lambda t: TF.adjust_brightness(t, factors[0]),
           lambda t: TF.adjust_contrast(t, factors[1]),
           lambda t: TF.adjust_saturation(t, factors[2]),
           lambda t: TF.adjust_hue(t, hue)]
    if x.shape[0] != 3:  # saturation and hue are defined for colour images only
        ops = ops[:2]
    for i in torch.randperm(len(ops), generator=g).tolist():
        x = ops[i](x)
    return x.clamp(0, 1)


def translate(x: torch.Tensor, fraction: float, g: torch.Generator) -> torch.Tensor:
    """C×H×W -> a copy shifted by up to ``fraction`` of the side in each direction
    (reflect padding, then a crop at a random offset)."""
    _, h, w = x.shape
    p = min(int(round(fraction * min(h, w))), min(h, w) - 1)
    if p <= 0:
        return x
    padded = F.pad(x[None], (p, p, p, p), mode="reflect")[0]
    oy, ox = _randint(g, 0, 2 * p), _randint(g, 0, 2 * p)
    return padded[:, oy:oy + h, ox:ox + w]


def cut_paste(x: torch.Tensor, spec: CutPasteSpec, g: torch.Generator) -> torch.Tensor:
    """CutPaste of one C×H×W image in [0, 1] (returns a new tensor)."""
    _, h, w = x.shape
    area = _uniform(g, *spec.area_ratio) * h * w
    log_lo, log_hi = math.log(spec.aspect_ratio), math.log(1.0 / spec.aspect_ratio)
    ratio = math.exp(_uniform(g, log_lo, log_hi))
    pw = min(w, max(1, int(round(math.sqrt(area * ratio)))))
    ph = min(h, max(1, int(round(math.sqrt(area / ratio)))))
    fy, fx = _randint(g, 0, h - ph), _randint(g, 0, w - pw)
    patch = color_jitter(x[:, fy:fy + ph, fx:fx + pw].clone(), spec.jitter, g)
    ty, tx = _randint(g, 0, h - ph), _randint(g, 0, w - pw)
    out = x.clone()
    out[:, ty:ty + ph, tx:tx + pw] = patch
    return out


def rotate_patch(patch: torch.Tensor, degrees: float) -> tuple[torch.Tensor, torch.Tensor]:
    """C×h×w patch -> (C×H'×W' rotated patch on a canvas that holds all of it, H'×W' bool mask
    of the canvas pixels the rotated patch covers), bilinear, as PIL's rotate(expand=True)."""
    c, h, w = patch.shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    out_w = max(1, int(math.ceil(abs(w * cos) + abs(h * sin) - 1e-6)))
    out_h = max(1, int(math.ceil(abs(w * sin) + abs(h * cos) - 1e-6)))
    # maps canvas-normalised coordinates to patch-normalised ones (inverse rotation)
    theta = torch.tensor([[cos * out_w / w, sin * out_h / w, 0.0],
                          [-sin * out_w / h, cos * out_h / h, 0.0]], dtype=patch.dtype)[None]
    grid = F.affine_grid(theta, [1, c + 1, out_h, out_w], align_corners=False)
    src = torch.cat([patch, torch.ones(1, h, w, dtype=patch.dtype)])[None]
    res = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    return res[:c], res[c] > 0.5


def cut_paste_scar(x: torch.Tensor, spec: CutPasteSpec, g: torch.Generator) -> torch.Tensor:
    """CutPaste-Scar of one C×H×W image in [0, 1] (returns a new tensor)."""
    _, h, w = x.shape
    scale = min(h, w) / REFERENCE_SIDE
    pw = min(w, max(1, int(round(_uniform(g, *spec.scar_width) * scale))))
    ph = min(h, max(1, int(round(_uniform(g, *spec.scar_length) * scale))))
    fy, fx = _randint(g, 0, h - ph), _randint(g, 0, w - pw)
    patch = color_jitter(x[:, fy:fy + ph, fx:fx + pw].clone(), spec.jitter, g)
    rotated, mask = rotate_patch(patch, _uniform(g, -spec.scar_rotation, spec.scar_rotation))
    rh, rw = mask.shape
    if rh > h or rw > w:  # tiny images: keep the centre of the rotated scar
        oy, ox = max(0, (rh - h) // 2), max(0, (rw - w) // 2)
        rotated, mask = rotated[:, oy:oy + h, ox:ox + w], mask[oy:oy + h, ox:ox + w]
        rh, rw = mask.shape
    ty, tx = _randint(g, 0, h - rh), _randint(g, 0, w - rw)
    out = x.clone()
    region = out[:, ty:ty + rh, tx:tx + rw]
    out[:, ty:ty + rh, tx:tx + rw] = torch.where(mask[None], rotated, region)
    return out


def cut_paste_union(x: torch.Tensor, spec: CutPasteSpec, g: torch.Generator) -> torch.Tensor:
    """CutPaste or CutPaste-Scar with probability 1/2 each (the "binary (union)" of Table 5)."""
    return cut_paste(x, spec, g) if float(torch.rand((), generator=g)) < 0.5 else cut_paste_scar(x, spec, g)


# variant -> the augmentations whose outputs are classes 1, 2, ... (class 0 = the image itself)
VARIANTS = {
    "binary": (cut_paste,),                 # CutPaste, Eq. 1
    "scar": (cut_paste_scar,),              # CutPaste (scar), Eq. 1 with CP = scar
    "union": (cut_paste_union,),            # binary: normal vs either (Table 5)
    "3way": (cut_paste, cut_paste_scar),    # normal / CutPaste / CutPaste-Scar (Sec. 2.2)
}


def make_batch(images: torch.Tensor, variant: str, spec: CutPasteSpec, g: torch.Generator, *,
               translate_fraction: float, image_jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """B×C×H×W normal images in [0, 1] -> (K·B images, K·B labels) for the proxy task: each image
    is first translated and jittered ("data augmentations ... are applied before feeding x into g
    or CP", Sec. 2.1), then every augmentation of the variant is applied to it."""
    base = [color_jitter(translate(x, translate_fraction, g), image_jitter, g) for x in images]
    groups = [torch.stack(base)]
    for aug in VARIANTS[variant]:
        groups.append(torch.stack([aug(x, spec, g) for x in base]))
    labels = torch.arange(len(groups)).repeat_interleave(len(images))
    return torch.cat(groups), labels
