"""CutPaste: Li, Sohn, Yoon, Pfister, "CutPaste: Self-Supervised Learning for Anomaly Detection and
Localization", CVPR 2021 (arXiv:2104.04015). Unofficial re-implementations consulted:
Runinho/pytorch-cutpaste and LilitYolyan/CutPaste (the authors' code is TensorFlow, unreleased).

Two stages (Sec. 2, Fig. 1):

1. Self-supervised representation (Sec. 2.1-2.2): a ResNet-18 trained from scratch (Sec. 4) with
   an MLP projection head on its average-pooled features and a last linear layer g classifies
   normal images against their CutPaste augmentations (``methods._cutpaste_aug``):

   * ``binary``: Eq. 1, L = E_x [CE(g(x), 0) + CE(g(CP(x)), 1)];
   * ``scar``: Eq. 1 with CP = CutPaste-Scar;
   * ``3way`` (the paper's best, Table 1): CE(g(x), 0) + CE(g(CP(x)), 1) + CE(g(CPScar(x)), 2);
   * ``union``: normal vs. the union of CutPaste and CutPaste-Scar (Table 5).

   Before CutPaste each image is randomly translated and colour-jittered (Sec. 2.1, A.1).
2. Anomaly score (Sec. 2.3, Eq. 2): a Gaussian density estimator (GDE) on the pooled features f
   of the normal training images, log p(x) ∝ -1/2 (f(x) - μ)ᵀ Σ⁻¹ (f(x) - μ), with μ, Σ from the
   training data through scikit-learn (the paper: "scikit-learn for GDE implementation", A.1;
   it names no estimator). ``covariance: gmm_full`` (default) is the estimator of the same
   authors' DROC code base that the paper's two-stage framework follows (Sohn et al., ICLR 2021;
   google-research/deep_representation_one_class ``util/train.py`` ``eval_embed``, the 'gde'
   branch: ``GaussianMixture(n_components=1, init_params='kmeans', covariance_type='full')`` with
   scikit-learn's default ``reg_covar`` 1e-6, on L2-normalised features, score
   ``-score_samples``): the sample mean and the biased sample covariance + reg_covar·I.
   ``ledoit_wolf`` is Ledoit-Wolf shrinkage, what Runinho/pytorch-cutpaste ``density.py``
   ``GaussianDensityTorch`` (its default ``--density torch``, after Rippel et al.) uses; ``oas`` /
   ``empirical`` are other scikit-learn estimators. The score is the Mahalanobis distance
   sqrt((f - μ)ᵀ Σ⁻¹ (f - μ)); -log p = ½ d² + const, so its AUROC is that of Eq. 2 and of DROC's
   ``-score_samples``.

Paper settings (Appendix A.1-A.2): 256×256 images; 65k parameter updates = 256 "epochs" of 256
steps each (footnote 5); momentum SGD, lr 0.03, momentum 0.9, batch 64 (96 for 3-way) = 32 normal
images plus their augmentations; single-cycle cosine decay; L2 weight decay 3e-5; patch colour
jitter 0.1; patch area (0.02, 0.15), aspect (0.3, 1) ∪ (1, 3.3); scar width [2, 16], length
[10, 25] px, rotation (-45, 45) degrees.

Not in the paper, chosen here (each a parameter): the projection head's widths (512 × 8, 128: the
DistAug code of Sohn et al. [52] that the paper follows, as read by Runinho/pytorch-cutpaste) with
batch norm on its hidden layers; ImageNet mean/std input normalisation (Runinho); L2-normalised
embeddings before the GDE (Runinho, after Sohn et al.); the translation magnitude (±10% of the
side, reflect padding) and the whole-image jitter (0.1) of the pre-CutPaste augmentation.
Localisation (GradCAM or the patch-level model of Sec. 2.4) is not implemented: rows carry image
scores only.

Reference: the authors' CutPaste code is not public; the defaults follow the paper and, where it
is silent, the DROC code (GDE) and Runinho/pytorch-cutpaste (head, normalisation): see
``CutPaste.reference``.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from data.base import Split
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, Transform, to_tensor
from methods._cutpaste_aug import VARIANTS, CutPasteSpec, make_batch
from methods.base import LearningRate, Method, MethodParams, RunContext, Scores, check_finite, register

N_CLASSES = {"binary": 2, "scar": 2, "union": 2, "3way": 3}
DENSITY = {  # what resolved_params records as the GDE (Eq. 2)
    "gmm_full": "GDE: sklearn GaussianMixture(1, 'full') as DROC util/train.py",
    "ledoit_wolf": "GDE: sklearn LedoitWolf as Runinho/pytorch-cutpaste density.py",
    "oas": "GDE: sklearn OAS covariance",
    "empirical": "GDE: sklearn EmpiricalCovariance",
}


class CutPasteParams(MethodParams):
    variant: Literal["binary", "scar", "union", "3way"] = "3way"   # Table 1: 3-way is best
    backbone: Literal["resnet18"] = "resnet18"                      # Sec. 4
    pretrained: bool = False          # Sec. 4.1: learned from scratch (true: ImageNet init)
    weights: str | None = None        # a local checkpoint for pretrained init
    image_size: int = Field(256, ge=16)              # A.1: 256×256
    head_dims: list[int] = [512] * 8 + [128]         # MLP projection head (see module doc)
    head_bn: bool = True
    epochs: int = Field(256, ge=1)                   # A.3: 256 epochs ...
    steps_per_epoch: int = Field(256, ge=1)          # ... of 256 updates (footnote 5) = 65k steps
    batch_size: int = Field(32, ge=2)                # normal images per step: 64 / 96 in total
    lr: LearningRate = 0.03                          # A.1
    momentum: float = Field(0.9, ge=0)               # A.1
    weight_decay: float = Field(3e-5, ge=0)          # A.1
    area_ratio: tuple[float, float] = (0.02, 0.15)   # A.2
    aspect_ratio: float = Field(0.3, gt=0, le=1)     # A.2: (0.3, 1) ∪ (1, 3.3)
    scar_width: tuple[float, float] = (2.0, 16.0)    # A.2, px at 256 px
    scar_length: tuple[float, float] = (10.0, 25.0)  # A.2, px at 256 px
    scar_rotation: float = Field(45.0, ge=0)         # A.2, degrees
    jitter: float = Field(0.1, ge=0)                 # A.2: patch colour jitter
    translate: float = Field(0.1, ge=0, lt=0.5)      # pre-CutPaste random translation (fraction)
    image_jitter: float = Field(0.1, ge=0)           # pre-CutPaste colour jitter of the image
    embedding: Literal["pool", "head"] = "pool"      # Sec. 4: GDE on the top pooled features
    l2_normalize: bool = True
    covariance: Literal["gmm_full", "ledoit_wolf", "oas", "empirical"] = "gmm_full"  # see module doc
    reg_covar: float = Field(1e-6, ge=0)             # gmm_full: sklearn's default, as DROC
    eval_batch_size: int = Field(64, ge=1)

    @field_validator("head_dims")
    @classmethod
    def _head(cls, v: list[int]) -> list[int]:
        if not v or any(d <= 0 for d in v):
            raise ValueError("head_dims: at least one positive width")
        return v

    @field_validator("area_ratio", "scar_width", "scar_length")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("a range (lo, hi) with 0 < lo <= hi")
        return v


class CutPasteNet(nn.Module):
    """ResNet-18 (global average pool, 512-d) -> MLP projection head -> last linear layer."""

    def __init__(self, n_classes: int, head_dims: list[int], head_bn: bool, encoder: nn.Module,
                 feature_dim: int = 512):
        super().__init__()
        self.encoder = encoder
        layers: list[nn.Module] = []
        prev = feature_dim
        for d in head_dims[:-1]:
            layers += [nn.Linear(prev, d)] + ([nn.BatchNorm1d(d)] if head_bn else []) + [nn.ReLU(inplace=True)]
            prev = d
        layers.append(nn.Linear(prev, head_dims[-1]))
        self.head = nn.Sequential(*layers)
        self.out = nn.Linear(head_dims[-1], n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pooled = self.encoder(x)
        z = self.head(pooled)
        return pooled, z, self.out(z)


def build_encoder(params: CutPasteParams, ctx: RunContext) -> nn.Module:
    """timm ResNet-18 without its classifier (pooled 512-d output); ImageNet weights only when
    ``pretrained`` / ``weights`` ask for them, through methods.backbones (clear offline errors)."""
    import timm

    from methods.backbones import load_weights_file, resolve_weights, spec_of

    spec = spec_of(params.backbone)
    encoder = timm.create_model(spec.architecture, pretrained=False, num_classes=0)
    if params.pretrained or params.weights:
        ref = resolve_weights(params.backbone, params.pretrained, params.weights)
        if ref.path is not None:
            load_weights_file(encoder, ref.path)
            ctx.weights_sha256 = ref.sha256
    return encoder


def fit_gaussian(emb: np.ndarray, covariance: str, reg_covar: float = 1e-6,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 2's μ and Σ⁻¹ from N×d training embeddings with a scikit-learn estimator
    (``gmm_full``: a one-component full-covariance GaussianMixture, as DROC's util/train.py)."""
    from sklearn.covariance import OAS, EmpiricalCovariance, LedoitWolf
    from sklearn.mixture import GaussianMixture

    x = emb.astype(np.float64)
    if covariance == "gmm_full":
        gm = GaussianMixture(n_components=1, covariance_type="full", init_params="kmeans",
                             reg_covar=reg_covar, random_state=seed).fit(x)
        return gm.means_[0], gm.precisions_[0]
    est = {"ledoit_wolf": LedoitWolf, "oas": OAS, "empirical": EmpiricalCovariance}[covariance]()
    est.fit(x)
    return est.location_, est.get_precision()


def mahalanobis(emb: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    diff = emb.astype(np.float64) - mean
    return np.sqrt(np.clip(np.einsum("nd,de,ne->n", diff, precision, diff), 0, None))


@register("cutpaste")
class CutPaste(Method):
    """CutPaste self-supervised ResNet-18 + Gaussian density estimator (CVPR 2021, Eqs. 1-2)."""

    Params = CutPasteParams
    protocols = {"one_class"}
    paper = "Li et al., CutPaste: Self-Supervised Learning for Anomaly Detection and Localization, CVPR 2021"
    reference = ("google-research/deep_representation_one_class@a36feaa2e2f1f8d4aabe24d219e2220b187bd315: "
                 "util/train.py (GDE); Runinho/pytorch-cutpaste@10d8bf71df76d3a97f0106efee1d76f81d983149: "
                 "model.py, eval.py, density.py (the authors' CutPaste code is unreleased)")

    def __init__(self, params: CutPasteParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.transform = Transform(resize=params.image_size, crop=None, channels=3,
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD)
        self.spec = CutPasteSpec(area_ratio=tuple(params.area_ratio), aspect_ratio=params.aspect_ratio,
                                 scar_width=tuple(params.scar_width), scar_length=tuple(params.scar_length),
                                 scar_rotation=params.scar_rotation, jitter=params.jitter)
        self.net: CutPasteNet | None = None
        self.mean: np.ndarray | None = None
        self.precision: np.ndarray | None = None
        self.n_steps = 0

    # ---------------------------------------------------------------------------------- data
    def _raw(self, images) -> torch.Tensor:
        """uint8 images -> N×3×S×S uint8 (resized, not normalised): the augmentation's input."""
        raw = Transform(resize=self.params.image_size, crop=None, channels=3, mean=None, std=None)
        return to_tensor(images, raw).mul_(255).round_().to(torch.uint8)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.transform.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.transform.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def embed(self, images) -> np.ndarray:
        """N×d embeddings of un-augmented images (pooled features or head output)."""
        if self.net is None:
            raise RuntimeError("score() before fit()")
        self.net.eval()
        out = []
        bs = self.params.eval_batch_size
        for s in range(0, len(images), bs):
            x = to_tensor(images[s:s + bs], self.transform).to(self.ctx.device)
            pooled, z, _ = self.net(x)
            e = pooled if self.params.embedding == "pool" else z
            if self.params.l2_normalize:
                e = F.normalize(e, p=2, dim=1)
            out.append(e.double().cpu())
        return torch.cat(out).numpy()

    # ---------------------------------------------------------------------------------- fit
    def fit(self, train: Split) -> None:
        p, ctx = self.params, self.ctx
        g = torch.Generator().manual_seed(int(ctx.seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.seed))
            self.net = CutPasteNet(N_CLASSES[p.variant], p.head_dims, p.head_bn, build_encoder(p, ctx)).to(ctx.device)
        self.n_steps = 0
        raw = self._raw(train.images)                       # N×3×S×S uint8, kept on the CPU
        n = len(raw)
        opt = torch.optim.SGD(self.net.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
        total = p.epochs * p.steps_per_epoch
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)  # single cycle (A.1)
        order, cursor = torch.randperm(n, generator=g), 0
        self.net.train()
        for epoch in range(p.epochs):
            losses = []
            for _ in range(p.steps_per_epoch):
                if cursor + p.batch_size > n:           # reshuffle: every image once per pass
                    order, cursor = torch.randperm(n, generator=g), 0
                take = order[cursor:cursor + min(p.batch_size, n)]
                cursor += len(take)
                x, y = make_batch(raw[take].float().div_(255), p.variant, self.spec, g,
                                  translate_fraction=p.translate, image_jitter=p.image_jitter)
                _, _, logits = self.net(self._normalise(x.to(ctx.device)))
                loss = F.cross_entropy(logits, y.to(ctx.device))
                check_finite(loss.item(), epoch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                self.n_steps += 1
            ctx.log_epoch(epoch, float(np.mean(losses)))
        emb = self.embed(train.images)
        if not np.isfinite(emb).all():
            raise ValueError("cutpaste: non-finite training embeddings")
        self.mean, self.precision = fit_gaussian(emb, p.covariance, p.reg_covar, int(ctx.seed))

    def score(self, test: Split) -> Scores:
        if self.precision is None:
            raise RuntimeError("score() before fit()")
        return Scores(image=mahalanobis(self.embed(test.images), self.mean, self.precision))

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        n_aug = len(VARIANTS[self.params.variant])
        out.update(
            transform=self.transform.describe(), input_size=self.transform.size,
            images_per_step=self.params.batch_size * (n_aug + 1),
            total_steps=self.params.epochs * self.params.steps_per_epoch,
            steps_run=self.n_steps, n_classes=N_CLASSES[self.params.variant],
            optimizer="SGD(momentum) + single-cycle CosineAnnealingLR over all steps",
            augmentation=self.spec.describe(),
            encoder=f"timm {self.params.backbone} (global average pool, 512-d)"
                    + (" ImageNet init" if self.params.pretrained or self.params.weights else " from scratch"),
            density=DENSITY[self.params.covariance] + (f" (reg_covar {self.params.reg_covar})"
                                                       if self.params.covariance == "gmm_full" else "")
                    + ", L2-normalised features" * self.params.l2_normalize + "; score: Mahalanobis distance",
            pixel_scores="none (GradCAM / patch-level localisation not implemented)")
        return out
