"""The classifier recipe: params, input pipeline, OpenOOD's training loop and checkpoint rule."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from data.base import Split
from data.datasets.cifar10 import CIFAR10
from data.datasets.cifar100 import CIFAR100
from data.transforms import Transform, to_tensor
from methods.base import LearningRate, MethodParams, check_finite, index_batches
from methods.classifier.checkpoints import cpu_state
from methods.classifier.nets import build_network


log = logging.getLogger("adgrid.classifier")


# ---------------------------------------------------------------------------------------------
# constants

#: OpenOOD v1.5 ``normalization_dict`` (openood/preprocessors/transform.py); "half" is its fallback.
NORMALIZATION = {
    "cifar10": (CIFAR10.statistics.mean, CIFAR10.statistics.std),
    "cifar100": (CIFAR100.statistics.mean, CIFAR100.statistics.std),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
CROP_PADDING = 4


# ---------------------------------------------------------------------------------------------
# params

class ClassifierParams(MethodParams):
    """The classifier recipe (OpenOOD v1.5 CIFAR defaults; see the module docstring)."""

    arch: Literal["resnet18_32x32", "wrn40_2", "bit_r50x1", "bit_r101x1"] = "resnet18_32x32"
    width_scale: float = Field(1.0, gt=0, le=4)
    drop_rate: float | None = Field(None, ge=0, lt=1)   # None: the architecture's (WRN 0.3, else 0)
    image_size: int = Field(32, ge=8, le=512)
    normalization: Literal["auto", "cifar10", "cifar100", "imagenet", "half"] = "auto"
    augment: Literal["crop_flip", "crop", "flip", "none"] = "crop_flip"
    epochs: int = Field(100, ge=0)
    batch_size: int = Field(128, ge=2)
    lr: LearningRate = 0.1
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    lr_min: float = Field(1e-6, ge=0, allow_inf_nan=False)
    eval_batch_size: int = Field(200, ge=1)
    checkpoint: str | None = None    # a trained model: loaded instead of training (sha256 recorded)
    #: which epoch's weights training keeps: "best" = highest accuracy on a held-out part of the train
    #: split (OpenOOD's base_recorder.py; its released and evaluated files are best.ckpt), "last" = the
    #: final epoch. A loaded ``checkpoint`` records the rule as given (OpenOOD's files: best).
    checkpoint_rule: Literal["best", "last"] = "best"
    checkpoint_val_fraction: float = Field(0.02, gt=0, lt=1)   # held-out share of each class ("best")

    @model_validator(mode="after")
    def _check(self):
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


RECIPE_FIELDS = ("arch", "width_scale", "drop_rate", "image_size", "normalization", "augment", "epochs",
                 "batch_size", "lr", "momentum", "nesterov", "weight_decay", "lr_min", "checkpoint",
                 "checkpoint_rule", "checkpoint_val_fraction")


def recipe_key(p: ClassifierParams) -> tuple:
    """Every field that decides the shared classifier (not the post-hoc method's own params)."""
    values = []
    for name in RECIPE_FIELDS:
        v = getattr(p, name)
        values.append(str(Path(v).expanduser().resolve()) if name == "checkpoint" and v else v)
    return tuple(values)


def classifier_affinity(params) -> tuple:
    """Affinity key of a method that uses the shared classifier: equal recipes, equal keys."""
    return ("classifier",) + recipe_key(params)


def recipe_dict(p: ClassifierParams) -> dict:
    return {name: getattr(p, name) for name in RECIPE_FIELDS}


# ---------------------------------------------------------------------------------------------
# inputs

@dataclass(frozen=True)
class Inputs:
    """Images -> uint8 N×3×S×S tensors (cached form), and normalisation applied per batch."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def prepare(self, images) -> torch.Tensor:
        """uint8 N×3×S×S (grey repeated to three channels, bilinear resize when sizes differ)."""
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (3, 4) \
                and images.shape[1] == self.image_size and images.shape[2] == self.image_size:
            arr = images if images.ndim == 4 else images[..., None]
            arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr)
            x = torch.from_numpy(arr).permute(0, 3, 1, 2)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            return x.contiguous()
        t = to_tensor(images, Transform(resize=self.image_size, channels=3, mean=None, std=None))
        return (t.clamp(0, 1) * 255).round().to(torch.uint8)

    def normalize(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = x_u8.float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def describe(self) -> dict:
        return {"image_size": self.image_size, "channels": 3, "resize": "bilinear (antialiased) when sizes differ",
                "mean": list(self.mean), "std": list(self.std), "normalization_source": self.source}


def make_inputs(p: ClassifierParams, split: Split) -> Inputs:
    """The input pipeline; ``normalization: auto`` = the mean / std the split's dataset declares
    (``Split.statistics``: OpenOOD's for CIFAR-10 / CIFAR-100), else OpenOOD's 0.5 / 0.5 fallback."""
    kind = p.normalization
    declared = split.statistics
    if kind == "auto" and declared.mean:
        mean, std = _three_channels(declared.mean), _three_channels(declared.std)
        return Inputs(p.image_size, mean, std, f"auto: {declared.source or f'declared by {split.dataset}'}")
    if kind == "auto":
        kind, source = "half", "auto: OpenOOD normalization_dict['half'] (OpenOOD's fallback for other datasets)"
    else:
        source = f"normalization_dict[{kind!r}]"
    mean, std = NORMALIZATION[kind]
    return Inputs(p.image_size, mean, std, source)


def _three_channels(values: tuple[float, ...]) -> tuple[float, ...]:
    """Declared per-channel values for the classifier's three input channels (grey repeated)."""
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise ValueError(f"declared mean / std have {len(values)} channels; the classifier takes 1 or 3")
    return values


def augment_batch(x: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """OpenOOD's training transform on a float batch in [0, 1]: RandomHorizontalFlip (p 0.5) and
    RandomCrop(size, padding=4) with zero padding, per sample."""
    if kind == "none":
        return x
    n, _, h, w = x.shape
    if kind in ("crop_flip", "flip"):
        flip = torch.rand(n, generator=g) < 0.5
        if flip.any():
            x = x.clone()
            x[flip.to(x.device)] = x[flip.to(x.device)].flip(-1)
    if kind in ("crop_flip", "crop"):
        pad = CROP_PADDING
        padded = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
        x = torch.stack([padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)])
    return x


# ---------------------------------------------------------------------------------------------
# training

def steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)


def cosine_factor(step: int, total: int, lr: float, lr_min: float) -> float:
    """OpenOOD's ``cosine_annealing(step, total, 1, lr_min / lr)``: the LambdaLR multiplier."""
    lo = lr_min / lr
    return lo + (1 - lo) * 0.5 * (1 + math.cos(step / max(total, 1) * math.pi))


def sgd(parameters, p, lr: float | None = None, momentum: float | None = None,
        weight_decay: float | None = None, nesterov: bool | None = None) -> torch.optim.SGD:
    momentum = p.momentum if momentum is None else momentum
    nesterov = p.nesterov if nesterov is None else nesterov
    return torch.optim.SGD(list(parameters), lr=p.lr if lr is None else lr, momentum=momentum,
                           weight_decay=p.weight_decay if weight_decay is None else weight_decay,
                           nesterov=bool(nesterov and momentum > 0))


@dataclass
class TrainData:
    x: torch.Tensor          # uint8 N×3×S×S (CPU)
    y: torch.Tensor          # int64 N (CPU)
    num_classes: int
    inputs: Inputs
    fit_idx: torch.Tensor | None = None   # the indices trained on (None: all)
    val_idx: torch.Tensor | None = None   # held out to choose the epoch (checkpoint_rule "best")

    @property
    def n_fit(self) -> int:
        return len(self.y) if self.fit_idx is None else len(self.fit_idx)


VALIDATION_SEED = 0   # the held-out images do not depend on the run's seed (OpenOOD's val list is fixed)


def holdout_indices(y: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): ``round(fraction · n_c)`` images of each class c (at least
    one when the class has two or more), chosen by a fixed-seed permutation; both sorted."""
    rng = np.random.default_rng(VALIDATION_SEED)
    val = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = max(1, int(round(fraction * len(members)))) if len(members) >= 2 else 0
        val.append(rng.permutation(members)[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    keep = np.ones(len(y), bool)
    keep[val_idx] = False
    return np.flatnonzero(keep), val_idx


def train_data(p: ClassifierParams, train: Split) -> TrainData:
    inputs = make_inputs(p, train)
    y = torch.as_tensor(np.asarray(train.targets), dtype=torch.int64)
    if (y < 0).any():
        raise ValueError("the classifier's train split holds samples without a class (target -1)")
    num_classes = len(train.class_names)
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least two in-distribution classes, got {num_classes}")
    if int(y.max()) >= num_classes:
        raise ValueError(f"train targets reach {int(y.max())} but there are {num_classes} class names")
    data = TrainData(inputs.prepare(train.images), y, num_classes, inputs)
    if p.checkpoint_rule == "best":
        fit_idx, val_idx = holdout_indices(y.numpy(), p.checkpoint_val_fraction)
        data.fit_idx, data.val_idx = torch.from_numpy(fit_idx), torch.from_numpy(val_idx)
    return data


class BestEpoch:
    """OpenOOD's checkpoint rule (``openood/recorders/base_recorder.py`` ``save_model``: after each
    epoch the accuracy on the validation split, ``if acc >= best_acc`` — ties go to the later epoch —
    the weights become best.ckpt; ``scripts/eval_ood.py`` evaluates best.ckpt). Here the validation
    split is ``TrainData.val_idx``; ``predict(x) -> class`` is the method's own prediction (MOS: the
    group-softmax class, as its evaluator); ``restore`` loads the best epoch's weights."""

    def __init__(self, data: TrainData, modules: tuple[nn.Module, ...], predict: Callable[[torch.Tensor], torch.Tensor],
                 device: str, batch_size: int = 200):
        self.data, self.modules, self.predict = data, modules, predict
        self.device, self.batch_size = device, batch_size
        self.best_acc, self.best_epoch, self.state = 0.0, None, None
        self.accuracies: list[float] = []

    @torch.no_grad()
    def accuracy(self) -> float:
        idx = self.data.val_idx
        if idx is None or len(idx) == 0:
            return 0.0
        for m in self.modules:
            m.eval()
        correct = 0
        for s in range(0, len(idx), self.batch_size):
            b = idx[s:s + self.batch_size]
            x = self.data.inputs.normalize(self.data.x[b].to(self.device))
            correct += int((self.predict(x).cpu() == self.data.y[b]).sum())
        for m in self.modules:
            m.train()
        return correct / len(idx)

    def update(self, epoch: int) -> None:
        acc = self.accuracy()
        self.accuracies.append(acc)
        if acc >= self.best_acc:
            self.best_acc, self.best_epoch = acc, epoch
            self.state = [cpu_state(m) for m in self.modules]

    def restore(self) -> None:
        if self.state is not None:
            for m, state in zip(self.modules, self.state):
                m.load_state_dict(state)

    def describe(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_val_acc": self.best_acc if self.best_epoch else None,
                "val_acc_curve": [round(a, 6) for a in self.accuracies]}


def epoch_selector(p: ClassifierParams, data: TrainData | None, modules: tuple[nn.Module, ...],
              predict: Callable[[torch.Tensor], torch.Tensor], device: str) -> BestEpoch | None:
    """The epoch chooser of ``p.checkpoint_rule`` (None for "last")."""
    if p.checkpoint_rule != "best" or data is None:
        return None
    return BestEpoch(data, modules, predict, device, p.eval_batch_size)


def argmax_of(net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: net(x).argmax(dim=1)


StepFn = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]


def run_training(data: TrainData, step_fn: StepFn, optimizer: torch.optim.Optimizer, *, epochs: int,
                 batch_size: int, augment: str, seed: int, device: str,
                 lr_at: Callable[[int], float | None], on_epoch: Callable[[int, float], None] | None = None,
                 modules: tuple[nn.Module, ...] = (), select: BestEpoch | None = None) -> list[float]:
    """The training loop shared by every classifier here.

    ``step_fn(x, y, epoch, step) -> loss`` (x normalised, on ``device``; epoch from 0) computes the
    loss of one batch; this loop sets the learning rate ``lr_at(step)`` before each step (None
    stops training), back-propagates, steps, and returns the per-epoch mean losses. A NaN / inf
    batch loss raises NonFiniteLoss at once. Batches are drawn from ``data.fit_idx`` (the held-out
    validation images are never trained on); with ``select`` each epoch is validated and the best
    epoch's weights are restored at the end (``checkpoint_rule: best``).
    """
    g = torch.Generator().manual_seed(seed)
    for m in modules:
        m.train()
    curve: list[float] = []
    step = 0
    stop = False
    for epoch in range(epochs):
        total, count = 0.0, 0
        for idx in index_batches(data.n_fit, batch_size, g, drop_single=True):
            if data.fit_idx is not None:
                idx = data.fit_idx[idx]
            lr = lr_at(step)
            if lr is None:
                stop = True
                break
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            xb = augment_batch(data.x[idx].float().div_(255.0), augment, g)
            mean = torch.tensor(data.inputs.mean).view(1, -1, 1, 1)
            std = torch.tensor(data.inputs.std).view(1, -1, 1, 1)
            xb = ((xb - mean) / std).to(device, non_blocking=True)
            yb = data.y[idx].to(device, non_blocking=True)
            loss = step_fn(xb, yb, epoch, step)
            value = float(loss.detach())
            check_finite(value, epoch + 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total += value * len(idx)
            count += len(idx)
        if count:
            curve.append(total / count)
            if on_epoch is not None:
                on_epoch(epoch + 1, curve[-1])
            if select is not None:
                select.update(epoch + 1)
        if stop:
            break
    if select is not None:
        select.restore()
    for m in modules:
        m.eval()
    return curve


def cosine_schedule(p, total_steps: int) -> Callable[[int], float]:
    return lambda step: p.lr * cosine_factor(step, total_steps, p.lr, p.lr_min)


def train_cross_entropy(data: TrainData, p: ClassifierParams, seed: int, device: str,
                        log_: logging.Logger | None = None) -> dict:
    """The plain cross-entropy classifier (OpenOOD's BaseTrainer). Returns {'state_dict' (CPU),
    'loss_curve'}."""
    net = build_network(p.arch, data.num_classes, p.width_scale, p.drop_rate, seed).to(device)
    opt = sgd(net.parameters(), p)
    total = p.epochs * steps_per_epoch(data.n_fit, p.batch_size)
    logger = log_ or log
    select = epoch_selector(p, data, (net,), argmax_of(net), device)

    def step_fn(x, y, epoch, step):
        return F.cross_entropy(net(x), y)

    curve = run_training(data, step_fn, opt, epochs=p.epochs, batch_size=p.batch_size, augment=p.augment,
                         seed=seed, device=device, lr_at=cosine_schedule(p, total), modules=(net,),
                         on_epoch=lambda e, l: logger.info("classifier epoch %d loss %.5f", e, l), select=select)
    return {"state_dict": cpu_state(net), "loss_curve": curve,
            "selection": select.describe() if select else None}
