"""FCDD: Fully Convolutional Data Description (Liznerski et al., "Explainable Deep One-Class
Classification", ICLR 2021; official code github.com/liznerski/fcdd).

A fully convolutional network φ (no dense layers, ``methods.deep_one_class.FCDDNet``) maps an image X to a
low-resolution map; its pseudo-Huber transform A(X) = sqrt(φ(X)² + 1) − 1 is the anomaly heatmap.

* Objective (Eq. 2, the HSC loss of Eq. 1 applied to the ℓ1-mean of A):
  1/n Σ_i (1 − y_i) (1/(u·v)) ‖A(X_i)‖₁ − y_i log(1 − exp(−(1/(u·v)) ‖A(X_i)‖₁)).
  With pixel ground truth for the anomalies (semi-supervised mode with masks) the objective is
  Eq. 3 on the up-sampled heatmap A': mean((1 − Y) ⊙ A') − log(1 − exp(−mean(Y ⊙ A'))).
* Anomaly score: (1/(u·v)) ‖A(X)‖₁. Pixel scores: A' = receptive-field up-sampling of A
  (Algorithm 1: transposed convolution with a Gaussian kernel of std ``gauss_std`` and extent the
  receptive field, centred at each output pixel's receptive-field centre), at the input size.
* Anomalies during training (``anomaly_source``, default ``auto`` = the official runner config's):
  outlier exposure with another dataset (``oe_dataset``, default CIFAR-100, greyed with luma weights
  for grey images: the paper's Fashion-MNIST / CIFAR-10 setting, ``auto`` at 28 / 32 px; see
  ``methods.fcdd_family`` for the ``set_outlier_exposure`` hook), confetti noise on normal images
  (the paper's MVTec-AD setting, ``auto`` at 224 px; needs no other data), semi-supervised with a
  few true anomalies (``set_true_anomalies`` / train rows with label 1), or none. Each training
  image is replaced by an anomaly with probability 0.5 (the official online supervisor).
* Networks (``net``): cnn28_w (Fashion-MNIST), cnn28, cnn32_lw3k (CIFAR-10), cnn32_s,
  vgg11_224 (MVTec-AD: VGG11-BN blocks 1-4 with ImageNet weights, blocks 1-3 frozen; needs
  ``pretrained`` weights, tests use ``pretrained: false``); 'auto' picks by input size.
* Defaults per input size = the official runner configs (``methods.fcdd_family.FAMILIES``),
  including the MVTec-AD recipe's 10 passes over the training set per epoch (``enlarge``).

Reference: liznerski/fcdd@4fa850215792b5f4a3405151e30127a5b67dc3b6: python/fcdd/runners/argparse_configs.py, python/fcdd/training/fcdd.py,
python/fcdd/datasets/mvtec.py, python/fcdd/datasets/online_supervisor.py.
"""
from __future__ import annotations

import torch

from methods.fcdd_family import (FCDDFamily, FCDDSupervisedParams, fcdd_gt_losses, fcdd_losses,
                                  pseudo_huber)
from methods.deep_one_class import FCDDNet, receptive_upsample
from methods.base import register


@register("fcdd")
class FCDD(FCDDFamily):
    """Fully Convolutional Data Description (ICLR 2021, Eqs. 2-3, Algorithm 1)."""

    Params = FCDDSupervisedParams
    objective = "fcdd"
    paper = "Liznerski et al., Explainable Deep One-Class Classification, ICLR 2021"
    reference = ("liznerski/fcdd@4fa850215792b5f4a3405151e30127a5b67dc3b6: python/fcdd/runners/argparse_configs.py, "
                 "python/fcdd/training/fcdd.py, python/fcdd/datasets/mvtec.py, "
                 "python/fcdd/datasets/online_supervisor.py")

    def _build(self, setup, pretrained_state):
        return FCDDNet(setup.net, setup.channels, setup.size, bias=self.params.bias,
                       pretrained_state=pretrained_state,
                       freeze=self.params.freeze and pretrained_state is not None)

    def _losses(self, out, x, labels, gt):
        if gt is not None:
            return fcdd_gt_losses(out, gt, self.reception, self.setup.gauss_std)
        return fcdd_losses(out, labels)

    @torch.no_grad()
    def _score_batch(self, x):
        a = pseudo_huber(self.net(x))
        heat = receptive_upsample(a, self.reception, self.setup.gauss_std, out_size=self.setup.size)
        return a.flatten(1).mean(1), heat[:, 0]

    def resolved_params(self) -> dict:
        out = super().resolved_params()
        if self.setup is not None:
            out["heatmap"] = (f"receptive-field Gaussian up-sampling (Algorithm 1), std {self.setup.gauss_std}, "
                              f"kernel extent {self.reception.r}, to {self.setup.size} px")
            out["score"] = "mean over the u x v map of A(X) = sqrt(phi(X)^2 + 1) - 1"
        return out
