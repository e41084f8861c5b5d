"""Deep SVDD (Ruff et al., "Deep One-Class Classification", ICML 2018).

A bias-free network φ(·; W) (LeNet-type, ``methods.deep_one_class.MnistLeNet`` / ``Cifar10LeNet``; no bias
terms and no affine batch-norm parameters, Sec. 3.3 Prop. 2, no bounded final activation, Prop. 3)
maps images into a feature space where normal data should concentrate around a centre c.

* One-class objective (Eq. 4): min_W 1/n Σ_i ||φ(x_i; W) − c||² + λ/2 Σ_l ||W^l||²_F.
* Soft-boundary objective (Eq. 3): min_{R,W} R² + 1/(νn) Σ_i max(0, ||φ(x_i; W) − c||² − R²) + λ/2 ...
  R is solved on each mini-batch as the (1 − ν)-quantile of the distances ||φ − c|| after
  ``warm_up_epochs`` (official ``get_radius``); before that R = 0.
* Anomaly score (Eq. 5): s(x) = ||φ(x; W*) − c||² (one-class), ||φ − c||² − R² (soft-boundary,
  as the official code).
* λ is Adam's weight decay. c is the mean of φ over the training images after pre-training, in
  eval mode; coordinates with |c_k| < eps are pushed to ±eps (official ``init_center_c``, eps 0.1;
  an exact 0 stays 0 as there).
* Pre-training: the DCAE of ``methods.dcae`` (shared through the worker cache with the ``dcae``
  method); its encoder initialises φ.
* Inputs: GCN-l1 then per-class min-max scaling to [0, 1] (Sec. 4.1) with the constants the split's
  dataset declares for its normal class (``Split.statistics``: the official ones for MNIST and
  CIFAR-10), else computed from the normal training images.
* Fashion-MNIST: the paper has no Fashion-MNIST experiment and the official code no recipe for it;
  ``net: auto`` uses the MNIST LeNet with GCN + min-max (Fashion-MNIST's official fcdd constants).
  ``net: fmnist_lenet`` is the authors' later Deep SAD recipe (lukasruff/Deep-SAD-PyTorch
  ``src/networks/fmnist_LeNet.py``, rep_dim 64; ``src/datasets/fmnist.py``: [0, 1] pixels, no GCN).
  Not adopted from Deep SAD: its batch 128 and its AE loss as a mean over pixels (ours: a sum, as
  Deep SVDD). ``resolved_params()['recipe']`` says which recipe a row used.

Defaults (official README, lukasruff/Deep-SVDD-PyTorch): Adam lr 1e-4, 150 epochs, lr ×0.1 at
epoch 50, batch 200, weight decay 0.5e-6, ν = 0.1, pre-training on; DCAE recipe in ``methods.dcae``.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from data.base import Split
from methods.deep_one_class import DSVDD_NETS
from methods.base import (LearningRate, Method, NonFiniteLoss, RunContext, Scores, check_finite, check_finite_weights,
                          index_batches, register)
from methods.dcae import (AEPretrainParams, DCAERecipe, LeNetInputs, lenet_inputs,
                          make_optimizer, pretrain_dcae, recipe_affinity, recipe_label, seeded)


def init_center(mean: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Deep SVDD's eps rule for the centre: coordinates of the mean embedding closer to 0 than eps
    become ±eps with their sign (a zero coordinate can be matched trivially by zero weights)."""
    c = mean.clone()
    c[(c.abs() < eps) & (c < 0)] = -eps
    c[(c.abs() < eps) & (c > 0)] = eps
    return c


def radius_from_distances(dist: torch.Tensor, nu: float) -> float:
    """Soft-boundary radius: the (1 − ν)-quantile of the distances ||φ − c|| (dist = squared)."""
    return float(np.quantile(np.sqrt(dist.detach().cpu().numpy()), 1 - nu))


class DSVDDParams(AEPretrainParams):
    objective: Literal["one-class", "soft-boundary"] = "one-class"
    nu: float = Field(0.1, gt=0, le=1)
    eps: float = Field(0.1, ge=0)
    pretrain: bool = True
    optimizer: Literal["adam", "amsgrad"] = "adam"
    lr: LearningRate = 1e-4
    epochs: int = Field(150, ge=0)
    milestones: list[int] = [50]
    batch_size: int = Field(200, ge=1)
    weight_decay: float = 0.5e-6
    warm_up_epochs: int = Field(10, ge=0)


@register("dsvdd")
class DeepSVDD(Method):
    """Deep SVDD, one-class or soft-boundary (Ruff et al., ICML 2018, Eqs. 3-5)."""

    Params = DSVDDParams
    protocols = {"one_class"}
    paper = "Ruff et al., Deep One-Class Classification, ICML 2018"
    reference = ("lukasruff/Deep-SVDD-PyTorch@1901612d595e23675fb75c4ebb563dd0ffebc21e: src/deepSVDD.py, "
                 "src/optim/deepSVDD_trainer.py, src/optim/ae_trainer.py, src/networks/mnist_LeNet.py, "
                 "src/networks/cifar10_LeNet.py, src/datasets/preprocessing.py; fmnist_lenet: "
                 "lukasruff/Deep-SAD-PyTorch@2e7aca37412e7f09d42d48d9e722ddfb422c814a: "
                 "src/networks/fmnist_LeNet.py, src/datasets/fmnist.py")

    def __init__(self, params: DSVDDParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.inputs: LeNetInputs | None = None
        self.recipe: DCAERecipe | None = None
        self.net = None
        self.c: torch.Tensor | None = None
        self.R = 0.0
        self.pretrain_curve: list[float] = []
        self.dataset: str | None = None

    def fit(self, train: Split) -> None:
        p, ctx = self.params, self.ctx
        self.inputs, x = lenet_inputs(train, p.net, p.stats, p.input_norm)
        self.dataset = train.dataset or None
        self.transform = self.inputs.transform
        net_cls = DSVDD_NETS[self.inputs.net][0]
        self.net = seeded(ctx.seed, net_cls).to(ctx.device)
        if p.pretrain:
            self.recipe = DCAERecipe.resolve(p, self.inputs.net)
            result = pretrain_dcae(ctx, train, x, self.recipe, self.inputs)
            enc = {k[len("encoder."):]: v for k, v in result["state_dict"].items() if k.startswith("encoder.")}
            self.net.load_state_dict(enc)
            self.pretrain_curve = list(result["loss_curve"])

        self.c = self._center(x)
        self.R = 0.0
        opt = make_optimizer(self.net.parameters(), p.optimizer, p.lr, p.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(p.milestones), gamma=0.1)
        g = torch.Generator().manual_seed(ctx.seed + 1)
        soft = p.objective == "soft-boundary"
        self.net.train()
        for epoch in range(1, p.epochs + 1):
            total, count = 0.0, 0
            for idx in index_batches(len(x), p.batch_size, g):
                xb = x[idx].to(ctx.device)
                opt.zero_grad(set_to_none=True)
                dist = ((self.net(xb) - self.c) ** 2).sum(dim=1)
                if soft:
                    r2 = self.R ** 2
                    loss = r2 + (1.0 / p.nu) * torch.clamp(dist - r2, min=0).mean()
                else:
                    loss = dist.mean()
                check_finite(loss.item(), epoch)
                loss.backward()
                opt.step()
                if soft and epoch > p.warm_up_epochs:  # official: epoch index >= warm_up (0-based)
                    self.R = radius_from_distances(dist, p.nu)
                total += loss.item() * len(idx)
                count += len(idx)
            ctx.log_epoch(epoch, total / max(count, 1))
            sched.step()
        check_finite_weights(self.net, p.epochs)
        self.net.eval()

    @torch.no_grad()
    def _center(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        total = None
        for start in range(0, len(x), 512):
            out = self.net(x[start:start + 512].to(self.ctx.device)).sum(0)
            total = out if total is None else total + out
        return init_center(total / len(x), self.params.eps)

    @torch.no_grad()
    def distances(self, images) -> torch.Tensor:
        x = self.inputs(images)
        self.net.eval()
        out = [((self.net(x[s:s + 512].to(self.ctx.device)) - self.c) ** 2).sum(1).cpu()
               for s in range(0, len(x), 512)]
        return torch.cat(out) if out else torch.empty(0)

    def score(self, test: Split) -> Scores:
        dist = self.distances(test.images)
        if self.params.objective == "soft-boundary":
            dist = dist - self.R ** 2
        if not bool(torch.isfinite(dist).all()):  # finite weights whose forward pass overflows
            raise NonFiniteLoss(self.params.epochs, "distances of the trained network")
        return Scores(image=dist.numpy().astype(np.float64))

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        if self.inputs is not None:
            out.update(net=self.inputs.net, preprocessing=self.inputs.describe(), lr_gamma=0.1,
                       rep_dim=DSVDD_NETS[self.inputs.net][0].rep_dim,
                       recipe=recipe_label(self.inputs.net, self.inputs.normalizer.kind, self.dataset))
        if self.recipe is not None:
            out.update(ae_epochs=self.recipe.epochs, ae_milestones=list(self.recipe.milestones),
                       ae_weight_decay=self.recipe.weight_decay, ae_lr_gamma=0.1)
        if not self.params.pretrain:
            for k in ("ae_optimizer", "ae_lr", "ae_epochs", "ae_milestones", "ae_batch_size", "ae_weight_decay"):
                out.pop(k, None)
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        return recipe_affinity(params) if params.pretrain else ()
