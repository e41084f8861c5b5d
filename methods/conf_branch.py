"""Confidence Branch (DeVries & Taylor, "Learning Confidence for Out-of-Distribution Detection in
Neural Networks", arXiv:1802.04865, 2018).

The classifier gets a second head on the penultimate features: a confidence c = σ(w_c·h + b_c)
(Sec. 2). Training interpolates the prediction towards the one-hot target by the confidence
(Eq. 1): p' = c·p + (1 − c)·y, with loss L = L_t + λ L_c, L_t = −Σ_i log(p'_i) y_i (Eq. 2) and
L_c = −log c (Eq. 3). Hints are given to half of the samples only (Sec. 2.2: b ~ Bernoulli(0.5),
c' = c·b + (1 − b), as the released code draws b = Bernoulli(U(0, 1))). The budget β sets λ
(Sec. 2.3): after each step, λ ← λ/0.99 if L_c > β, else λ ← λ/1.01. p and c are clamped to
[eps, 1 − eps].

Score: the confidence c of the test sample (Sec. 3); the OOD score here is −c (higher = more OOD).
``pred`` is the arg-max of the class head. The paper also perturbs test inputs (ODIN-style, ε);
OpenOOD v1.5 does not, nor do we.

Network and defaults as OpenOOD v1.5 (``openood/networks/conf_branch_net.py``,
``openood/trainers/conf_branch_trainer.py``, ``configs/pipelines/train/train_conf_branch.yml``):
backbone ResNet-18 32×32 with ``fc`` and ``confidence`` heads on the 512-d features, budget 0.3,
λ₀ 0.1, eps 1e-12, 100 epochs, SGD 0.1 / 0.9 Nesterov / 5e-4, cosine per step, batch 128. The
method trains its own network (not the shared classifier); ``checkpoint`` loads a trained one
(OpenOOD's state-dict names: ``backbone.*``, ``fc``, ``confidence``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from data.base import Split
from methods.classifier import (ClassifierParams, build_network, cosine_schedule, describe_recipe, own_checkpoint,
                                 predict_logits, run_training, sgd, steps_per_epoch, train_data,
                                 epoch_selector)
from methods.base import Method, RunContext, Scores, register


class ConfBranchParams(ClassifierParams):
    budget: float = Field(0.3, gt=0)
    lmbda: float = Field(0.1, gt=0)
    eps: float = Field(1e-12, ge=0, lt=0.5)
    hints: bool = True       # False: OpenOOD's `baseline` (plain NLL, no interpolation)


class ConfBranchNet(nn.Module):
    """A backbone (its own fc replaced by Identity) with a class head and a confidence head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.backbone.fc = nn.Identity()
        self.fc = nn.Linear(backbone.feature_dim, num_classes)
        self.confidence = nn.Linear(backbone.feature_dim, 1)

    def forward(self, x, return_confidence: bool = False):
        h = self.backbone.forward_features(x)
        logits = self.fc(h)
        return (logits, self.confidence(h)) if return_confidence else logits


def conf_branch_loss(logits: torch.Tensor, conf_logit: torch.Tensor, y: torch.Tensor, lmbda: float, eps: float,
                     hint_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, L_c) of Eqs. 1-3 for one batch; ``hint_mask`` (B×1 of 0/1, 1 = no hint) None
    disables the interpolation."""
    p = torch.softmax(logits, dim=-1).clamp(eps, 1 - eps)
    c = torch.sigmoid(conf_logit).clamp(eps, 1 - eps)
    if hint_mask is not None:
        c_used = c * hint_mask + (1 - hint_mask)
        onehot = F.one_hot(y, logits.shape[1]).to(p.dtype)
        p = p * c_used + onehot * (1 - c_used)
    task = F.nll_loss(torch.log(p), y)
    conf_loss = torch.mean(-torch.log(c))
    return (task + lmbda * conf_loss if hint_mask is not None else task), conf_loss


@register("conf_branch")
class ConfBranch(Method):
    """Learned confidence branch (DeVries & Taylor 2018, Eqs. 1-3); score = −confidence."""

    Params = ConfBranchParams
    protocols = {"ood", "osr"}
    paper = "DeVries & Taylor, Learning Confidence for Out-of-Distribution Detection in Neural Networks, 2018"
    reference = ("Jingkang50/OpenOOD@3c35632ee91b54b09d1f085d04f94744cece7d0b: "
                 "openood/trainers/conf_branch_trainer.py, openood/postprocessors/conf_branch_postprocessor.py")

    def __init__(self, params: ConfBranchParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.net: ConfBranchNet | None = None
        self.data = None
        self.source = None
        self.final_lmbda = None
        self.select = None

    def fit(self, train: Split) -> None:
        p, ctx = self.params, self.ctx
        self.data = data = train_data(p, train)
        backbone = build_network(p.arch, data.num_classes, p.width_scale, p.drop_rate, ctx.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed + 1)
            self.net = ConfBranchNet(backbone, data.num_classes)
        self.net.to(ctx.device)
        self.source = own_checkpoint(ctx, p, self.net)
        if self.source is not None:
            self.net.eval()
            return
        opt = sgd(self.net.parameters(), p)
        total = p.epochs * steps_per_epoch(data.n_fit, p.batch_size)
        state = {"lmbda": p.lmbda}
        self.select = epoch_selector(p, data, (self.net,), lambda x: self.net(x).argmax(dim=1), ctx.device)
        g = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 2)

        def step_fn(x, y, epoch, step):
            logits, conf = self.net(x, return_confidence=True)
            mask = None
            if p.hints:
                prob = torch.rand(conf.shape, generator=g, device=conf.device)
                mask = torch.bernoulli(prob, generator=g)
            loss, conf_loss = conf_branch_loss(logits, conf, y, state["lmbda"], p.eps, mask)
            if p.hints:
                state["lmbda"] = state["lmbda"] / 1.01 if p.budget > conf_loss.item() else state["lmbda"] / 0.99
            return loss

        run_training(data, step_fn, opt, epochs=p.epochs, batch_size=p.batch_size, augment=p.augment,
                     seed=ctx.seed, device=ctx.device, lr_at=cosine_schedule(p, total), modules=(self.net,),
                     on_epoch=ctx.log_epoch, select=self.select)
        self.final_lmbda = state["lmbda"]
        self.source = "trained"

    def score(self, test: Split) -> Scores:
        p = self.params
        out = predict_logits(self.net, self.data.inputs, test.images, p.eval_batch_size, self.ctx.device,
                             fn=lambda x: torch.cat(self.net(x, return_confidence=True), dim=1))
        logits, conf = out[:, :-1].double(), torch.sigmoid(out[:, -1].double())
        return Scores(image=(-conf).numpy(), pred=logits.argmax(dim=1).numpy())

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        out.update(describe_recipe(self.params, self.data, self.source,
                                                   self.select.describe() if self.select else None), final_lmbda=self.final_lmbda,
                   hint_distribution="b ~ Bernoulli(U(0,1)) per sample (released code)",
                   score="-sigmoid(confidence head)")
        return out
