"""MSP: maximum softmax probability (Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and
Out-of-Distribution Examples in Neural Networks", ICLR 2017).

A classifier f trained with cross-entropy on the in-distribution classes; the confidence of a
sample is its maximum softmax probability, max_k softmax(f(x))_k (Sec. 2), and a low confidence
flags an OOD sample. Here the anomaly score is its negation, s(x) = −max_k softmax(f(x))_k, so
higher = more OOD. ``pred`` is the classifier's arg-max class.

The classifier is the shared one of ``methods.classifier`` (OpenOOD v1.5 recipe: ResNet-18 32×32,
100 epochs, SGD 0.1 / 0.9 / 5e-4, cosine, batch 128), trained once per (split, recipe, seed) in
the worker cache and reused by Gram, OpenMax and MOS; or loaded from ``checkpoint``. OpenOOD's
postprocessor (``openood/postprocessors/base_postprocessor.py``: softmax, max) is the same.
"""
from __future__ import annotations


from data.base import Split
from methods.classifier import ClassifierParams, PostHocMethod, softmax_np
from methods.base import Scores, register


class MSPParams(ClassifierParams):
    pass


@register("msp")
class MSP(PostHocMethod):
    """Maximum softmax probability baseline (Hendrycks & Gimpel 2017); score = −max softmax."""

    Params = MSPParams
    paper = "Hendrycks & Gimpel, A Baseline for Detecting Misclassified and OOD Examples, ICLR 2017"
    reference = ("Jingkang50/OpenOOD@3c35632ee91b54b09d1f085d04f94744cece7d0b: "
                 "openood/postprocessors/base_postprocessor.py, openood/trainers/base_trainer.py, openood/networks/resnet18_32x32.py")

    def score(self, test: Split) -> Scores:
        logits = self.logits(test)
        return Scores(image=-softmax_np(logits).max(axis=1), pred=logits.argmax(axis=1))

    def describe(self) -> dict:
        return {"score": "-max_k softmax(logits)_k"}
