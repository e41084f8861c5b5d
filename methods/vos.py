"""VOS: Virtual Outlier Synthesis (Du, Wang, Cai & Li, "VOS: Learning What You Don't Know by Virtual
Outlier Synthesis", ICLR 2022).

Training (Sec. 3): class-conditional Gaussians with a shared covariance in the penultimate space,
N(μ̂_k, Σ̂) (Eq. 1), estimated from a queue of the last ``sample_number`` features per class;
virtual outliers are drawn from the low-likelihood region of each class's Gaussian: of
``sample_from`` samples, the ``select`` least likely (Eq. 2, the ε-likelihood boundary chosen by
ranking as the released code does). The uncertainty loss (Eq. 5) is a logistic regression on
the weighted energy that separates ID features (label 1) from virtual outliers (label 0):
L_uncertainty = CE(φ(−E(v; θ)), label), with −E(x) = log Σ_k ReLU(w_k) exp f_k(x); total loss
L_CE + β L_uncertainty (Eq. 6, β = ``loss_weight``). Synthesis starts at ``start_epoch`` (epochs
counted from 0) once every queue is full (before, queues only fill); Σ̂ gets 1e-4·I.

Score (Sec. 3.2): the energy score −E(x) = log Σ_k exp f_k(x) (temperature 1, unweighted, as the
released test code and OpenOOD's EBO postprocessor); the OOD score here is E(x) = −logsumexp (higher =
more OOD). ``pred`` is the arg-max class.

Two coherent set-ups (``mode``), each recorded in the row and compared with its own numbers:

* ``openood`` (default; OpenOOD v1.5's leaderboard rows): ``configs/pipelines/train/train_vos.yml``
  (start_epoch 0, sample_number 1000, sample_from 10000, select 1, loss_weight 0.1, 100 epochs,
  SGD 0.1 / 0.9 Nesterov / 5e-4, per-step cosine), ResNet-18 32×32, checkpoint ``best``
  (base recorder, best.ckpt). Its ``vos_trainer.py`` ``log_sum_exp`` builds a fresh
  ``nn.Linear(num_classes, 1)`` (default init) on every call, floors the energy at −1 and returns
  it through a Python list (``output.cpu().detach().numpy().tolist()``): the energies carry no
  gradient, so only the logistic regression learns from the uncertainty loss; the trainer's own
  ``weight_energy`` is never used. Reproduced here: per call a fresh weight
  U(−1/√K, 1/√K) (nn.Linear's default), ReLU-weighted log-sum-exp, floored at −1, detached.
* ``paper`` (the released code, deeplearning-wisc/vos ``classification/CIFAR/train_virtual.py``):
  WideResNet-40-2 (dropout 0.3), start_epoch 40, one learnable ``weight_energy`` (uniform init,
  trained with the network) and gradients through both energies into the network; the weights of
  the last epoch are kept (the script saves every epoch and deletes the previous file).

``start_epoch``, ``arch`` and ``checkpoint_rule`` default to the mode's values; any of them can be
set explicitly (then the row records the explicit value). Outliers are drawn as μ + L z (L the
Cholesky factor of Σ̂, z standard normal); with a shared Σ̂, the least likely samples of a class are
those with the largest ‖z‖.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from typing import Literal

from pydantic import Field, model_validator

from data.base import Split
from methods.classifier import (ClassifierParams, build_network, cosine_schedule, describe_recipe, own_checkpoint,
                                 predict_logits, run_training, sgd, steps_per_epoch, train_data,
                                 argmax_of, epoch_selector)
from methods.base import Method, RunContext, Scores, register


#: The values each mode gives to the parameters left unset.
MODE_DEFAULTS = {"openood": {"start_epoch": 0, "arch": "resnet18_32x32", "checkpoint_rule": "best"},
                 "paper": {"start_epoch": 40, "arch": "wrn40_2", "checkpoint_rule": "last"}}


class VOSParams(ClassifierParams):
    mode: Literal["openood", "paper"] = "openood"
    start_epoch: int = Field(0, ge=0)
    sample_number: int = Field(1000, ge=2)
    sample_from: int = Field(10000, ge=1)
    select: int = Field(1, ge=1)
    loss_weight: float = Field(0.1, ge=0)
    cov_reg: float = Field(1e-4, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data):
        if isinstance(data, dict):
            mode = data.get("mode", "openood")
            data = {**MODE_DEFAULTS.get(mode, {}), **data}
        return data


def weighted_logsumexp(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log Σ_k ReLU(w_k) exp(f_k): the energy with learnable class weights (released log_sum_exp)."""
    m = logits.max(dim=1, keepdim=True).values
    return m.squeeze(1) + torch.log(torch.sum(F.relu(weight) * torch.exp(logits - m), dim=1))


def openood_energy(logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """OpenOOD's ``vos_trainer.log_sum_exp``: a fresh weight U(−1/√K, 1/√K) (nn.Linear's default
    init) per call, the ReLU-weighted log-sum-exp floored at −1, detached (no gradient)."""
    k = logits.shape[1]
    bound = 1.0 / np.sqrt(k)
    weight = (torch.rand(1, k, generator=g, device=logits.device) * 2 - 1) * bound
    with torch.no_grad():
        return weighted_logsumexp(logits.detach(), weight).clamp_min(-1.0)


class ClassQueues:
    """Per-class queue of the last ``size`` penultimate features (the released ``data_dict``). Once
    every queue is full, each new feature replaces its class's oldest one (a ring buffer: the
    same set of features as the released torch.cat FIFO, whose order does not matter)."""

    def __init__(self, num_classes: int, size: int, dim: int, device: str):
        self.data = torch.zeros(num_classes, size, dim, device=device)
        self.count = [0] * num_classes
        self.head = [0] * num_classes
        self.size = size

    @property
    def full(self) -> bool:
        return all(c == self.size for c in self.count)

    def push(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Before every queue is full, fill (features of full classes are dropped, as released);
        after, replace the oldest."""
        feats = feats.detach()
        was_full = self.full
        for i, k in enumerate(labels.tolist()):
            if was_full:
                self.data[k, self.head[k]] = feats[i]
                self.head[k] = (self.head[k] + 1) % self.size
            elif self.count[k] < self.size:
                self.data[k, self.count[k]] = feats[i]
                self.count[k] += 1

    def gaussians(self, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Class means (K×D) and the shared covariance of the class-centred features + reg·I."""
        means = self.data.mean(dim=1)
        centred = (self.data - means[:, None]).reshape(-1, self.data.shape[-1])
        cov = centred.T @ centred / len(centred)
        return means, cov + reg * torch.eye(cov.shape[0], device=cov.device)


def virtual_outliers(means: torch.Tensor, cov: torch.Tensor, sample_from: int, select: int,
                     g: torch.Generator) -> torch.Tensor:
    """For each class, the ``select`` least likely of ``sample_from`` draws from N(μ_k, Σ)."""
    chol = torch.linalg.cholesky(cov.double()).to(cov.dtype)
    out = []
    for mu in means:
        z = torch.randn(sample_from, len(mu), generator=g, device=mu.device)
        idx = torch.topk((z * z).sum(dim=1), min(select, sample_from)).indices
        out.append(mu + z[idx] @ chol.T)
    return torch.cat(out)


@register("vos")
class VOS(Method):
    """Virtual outlier synthesis with the energy-based uncertainty loss (Du et al., ICLR 2022,
    Eqs. 1-6); score = energy."""

    Params = VOSParams
    protocols = {"ood", "osr"}
    paper = "Du, Wang, Cai & Li, VOS: Learning What You Don't Know by Virtual Outlier Synthesis, ICLR 2022"
    reference = ("Jingkang50/OpenOOD@3c35632ee91b54b09d1f085d04f94744cece7d0b: "
                 "openood/trainers/vos_trainer.py, configs/pipelines/train/train_vos.yml, "
                 "openood/postprocessors/ebo_postprocessor.py; deeplearning-wisc/vos@"
                 "6dd9c2748de1f261c0ae898df130ec9558c60268: classification/CIFAR/train_virtual.py (mode paper)")

    def __init__(self, params: VOSParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.net = None
        self.data = None
        self.source = None
        self.synthesis_steps = 0
        self.select = None

    def fit(self, train: Split) -> None:
        p, ctx = self.params, self.ctx
        self.data = data = train_data(p, train)
        counts = np.bincount(data.y.numpy(), minlength=data.num_classes)
        self.net = build_network(p.arch, data.num_classes, p.width_scale, p.drop_rate, ctx.seed).to(ctx.device)
        self.source = own_checkpoint(ctx, p, self.net)
        if self.source is not None:
            self.net.eval()
            return
        if p.start_epoch < p.epochs and counts.min() < p.sample_number:
            ctx.log.warning("vos: the smallest class has %d training images < sample_number %d: its queue never "
                            "fills and no virtual outliers are synthesised", counts.min(), p.sample_number)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 1)
            weight_energy = nn.Linear(data.num_classes, 1).to(ctx.device)
            nn.init.uniform_(weight_energy.weight)
            logistic = nn.Linear(1, 2).to(ctx.device)
        opt = sgd(list(self.net.parameters()) + list(weight_energy.parameters()) + list(logistic.parameters()), p)
        total = p.epochs * steps_per_epoch(data.n_fit, p.batch_size)
        self.select = epoch_selector(p, data, (self.net,), argmax_of(self.net), ctx.device)
        g_energy = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 4)
        queues = ClassQueues(data.num_classes, p.sample_number, self.net.feature_dim, ctx.device)
        g = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 2)

        def step_fn(x, y, epoch, step):
            feats = self.net.forward_features(x)
            logits = self.net.fc(feats)
            reg = torch.zeros((), device=x.device)
            synthesise = queues.full and epoch >= p.start_epoch
            queues.push(feats, y)
            if synthesise:
                means, cov = queues.gaussians(p.cov_reg)
                outliers = virtual_outliers(means, cov, p.sample_from, p.select, g)
                if p.mode == "paper":
                    e_id = weighted_logsumexp(logits, weight_energy.weight)
                    e_ood = weighted_logsumexp(self.net.fc(outliers), weight_energy.weight)
                else:
                    e_id = openood_energy(logits, g_energy)
                    e_ood = openood_energy(self.net.fc(outliers), g_energy)
                inp = torch.cat((e_id, e_ood)).view(-1, 1)
                target = torch.cat((torch.ones(len(e_id)), torch.zeros(len(e_ood)))).long().to(x.device)
                reg = F.cross_entropy(logistic(inp), target)
                self.synthesis_steps += 1
            return F.cross_entropy(logits, y) + p.loss_weight * reg

        run_training(data, step_fn, opt, epochs=p.epochs, batch_size=p.batch_size, augment=p.augment,
                     seed=ctx.seed, device=ctx.device, lr_at=cosine_schedule(p, total),
                     modules=(self.net, weight_energy, logistic), on_epoch=ctx.log_epoch, select=self.select)
        self.source = "trained"

    def score(self, test: Split) -> Scores:
        logits = predict_logits(self.net, self.data.inputs, test.images, self.params.eval_batch_size,
                                self.ctx.device).double()
        return Scores(image=(-torch.logsumexp(logits, dim=1)).numpy(), pred=logits.argmax(dim=1).numpy())

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        out.update(describe_recipe(self.params, self.data, self.source,
                                   self.select.describe() if self.select else None),
                   synthesis_steps=self.synthesis_steps,
                   uncertainty_energy=("learnable ReLU(weight_energy) log-sum-exp, gradients into the network "
                                       "(train_virtual.py)" if self.params.mode == "paper" else
                                       "fresh random weights per call, floored at -1, detached: only the "
                                       "logistic regression learns (OpenOOD vos_trainer.py log_sum_exp)"),
                   feature_dim=getattr(self.net, "feature_dim", None),
                   score="energy = -logsumexp(logits) (T = 1)")
        return out
