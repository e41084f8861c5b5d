"""PatchCore: Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022
(arXiv:2106.08265), following the reference code amazon-science/patchcore-inspection@
fcaa92f124fb1ad74a7acf56726decd4b27cbcad: src/patchcore/patchcore.py, common.py, sampler.py,
datasets/mvtec.py, metrics.py, sample_training.sh (whose IM224 WR50 run made the results.csv that
reports/expected.csv quotes).

Pipeline (Sec. 3 of the paper; equation numbers as in arXiv v2):
* input: Resize(256), CenterCrop(224) (datasets/mvtec.py; sample_training.sh --resize 256
  --imagesize 224);
* locally aware patch features (Sec. 3.1, Eq. 1-2): the outputs of two mid-level stages
  (WRN50-2 layer2 + layer3) of a frozen ImageNet backbone; each position is aggregated over its
  p×p neighbourhood (p = 3); the deeper map is bilinearly up-sampled to the shallower one; each
  layer's neighbourhood vector is adaptively average-pooled to ``pretrain_embed_dim`` and the
  stacked layers to ``target_embed_dim`` (1024 / 1024, sample_training.sh). This stage
  has no random step, so the embedded patch matrix of a split is cached beside its backbone
  features and shared by every seed; ``aggregation: avg_pool`` is anomalib's variant instead
  (each map p×p average-pooled, zero padding counted, the layers concatenated, no pooling of
  dimensions: D = the sum of the layers' channels), for like-for-like comparisons with it;
* the memory bank M (Eq. 3-4) is reduced by greedy k-center coreset subsampling (Sec. 3.2,
  the minimax objective Eq. 5 approximated by Algorithm 1) to 10% (sample_training.sh -p 0.1)
  on a random linear projection (Johnson-Lindenstrauss) to 128 dimensions, starting from the mean
  distance to 10 random points (the reference ``ApproximateGreedyCoresetSampler``); the seed
  enters here and only here;
* scoring, as the reference code (``NearestNeighbourScorer`` over ``FaissNN``'s IndexFlatL2,
  whose search returns squared L2 distances; ``anomaly_scorer_num_nn 1``): the patch score is the
  squared L2 distance to the nearest memory-bank patch (mean over k neighbours for k > 1), the
  image score the plain maximum patch score (``PatchMaker.score``), the anomaly map the
  patch-score map bilinearly up-sampled to the input size and smoothed with a Gaussian of
  sigma = 4 px (``RescaleSegmentor``);
* ground truth as the reference's: masks bilinearly resized with the images, and only pixels
  whose resized value is exactly 1 count as anomalous (metrics.py ``astype(int)``):
  ``mask_resize: "bilinear==1"``.

The paper's variants, as options: ``distance: l2`` (Eq. 6 has the L2 norm; squaring changes no
image-score ranking, only the smoothed maps), ``reweight: true`` (Eq. 7's image score
s = w·s*, w = 1 - exp||m_test,* - m*|| / sum_{m in N_b(m*)} exp||m_test,* - m||, with L2 norms
whatever ``distance``; the reference code does not re-weight). anomalib re-weights, with L2.
Left out: the reference min-max normalises scores and maps over the test set (monotone for one
model, no effect on AUROC).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator

from data.base import Split
from data.transforms import MaskResize
from methods.backbones import FrozenFeatureMethod, FrozenFeatureParams, anomaly_maps
from methods.base import Scores, register


# ----------------------------------------------------------------------------- coreset
def pairwise_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a|×|b| Euclidean distances via ||a||² - 2ab + ||b||² (as the reference sampler)."""
    aa = (a * a).sum(1, keepdim=True)
    bb = (b * b).sum(1)[None]
    return (aa - 2 * a @ b.T + bb).clamp_min_(0).sqrt_()


def greedy_k_center(z: torch.Tensor, n: int, min_dist: torch.Tensor) -> np.ndarray:
    """Algorithm 1 of the paper (Sener & Savarese's k-center greedy): ``n`` times, pick the point
    farthest from the selected set (argmax_m min_n ||psi(m) - psi(n)||, the greedy step for the
    minimax objective of Eq. 5), where the distance of the empty set is ``min_dist`` (the starting
    distances). As the reference sampler, each step updates the minimum distances incrementally
    with one matrix-vector product against the new centre; here on squared distances (squaring
    non-negative values keeps every argmax, and saves a square root per point per step) and with
    the points stored D×N, the layout whose product streams the bank once (about 4x faster on one
    CPU thread than the N×D one)."""
    z_t = z.T.contiguous()
    sq_norms = (z * z).sum(1)
    min_d2 = min_dist.to(z).square()
    d2 = torch.empty_like(sq_norms)
    picked = np.empty(n, dtype=np.int64)
    for t in range(n):
        i = int(torch.argmax(min_d2))
        picked[t] = i
        torch.addmv(sq_norms, z_t.T, z[i], alpha=-2, out=d2).add_(sq_norms[i])  # ||z_j - z_i||^2, all j
        torch.minimum(min_d2, d2, out=min_d2)
    return picked


def coreset_size(n: int, ratio: float) -> int:
    """int(n · ratio) as the reference sampler, at least 1; ratio ≥ 1 keeps everything."""
    return n if ratio >= 1 else max(1, min(n, int(n * ratio)))


def greedy_coreset(features: torch.Tensor, n: int, *, seed: int, projection_dim: int | None = 128,
                   num_starting_points: int = 10) -> np.ndarray:
    """Indices of an ``n``-point greedy coreset of ``features`` (N×D).

    Distances are computed on a random Gaussian projection to ``projection_dim`` dimensions
    (Sec. 3.2: "random linear projections ... reduce dimensionality", Johnson-Lindenstrauss);
    the start distances are the mean distances to ``num_starting_points`` random points, as the
    reference ``ApproximateGreedyCoresetSampler``. Everything random draws from ``seed``."""
    if n >= len(features):
        return np.arange(len(features))
    g = torch.Generator().manual_seed(int(seed))
    z = features
    if projection_dim and features.shape[1] > projection_dim:
        proj = torch.randn(features.shape[1], projection_dim, generator=g, dtype=torch.float64)
        z = features @ (proj / math.sqrt(projection_dim)).to(features)
    starts = torch.randperm(len(z), generator=g)[:max(1, min(num_starting_points, len(z)))]
    start_dist = pairwise_l2(z, z[starts.to(z.device)]).mean(1)
    return greedy_k_center(z, n, start_dist)


# ----------------------------------------------------------------------------- nearest neighbours
_GPU_RES: dict = {}


def make_index(dim: int, device: str):
    """faiss exact L2 index: on the GPU when ``device`` is cuda and faiss has GPU support."""
    import faiss

    if str(device).startswith("cuda") and hasattr(faiss, "StandardGpuResources") \
            and faiss.get_num_gpus() > 0:
        dev = int(str(device).split(":")[1]) if ":" in str(device) else 0
        if dev not in _GPU_RES:
            _GPU_RES[dev] = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = dev
        return faiss.GpuIndexFlatL2(_GPU_RES[dev], dim, cfg)
    faiss.omp_set_num_threads(torch.get_num_threads())  # honour the worker's thread budget
    return faiss.IndexFlatL2(dim)


def knn(index, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared L2 distances, as faiss returns them, indices) of the k nearest memory-bank entries."""
    q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
    d2, idx = index.search(q, k)
    return torch.from_numpy(d2), torch.from_numpy(idx)


# ----------------------------------------------------------------------------- method
AGGREGATIONS = ("reference", "avg_pool")


class PatchCoreParams(FrozenFeatureParams):
    layers: list[str] = ["layer2", "layer3"]
    patch_size: int = 3                 # neighbourhood p of Eq. 1
    aggregation: str = "reference"      # f_agg of Eq. 1: reference code | anomalib's avg_pool
    pretrain_embed_dim: int = 1024      # per-layer adaptive pooling (reference code)
    target_embed_dim: int = 1024        # final adaptive pooling (reference code)
    coreset_ratio: float = 0.1          # |M_C| / |M|, 10% in the paper's main results
    coreset_projection_dim: int | None = 128
    coreset_start_points: int = 10
    num_neighbors: int = 1              # k of the patch score (1 in the paper, sample_training.sh)
    distance: Literal["squared_l2", "l2"] = "squared_l2"   # patch score: faiss' squared L2 (reference) | l2 (Eq. 6)
    reweight: bool = False              # Eq. 7 (paper, anomalib); the reference code takes the max
    reweight_neighbors: int = 9         # b = |N_b(m*)| of Eq. 7 (anomalib's default)
    sigma: float = 4.0                  # Gaussian smoothing of the anomaly map, px
    mask_resize: MaskResize = "bilinear==1"    # ground truth as the reference's metrics.py reads it

    @field_validator("coreset_ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("coreset_ratio must be in (0, 1]")
        return v

    @field_validator("patch_size", "pretrain_embed_dim", "target_embed_dim", "num_neighbors",
                     "reweight_neighbors", "coreset_start_points")
    @classmethod
    def _pos(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("patch_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("patch_size must be odd (the neighbourhood is centred on its patch)")
        return v


    @field_validator("aggregation")
    @classmethod
    def _aggregation(cls, v: str) -> str:
        if v not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}")
        return v


@register("patchcore")
class PatchCore(FrozenFeatureMethod):
    Params = PatchCoreParams
    protocols = {"one_class", "unified"}
    paper = "Roth et al., Towards Total Recall in Industrial Anomaly Detection, CVPR 2022"
    reference = ("amazon-science/patchcore-inspection@fcaa92f124fb1ad74a7acf56726decd4b27cbcad: "
                 "src/patchcore/patchcore.py, src/patchcore/common.py, src/patchcore/sampler.py, "
                 "src/patchcore/datasets/mvtec.py, src/patchcore/metrics.py, sample_training.sh")

    def __init__(self, params: PatchCoreParams, ctx):
        super().__init__(params, ctx)
        self.memory_bank: torch.Tensor | None = None
        self.index = None
        self.bank_size: int | None = None
        self.feature_hw: tuple[int, int] | None = None

    # Sec. 3.1, Eq. 1-2: local neighbourhood aggregation of each layer, brought to one grid.
    def embed(self, layer_feats: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Layer maps (B×C_l×h_l×w_l, shallowest first) -> B×(h·w)×D patch features."""
        p = self.params
        ref_hw = tuple(layer_feats[0].shape[-2:])
        if p.aggregation == "avg_pool":
            return self._embed_avg_pool(layer_feats, ref_hw), ref_hw
        pooled = []
        for f in layer_feats:
            f = f.to(self.ctx.device, torch.float32)
            b, c, h, w = f.shape
            patches = F.unfold(f, kernel_size=p.patch_size, padding=(p.patch_size - 1) // 2, stride=1)
            patches = patches.reshape(b, c * p.patch_size ** 2, h, w)
            if (h, w) != ref_hw:
                patches = F.interpolate(patches, size=ref_hw, mode="bilinear", align_corners=False)
            patches = patches.permute(0, 2, 3, 1).reshape(-1, 1, patches.shape[1])
            pooled.append(F.adaptive_avg_pool1d(patches, p.pretrain_embed_dim)[:, 0])
        x = torch.stack(pooled, dim=1).reshape(len(pooled[0]), 1, -1)
        x = F.adaptive_avg_pool1d(x, p.target_embed_dim)[:, 0]
        return x.reshape(layer_feats[0].shape[0], ref_hw[0] * ref_hw[1], -1), ref_hw

    def _embed_avg_pool(self, layer_feats: list[torch.Tensor], ref_hw: tuple[int, int]) -> torch.Tensor:
        """anomalib's PatchcoreModel: AvgPool2d(p, 1, p // 2) of each map (zero padding counted in
        the mean), deeper maps bilinearly up-sampled to the first grid, channels concatenated."""
        p = self.params
        maps = []
        for f in layer_feats:
            f = F.avg_pool2d(f.to(self.ctx.device, torch.float32), p.patch_size, stride=1,
                             padding=p.patch_size // 2)
            if tuple(f.shape[-2:]) != ref_hw:
                f = F.interpolate(f, size=ref_hw, mode="bilinear", align_corners=False)
            maps.append(f)
        x = torch.cat(maps, dim=1)
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], ref_hw[0] * ref_hw[1], x.shape[1])

    def embedding(self, split: Split) -> torch.Tensor:
        """N×h×w×D patch features of ``split`` (CPU float32), through the feature cache: Eq. 1-2
        have no random step, so one embedding serves every seed. Keyed on the features' key plus
        everything the embedding reads: layers, p, the aggregation and, for the reference one,
        both pooled dimensions. Shared with the cache: do not modify it in place."""
        p = self.params
        depends_on = dict(layers=p.layers, patch_size=p.patch_size, aggregation=p.aggregation)
        if p.aggregation == "reference":
            depends_on.update(pretrain_embed_dim=p.pretrain_embed_dim, target_embed_dim=p.target_embed_dim)
        return self.derived(split, "patchcore-embedding", depends_on, lambda: self._compute_embedding(split))

    def _compute_embedding(self, split: Split) -> torch.Tensor:
        feats = self.features(split)
        bs, chunks = self.params.batch_size, []
        for s in range(0, len(split), bs):
            emb, hw = self.embed([feats[layer][s:s + bs] for layer in self.params.layers])
            chunks.append(emb.reshape(len(emb), *hw, emb.shape[-1]).cpu())
        return torch.cat(chunks)

    def fit(self, train: Split) -> None:
        p = self.params
        emb = self.embedding(train)
        self.feature_hw = tuple(emb.shape[1:3])
        bank = emb.reshape(-1, emb.shape[-1]).to(self.ctx.device)
        self.bank_size = len(bank)
        n = coreset_size(len(bank), p.coreset_ratio)
        if n < len(bank):
            idx = greedy_coreset(bank, n, seed=self.ctx.seed, projection_dim=p.coreset_projection_dim,
                                 num_starting_points=p.coreset_start_points)
            bank = bank[torch.from_numpy(idx).to(bank.device)]
        self.memory_bank = bank.contiguous()
        self.index = make_index(bank.shape[1], self.ctx.device)
        self.index.add(np.ascontiguousarray(bank.float().cpu().numpy()))

    def score(self, test: Split) -> Scores:
        if self.index is None:
            raise RuntimeError("score() before fit()")
        p = self.params
        k = min(p.num_neighbors, len(self.memory_bank))
        image_scores, patch_maps = [], []
        test_emb = self.embedding(test)
        hw = tuple(test_emb.shape[1:3])
        for s in range(0, len(test_emb), p.batch_size):
            emb = test_emb[s:s + p.batch_size].flatten(1, 2).to(self.ctx.device)
            b, L, D = emb.shape
            d2, nn_idx = knn(self.index, emb.reshape(-1, D), k)
            dist = d2.clamp_min(0).sqrt()
            patch = (d2 if p.distance == "squared_l2" else dist).mean(1).reshape(b, L)
            j = patch.argmax(1)
            s_star = patch[torch.arange(b), j]
            if p.reweight:
                rows = torch.arange(b)
                s_star = s_star * self._reweight(emb[rows.to(emb.device), j.to(emb.device)],
                                                 nn_idx.reshape(b, L, k)[rows, j, 0],
                                                 dist.reshape(b, L, k)[rows, j, 0])
            image_scores.append(s_star)
            patch_maps.append(patch.reshape(b, *hw))
        maps = torch.cat(patch_maps)
        return Scores(image=torch.cat(image_scores).double().numpy(),
                      pixel=anomaly_maps(maps, self.transform.size, p.sigma))

    def _reweight(self, m_test: torch.Tensor, nn_idx: torch.Tensor, d_star: torch.Tensor) -> torch.Tensor:
        """Eq. 7: w = 1 - exp(d*) / sum_{m in N_b(m*)} exp(||m_test,* - m||), N_b(m*) the b nearest
        memory-bank neighbours of m* (m* itself first), computed as 1 - exp(d* - logsumexp)."""
        b = min(self.params.reweight_neighbors, len(self.memory_bank))
        m_star = self.memory_bank[nn_idx.to(self.memory_bank.device)]
        _, support = knn(self.index, m_star, b)                       # B×b
        support_feats = self.memory_bank[support.to(self.memory_bank.device)]  # B×b×D
        d = torch.linalg.vector_norm(support_feats - m_test[:, None].to(support_feats), dim=-1).cpu()
        return 1 - torch.exp(d_star.to(d) - torch.logsumexp(d, dim=1))

    def resolved_params(self) -> dict:
        out = super().resolved_params()
        out.update(nn_index="faiss.IndexFlatL2 (GPU when cuda)",
                   image_score="reweighted" if self.params.reweight else "max",
                   image_score_rule=("Eq. 7 re-weighted maximum patch score" if self.params.reweight
                                     else "maximum patch score (reference code)"),
                   embedding_dim=None if self.memory_bank is None else int(self.memory_bank.shape[1]),
                   coreset="approximate greedy k-center, Gaussian projection",
                   memory_bank_size=self.bank_size,
                   coreset_size=None if self.memory_bank is None else len(self.memory_bank),
                   feature_map=list(self.feature_hw) if self.feature_hw else None)
        return out
