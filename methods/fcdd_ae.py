"""AE baseline of the FCDD paper (Liznerski et al., ICLR 2021, Sec. 4 "explanation baselines";
the autoencoder column of its Fashion-MNIST table): an hourglass autoencoder whose encoder is the
HSC baseline's network (``methods.deep_one_class.FCDDAutoencoder``: AE28 / AE28_W / AE32 / AE32_LW3K /
AE224_VGG of the official code), trained without anomalies (the official baseline sets
supervise_mode 'unsupervised') on the mean squared reconstruction error.

* Anomaly score: mean over pixels and channels of (x̂ − x)².
* Pixel scores: (x̂ − x)² averaged over channels, at the input size (optionally blurred with the
  corresponding FCDD net's receptive-field Gaussian, ``blur_heatmaps``; off as in the official
  AUROC code).
* ``net: auto`` follows the official FCDD→AE mapping: 28 px → ae28, 32 px → ae32_lw3k,
  larger → ae224_vgg. Schedules as FCDD's for the same input size (with the MVTec-AD recipe's
  10 passes over the training set per epoch, ``enlarge``).

Reference: liznerski/fcdd@4fa850215792b5f4a3405151e30127a5b67dc3b6: python/fcdd/training/ae.py, python/fcdd/models/shallow_cnn_*.py,
python/fcdd/runners/argparse_configs.py, python/fcdd/datasets/mvtec.py.
"""
from __future__ import annotations

from typing import Literal

from methods.fcdd_family import FCDDCommonParams, FCDDFamily, auto_fcdd_net
from methods.deep_one_class import FCDDAutoencoder, gaussian_blur
from methods.base import register

_AUTO = {"cnn28_w": "ae28", "cnn32_lw3k": "ae32_lw3k", "vgg11_224": "ae224_vgg"}


class AEParams(FCDDCommonParams):
    """net: auto | ae28 | ae28_w | ae32 | ae32_lw3k | ae224_vgg."""

    net: Literal["auto", "ae28", "ae28_w", "ae32", "ae32_lw3k", "ae224_vgg"] = "auto"
    blur_heatmaps: bool = False


@register("fcdd_ae")
class FCDDAE(FCDDFamily):
    """Autoencoder baseline with reconstruction-error heatmaps (FCDD paper)."""

    Params = AEParams
    objective = "ae"
    NETS = tuple(FCDDAutoencoder.ENCODER)
    paper = "Liznerski et al., Explainable Deep One-Class Classification, ICLR 2021 (AE baseline)"
    reference = ("liznerski/fcdd@4fa850215792b5f4a3405151e30127a5b67dc3b6: python/fcdd/training/ae.py, "
                 "python/fcdd/models/shallow_cnn_28.py, python/fcdd/models/shallow_cnn_32.py, "
                 "python/fcdd/runners/argparse_configs.py, python/fcdd/datasets/mvtec.py")

    def _auto_net(self, images) -> str:
        return _AUTO[auto_fcdd_net(images)]

    def _fcdd_net_name(self, net: str) -> str:
        return FCDDAutoencoder.FCDD_NET[net]

    def _build(self, setup, pretrained_state):
        return FCDDAutoencoder(setup.net, setup.channels, bias=self.params.bias,
                               pretrained_state=pretrained_state,
                               freeze=self.params.freeze and pretrained_state is not None)

    def _losses(self, out, x, labels, gt):
        return ((out - x) ** 2).flatten(1).mean(1)

    def _score_batch(self, x):
        import torch

        with torch.no_grad():
            err = (self.net(x) - x) ** 2
        heat = err.mean(1, keepdim=True)
        if self.params.blur_heatmaps:
            heat = gaussian_blur(heat, self.reception.r, self.setup.gauss_std)
        return err.flatten(1).mean(1), heat[:, 0]

    def resolved_params(self) -> dict:
        out = super().resolved_params()
        if self.setup is not None:
            out["heatmap"] = "(x_hat - x)^2 averaged over channels" + (
                f", blurred (kernel {self.reception.r}, std {self.setup.gauss_std})" if self.params.blur_heatmaps else "")
            out["score"] = "mean squared reconstruction error"
        return out
