"""PaDiM: Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
and Localization", ICPR workshops 2020 (arXiv:2011.08785), following the reference
re-implementation xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master.

* Embedding (Sec. 3.1): the outputs of layer1, layer2, layer3 of a frozen ImageNet backbone,
  the deeper maps nearest-up-sampled to layer1's grid and concatenated (the reference
  ``embedding_concat``); a random subset of d of the concatenated dimensions is kept
  (Sec. 3.1 / Table 1: d = 100 for ResNet-18, 550 for WRN50-2).
* Learning (Sec. 3.2, Eq. 1): a multivariate Gaussian N(mu_ij, Sigma_ij) per patch position
  (i, j), with the unbiased sample covariance plus eps·I (eps = 0.01).
* Inference (Sec. 3.3, Eq. 2): the Mahalanobis distance
  M(x_ij) = sqrt((x_ij - mu_ij)^T Sigma_ij^-1 (x_ij - mu_ij)) at every position; the map is
  bilinearly up-sampled to the input size and Gaussian-smoothed (sigma = 4, reference code); the
  image score is the map's maximum (reference code). The reference code min-max normalises maps
  over the test set for display; that monotone transform is left out (it leaks test statistics).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator

from data.base import Split
from methods.backbones import FrozenFeatureMethod, FrozenFeatureParams, anomaly_maps
from methods.base import Scores, index_batches, register

# Sec. 3.1 / Table 1 of the paper.
D_DEFAULTS = {"resnet18": 100, "wide_resnet50_2": 550}


def upsample_concat(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate layer maps on the first (finest) map's grid; deeper maps are nearest
    up-sampled, which equals the reference ``embedding_concat`` for integer size ratios."""
    hw = maps[0].shape[-2:]
    return torch.cat([m if m.shape[-2:] == hw else F.interpolate(m, size=hw, mode="nearest")
                      for m in maps], dim=1)


def random_dims(total: int, d: int, seed: int) -> np.ndarray:
    """Sec. 3.1's random dimensionality reduction: ``d`` of the ``total`` concatenated embedding
    dimensions, drawn without replacement from ``seed``, sorted (the order plays no part in a
    Mahalanobis distance)."""
    return np.sort(np.random.default_rng(seed).choice(total, d, replace=False))


# On the CPU per-chunk temporaries stay under glibc's largest mmap threshold (32 MiB): bigger ones
# are mapped afresh and page-faulted on every use, which cost PaDiM / OrthoAD 40% of a cell in
# kernel time (a cell 4.0 s -> 2.5 s with 16 MiB chunks, same results). CUDA's caching allocator
# has no such cost, and large batches keep its kernels busy.
CHUNK_BYTES = {"cpu": 1 << 24, "cuda": 1 << 28}


def _position_chunk(d: int, n: int, device: torch.device | str = "cpu") -> int:
    """Positions per chunk so that a chunk's d×d float64 matrices and n×d data fit the budget."""
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cpu"])
    return max(1, int(budget // (8 * (d * d + n * d + 1))))


def precision_from_cov(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """(Sigma + eps·I)^-1 for a batch of covariances (P×d×d), computed in float64. Sigma + eps·I is
    symmetric positive definite, so the inverse goes through its Cholesky factor (less work than
    the reference code's general inverse, the same matrix to round-off); a position whose
    factorisation fails to round-off falls back to the general inverse."""
    eye = torch.eye(cov.shape[-1], dtype=torch.float64, device=cov.device)
    regularised = cov.double() + eps * eye
    factor, info = torch.linalg.cholesky_ex(regularised)
    prec = torch.cholesky_inverse(factor)
    failed = info != 0
    if failed.any():
        prec[failed] = torch.linalg.inv(regularised[failed])
    return prec


def gaussian_fit(emb: torch.Tensor, eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1: per-position mean and precision (Sigma + eps I)^-1 of N×d×P embeddings, Sigma the
    unbiased sample covariance (np.cov, as the reference code). Returns (P×d, P×d×d) float32."""
    n, d, p = emb.shape
    mean = emb.mean(0, dtype=torch.float64).T.contiguous()          # P×d
    prec = torch.empty(p, d, d, dtype=torch.float32, device=emb.device)
    step = _position_chunk(d, n, emb.device)
    for s in range(0, p, step):
        x = (emb[:, :, s:s + step].double().permute(2, 0, 1) - mean[s:s + step, None]).contiguous()  # c×N×d
        cov = torch.bmm(x.transpose(1, 2), x).div_(max(n - 1, 1))
        prec[s:s + step] = precision_from_cov(cov, eps).float()
    return mean.float(), prec


def mahalanobis(emb: torch.Tensor, mean: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """Eq. 2: B×d×P embeddings -> B×P distances sqrt((x - mu)^T P (x - mu)) per position."""
    b, d, p = emb.shape
    out = torch.empty(b, p, dtype=torch.float32, device=emb.device)
    step = _position_chunk(d, b, emb.device)
    for s in range(0, p, step):
        diff = emb[:, :, s:s + step].permute(2, 0, 1).float() - mean[s:s + step, None]  # c×B×d
        d2 = ((diff @ prec[s:s + step]) * diff).sum(-1)                               # c×B
        out[:, s:s + step] = d2.clamp_min(0).sqrt().T
    return out


class PaDiMParams(FrozenFeatureParams):
    layers: list[str] = ["layer1", "layer2", "layer3"]
    d: int | None = None        # None: 100 for resnet18, 550 for wide_resnet50_2 (paper)
    eps: float = 0.01           # covariance regulariser (Sec. 3.2)
    sigma: float = 4.0          # Gaussian smoothing of the anomaly map, px

    @field_validator("d")
    @classmethod
    def _d(cls, v):
        if v is not None and v <= 0:
            raise ValueError("d must be positive")
        return v


class MahalanobisMapMethod(FrozenFeatureMethod):
    """Shared inference of PaDiM and OrthoAD: distance maps -> smoothed maps -> max."""

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.mean: torch.Tensor | None = None
        self.prec: torch.Tensor | None = None
        self.feature_hw: tuple[int, int] | None = None
        self.layer_dims: list[int] | None = None

    def embed(self, layer_feats: list[torch.Tensor]) -> torch.Tensor:  # B×d×H×W
        raise NotImplementedError

    def _batches(self, split: Split, rows: np.ndarray | None = None):
        """Embeddings of ``split`` batch by batch; of its images ``rows`` only where given (the
        features of the whole split stay the cached ones)."""
        feats = self.features(split)
        if self.layer_dims is None:
            self.layer_dims = [int(feats[layer].shape[1]) for layer in self.params.layers]
        bs = self.params.batch_size
        order = None if rows is None else torch.from_numpy(np.asarray(rows))
        for idx in index_batches(len(split) if rows is None else len(rows), bs):
            pick = idx if order is None else order[idx]
            yield self.embed([feats[layer][pick].to(self.ctx.device) for layer in self.params.layers])

    def distance_maps(self, test: Split) -> torch.Tensor:
        """N×H×W Mahalanobis distances on the feature grid (before up-sampling)."""
        if self.prec is None:
            raise RuntimeError("score() before fit()")
        out = []
        for emb in self._batches(test):
            b, d, h, w = emb.shape
            out.append(mahalanobis(emb.reshape(b, d, h * w), self.mean, self.prec).reshape(b, h, w).cpu())
        return torch.cat(out)

    def score(self, test: Split) -> Scores:
        maps = anomaly_maps(self.distance_maps(test), self.transform.size, self.params.sigma)
        return Scores(image=maps.reshape(len(maps), -1).max(1).astype(np.float64), pixel=maps)


@register("padim")
class PaDiM(MahalanobisMapMethod):
    Params = PaDiMParams
    protocols = {"one_class", "unified"}
    paper = "Defard et al., PaDiM: a Patch Distribution Modeling Framework, ICPR 2020"
    reference = ("xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master@616004b9b7fa6a507d196dd3eeeba9e0a93f160f: "
                 "main.py, datasets/mvtec.py (a re-implementation; the paper has no official code)")

    def __init__(self, params: PaDiMParams, ctx):
        super().__init__(params, ctx)
        if params.d is None and params.backbone not in D_DEFAULTS:
            raise ValueError(f"padim: no paper default d for backbone {params.backbone!r} "
                             f"(known: {D_DEFAULTS}); set d explicitly")
        self.d = params.d or D_DEFAULTS[params.backbone]
        self.index: np.ndarray | None = None

    def _select(self) -> None:
        total = sum(self.layer_dims)
        if self.d > total:
            raise ValueError(f"padim: d={self.d} exceeds the {total} embedding dimensions of "
                             f"{self.params.backbone} {self.params.layers}")
        self.index = random_dims(total, self.d, self.ctx.seed)
        offsets = np.cumsum([0] + self.layer_dims)
        self._per_layer = [torch.from_numpy(self.index[(self.index >= lo) & (self.index < hi)] - lo)
                           for lo, hi in zip(offsets[:-1], offsets[1:])]

    def embed(self, layer_feats: list[torch.Tensor]) -> torch.Tensor:
        if self.index is None:
            self._select()
        # choose the channels first, then up-sample: same values, less memory
        return upsample_concat([f[:, idx.to(f.device)].float() for f, idx in zip(layer_feats, self._per_layer)])

    def fit(self, train: Split) -> None:
        emb = torch.cat(list(self._batches(train)))
        n, d, h, w = emb.shape
        self.feature_hw = (h, w)
        self.mean, self.prec = gaussian_fit(emb.reshape(n, d, h * w), self.params.eps)

    def resolved_params(self) -> dict:
        out = super().resolved_params()
        out.update(d=self.d, covariance="unbiased sample covariance + eps*I per position",
                   layer_dims=self.layer_dims, embedding_dims=sum(self.layer_dims) if self.layer_dims else None,
                   feature_map=list(self.feature_hw) if self.feature_hw else None,
                   image_score="max", image_score_rule="max of the smoothed anomaly map")
        return out
