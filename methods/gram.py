"""Gram: OOD detection with Gram matrices (Sastry & Oore, "Detecting Out-of-Distribution Examples
with Gram Matrices", ICML 2020).

For a layer l with feature maps F_l (C channels × HW positions) and a power p, the p-th order Gram
matrix is G_l^p = (F_l^p F_l^pT)^{1/p} (Eq. 2; powers taken element-wise, the root keeps the sign).
As in the authors' released code and OpenOOD (``openood/postprocessors/gram_postprocessor.py``,
``G_p``), each Gram matrix is reduced to its C row sums (computed here as F^p (Σ_j F_j^p), the
same numbers without forming the C×C matrix).

Fit (training data, true labels): for every layer l, power p and class c, the element-wise
minimum and maximum of the Gram values over the class's training images (Sec. 3). Deviation of a
value v from [min, max] (Eq. 3): δ(min, max, v) = (min − v)/|min| if v < min, (v − max)/|max| if
v > max, else 0 (|·| + 1e-6 as the code), summed over values and powers: δ_l(x). Each layer's
deviation is normalised by its mean over held-out validation data, E_va[δ_l] (Eq. 4; the
validation set is a random ``val_fraction`` of each class's training images, left out of the
min/max, as OpenOOD's ``sample_estimator``). Total deviation Δ(x) = Σ_l δ_l(x) / E_va[δ_l] with the
class c the classifier predicts for x.

Score = Δ(x) / max softmax(x) with ``confidence_weighted`` (OpenOOD: ``-deviations/confs``),
else Δ(x); higher = more OOD. Layers: the output of every Conv2d and nn.ReLU module, as OpenOOD's
``FeatureExtractor`` hooks (for its ResNet-18, which applies ReLU functionally, the 20 conv
outputs). Powers 1..5 as OpenOOD v1.5 (``configs/postprocessors/gram.yml``); the paper uses 1..10.
A layer whose validation mean is 0 is normalised by 1.

Differences from the paper's own code (deeplearning-wisc/vos@6dd9c2748de1f261c0ae898df130ec9558c60268
``classification/CIFAR/gram_matrics.py``, the Gram baseline of the VOS release), all OpenOOD's choices
and kept as such here: (1) min / max are grouped by the class the network *predicts* for each
training image there (``train_preds``, ``np.where(train_preds == PRED)``), by the true label here;
(2) its validation set is 10% of the in-distribution *test* deviations (``detect``:
``random.sample(range(len(all_test_deviations)), int(0.1 * ...))``), scored on the other 90%; here it
is ``val_fraction`` of the training images; (3) its normaliser is that validation mean + 1e-7 and
its deviation divides by ``|min + 1e-6|``; here E_va[δ_l] (0 → 1) and ``|min| + 1e-6``; (4) the paper
uses powers 1..10 and its own hand-picked layers, OpenOOD powers 1..5 and every conv / ReLU output.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from data.base import Split
from methods.classifier import ClassifierParams, PostHocMethod
from methods.base import RunContext, Scores, register

EPS = 1e-6


class GramParams(ClassifierParams):
    powers: list[int] = [1, 2, 3, 4, 5]
    val_fraction: float = Field(0.1, ge=0, lt=1)
    confidence_weighted: bool = True

    @field_validator("powers")
    @classmethod
    def _powers(cls, v: list[int]) -> list[int]:
        if not v or any(p < 1 for p in v):
            raise ValueError("powers must be a non-empty list of integers >= 1")
        return v


def gram_rows(feature: torch.Tensor, powers: list[int]) -> torch.Tensor:
    """P×B×C: for each power p, the row sums of the p-th order Gram matrix of B×C×H×W features,
    sign(g)·|g|^{1/p} (float64)."""
    f = feature.detach().to(torch.float64).flatten(2)                  # B×C×S
    out = []
    for p in powers:
        fp = f ** p
        g = torch.einsum("bcs,bs->bc", fp, fp.sum(dim=1))               # Σ_j (F^p F^pT)_{cj}
        out.append(g.sign() * g.abs() ** (1.0 / p))
    return torch.stack(out)


def deviation(mins: torch.Tensor, maxs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ over powers and entries of δ(min, max, v) (Eq. 3). All P×B×C -> B."""
    dev = F.relu(mins - values) / (mins + EPS).abs() + F.relu(values - maxs) / (maxs + EPS).abs()
    return dev.sum(dim=(0, 2))


class GramCollector:
    """Forward hooks on every Conv2d and ReLU module. In "minmax" mode they update per-class
    extremes; in "collect" mode they keep each layer's Gram values of the batch, and
    ``layer_deviations(classes)`` turns them into per-layer deviations once the classes (true or
    predicted from the same forward pass) are known."""

    def __init__(self, net: nn.Module, powers: list[int], num_classes: int):
        self.powers, self.k = list(powers), num_classes
        self.mins: list[torch.Tensor] = []
        self.maxs: list[torch.Tensor] = []
        self.mode, self.classes, self.layer, self.grams = "minmax", None, 0, []
        self.handles = [m.register_forward_hook(self._hook) for m in net.modules()
                        if isinstance(m, (nn.Conv2d, nn.ReLU))]

    def _hook(self, _module, _inputs, output):
        if output.dim() != 4:
            return
        g = gram_rows(output, self.powers)
        i = self.layer
        self.layer += 1
        if self.mode == "collect":
            self.grams.append(g)
            return
        if i == len(self.mins):
            shape = (len(self.powers), self.k, g.shape[2])
            self.mins.append(torch.full(shape, float("inf"), dtype=torch.float64, device=g.device))
            self.maxs.append(torch.full(shape, float("-inf"), dtype=torch.float64, device=g.device))
        index = self.classes.view(1, -1, 1).expand_as(g)
        self.mins[i].scatter_reduce_(1, index, g, reduce="amin", include_self=True)
        self.maxs[i].scatter_reduce_(1, index, g, reduce="amax", include_self=True)

    def start(self, mode: str, classes: torch.Tensor | None = None) -> None:
        self.mode, self.classes, self.layer, self.grams = mode, classes, 0, []

    def finish_minmax(self) -> None:
        """Classes without training images get [0, 0] (no finite extremes to compare with)."""
        for mn, mx in zip(self.mins, self.maxs):
            mn[torch.isinf(mn)] = 0.0
            mx[torch.isinf(mx)] = 0.0

    def layer_deviations(self, classes: torch.Tensor) -> torch.Tensor:
        """B×L deviations of the last collected batch w.r.t. ``classes`` (B)."""
        devs = [deviation(self.mins[i][:, classes], self.maxs[i][:, classes], g) for i, g in enumerate(self.grams)]
        self.grams = []
        return torch.stack(devs, dim=1)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def validation_split(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out validation images: int(fraction·n_c) random images per class."""
    rng = np.random.default_rng(seed)
    val = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n_val = int(fraction * len(members))
        if n_val:
            val[rng.choice(members, n_val, replace=False)] = True
    return val


@register("gram")
class Gram(PostHocMethod):
    """Gram-matrix deviations (Sastry & Oore, ICML 2020, Eqs. 2-4) on the shared classifier."""

    Params = GramParams
    paper = "Sastry & Oore, Detecting Out-of-Distribution Examples with Gram Matrices, ICML 2020"
    reference = ("Jingkang50/OpenOOD@3c35632ee91b54b09d1f085d04f94744cece7d0b: "
                 "openood/postprocessors/gram_postprocessor.py, configs/postprocessors/gram.yml")

    def __init__(self, params: GramParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.collector: GramCollector | None = None
        self.normalizers: torch.Tensor | None = None
        self.n_val = 0

    @torch.no_grad()
    def _forward(self, x_u8: torch.Tensor, mode: str, classes: torch.Tensor | None = None):
        """Forward uint8 images in batches. "minmax": update the extremes with ``classes``;
        "deviation": per-layer deviations w.r.t. ``classes`` (None: the predicted classes).
        Returns (logits, B×L deviations); None in minmax mode."""
        clf, bs, dev = self.clf, self.params.eval_batch_size, self.ctx.device
        logits, devs = [], []
        for s in range(0, len(x_u8), bs):
            xb = clf.inputs.normalize(x_u8[s:s + bs].to(dev))
            if mode == "minmax":
                self.collector.start("minmax", classes[s:s + bs].to(dev))
                clf.net(xb)
                continue
            self.collector.start("collect")
            out = clf.net(xb)
            cls = out.argmax(dim=1) if classes is None else classes[s:s + bs].to(dev)
            devs.append(self.collector.layer_deviations(cls).cpu())
            logits.append(out.double().cpu())
        if mode == "minmax":
            return None, None
        return torch.cat(logits), torch.cat(devs)

    def setup(self, train: Split) -> None:
        p = self.params
        self.clf.net.eval()
        y = self.data.y.numpy()
        val = validation_split(y, p.val_fraction, self.ctx.seed)
        self.n_val = int(val.sum())
        self.collector = GramCollector(self.clf.net, p.powers, self.data.num_classes)
        fit_idx = torch.from_numpy(np.flatnonzero(~val))
        self._forward(self.data.x[fit_idx], "minmax", self.data.y[fit_idx])
        self.collector.finish_minmax()
        n_layers = len(self.collector.mins)
        if self.n_val:
            val_idx = torch.from_numpy(np.flatnonzero(val))
            _, devs = self._forward(self.data.x[val_idx], "deviation", self.data.y[val_idx])
            norm = devs.mean(dim=0)
        else:
            norm = torch.ones(n_layers, dtype=torch.float64)
        self.normalizers = torch.where(norm > 0, norm, torch.ones_like(norm))

    def score(self, test: Split) -> Scores:
        x = self.clf.inputs.prepare(test.images)
        logits, devs = self._forward(x, "deviation", None)
        total = (devs / self.normalizers).sum(dim=1).numpy()
        logits = logits.double()
        conf = torch.softmax(logits, dim=1).max(dim=1).values.numpy()
        image = total / conf if self.params.confidence_weighted else total
        return Scores(image=image.astype(np.float64), pred=logits.argmax(dim=1).numpy())

    def describe(self) -> dict:
        return {"layers": "outputs of every Conv2d and nn.ReLU module (OpenOOD FeatureExtractor)",
                "n_layers": len(self.collector.mins) if self.collector else None, "n_val": self.n_val,
                "gram_reduction": "row sums of the Gram matrix (released code / OpenOOD G_p)",
                "score": "sum_l delta_l / E_va[delta_l]" + (" / max softmax" if self.params.confidence_weighted else "")}
