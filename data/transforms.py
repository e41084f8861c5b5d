"""Input transforms a method declares: resize (optionally centre-crop), channels, normalisation.

Datasets hand out raw uint8 images; each method turns them into tensors with ``to_tensor`` and
records the transform it used (``Transform.describe()``) in its resolved params.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

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


def resize_masks(masks, size: int | tuple[int, int], crop: int | None = None,
                 resize: int | None = None) -> np.ndarray:
    """Binary masks (N×H×W array or list) -> N×h×w uint8 at ``size`` (nearest), applying the same
    resize-then-centre-crop a method's Transform applied to the images when crop/resize given."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    result = []
    for group in _as_nhwc_groups(masks):
        m = _batch_tensor(group, 0, group.shape[0]).float()
        if resize is not None and crop is not None and crop != resize:
            m = F.interpolate(m, size=(resize, resize), mode="nearest")
            off = (resize - crop) // 2
            m = m[..., off:off + crop, off:off + crop]
        m = F.interpolate(m, size=(out_h, out_w), mode="nearest")
        result.append((m[:, 0] > 0.5).to(torch.uint8).numpy())
    return np.concatenate(result) if result else np.zeros((0, out_h, out_w), np.uint8)
