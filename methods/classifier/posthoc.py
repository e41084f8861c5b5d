"""The shared classifier (trained or loaded once per split, recipe and seed through the worker
cache) and the base class of the post-hoc methods that use it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from data.base import Split
from methods.base import Method, RunContext
from methods.classifier.checkpoints import (cpu_state, load_state, read_state_dict, resolve_checkpoint,
                                            sha256_file)
from methods.classifier.nets import build_network, resolved_drop_rate
from methods.classifier.training import (VALIDATION_SEED, ClassifierParams, Inputs, TrainData, classifier_affinity,
                                         recipe_key, steps_per_epoch, train_cross_entropy, train_data)


# ---------------------------------------------------------------------------------------------
# the shared classifier

@dataclass
class Classifier:
    """A trained classifier ready to score: network (eval mode, on the device) and its inputs."""

    net: nn.Module
    inputs: Inputs
    num_classes: int
    key: tuple
    loss_curve: list[float] = field(default_factory=list)
    source: str = "trained"
    sha256: str | None = None
    eval_batch_size: int = 200
    device: str = "cpu"
    selection: dict | None = None    # BestEpoch.describe() of its training ("best"), else None

    @torch.no_grad()
    def outputs(self, images) -> dict:
        """{'logits': N×K, 'features': N×D} float32 numpy arrays (penultimate features)."""
        x = self.inputs.prepare(images)
        self.net.eval()
        logits, feats = [], []
        for start in range(0, len(x), self.eval_batch_size):
            xb = self.inputs.normalize(x[start:start + self.eval_batch_size].to(self.device))
            f = self.net.forward_features(xb)
            logits.append(self.net.fc(f).float().cpu())
            feats.append(f.float().cpu())
        if not logits:
            k = self.num_classes
            return {"logits": np.zeros((0, k), np.float32), "features": np.zeros((0, 0), np.float32)}
        return {"logits": torch.cat(logits).numpy(), "features": torch.cat(feats).numpy()}


def _load_or_train(p: ClassifierParams, train: Split, data: TrainData, ctx: RunContext) -> dict:
    if p.checkpoint:
        path = resolve_checkpoint(p.checkpoint)
        state = read_state_dict(path)
        net = build_network(p.arch, data.num_classes, p.width_scale, p.drop_rate)
        load_state(net, state, f"checkpoint {path}")
        return {"state_dict": cpu_state(net), "loss_curve": [], "source": f"checkpoint {path}",
                "sha256": sha256_file(path), "selection": None}
    out = train_cross_entropy(data, p, ctx.seed, ctx.device, ctx.log)
    out.update(source="trained", sha256=None)
    return out


def shared_classifier(ctx: RunContext, train: Split, p: ClassifierParams,
                      data: TrainData | None = None, replay_curve: bool = True) -> Classifier:
    """The cross-entropy classifier of (train split, recipe, seed) — or of a checkpoint file — from
    the worker cache, trained or loaded on a miss. Its loss curve is replayed into the row (so
    every post-hoc row shows the curve of the classifier it used); ``ctx.weights_sha256`` is set
    for a checkpoint."""
    data = data or train_data(p, train)
    seed_part = ("checkpoint",) if p.checkpoint else ("seed", ctx.seed)
    key = ("classifier", train.key, data.num_classes) + recipe_key(p) + seed_part
    value = ctx.cached(key, lambda: _load_or_train(p, train, data, ctx))
    net = build_network(p.arch, data.num_classes, p.width_scale, p.drop_rate)
    net.load_state_dict(value["state_dict"])
    net.to(ctx.device).eval()
    if replay_curve:
        for epoch, loss in enumerate(value["loss_curve"], start=1):
            ctx.log_epoch(epoch, loss)
    if value.get("sha256"):
        ctx.weights_sha256 = value["sha256"]
    return Classifier(net=net, inputs=data.inputs, num_classes=data.num_classes, key=key,
                      loss_curve=list(value["loss_curve"]), source=value["source"], sha256=value.get("sha256"),
                      eval_batch_size=p.eval_batch_size, device=ctx.device, selection=value.get("selection"))


def classifier_outputs(ctx: RunContext, clf: Classifier, split: Split) -> dict:
    """Logits and penultimate features of ``split`` under the shared classifier, cached per
    (classifier, split) so MSP and OpenMax run the network once per split. It goes
    to the cache directly, not through ``ctx.cached``: a row's ``feature_cache_hit`` says whether
    the classifier itself came from the cache."""
    value, _ = ctx.cache.get_or_compute(("classifier_outputs", clf.key, split.key), lambda: clf.outputs(split.images))
    return value


def own_checkpoint(ctx: RunContext, p: ClassifierParams, net: nn.Module) -> str | None:
    """Load ``p.checkpoint`` into a method's own network (conf_branch, vos, mos) when given;
    returns the source string, None when there is nothing to load."""
    if not p.checkpoint:
        return None
    path = resolve_checkpoint(p.checkpoint)
    load_state(net, read_state_dict(path), f"checkpoint {path}")
    ctx.weights_sha256 = sha256_file(path)
    return f"checkpoint {path}"


def describe_validation(p: ClassifierParams, data: TrainData | None) -> str:
    """The validation split behind ``checkpoint_rule`` (stated in every row)."""
    if p.checkpoint_rule == "last":
        return "none (the last epoch is kept)"
    n = "" if data is None or data.val_idx is None else f": {len(data.val_idx)} images"
    return (f"held out from the train split, round({p.checkpoint_val_fraction} x class size) images per class "
            f"(fixed seed {VALIDATION_SEED}, never trained on){n}; OpenOOD validates on its ID val imglist "
            f"(benchmark_imglist/<dataset>/val_<dataset>.txt, configs/datasets/cifar10/cifar10.yml), "
            f"which its repository does not ship")


def describe_recipe(p: ClassifierParams, data: TrainData | None, source: str | None,
                    selection: dict | None = None) -> dict:
    """The resolved classifier set-up for ``resolved_params``."""
    out = {"drop_rate": resolved_drop_rate(p.arch, p.drop_rate),
           "optimizer": f"SGD(momentum={p.momentum}, nesterov={p.nesterov}, weight_decay={p.weight_decay})",
           "lr_schedule": f"cosine per iteration from {p.lr} to {p.lr_min} (OpenOOD cosine_annealing)",
           "train_transform": {"crop_flip": "RandomHorizontalFlip + RandomCrop(size, padding=4)",
                               "crop": "RandomCrop(size, padding=4)", "flip": "RandomHorizontalFlip",
                               "none": "none"}[p.augment],
           "classifier_source": source, "checkpoint_rule": p.checkpoint_rule,
           "validation_split": describe_validation(p, data), **(selection or {})}
    if source is not None and source.startswith("checkpoint"):
        out["validation_split"] = "none here: the checkpoint file was trained elsewhere (checkpoint_rule as given)"
    if data is not None:
        out.update(num_classes=data.num_classes, n_train=int(data.n_fit),
                   n_val=0 if data.val_idx is None else int(len(data.val_idx)),
                   steps_per_epoch=steps_per_epoch(data.n_fit, p.batch_size), inputs=data.inputs.describe())
    return out


@torch.no_grad()
def predict_logits(net: nn.Module, inputs: Inputs, images, batch_size: int, device: str,
                   fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``fn`` (default: the network) over images in eval mode; concatenated CPU float output."""
    x = inputs.prepare(images)
    net.eval()
    fn = fn or net
    outs = [fn(inputs.normalize(x[s:s + batch_size].to(device))).float().cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def softmax_np(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class PostHocMethod(Method):
    """A score computed on the shared classifier, in the shape of OpenOOD's post-processors
    (``openood/postprocessors/base_postprocessor.py``: ``setup`` on the training data, then
    ``postprocess`` per batch). ``fit`` trains or loads the classifier once per (split, recipe, seed)
    through the worker cache, then calls ``setup``; subclasses implement ``setup`` (statistics of
    the training set, if any), ``score`` and ``describe`` (what their score is, for
    ``resolved_params``)."""

    Params = ClassifierParams
    protocols = {"ood", "osr"}

    def __init__(self, params: ClassifierParams, ctx: RunContext):
        super().__init__(params, ctx)
        self.clf: Classifier | None = None
        self.data: TrainData | None = None

    def fit(self, train: Split) -> None:
        self.data = train_data(self.params, train)
        self.clf = shared_classifier(self.ctx, train, self.params, self.data)
        self.setup(train)

    def setup(self, train: Split) -> None:
        """Statistics of the training set under ``self.clf`` (none for MSP)."""

    def logits(self, split: Split) -> np.ndarray:
        """The classifier's float64 logits of ``split`` (run once per split, shared in the cache)."""
        return classifier_outputs(self.ctx, self.clf, split)["logits"].astype(np.float64)

    def describe(self) -> dict:
        """The method's own resolved set-up beyond its params (its score, layers...)."""
        return {}

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        out.update(describe_recipe(self.params, self.data, self.clf.source if self.clf else None,
                                   self.clf.selection if self.clf else None), **self.describe())
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        return classifier_affinity(params)
