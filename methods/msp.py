"""MSP: maximum softmax probability (Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
Out-of-Distribution Examples in Neural Networks", ICLR 2017).

A classifier f trained with cross-entropy on the in-distribution classes; the confidence of a
sample is its maximum softmax probability, max_k softmax(f(x))_k (Sec. 2), and a low confidence
flags an OOD sample. Here the anomaly score is its negation, s(x) = −max_k softmax(f(x))_k, so
higher = more OOD. ``pred`` is the classifier's arg-max class.

The classifier is the shared one of ``methods._classifier`` (OpenOOD v1.5 recipe: ResNet-18 32×32,
100 epochs, SGD 0.1 / 0.9 / 5e-4, cosine, batch 128), trained once per (split, recipe, seed) in
the worker cache and reused by Gram, OpenMax and MOS; or loaded from ``checkpoint``. OpenOOD's
postprocessor (``openood/postprocessors/base_postprocessor.py``: softmax, max) is the same.
"""
from __future__ import annotations

import numpy as np

from data.base import Split
from methods._classifier import (ClassifierParams, classifier_affinity, classifier_outputs, describe_recipe,
                                 shared_classifier, softmax_np, train_data)
from methods.base import Method, RunContext, Scores, register


class MSPParams(ClassifierParams):
    pass


@register("msp")
class MSP(Method):
    """Maximum softmax probability baseline (Hendrycks & Gimpel 2017); score = −max softmax."""

    Params = MSPParams
    protocols = {"ood", "osr"}
    paper = "Hendrycks & Gimpel, A Baseline for Detecting Misclassified and OOD Examples, ICLR 2017"

    def __init__(self, params: MSPParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.clf = None
        self.data = None

    def fit(self, train: Split) -> None:
        self.data = train_data(self.params, train)
        self.clf = shared_classifier(self.ctx, train, self.params, self.data)

    def score(self, test: Split) -> Scores:
        logits = classifier_outputs(self.ctx, self.clf, test)["logits"].astype(np.float64)
        prob = softmax_np(logits)
        return Scores(image=-prob.max(axis=1), pred=logits.argmax(axis=1))

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        out.update(describe_recipe(self.params, self.data, self.clf.source if self.clf else None),
                   score="-max_k softmax(logits)_k")
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        return classifier_affinity(params)
