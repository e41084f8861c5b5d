"""DCAE: the deep convolutional autoencoder of Deep SVDD's pre-training, scored by reconstruction
error (Ruff et al., "Deep One-Class Classification", ICML 2018, Sec. 4.1 baseline "DCAE").

The autoencoder is the LeNet-type encoder of Deep SVDD plus a mirrored decoder
(``methods.deep_one_class.MnistLeNetAE`` / ``Cifar10LeNetAE``), trained with Adam on the mean over the batch
of the per-image summed squared error ``Σ_pixels (x̂ - x)²``; the anomaly score of a test image is
the same sum (official ``src/optim/ae_trainer.py``).

Shared pre-training: ``pretrain_dcae`` is what ``dsvdd`` uses to initialise its network. It trains
through the worker cache, ``ctx.cached(key, fn)``, with a key of (split.key, seed, network, the
pre-training recipe, the input preprocessing), and stores ``{"state_dict", "loss_curve"}``; a
``dsvdd`` cell and a ``dcae`` cell on the same split, class, seed and recipe therefore pre-train once.
The training itself is a pure function of the key: the network is initialised under a forked RNG
seeded with the cell's seed and mini-batches are drawn with a seeded ``torch.Generator``.

Defaults are the official README's (lukasruff/Deep-SVDD-PyTorch): Adam, lr 1e-4, batch 200;
``net: fmnist_lenet`` is Deep SAD's Fashion-MNIST autoencoder on [0, 1] inputs (see ``methods.dsvdd``);
MNIST LeNet: 150 epochs, lr ×0.1 at epoch 50, weight decay 0.5e-3; CIFAR-10 LeNet: 350 epochs,
milestone 250, weight decay 0.5e-6. Inputs: GCN-l1 then per-class min-max scaling
(``methods.deep_one_class.fit_normalizer``), at 28×28×1 (mnist_lenet) or 32×32×3 (cifar10_lenet).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from data.base import Split
from data.transforms import Transform, to_tensor
from methods.deep_one_class import DSVDD_NETS, Normalizer, fit_normalizer
from methods.base import (LearningRate, Method, MethodParams, NonFiniteLoss, RunContext, Scores, check_finite,
                          check_finite_weights, index_batches, register)

AE_DEFAULTS = {
    "mnist_lenet": {"ae_epochs": 150, "ae_milestones": [50], "ae_weight_decay": 0.5e-3},
    "cifar10_lenet": {"ae_epochs": 350, "ae_milestones": [250], "ae_weight_decay": 0.5e-6},
    # Deep-SAD-PyTorch README's LeNet example (its only command line): 150 epochs, milestone 50, 0.5e-3
    "fmnist_lenet": {"ae_epochs": 150, "ae_milestones": [50], "ae_weight_decay": 0.5e-3},
}
#: Input normalisation per net for ``input_norm: auto``: GCN-l1 + min-max (Deep SVDD, Sec. 4.1), or
#: none, the [0, 1] pixels of Deep SAD's Fashion-MNIST (Deep-SAD-PyTorch src/datasets/fmnist.py
#: lines 32-33: ``transforms.ToTensor()`` only).
AUTO_INPUT_NORM = {"mnist_lenet": "gcn_minmax", "cifar10_lenet": "gcn_minmax", "fmnist_lenet": "none"}
#: What a row's ``recipe`` says (which published recipe the net and inputs are).
RECIPES = {
    ("mnist_lenet", "gcn_minmax"): "Deep SVDD (ICML 2018) mnist_LeNet, GCN-l1 + min-max",
    ("cifar10_lenet", "gcn_minmax"): "Deep SVDD (ICML 2018) cifar10_LeNet, GCN-l1 + min-max",
    ("fmnist_lenet", "none"): "Deep SAD (ICLR 2020) fmnist_LeNet, [0, 1] inputs (no GCN)",
}


def recipe_label(net: str, norm: str, dataset: str | None) -> str:
    """The recipe a row used; on Fashion-MNIST it says that Deep SVDD has no official recipe."""
    label = RECIPES.get((net, norm), f"{net}, input normalisation {norm} (no published recipe)")
    if dataset == "fashion_mnist" and net == "mnist_lenet":
        label += " (the MNIST recipe: Deep SVDD has no official Fashion-MNIST recipe)"
    return label


class AEPretrainParams(MethodParams):
    """Network choice, input statistics and the DCAE recipe (shared by dcae and dsvdd).

    net: 'auto' picks mnist_lenet for one-channel images (Fashion-MNIST included: Deep SVDD
    published no Fashion-MNIST recipe) and cifar10_lenet for colour images; 'fmnist_lenet' is the
    authors' later Deep SAD Fashion-MNIST net. Images are resized to the net's input side (28 or
    32). input_norm: 'auto' = GCN-l1 + min-max for the Deep SVDD nets, none ([0, 1] pixels) for
    fmnist_lenet, as Deep SAD. stats: 'auto' uses the per-class min/max constants the split's
    dataset declares for its normal class (``Split.statistics``; the official ones for MNIST /
    Fashion-MNIST / CIFAR-10) at the geometry they hold at, else 'computed' from the normal
    training images after GCN.
    ae_epochs / ae_milestones / ae_weight_decay: None = the official value for the chosen net."""

    net: Literal["auto", "mnist_lenet", "cifar10_lenet", "fmnist_lenet"] = "auto"
    input_norm: Literal["auto", "gcn_minmax", "none"] = "auto"   # auto: AUTO_INPUT_NORM[net]
    stats: Literal["auto", "computed"] = "auto"
    ae_optimizer: Literal["adam", "amsgrad"] = "adam"
    ae_lr: LearningRate = 1e-4
    ae_epochs: int | None = None
    ae_milestones: list[int] | None = None
    ae_batch_size: int = 200
    ae_weight_decay: float | None = None


@dataclass(frozen=True)
class DCAERecipe:
    net: str
    optimizer: str
    lr: float
    epochs: int
    milestones: tuple[int, ...]
    batch_size: int
    weight_decay: float

    @classmethod
    def resolve(cls, p: AEPretrainParams, net: str) -> "DCAERecipe":
        d = AE_DEFAULTS[net]
        return cls(net=net, optimizer=p.ae_optimizer, lr=p.ae_lr,
                   epochs=p.ae_epochs if p.ae_epochs is not None else d["ae_epochs"],
                   milestones=tuple(p.ae_milestones if p.ae_milestones is not None else d["ae_milestones"]),
                   batch_size=p.ae_batch_size,
                   weight_decay=p.ae_weight_decay if p.ae_weight_decay is not None else d["ae_weight_decay"])


def resolve_lenet(net: str, images) -> str:
    """'auto' → mnist_lenet for one-channel images, cifar10_lenet for three channels."""
    if net != "auto":
        return net
    first = images[0] if len(images) else None
    channels = 1 if first is None or np.asarray(first).ndim == 2 else np.asarray(first).shape[-1]
    return "mnist_lenet" if channels == 1 else "cifar10_lenet"


def _raw_geometry(images) -> tuple[tuple[int, int], int]:
    first = np.asarray(images[0])
    return (int(first.shape[0]), int(first.shape[1])), (1 if first.ndim == 2 else int(first.shape[-1]))


@dataclass
class LeNetInputs:
    """The preprocessed inputs of a LeNet-type net and how they were made."""

    net: str
    transform: Transform
    normalizer: Normalizer

    def __call__(self, images) -> torch.Tensor:
        return self.normalizer(to_tensor(images, self.transform))

    def describe(self) -> dict:
        return {"image_size": self.transform.size, "channels": self.transform.channels,
                "resize": {"side": self.transform.resize, "mode": "bilinear (antialias)"},
                "normalisation": self.normalizer.describe()}

    def key(self) -> tuple:
        return (self.transform.resize, self.transform.channels) + self.normalizer.key()


def lenet_inputs(train: Split, net_param: str, stats: str,
                 input_norm: str = "auto") -> tuple[LeNetInputs, torch.Tensor]:
    """Resolve the net, fit its normaliser (GCN + min-max, or none) on the normal training images,
    and return it with the normalised normal training tensor."""
    net = resolve_lenet(net_param, train.images)
    cls = DSVDD_NETS[net][0]
    transform = Transform(resize=cls.in_size, channels=cls.in_channels, mean=None, std=None)
    raw = to_tensor(train.images, transform)
    normal = raw[torch.from_numpy(np.asarray(train.labels) == 0)]
    if len(normal) == 0:
        raise ValueError("the train split has no normal images (labels == 0)")
    hw, ch = _raw_geometry(train.images)
    kind = AUTO_INPUT_NORM[net] if input_norm == "auto" else input_norm
    normalizer = fit_normalizer(kind, normal, train, stats=stats, raw_hw=hw, raw_channels=ch)
    return LeNetInputs(net, transform, normalizer), normalizer(normal)


def seeded(seed: int, build):
    """Run ``build()`` (network construction) under a forked global RNG seeded with ``seed`` so
    the initial weights depend on the seed only, not on what ran before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def make_optimizer(params, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, amsgrad=(name == "amsgrad"))


def train_autoencoder(x: torch.Tensor, recipe: DCAERecipe, seed: int, device: str,
                      log=None) -> dict:
    """Train the DCAE (uncached). Returns {'state_dict' (CPU tensors), 'loss_curve'}.
    Raises NonFiniteLoss at the first NaN / infinite mini-batch loss."""
    ae = seeded(seed, lambda: DSVDD_NETS[recipe.net][1]()).to(device)
    opt = make_optimizer(ae.parameters(), recipe.optimizer, recipe.lr, recipe.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(recipe.milestones), gamma=0.1)
    g = torch.Generator().manual_seed(seed)
    curve = []
    ae.train()
    for epoch in range(1, recipe.epochs + 1):
        total, count = 0.0, 0
        for idx in index_batches(len(x), recipe.batch_size, g):
            xb = x[idx].to(device)
            opt.zero_grad(set_to_none=True)
            loss = ((ae(xb) - xb) ** 2).flatten(1).sum(1).mean()
            check_finite(loss.item(), epoch)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            count += len(idx)
        curve.append(check_finite(total / count, epoch))
        if log is not None:
            log.info("dcae pretraining epoch %d loss %.6f", epoch, curve[-1])
        sched.step()
    check_finite_weights(ae, recipe.epochs)
    return {"state_dict": {k: v.detach().cpu().clone() for k, v in ae.state_dict().items()},
            "loss_curve": curve}


def pretrain_key(split: Split, seed: int, recipe: DCAERecipe, inputs: LeNetInputs) -> tuple:
    return ("dcae-pretrain", split.key, int(seed), tuple(asdict(recipe).items()), inputs.key())


def pretrain_dcae(ctx: RunContext, split: Split, x: torch.Tensor, recipe: DCAERecipe,
                  inputs: LeNetInputs) -> dict:
    """The shared, cached DCAE pre-training (see the module docstring)."""
    return ctx.cached(pretrain_key(split, ctx.seed, recipe, inputs),
                      lambda: train_autoencoder(x, recipe, ctx.seed, ctx.device, ctx.log))


def recipe_affinity(p: AEPretrainParams) -> tuple:
    """What decides whether two cells can share a DCAE pre-training (beyond split and seed)."""
    return ("dcae", p.net, p.input_norm, p.stats, p.ae_optimizer, p.ae_lr, p.ae_epochs,
            tuple(p.ae_milestones) if p.ae_milestones is not None else None,
            p.ae_batch_size, p.ae_weight_decay)


@register("dcae")
class DCAE(Method):
    """Deep convolutional autoencoder baseline of Ruff et al. (ICML 2018): anomaly score =
    ``Σ_pixels (x̂ - x)²`` of the DCAE that Deep SVDD pre-trains (shared via the worker cache)."""

    Params = AEPretrainParams
    protocols = {"one_class"}
    paper = "Ruff et al., Deep One-Class Classification, ICML 2018 (DCAE baseline)"
    reference = ("lukasruff/Deep-SVDD-PyTorch@1901612d595e23675fb75c4ebb563dd0ffebc21e: src/optim/ae_trainer.py, "
                 "src/networks/mnist_LeNet.py, src/networks/cifar10_LeNet.py, src/datasets/preprocessing.py; "
                 "fmnist_lenet: lukasruff/Deep-SAD-PyTorch@2e7aca37412e7f09d42d48d9e722ddfb422c814a: "
                 "src/networks/fmnist_LeNet.py, src/datasets/fmnist.py")

    def __init__(self, params: AEPretrainParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.inputs: LeNetInputs | None = None
        self.recipe: DCAERecipe | None = None
        self.ae = None
        self.dataset: str | None = None

    def fit(self, train: Split) -> None:
        self.inputs, x = lenet_inputs(train, self.params.net, self.params.stats, self.params.input_norm)
        self.dataset = train.dataset or None
        self.transform = self.inputs.transform
        self.recipe = DCAERecipe.resolve(self.params, self.inputs.net)
        result = pretrain_dcae(self.ctx, train, x, self.recipe, self.inputs)
        for epoch, loss in enumerate(result["loss_curve"], start=1):
            self.ctx.log_epoch(epoch, loss)
        self.ae = DSVDD_NETS[self.recipe.net][1]().to(self.ctx.device)
        self.ae.load_state_dict(result["state_dict"])
        self.ae.eval()

    @torch.no_grad()
    def score(self, test: Split) -> Scores:
        x = self.inputs(test.images)
        out = []
        for start in range(0, len(x), 512):
            xb = x[start:start + 512].to(self.ctx.device)
            out.append(((self.ae(xb) - xb) ** 2).flatten(1).sum(1).cpu())
        scores = torch.cat(out) if out else torch.empty(0)
        if not bool(torch.isfinite(scores).all()):  # finite weights whose forward pass overflows
            raise NonFiniteLoss(self.recipe.epochs, "reconstruction errors of the trained autoencoder")
        return Scores(image=scores.numpy().astype(np.float64))

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        if self.recipe is not None:
            out.update(net=self.recipe.net, ae_epochs=self.recipe.epochs,
                       ae_milestones=list(self.recipe.milestones),
                       ae_weight_decay=self.recipe.weight_decay, ae_lr_gamma=0.1,
                       preprocessing=self.inputs.describe(),
                       recipe=recipe_label(self.recipe.net, self.inputs.normalizer.kind, self.dataset),
                       score="sum over pixels of squared reconstruction error")
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        return recipe_affinity(params)
