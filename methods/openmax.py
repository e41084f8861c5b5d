"""OpenMax (Bendale & Boult, "Towards Open Set Deep Networks", CVPR 2016).

Activation vectors (AVs) are the classifier's logits (the penultimate "fc8" layer of the paper).

Fit (Alg. 1): for each class j, the mean activation vector μ_j of the training images the
classifier gets right; the distances of those AVs to μ_j; a Weibull fit (libMR ``FitHigh``) to
the ``tailsize`` largest distances.

Score (Alg. 2): rank the classes by activation; the class at rank i = 1..α has its activation
recalibrated to v̂_j = v_j (1 − w_j (α + 1 − i)/α), w_j = w_score_j(d(x, μ_j)), the others keep
v_j (the weights (α + 1 − i)/α are those of the released code, OSDN ``compute_openmax.py`` and
OpenOOD; Alg. 2 as printed writes 1 − ((α − i)/α) w); the unknown class receives
v̂_0 = Σ_j (v_j − v̂_j); OpenMax probabilities are the softmax over (v̂_1..v̂_N, v̂_0) (Eq. 2). The OOD
score is the unknown-class probability P(y = 0 | x) (higher = more OOD), as OpenOOD's
postprocessor (``openood/postprocessors/openmax_postprocessor.py``, which negates it as a
confidence). ``pred`` is the classifier's arg-max (the known class).

Weibull fit as libMR's ``MR().fit_high(tail, len(tail))`` with the Python wrapper's
``translate_amount=1``: the tail is shifted by 1 − min(tail) and a two-parameter Weibull is fitted
by maximum likelihood (``scipy.stats.weibull_min.fit`` with loc fixed at 0); w_score(d) is its
CDF at d + 1 − min(tail) (0 below the support).

Defaults as OpenOOD v1.5: tailsize 20, α = 3, Euclidean distance. The paper and the authors' code
(abhijitbendale/OSDN) use α = 10 and the "eucos" distance (Euclidean/200 + cosine):
``distance: eucos, eu_weight: 0.005, alpha: 10``. α is capped at the number of classes.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field
from scipy import stats

from data.base import Split
from methods.classifier import ClassifierParams, PostHocMethod
from methods.base import RunContext, Scores, register

TRANSLATE_AMOUNT = 1.0   # libmr.MR() default in the Python wrapper (python/libmr.pyx)


class OpenMaxParams(ClassifierParams):
    tailsize: int = Field(20, ge=2)
    alpha: int = Field(3, ge=1)
    distance: Literal["euclidean", "eucos", "cosine"] = "euclidean"
    eu_weight: float = Field(0.005, gt=0)   # eucos: eu_weight * euclidean + cosine (OSDN: 1/200)


def distances(av: np.ndarray, means: np.ndarray, kind: str, eu_weight: float) -> np.ndarray:
    """N×C distances of activation vectors (N×D) to class means (C×D)."""
    diff = av[:, None, :] - means[None, :, :]
    eu = np.sqrt((diff ** 2).sum(-1))
    if kind == "euclidean":
        return eu
    num = av @ means.T
    den = np.linalg.norm(av, axis=1)[:, None] * np.linalg.norm(means, axis=1)[None, :]
    cos = 1.0 - num / np.where(den > 0, den, 1.0)
    return cos if kind == "cosine" else eu_weight * eu + cos


class WeibullTail:
    """libMR FitHigh / W_score: 2-parameter Weibull on the translated largest distances."""

    def __init__(self, values: np.ndarray, tailsize: int):
        tail = np.sort(np.asarray(values, dtype=np.float64))[-tailsize:]
        self.small_score = float(tail[0])
        shifted = tail + TRANSLATE_AMOUNT - self.small_score
        if np.ptp(shifted) <= 1e-12:          # all equal: a step at that distance
            self.shape, self.scale, self.degenerate = np.inf, float(shifted[0]), True
        else:
            self.shape, _, self.scale = stats.weibull_min.fit(shifted, floc=0)
            self.degenerate = False

    def w_score(self, d: np.ndarray) -> np.ndarray:
        x = np.asarray(d, dtype=np.float64) + TRANSLATE_AMOUNT - self.small_score
        if self.degenerate:
            return (x >= self.scale).astype(np.float64)
        return stats.weibull_min.cdf(x, self.shape, loc=0, scale=self.scale)


def openmax_probabilities(av: np.ndarray, means: np.ndarray, tails: list[WeibullTail], alpha: int,
                          kind: str, eu_weight: float) -> np.ndarray:
    """N×(C+1) OpenMax probabilities, the unknown class last (Alg. 2, Eq. 2)."""
    n, c = av.shape
    alpha = min(alpha, c)
    ranks = np.argsort(-av, axis=1)[:, :alpha]
    omega = np.zeros((n, c))
    weights = (alpha + 1 - np.arange(1, alpha + 1)) / alpha
    np.put_along_axis(omega, ranks, np.broadcast_to(weights, ranks.shape), axis=1)
    d = distances(av, means, kind, eu_weight)
    w = np.stack([tails[j].w_score(d[:, j]) for j in range(c)], axis=1)
    modified = av * (1.0 - w * omega)
    unknown = (av - modified).sum(axis=1, keepdims=True)
    z = np.concatenate([modified, unknown], axis=1)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@register("openmax")
class OpenMax(PostHocMethod):
    """OpenMax (Bendale & Boult, CVPR 2016, Algs. 1-2): unknown-class probability on the shared
    classifier's logits."""

    Params = OpenMaxParams
    paper = "Bendale & Boult, Towards Open Set Deep Networks, CVPR 2016"
    reference = ("Jingkang50/OpenOOD@3c35632ee91b54b09d1f085d04f94744cece7d0b: "
                 "openood/postprocessors/openmax_postprocessor.py, configs/postprocessors/openmax.yml")

    def __init__(self, params: OpenMaxParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.means: np.ndarray | None = None
        self.tails: list[WeibullTail] = []
        self.n_correct: list[int] = []

    def setup(self, train: Split) -> None:
        p = self.params
        av = self.logits(train)
        y = self.data.y.numpy()
        correct = av.argmax(axis=1) == y
        means, self.tails, self.n_correct = [], [], []
        for j in range(self.data.num_classes):
            members = av[(y == j) & correct]
            if len(members) == 0:          # nothing right: fall back on all images of the class
                members = av[y == j]
            if len(members) == 0:
                raise ValueError(f"openmax: class {j} has no training images")
            self.n_correct.append(int(((y == j) & correct).sum()))
            mu = members.mean(axis=0)
            means.append(mu)
            d = distances(members, mu[None], p.distance, p.eu_weight)[:, 0]
            self.tails.append(WeibullTail(d, min(p.tailsize, len(d))))
        self.means = np.stack(means)

    def score(self, test: Split) -> Scores:
        p = self.params
        av = self.logits(test)
        prob = openmax_probabilities(av, self.means, self.tails, p.alpha, p.distance, p.eu_weight)
        return Scores(image=prob[:, -1], pred=av.argmax(axis=1))

    def describe(self) -> dict:
        return {"activation_vector": "logits",
                "alpha_used": min(self.params.alpha, self.data.num_classes) if self.data else None,
                "weibull": "libMR FitHigh, translate_amount 1 (scipy weibull_min MLE)",
                "n_correct_per_class": self.n_correct, "score": "OpenMax probability of the unknown class"}
