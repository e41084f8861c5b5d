"""MOS: Minimum Others Score (Huang & Li, "MOS: Towards Scaling Out-of-distribution Detection for
Large Semantic Space", CVPR 2021).

The label space is divided into K groups; each group's softmax gets an extra "others" category
(Sec. 3.1, group-based learning): a sample of class c in group g has label c within g and label
"others" in every other group; the loss is the sum of the group cross-entropies (Eq. 1).
Prediction (Eq. 2-3): within each group the most likely non-others class, across groups the one
with the highest probability. Score (Eq. 4): S_MOS(x) = −min_k p^k_others(x); the OOD score here
is min_k p^k_others(x) (higher = more OOD).

Training as the paper's fine-tuning (deeplearning-wisc/large_scale_ood ``finetune.py`` with BiT's
hyper-rule, also OpenOOD's ``openood/trainers/mos_trainer.py``): SGD lr 0.003, momentum 0.9, no
weight decay, linear warm-up then ×0.1 steps at the rule's supports — [100, 200, 300, 400, 500]
steps below 20k training images, [500, 3000, 6000, 9000, 10000] below 500k, else [500, 6000,
12000, 18000, 20000] — training stops at the last support; mixup with α = 0.1 from 20k images
(0 below). The network starts from the shared cross-entropy classifier (``init: classifier``, as
OpenOOD's CIFAR scripts fine-tune their base checkpoint for at most 30 epochs, batch 128, with a
ResNet-18 32×32) with a new head of (classes + groups) logits; ``arch: bit_r101x1`` with
``init_weights: BiT-S-R101x1.npz`` is the paper's ImageNet set-up. ``mos_checkpoint`` loads a
trained MOS network instead of fine-tuning (``checkpoint`` is the base classifier's).

Groups: ``groups`` (lists of in-distribution class indices covering every class once), else
``n_groups`` contiguous groups of near-equal size, else (both unset, the default) the groups the
dataset declares (``DATASET_GROUPS``), as OpenOOD takes them from its double-label dataset
configs: ``configs/datasets/cifar10/cifar10_double_label.yml`` (``num_classes: 12``: 10 classes in
2 groups), ``cifar100_double_label.yml`` (120 logits: 100 classes in 20 groups),
``imagenet200_double_label.yml`` (6 groups), ``imagenet_double_label.yml`` (8 groups). The
members of each group are in OpenOOD's ``benchmark_imglist/*/train_*_mos.txt`` (``group_label``,
``class_label`` per image, read by ``mos_trainer.py`` ``cal_group_slices`` with ``group_config:
Auto``), which the repository does not ship; here CIFAR-100's groups are its 20 superclasses
(the dataset's own coarse labels, five classes each, which 20 groups of 120 logits imply) and
CIFAR-10's two are vehicles {airplane, automobile, ship, truck} and animals {the other six} — a
stated assumption; give ``groups`` to use another assignment. Other datasets: two contiguous
groups (recorded as ``groups_source``). A class subset (osr, a subset of normal classes) keeps the
declared groups restricted to its classes.

Mixup: OpenOOD's trainer (``mos_trainer.py`` lines 282-284) computes ``mixup_data(data, ...)`` but
feeds the un-mixed ``data`` to the network, so only the targets are mixed (the loss is
λ·L(y_a) + (1−λ)·L(y_b) on clean images) — the default here (``mixup_inputs: false``); the paper's
code (deeplearning-wisc/large_scale_ood ``finetune.py`` lines 271-275) feeds the mixed images
(``mixup_inputs: true``). Checkpoint: ``best`` by the group-softmax accuracy on the held-out split
(OpenOOD's ``mos_evaluator.py`` accuracy, base recorder; ``scripts/ood/mos/cifar10_test_mos.sh``
tests ``best.ckpt``).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from data.base import Split
from data.datasets.cifar100 import COARSE_CLASSES, COARSE_OF_FINE, FINE_CLASSES
from methods.classifier import (BiTResNet, ClassifierParams, build_network, classifier_affinity, describe_recipe,
                                 load_bit_npz, load_state, read_state_dict, resolve_checkpoint, run_training,
                                 sgd, sha256_file, shared_classifier, predict_logits, train_data,
                                 epoch_selector)
from methods.base import LearningRate, Method, RunContext, Scores, register


class MOSParams(ClassifierParams):
    init: Literal["classifier", "scratch"] = "classifier"
    init_weights: str | None = None        # backbone weights: BiT .npz or a state dict (fc dropped)
    mos_checkpoint: str | None = None      # a trained MOS network: no fine-tuning
    groups: list[list[int]] | None = None
    n_groups: int | None = Field(None, ge=1)   # None (and no groups): the dataset's groups
    mixup_inputs: bool = False   # False: OpenOOD mixes the targets only; True: the paper's code
    ft_epochs: int = Field(30, ge=0)
    ft_batch_size: int = Field(128, ge=2)
    ft_lr: LearningRate = 0.003
    ft_momentum: float = Field(0.9, ge=0, lt=1)
    ft_weight_decay: float = Field(0.0, ge=0)
    schedule_steps: list[int] | None = None  # BiT supports [warm-up end, 3 decays, stop]; None: by size
    mixup: float | None = Field(None, ge=0)  # Beta(α, α); None: BiT rule (0.1 from 20k images)

    @model_validator(mode="after")
    def _check_mos(self):
        if self.schedule_steps is not None:
            s = self.schedule_steps
            if len(s) < 2 or any(b <= a for a, b in zip(s, s[1:])) or s[0] < 0:
                raise ValueError("schedule_steps: increasing step counts [warm-up end, decays..., stop]")
        return self


def bit_supports(n_train: int) -> list[int]:
    """BiT hyper-rule schedule (``get_schedule`` of the MOS / OpenOOD code)."""
    if n_train < 20_000:
        return [100, 200, 300, 400, 500]
    if n_train < 500_000:
        return [500, 3000, 6000, 9000, 10_000]
    return [500, 6000, 12_000, 18_000, 20_000]


def bit_lr(step: int, supports: list[int], base_lr: float) -> float | None:
    """BiT hyper-rule learning rate (``get_lr``): linear warm-up, ×0.1 after each support, None at the end."""
    if step < supports[0]:
        return base_lr * step / supports[0]
    if step >= supports[-1]:
        return None
    lr = base_lr
    for s in supports[1:]:
        if s < step:
            lr /= 10
    return lr


#: MOS groups a dataset declares, as class names per group (OpenOOD's double-label configs; see the
#: module docstring for what is and is not OpenOOD's exact assignment).
DATASET_GROUPS = {
    "cifar10": (("airplane", "automobile", "ship", "truck"), ("bird", "cat", "deer", "dog", "frog", "horse")),
    "cifar100": tuple(tuple(FINE_CLASSES[f] for f, c in enumerate(COARSE_OF_FINE) if c == g)
                      for g in range(len(COARSE_CLASSES))),
}
FALLBACK_GROUPS = 2


def dataset_groups(dataset: str, class_names: list[str]) -> list[list[int]] | None:
    """The declared groups of ``dataset`` as indices into ``class_names`` (classes the split lacks
    dropped, empty groups removed); None when the dataset declares none or a class is not covered."""
    declared = DATASET_GROUPS.get(dataset)
    if declared is None:
        return None
    index = {name: i for i, name in enumerate(class_names)}
    groups = [[index[n] for n in group if n in index] for group in declared]
    groups = [g for g in groups if g]
    if sorted(c for g in groups for c in g) != list(range(len(class_names))):
        return None
    return groups


def choose_groups(p: "MOSParams", train: Split, num_classes: int) -> tuple[list[list[int]], str]:
    """(groups, where they come from): ``groups``, ``n_groups``, the dataset's, else two contiguous."""
    if p.groups is not None or p.n_groups is not None:
        source = "groups param" if p.groups is not None else f"n_groups={p.n_groups} contiguous"
        return resolve_groups(p.groups, p.n_groups or FALLBACK_GROUPS, num_classes), source
    dataset = train.dataset
    declared = dataset_groups(dataset, list(train.class_names))
    if declared is not None and len(declared) <= num_classes:
        return declared, f"declared for {dataset} (methods/mos.py DATASET_GROUPS)"
    n = min(FALLBACK_GROUPS, num_classes)
    return resolve_groups(None, n, num_classes), f"{n} contiguous (no groups declared for {dataset or 'this dataset'})"


def resolve_groups(groups: list[list[int]] | None, n_groups: int, num_classes: int) -> list[list[int]]:
    if groups is None:
        if n_groups > num_classes:
            raise ValueError(f"mos: n_groups {n_groups} exceeds the {num_classes} in-distribution classes")
        return [chunk.tolist() for chunk in np.array_split(np.arange(num_classes), n_groups)]
    flat = sorted(c for g in groups for c in g)
    if flat != list(range(num_classes)) or any(not g for g in groups):
        raise ValueError(f"mos: groups {groups} must split the classes 0..{num_classes - 1}, each exactly once")
    return [list(g) for g in groups]


class GroupLayout:
    """Logit layout: group g occupies a slice [others, its classes...] (OpenOOD get_group_slices)."""

    def __init__(self, groups: list[list[int]]):
        self.groups = groups
        self.slices, start = [], 0
        for g in groups:
            self.slices.append((start, start + len(g) + 1))
            start += len(g) + 1
        self.num_logits = start
        self.num_classes = sum(len(g) for g in groups)
        self.group_of = np.zeros(self.num_classes, np.int64)
        self.pos_in_group = np.zeros(self.num_classes, np.int64)
        for gi, g in enumerate(groups):
            for pos, c in enumerate(g):
                self.group_of[c], self.pos_in_group[c] = gi, pos

    def labels(self, y: torch.Tensor) -> torch.Tensor:
        """B×G group labels: class position + 1 in its own group, 0 ("others") elsewhere."""
        gof = torch.as_tensor(self.group_of, device=y.device)[y]
        pos = torch.as_tensor(self.pos_in_group, device=y.device)[y]
        out = torch.zeros(len(y), len(self.groups), dtype=torch.long, device=y.device)
        out[torch.arange(len(y), device=y.device), gof] = pos + 1
        return out

    def loss(self, logits: torch.Tensor, group_labels: torch.Tensor) -> torch.Tensor:
        """Σ_g CE(group logits, group label) (Eq. 1, ``calc_group_softmax_loss``)."""
        return sum(F.cross_entropy(logits[:, a:b], group_labels[:, i]) for i, (a, b) in enumerate(self.slices))

    def others_and_pred(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(min_k p_others^k, predicted class) per sample (Eqs. 2-4)."""
        others, best_p, best_c = [], [], []
        for gi, (a, b) in enumerate(self.slices):
            p = torch.softmax(logits[:, a:b], dim=1)
            others.append(p[:, 0])
            pm, idx = p[:, 1:].max(dim=1)
            best_p.append(pm)
            best_c.append(torch.as_tensor(self.groups[gi], device=logits.device)[idx])
        best_p, best_c = torch.stack(best_p, 1), torch.stack(best_c, 1)
        g = best_p.argmax(dim=1)
        return torch.stack(others, 1).min(dim=1).values, best_c[torch.arange(len(g)), g]


@register("mos")
class MOS(Method):
    """Group softmax with an "others" category per group (Huang & Li, CVPR 2021, Eqs. 1-4);
    score = minimum others-probability."""

    Params = MOSParams
    protocols = {"ood", "osr"}
    paper = "Huang & Li, MOS: Towards Scaling Out-of-distribution Detection for Large Semantic Space, CVPR 2021"
    reference = ("Jingkang50/OpenOOD@3c35632ee91b54b09d1f085d04f94744cece7d0b: "
                 "openood/trainers/mos_trainer.py, openood/postprocessors/mos_postprocessor.py, "
                 "configs/datasets/cifar10/cifar10_double_label.yml, configs/datasets/cifar100/cifar100_double_label.yml; "
                 "deeplearning-wisc/large_scale_ood@af75ddd3112e4f23a4f836509d05070842cdcf8c: finetune.py")

    def __init__(self, params: MOSParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.net = None
        self.data = None
        self.layout: GroupLayout | None = None
        self.source = None
        self.supports: list[int] | None = None
        self.mixup_alpha: float | None = None
        self.steps = 0
        self.select = None
        self.groups_source = None

    def _init_backbone(self, train: Split, net: nn.Module) -> str:
        p, ctx = self.params, self.ctx
        if p.init_weights:
            path = resolve_checkpoint(p.init_weights)
            ctx.weights_sha256 = sha256_file(path)
            if str(path).endswith(".npz"):
                if not isinstance(net, BiTResNet):
                    raise ValueError("mos: .npz init_weights are BiT weights; use arch bit_r50x1 / bit_r101x1")
                load_bit_npz(net, path)
            else:
                state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
                load_state(net, {**state, "fc.weight": net.fc.weight, "fc.bias": net.fc.bias}, f"init_weights {path}")
            return f"init_weights {path}"
        if p.init == "classifier":
            clf = shared_classifier(ctx, train, p, self.data, replay_curve=False)
            state = {k: v for k, v in clf.net.state_dict().items() if not k.startswith("fc.")}
            load_state(net, {**state, "fc.weight": net.fc.weight.detach(), "fc.bias": net.fc.bias.detach()},
                       "the shared classifier")
            return f"fine-tuned from the shared classifier ({clf.source})"
        return "scratch"

    def fit(self, train: Split) -> None:
        p, ctx = self.params, self.ctx
        self.data = data = train_data(p, train)
        groups, self.groups_source = choose_groups(p, train, data.num_classes)
        self.layout = layout = GroupLayout(groups)
        self.net = net = build_network(p.arch, layout.num_logits, p.width_scale, p.drop_rate, ctx.seed)
        if p.mos_checkpoint:
            path = resolve_checkpoint(p.mos_checkpoint)
            load_state(net, read_state_dict(path), f"mos_checkpoint {path}")
            ctx.weights_sha256 = sha256_file(path)
            self.source = f"mos_checkpoint {path}"
            net.to(ctx.device).eval()
            return
        start = self._init_backbone(train, net)
        net.to(ctx.device)
        n = data.n_fit
        self.supports = list(p.schedule_steps) if p.schedule_steps else bit_supports(n)
        self.mixup_alpha = p.mixup if p.mixup is not None else (0.1 if n >= 20_000 else 0.0)
        opt = sgd(net.parameters(), p, lr=p.ft_lr, momentum=p.ft_momentum, weight_decay=p.ft_weight_decay,
                  nesterov=False)
        rng = np.random.default_rng(ctx.seed + 3)
        g = torch.Generator(device=ctx.device).manual_seed(ctx.seed + 3)
        state = {"lam": float(rng.beta(self.mixup_alpha, self.mixup_alpha)) if self.mixup_alpha > 0 else 1.0}

        def step_fn(x, y, epoch, step):
            labels = layout.labels(y)
            if self.mixup_alpha > 0:
                lam = state["lam"]
                perm = torch.randperm(len(y), generator=g, device=x.device)
                logits = net(lam * x + (1 - lam) * x[perm] if p.mixup_inputs else x)
                loss = lam * layout.loss(logits, labels) + (1 - lam) * layout.loss(logits, labels[perm])
                state["lam"] = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            else:
                loss = layout.loss(net(x), labels)
            self.steps = step + 1
            return loss

        self.select = epoch_selector(p, data, (net,), lambda x: layout.others_and_pred(net(x))[1], ctx.device)
        run_training(data, step_fn, opt, epochs=p.ft_epochs, batch_size=p.ft_batch_size, augment=p.augment,
                     seed=ctx.seed, device=ctx.device, lr_at=lambda s: bit_lr(s, self.supports, p.ft_lr),
                     modules=(net,), on_epoch=ctx.log_epoch, select=self.select)
        self.source = start

    def score(self, test: Split) -> Scores:
        logits = predict_logits(self.net, self.data.inputs, test.images, self.params.eval_batch_size,
                                self.ctx.device).double()
        others, pred = self.layout.others_and_pred(logits)
        return Scores(image=others.numpy(), pred=pred.numpy())

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        out.update(describe_recipe(self.params, self.data, self.source,
                                   self.select.describe() if self.select else None),
                   groups_resolved=self.layout.groups if self.layout else None, groups_source=self.groups_source,
                   mixup_mode="images and targets (paper's finetune.py)" if self.params.mixup_inputs else
                              "targets only (OpenOOD mos_trainer.py)",
                   num_logits=self.layout.num_logits if self.layout else None,
                   schedule_steps_resolved=self.supports, mixup_resolved=self.mixup_alpha, ft_steps=self.steps,
                   ft_optimizer=f"SGD(lr={self.params.ft_lr}, momentum={self.params.ft_momentum}, "
                                f"weight_decay={self.params.ft_weight_decay}), BiT hyper-rule schedule",
                   score="min over groups of p_others")
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        if params.init == "classifier" and not params.init_weights and not params.mos_checkpoint:
            return classifier_affinity(params)
        return ()
