"""VOS: Virtual Outlier Synthesis (Du, Wang, Cai & Li, "VOS: Learning What You Don't Know by Virtual
Outlier Synthesis", ICLR 2022).

Training (Sec. 3): class-conditional Gaussians with a shared covariance in the penultimate space,
N(μ̂_k, Σ̂) (Eq. 1), estimated from a queue of the last ``sample_number`` features per class;
virtual outliers are drawn from the low-likelihood region of each class's Gaussian: of
``sample_from`` samples, the ``select`` least likely (Eq. 2, the ε-likelihood boundary chosen by
ranking as the released code does). The uncertainty loss (Eq. 5) is a logistic regression on
the (learnable, weighted) energy that separates ID features (label 1) from virtual outliers
(label 0): L_uncertainty = CE(φ(−E(v; θ)), label), with −E(x) = log Σ_k ReLU(w_k) exp f_k(x)
(``log_sum_exp`` with ``weight_energy``); total loss L_CE + β L_uncertainty (Eq. 6, β =
``loss_weight``). Synthesis starts at ``start_epoch`` once every queue is full (before, queues
only fill); Σ̂ gets 1e-4·I.

Score (Sec. 3.2): the energy score −E(x) = log Σ_k exp f_k(x) (temperature 1, unweighted, as the
released test code and OpenOOD's EBO postprocessor); the OOD score here is E(x) = −logsumexp (higher =
more OOD). ``pred`` is the arg-max class.

Defaults: the released CIFAR code (deeplearning-wisc/vos ``classification/CIFAR/train_virtual.py``):
start_epoch 40, sample_number 1000, sample_from 10000, select 1, loss_weight 0.1, SGD 0.1 / 0.9
Nesterov / 5e-4 with per-step cosine, 100 epochs, batch 128; the network defaults to OpenOOD
v1.5's ResNet-18 32×32 (the paper: ``arch: wrn40_2``, dropout 0.3). OpenOOD's ``vos_trainer.py``
re-creates ``weight_energy`` inside ``log_sum_exp`` and detaches the energies through a Python
list, so its uncertainty loss trains only the logistic regression; here, as in the released VOS
code, gradients reach the network and the energy weights. Outliers are drawn as μ + L z (L the
Cholesky factor of Σ̂, z standard normal); with a shared Σ̂, the least likely samples of a class
are those with the largest ‖z‖.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from data.base import Split
from methods._classifier import (ClassifierParams, build_network, cosine_schedule, describe_recipe, own_checkpoint,
                                 predict_logits, run_training, sgd, steps_per_epoch, train_data)
from methods.base import Method, RunContext, Scores, register


class VOSParams(ClassifierParams):
    start_epoch: int = Field(40, ge=0)
    sample_number: int = Field(1000, ge=2)
    sample_from: int = Field(10000, ge=1)
    select: int = Field(1, ge=1)
    loss_weight: float = Field(0.1, ge=0)
    cov_reg: float = Field(1e-4, ge=0)


def weighted_logsumexp(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """log Σ_k ReLU(w_k) exp(f_k): the energy with learnable class weights (released log_sum_exp)."""
    m = logits.max(dim=1, keepdim=True).values
    return m.squeeze(1) + torch.log(torch.sum(F.relu(weight) * torch.exp(logits - m), dim=1))


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
                 "openood/trainers/vos_trainer.py, openood/postprocessors/ebo_postprocessor.py")

    def __init__(self, params: VOSParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.net = None
        self.data = None
        self.source = None
        self.synthesis_steps = 0

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
        total = p.epochs * steps_per_epoch(len(data.y), p.batch_size)
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
                e_id = weighted_logsumexp(logits, weight_energy.weight)
                e_ood = weighted_logsumexp(self.net.fc(outliers), weight_energy.weight)
                inp = torch.cat((e_id, e_ood)).view(-1, 1)
                target = torch.cat((torch.ones(len(e_id)), torch.zeros(len(e_ood)))).long().to(x.device)
                reg = F.cross_entropy(logistic(inp), target)
                self.synthesis_steps += 1
            return F.cross_entropy(logits, y) + p.loss_weight * reg

        run_training(data, step_fn, opt, epochs=p.epochs, batch_size=p.batch_size, augment=p.augment,
                     seed=ctx.seed, device=ctx.device, lr_at=cosine_schedule(p, total),
                     modules=(self.net, weight_energy, logistic), on_epoch=ctx.log_epoch)
        self.source = "trained"

    def score(self, test: Split) -> Scores:
        logits = predict_logits(self.net, self.data.inputs, test.images, self.params.eval_batch_size,
                                self.ctx.device).double()
        return Scores(image=(-torch.logsumexp(logits, dim=1)).numpy(), pred=logits.argmax(dim=1).numpy())

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        out.update(describe_recipe(self.params, self.data, self.source), synthesis_steps=self.synthesis_steps,
                   feature_dim=getattr(self.net, "feature_dim", None),
                   score="energy = -logsumexp(logits) (T = 1)")
        return out
