"""HSC baseline of the FCDD paper (Liznerski et al., ICLR 2021, Sec. 4 "explanation baselines";
hypersphere classifier of Ruff et al., 2020): the FCDD convolutional blocks followed by dense
layers that pool the spatial map into one feature vector z = φ(X) (``methods.deep_one_class.HSCNet``:
CNN28 / CNN28_W / CNN32 / CNN32_LW3K / CNN224_VGG of the official code).

* Objective (Eq. 1): 1/n Σ_i (1 − y_i) h(φ(X_i)) − y_i log(1 − exp(−h(φ(X_i)))), with the
  pseudo-Huber h(z) = sqrt(‖z‖² + 1) − 1. Anomalies come from the same sources as FCDD's
  (``anomaly_source``; pixel masks of true anomalies are not used: HSC has no spatial output).
* Anomaly score: h(φ(X)).
* Pixel scores: gradient heatmaps |∂h(φ(X))/∂X| summed over channels (official
  ``get_grad_heatmap``), at the input size; ``blur_heatmaps`` additionally blurs them with the
  Gaussian of the corresponding FCDD net's receptive field (the paper's figures; the official AUROC
  code uses the unblurred gradients, hence off by default).
* Defaults per input size as FCDD's (``methods.fcdd_family.FAMILIES``: anomaly source, schedule,
  ``enlarge``).

Reference: liznerski/fcdd@4fa850215792b5f4a3405151e30127a5b67dc3b6: python/fcdd/training/hsc.py, python/fcdd/models/shallow_cnn_*.py,
python/fcdd/runners/argparse_configs.py, python/fcdd/datasets/mvtec.py.
"""
from __future__ import annotations

import torch

from methods.fcdd_family import FCDDFamily, FCDDSupervisedParams, hsc_losses
from methods.deep_one_class import HSCNet, gaussian_blur
from methods.base import register


class HSCParams(FCDDSupervisedParams):
    blur_heatmaps: bool = False


@register("fcdd_hsc")
class FCDDHSC(FCDDFamily):
    """Hypersphere classifier baseline with gradient heatmaps (FCDD paper, Eq. 1)."""

    Params = HSCParams
    objective = "hsc"
    paper = "Liznerski et al., Explainable Deep One-Class Classification, ICLR 2021 (HSC baseline)"
    reference = ("liznerski/fcdd@4fa850215792b5f4a3405151e30127a5b67dc3b6: python/fcdd/training/hsc.py, "
                 "python/fcdd/models/shallow_cnn_28.py, python/fcdd/models/shallow_cnn_32.py, "
                 "python/fcdd/runners/argparse_configs.py, python/fcdd/datasets/mvtec.py")

    def _build(self, setup, pretrained_state):
        return HSCNet(setup.net, setup.channels, bias=self.params.bias, pretrained_state=pretrained_state,
                      freeze=self.params.freeze and pretrained_state is not None)

    def _losses(self, out, x, labels, gt):
        return hsc_losses(out, labels)

    def _score_batch(self, x):
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            z = self.net(x)
            h = torch.sqrt((z ** 2).sum(-1) + 1) - 1
            (grad,) = torch.autograd.grad(h.sum(), x)
        heat = grad.abs().sum(1, keepdim=True)
        if self.params.blur_heatmaps:
            heat = gaussian_blur(heat, self.reception.r, self.setup.gauss_std)
        return h.detach(), heat[:, 0].detach()

    def resolved_params(self) -> dict:
        out = super().resolved_params()
        if self.setup is not None:
            out["heatmap"] = "|d h(phi(X)) / dX| summed over channels" + (
                f", blurred (kernel {self.reception.r}, std {self.setup.gauss_std})" if self.params.blur_heatmaps else "")
            out["score"] = "h(phi(X)) = sqrt(|phi(X)|^2 + 1) - 1"
        return out
