"""The pseudo-Huber losses (FCDD paper Eq. 1 HSC, Eq. 2 FCDD, Eq. 3 FCDD with ground-truth maps)."""
from __future__ import annotations

import torch

from methods.deep_one_class import Reception


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

def pseudo_huber(x: torch.Tensor) -> torch.Tensor:
    """A(X) = sqrt(φ(X)² + 1) − 1, element-wise (FCDD paper Sec. 3)."""
    return torch.sqrt(x ** 2 + 1) - 1


def _anomalous(m: torch.Tensor) -> torch.Tensor:
    """−log(1 − exp(−m)), with fcdd's +1e-31 inside the log."""
    return -torch.log(1 - torch.exp(-m) + 1e-31)


def fcdd_losses(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample FCDD loss (Eq. 2): normal: (1/(u·v))‖A(X)‖₁; anomalous:
    −log(1 − exp(−(1/(u·v))‖A(X)‖₁))."""
    m = pseudo_huber(out).flatten(1).mean(1)
    anom = labels.bool()
    res = m.clone()
    res[anom] = _anomalous(m[anom])
    return res


def fcdd_gt_losses(out: torch.Tensor, gt: torch.Tensor, rec: Reception, std: float) -> torch.Tensor:
    """Per-sample FCDD loss with ground-truth maps (Eq. 3) on the up-sampled heatmap A':
    mean((1 − Y) ⊙ A') − log(1 − exp(−mean(Y ⊙ A'))) (second term only for images with Y ≠ 0)."""
    from methods.deep_one_class import receptive_upsample

    up = receptive_upsample(pseudo_huber(out), rec, std, out_size=gt.shape[-1])
    norm = (up * (1 - gt)).flatten(1).mean(1)
    has = gt.flatten(1).sum(1) > 0
    res = norm.clone()
    a = (up * gt).flatten(1).mean(1)
    res[has] = norm[has] + _anomalous(a[has])
    return res


def hsc_losses(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample HSC loss (Eq. 1): h(z) = sqrt(‖z‖² + 1) − 1 for normal samples,
    −log(1 − exp(−h(z))) for anomalous ones."""
    h = torch.sqrt((out ** 2).sum(-1) + 1) - 1
    anom = labels.bool()
    res = h.clone()
    res[anom] = _anomalous(h[anom])
    return res
