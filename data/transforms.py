"""Input transforms a method declares: resize (optionally centre-crop), channels, normalisation.

Datasets hand out raw uint8 images; each method turns them into tensors with ``to_tensor`` and
records the transform it used (``Transform.describe()``) in its resolved params.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Transform:
    """resize: side after resizing; crop: centre crop side (None = no crop);
    channels: 1 or 3 (grey images are repeated to 3, colour images averaged to 1);
    mean/std: per-channel normalisation of [0, 1] values (None = no normalisation)."""

    resize: int
    crop: int | None = None
    channels: int = 3
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD

    @property
    def size(self) -> int:
        return self.crop or self.resize

    def describe(self) -> dict:
        return asdict(self)

    def __call__(self, images, batch: int = 256) -> torch.Tensor:
        return to_tensor(images, self, batch=batch)


def _as_nhwc_groups(images) -> list[np.ndarray]:
    """Uniform array -> [the N×H×W×C array]; list of differently sized images -> one 1×H×W×C each.
    No copy here: a memory-mapped dataset is read batch by batch in ``to_tensor``."""
    if isinstance(images, np.ndarray):
        return [images if images.ndim == 4 else images[..., None]]
    out = []
    for img in images:
        img = np.asarray(img)
        out.append((img if img.ndim == 3 else img[..., None])[None])
    return out


def _batch_tensor(group: np.ndarray, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of an N×H×W×C array as an N×C×H×W tensor (a private, writable copy)."""
    return torch.from_numpy(np.array(group[start:stop])).permute(0, 3, 1, 2)


def to_tensor(images, transform: Transform, batch: int = 256) -> torch.Tensor:
    """uint8 images (N×H×W×C array or list of H×W×C) -> float N×C×S×S tensor, normalised."""
    chunks = []
    for group in _as_nhwc_groups(images):
        for start in range(0, group.shape[0], batch):
            x = _batch_tensor(group, start, start + batch).float().div_(255.0)
            if transform.channels == 3 and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            elif transform.channels == 1 and x.shape[1] == 3:
                x = x.mean(dim=1, keepdim=True)
            if x.shape[-2:] != (transform.resize, transform.resize):
                x = F.interpolate(x, size=(transform.resize, transform.resize), mode="bilinear",
                                  align_corners=False, antialias=True)
            if transform.crop is not None and transform.crop != transform.resize:
                off = (transform.resize - transform.crop) // 2
                x = x[..., off:off + transform.crop, off:off + transform.crop]
            if transform.mean is not None:
                mean = torch.tensor(transform.mean[: x.shape[1]]).view(1, -1, 1, 1)
                std = torch.tensor(transform.std[: x.shape[1]]).view(1, -1, 1, 1)
                x = (x - mean) / std
            chunks.append(x.contiguous())
    return torch.cat(chunks) if chunks else torch.empty(0, transform.channels, transform.size, transform.size)


# How ground-truth masks are brought to a method's map size, each as a reference code does it with
# PIL (the masks are 0/255 images there):
#   "nearest":      PIL NEAREST (pixel centres; torch's "nearest" samples half a pixel up-left of
#                   them): PaDiM's reference Resize(..., Image.NEAREST), and ours for everyone else;
#   "bilinear>0.5": PIL BILINEAR, then value / 255 > 0.5 (jnhwkim/orthoad dataset.py: torchvision
#                   Resize on the mask, ``self.transform(annotation)[0] > .5``);
#   "bilinear==1":  PIL BILINEAR, then value == 255 (amazon-science/patchcore-inspection: torchvision
#                   Resize on the mask in datasets/mvtec.py, ``astype(int)`` in metrics.py keeps the
#                   pixels whose resized value is exactly 1).
MaskResize = Literal["nearest", "bilinear>0.5", "bilinear==1"]
MASK_RESIZE_RULES = get_args(MaskResize)


def pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` pixels when PIL's NEAREST resizes ``n_in`` pixels to
    ``n_out``: PIL's own arithmetic (read off a resized index row; it is separable, the same
    for rows and columns). Mostly torch's "nearest-exact", but PIL accumulates the step in
    floating point, so a few pixels whose centre falls exactly on a source border differ."""
    from PIL import Image

    row = Image.fromarray(np.arange(n_in, dtype=np.int32)[None])  # mode "I"
    return np.asarray(row.resize((n_out, 1), Image.NEAREST), dtype=np.int64)[0]


def _crop_index(idx: np.ndarray, crop: int | None) -> np.ndarray:
    if crop is None or crop == len(idx):
        return idx
    off = (len(idx) - crop) // 2
    return idx[off:off + crop]


def resize_masks(masks, size: int | tuple[int, int], crop: int | None = None,
                 resize: int | None = None, rule: str = "nearest") -> np.ndarray:
    """Binary masks (N×H×W array or list) -> N×h×w uint8 {0,1} at ``size``, applying the
    resize-then-centre-crop a method's Transform applied to the images when resize is given
    (resize to resize×resize, centre crop ``crop``), then, where the map size differs from that,
    a nearest resize to ``size``. ``rule`` (MASK_RESIZE_RULES) is the first resize's
    interpolation and threshold, computed with PIL exactly as the reference codes do."""
    if rule not in MASK_RESIZE_RULES:
        raise ValueError(f"mask resize rule {rule!r}; valid: {MASK_RESIZE_RULES}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    result = []
    for group in _as_nhwc_groups(masks):
        m = np.asarray(group[..., 0] if group.ndim == 4 else group)
        h, w = m.shape[1:]
        first = (resize, resize) if resize is not None else (out_h, out_w)
        k = crop if resize is not None else None
        if rule == "nearest":  # index arithmetic only: no full-size copy of the masks
            binary = m
            rows = _crop_index(pil_nearest_index(h, first[0]), k)
            cols = _crop_index(pil_nearest_index(w, first[1]), k)
        else:
            from PIL import Image

            stack = []
            for one in m:
                img = Image.fromarray(np.where(one != 0, 255, 0).astype(np.uint8))
                stack.append(np.asarray(img.resize((first[1], first[0]), Image.BILINEAR)))
            v = np.stack(stack) if stack else np.zeros((0, *first), np.uint8)
            binary = v > 127 if rule == "bilinear>0.5" else v == 255  # x / 255 > 0.5 | x / 255 == 1
            rows = _crop_index(np.arange(first[0]), k)
            cols = _crop_index(np.arange(first[1]), k)
        if (len(rows), len(cols)) != (out_h, out_w):
            rows = rows[pil_nearest_index(len(rows), out_h)]
            cols = cols[pil_nearest_index(len(cols), out_w)]
        result.append((binary[:, rows][:, :, cols] != 0).astype(np.uint8))
    return np.concatenate(result) if result else np.zeros((0, out_h, out_w), np.uint8)
