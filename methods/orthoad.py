"""OrthoAD: Kim et al., "Semi-orthogonal Embedding for Efficient Unsupervised Anomaly
Segmentation", arXiv:2105.14737 (2021), following the authors' code
jnhwkim/orthoad@c7eff1739f12038acd8286fc5c4c85581877b826: train.py, model.py, dataset.py.

PaDiM's pipeline (layer1-3 embeddings on layer1's grid, a Gaussian per position, Mahalanobis
distance maps, bilinear up-sampling, Gaussian smoothing sigma = 4: model.py ``SpadeResNet``)
with PaDiM's random subset of dimensions replaced by a random semi-orthogonal matrix W in
R^{F×k}, W^T W = I_k (Sec. 3.2), drawn uniformly (QR of a Gaussian matrix with the sign
correction; the authors' ``MahEvaluator.get_embedding`` uses torch's orthogonal_ init, the same
construction); k = 100 for ResNet-18, 300 for WRN50-2 (Sec. 4). The distance approximates the
full-rank Mahalanobis distance as (Sec. 3)

    d(x)^2 = (x - mu)^T W (W^T Sigma W + eps I)^-1 W^T (x - mu),

computed as the paper does, through the projection: W^T x is formed per position (per layer at
its own resolution, then nearest up-sampled and summed, which equals projecting the concatenated
embedding), and the first and second moments of the projected features are accumulated over the
training images, so memory grows with k^2 per position, never with F^2 nor with the number of
training images. W^T (Sigma + eps I) W = W^T Sigma W + eps I since W^T W = I. As in the authors'
code the covariance is the biased (1/N) estimate (train.py), eps = 0.01, and the image score is
the maximum of the smoothed map (train.py, ``det_pred``).

The reference's data pipeline (dataset.py ``MVTecAD``), our defaults:
* the whole frame: Resize(256) and CenterCrop(256) (RandomCrop(256) for training), so a 256×256
  input, a 64×64 layer1 grid, maps and masks at 256: ``image_size: 256, crop: null``;
* the Gaussians are fitted on 90% of the training images: of each category's training files in
  sorted order, indices 0, 10, 20, ... go to a validation split the evaluation never uses
  (``hold_out_every: 10``; ``null`` fits on every image);
* masks go through the images' bilinear Resize and are thresholded at 0.5
  (``mask_resize: "bilinear>0.5"``).
Left out: the reference first caches every image (and mask) resized to 320 px (its
``cache_loader``), then resizes to 256; we resize once.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator

from data.base import Split
from data.transforms import MaskResize
from methods.base import register
from methods.padim import MahalanobisMapMethod, _position_chunk, precision_from_cov
from methods.backbones import FrozenFeatureParams

# Sec. 4 of the paper.
K_DEFAULTS = {"resnet18": 100, "wide_resnet50_2": 300}


def semi_orthogonal(f: int, k: int, seed: int) -> torch.Tensor:
    """Random F×k matrix with orthonormal columns, Haar-distributed: Q of the QR decomposition of
    a standard Gaussian matrix, columns multiplied by sign(diag(R)) (Sec. 3.2)."""
    if k > f:
        raise ValueError(f"orthoad: k={k} exceeds the embedding dimension F={f}")
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(f, k, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None]


class OrthoADParams(FrozenFeatureParams):
    layers: list[str] = ["layer1", "layer2", "layer3"]
    crop: int | None = None     # the whole 256 frame (reference CenterCrop(256) of a 256 image)
    mask_resize: MaskResize = "bilinear>0.5"   # reference: bilinear Resize of the mask, > 0.5
    hold_out_every: int | None = 10     # every 10th training image held out, unused (reference); None: all
    k: int | None = None        # None: 100 for resnet18, 300 for wide_resnet50_2 (paper)
    eps: float = 0.01           # covariance regulariser (PaDiM's, as the authors' code)
    sigma: float = 4.0          # Gaussian smoothing of the anomaly map, px

    @field_validator("k")
    @classmethod
    def _k(cls, v):
        if v is not None and v <= 0:
            raise ValueError("k must be positive")
        return v

    @field_validator("hold_out_every")
    @classmethod
    def _hold_out(cls, v):
        if v is not None and v < 2:
            raise ValueError("hold_out_every must be at least 2 (or null: fit on every image)")
        return v


def fitted_rows(targets: np.ndarray, hold_out_every: int | None) -> np.ndarray:
    """Indices of the training images the reference fits on: within each class (category), in
    the split's order (sorted file names, as torchvision's ImageFolder), every image but the
    0th, 10th, 20th, ... (dataset.py ``MVTecAD.__init__``: ``0 != idx % 10``)."""
    targets = np.asarray(targets)
    if hold_out_every is None:
        return np.arange(len(targets))
    keep = np.ones(len(targets), dtype=bool)
    for t in np.unique(targets):
        pos = np.flatnonzero(targets == t)
        keep[pos[::hold_out_every]] = False
    return np.flatnonzero(keep)


@register("orthoad")
class OrthoAD(MahalanobisMapMethod):
    Params = OrthoADParams
    protocols = {"one_class", "unified"}
    paper = "Kim et al., Semi-orthogonal Embedding for Efficient Unsupervised Anomaly Segmentation, 2021"
    reference = "jnhwkim/orthoad@c7eff1739f12038acd8286fc5c4c85581877b826: train.py, model.py, dataset.py"

    def __init__(self, params: OrthoADParams, ctx):
        super().__init__(params, ctx)
        if params.k is None and params.backbone not in K_DEFAULTS:
            raise ValueError(f"orthoad: no paper default k for backbone {params.backbone!r} "
                             f"(known: {K_DEFAULTS}); set k explicitly")
        self.k = params.k or K_DEFAULTS[params.backbone]
        self.W: torch.Tensor | None = None  # F×k
        self.n_fitted: int | None = None
        self.n_held_out: int | None = None

    def embed(self, layer_feats: list[torch.Tensor]) -> torch.Tensor:
        """B×k×H×W projected embeddings W^T x on layer1's grid."""
        if self.W is None:
            self.W = semi_orthogonal(sum(self.layer_dims), self.k, self.ctx.seed).float().to(self.ctx.device)
        hw = layer_feats[0].shape[-2:]
        out, off = None, 0
        for f in layer_feats:
            c = f.shape[1]
            z = torch.einsum("bchw,ck->bkhw", f.float(), self.W[off:off + c])
            off += c
            if z.shape[-2:] != hw:
                z = F.interpolate(z, size=hw, mode="nearest")
            out = z if out is None else out.add_(z)  # out is this call's own tensor
        return out

    def fit(self, train: Split) -> None:
        rows = fitted_rows(train.targets, self.params.hold_out_every)
        if len(rows) == 0:
            raise ValueError(f"orthoad: no training image left after holding out every "
                             f"{self.params.hold_out_every}th of {len(train)}")
        self.n_fitted, self.n_held_out = len(rows), len(train) - len(rows)
        n, s1, s2 = 0, None, None
        for z in self._batches(train, rows if self.n_held_out else None):
            b, k, h, w = z.shape
            z = z.reshape(b, k, h * w)
            if s1 is None:
                s1 = torch.zeros(h * w, k, dtype=torch.float64, device=z.device)
                s2 = torch.zeros(h * w, k, k, dtype=torch.float64, device=z.device)
                self.feature_hw = (h, w)
            step = _position_chunk(k, b, z.device)
            for s in range(0, h * w, step):
                zc = z[:, :, s:s + step].permute(2, 0, 1).double().contiguous()  # c×b×k
                s1[s:s + step] += zc.sum(1)
                s2[s:s + step].baddbmm_(zc.transpose(1, 2), zc)  # sum over images of z z^T
            n += b
        mean = s1 / n
        prec = torch.empty(s2.shape, dtype=torch.float32, device=s2.device)
        step = _position_chunk(self.k, 0, s2.device)
        for s in range(0, len(mean), step):
            m = mean[s:s + step]
            cov = torch.baddbmm(s2[s:s + step], m[:, :, None], m[:, None, :], beta=1 / n, alpha=-1)  # biased
            prec[s:s + step] = precision_from_cov(cov, self.params.eps).float()
        self.mean, self.prec = mean.float(), prec

    def resolved_params(self) -> dict:
        out = super().resolved_params()
        out.update(k=self.k, projection="random semi-orthogonal W (QR of Gaussian, sign-corrected)",
                   covariance="biased (1/N) covariance of W^T x + eps*I per position",
                   layer_dims=self.layer_dims, embedding_dims=sum(self.layer_dims) if self.layer_dims else None,
                   feature_map=list(self.feature_hw) if self.feature_hw else None,
                   image_score="max", image_score_rule="max of the smoothed anomaly map",
                   train_images_fitted=self.n_fitted, train_images_held_out=self.n_held_out)
        return out
