"""An adgrid method plugin: a PyOD detector (KNN or ECOD) on frozen backbone features.

Use it from a grid:  plugins: [pyod_detector.py]   methods: [{name: pyod, params: {detector: ecod}}]
It builds on PaDiM's and PatchCore's frozen-feature base, so its features come from the same
per-worker cache (same backbone, weights, transform and split: the same entry) and the runner sends
it to the worker that has them warm (the same ``affinity_key``).
"""
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from methods import Scores, register
from methods.backbones import FrozenFeatureMethod, FrozenFeatureParams


class PyODParams(FrozenFeatureParams):
    detector: Literal["knn", "ecod"] = "knn"
    n_neighbors: int = Field(5, gt=0)  # KNN only (PyOD's default); capped at the training set's size - 1


@register("pyod")
class PyODDetector(FrozenFeatureMethod):
    """Each image is its layers' feature maps, average-pooled and concatenated; PyOD scores it."""

    Params = PyODParams
    paper = "Zhao et al., PyOD: A Python Toolbox for Scalable Outlier Detection, JMLR 2019"

    def embed(self, split) -> np.ndarray:
        feats = self.features(split)  # layer -> N×C×h×w, shared with PaDiM / PatchCore
        return torch.cat([F.adaptive_avg_pool2d(feats[layer], 1).flatten(1) for layer in self.params.layers], 1).numpy()

    def fit(self, train) -> None:
        from pyod.models.ecod import ECOD
        from pyod.models.knn import KNN

        p = self.params
        self.detector = KNN(n_neighbors=min(p.n_neighbors, len(train) - 1)) if p.detector == "knn" else ECOD()
        self.detector.fit(self.embed(train))

    def score(self, test) -> Scores:
        return Scores(image=self.detector.decision_function(self.embed(test)).astype(np.float64))
