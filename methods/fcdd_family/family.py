"""``FCDDFamily``: the fit / score skeleton fcdd, fcdd_hsc and fcdd_ae share, with the online
supervisor's anomaly sources."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import ClassVar

import numpy as np
import torch

from data.base import OutlierExposure, Split
from data.transforms import Transform, resize_masks, to_tensor
from methods.deep_one_class import Normalizer, Reception, fcdd_reception, fit_normalizer, load_vgg11_bn_state
from methods.base import Method, RunContext, Scores, check_finite
from methods.fcdd_family.augment import augment, to_net_size
from methods.fcdd_family.confetti import CONFETTI_REF_SIDE, ConfettiSpec, confetti_noise, malform
from methods.fcdd_family.recipes import (AUGMENTATION, FAMILIES, NET_FAMILY, Setup, auto_fcdd_net, grey_luma,
                                         image_channels)


# --------------------------------------------------------------------------------------------
# The shared method skeleton
# --------------------------------------------------------------------------------------------

def _as_uint8_images(images):
    if isinstance(images, Split):
        return images.images
    return images


class FCDDFamily(Method):
    """fit / score skeleton; subclasses set ``objective`` and implement ``_build``, ``_losses``
    and ``_score_batch``."""

    objective: ClassVar[str] = ""
    NETS: ClassVar[tuple[str, ...]] = ("cnn28", "cnn28_w", "cnn32_s", "cnn32_lw3k", "vgg11_224")
    protocols = {"one_class"}

    def __init__(self, params, ctx: RunContext):
        super().__init__(params, ctx)
        if params.net != "auto" and params.net not in self.NETS:
            raise ValueError(f"net must be 'auto' or one of {', '.join(self.NETS)}; got {params.net!r}")
        self.setup: Setup | None = None
        self.normalizer: Normalizer | None = None
        self.net: torch.nn.Module | None = None
        self.reception: Reception | None = None
        self._oe_images = None
        self._oe_origin = None
        self._true_anomalies: list[Split] = []
        self._supervision: dict = {}
        if params.net != "auto":  # geometry known before fit: declare the input transform now
            family = FAMILIES[NET_FAMILY[self._fcdd_net_name(params.net)]]
            self.transform = Transform(resize=family["size"], channels=3, mean=None, std=None)

    # hooks ----------------------------------------------------------------------------------
    def set_outlier_exposure(self, images, name: str | None = None) -> None:
        """Outlier-exposure images (Split, N×H×W×C uint8 array or list), used instead of oe_dataset."""
        self._oe_images = _as_uint8_images(images)
        self._oe_origin = name or (images.key if isinstance(images, Split) else "set_outlier_exposure()")

    def set_true_anomalies(self, split: Split) -> None:
        """Labelled anomalies for anomaly_source 'semi' (its rows with label 1, masks if present)."""
        self._true_anomalies.append(split)

    # to implement ---------------------------------------------------------------------------
    def _fcdd_net_name(self, net: str) -> str:
        return net

    def _auto_net(self, images) -> str:
        return auto_fcdd_net(images)

    def _build(self, setup: Setup, pretrained_state: dict | None) -> torch.nn.Module:
        raise NotImplementedError

    def _losses(self, out, x, labels, gt) -> torch.Tensor:
        raise NotImplementedError

    def _score_batch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _anomaly_source(self, setup: Setup) -> str:
        """The params' anomaly source; 'auto' = the recipe's (oe at 28 / 32 px, confetti at 224 px)."""
        source = getattr(self.params, "anomaly_source", "none")
        return FAMILIES[setup.family]["anomaly_source"] if source == "auto" else source

    # resolution -----------------------------------------------------------------------------
    def _resolve(self, train: Split) -> Setup:
        p = self.params
        net = self._auto_net(train.images) if p.net == "auto" else p.net
        family = NET_FAMILY[self._fcdd_net_name(net)]
        d = FAMILIES[family]
        channels = 3 if family == "224" else image_channels(train.images)
        optimizer = d["optimizer"] if p.optimizer == "auto" else p.optimizer
        scheduler = d["scheduler"] if p.scheduler == "auto" else p.scheduler
        # fcdd DefaultConfig's lambda factor is 0.985 where a config sets none
        lr_decay = p.lr_decay if p.lr_decay is not None else (d["lr_decay"] or 0.985)
        milestones = list(p.milestones) if p.milestones is not None else list(d["milestones"])
        return Setup(net=net, family=family, size=d["size"], raw_size=d["raw_size"], channels=channels,
                     epochs=p.epochs if p.epochs is not None else d["epochs"],
                     lr=p.lr if p.lr is not None else d["lr"], optimizer=optimizer, scheduler=scheduler,
                     lr_decay=lr_decay, milestones=milestones, gamma=p.gamma,
                     weight_decay=p.weight_decay if p.weight_decay is not None else d["weight_decay"],
                     batch_size=p.batch_size if p.batch_size is not None else d["batch_size"],
                     gauss_std=p.gauss_std if p.gauss_std is not None else d["gauss_std"],
                     preprocessing=d["preprocessing"] if p.preprocessing == "auto" else p.preprocessing,
                     config=d["config"], enlarge=p.enlarge if p.enlarge is not None else d["enlarge"])

    def _raw(self, images, setup: Setup) -> torch.Tensor:
        return to_tensor(images, Transform(resize=setup.raw_size, channels=setup.channels, mean=None, std=None))

    def _oe_uint8(self, images, setup: Setup) -> torch.Tensor:
        """Outlier images at the raw size as uint8; colour ones for a grey net are resized, then
        greyed with the luma weights (fcdd outlier_exposure/cifar100.py:47-51: Resize, Grayscale)."""
        x = to_tensor(images, Transform(resize=setup.raw_size, channels=3, mean=None, std=None))
        if setup.channels == 1:
            x = grey_luma(x)
        return (x * 255).round().clamp(0, 255).to(torch.uint8)

    # data for the anomaly sources ------------------------------------------------------------
    def _oe_source(self, train: Split, setup: Setup) -> OutlierExposure | None:
        """Which outlier-exposure set the data side provides (``data.protocols.outlier_exposure_source``
        states the rule): the train split's (the grid's dataset entry names it), else the params'
        ``oe_dataset``, else the recipe's (CIFAR-100 at 28 / 32 px, none at 224 px)."""
        p = self.params
        entry = train.outlier_exposure
        if entry is not None:
            if (p.oe_dataset and p.oe_dataset != entry.name) or (p.oe_dataset_params and
                                                                 dict(p.oe_dataset_params) != dict(entry.params)):
                raise ValueError(f"the dataset entry's outlier_exposure ({entry.name} {dict(entry.params)}) and "
                                 f"params oe_dataset / oe_dataset_params ({p.oe_dataset} {p.oe_dataset_params}) "
                                 "disagree: name the outlier set in one place")
            return entry
        name = p.oe_dataset or FAMILIES[setup.family]["oe_dataset"]
        return OutlierExposure(name=name, params=dict(p.oe_dataset_params)) if name else None

    def _oe_pool(self, train: Split, setup: Setup, g: torch.Generator) -> torch.Tensor:
        p = self.params
        if self._oe_images is None:
            source = self._oe_source(train, setup)
            if source is None:
                raise ValueError("anomaly_source 'oe' needs an outlier set: outlier_exposure: {name: DATASET} "
                                 "on the grid's dataset entry, params oe_dataset: NAME (a registered dataset), "
                                 "or images passed with set_outlier_exposure() before fit")
            import data  # registers every dataset module
            if source.name not in data.DATASETS:
                raise NotImplementedError(
                    f"outlier exposure needs the dataset {source.name!r}, which is not registered in "
                    f"data/datasets (registered: {', '.join(sorted(data.DATASETS)) or 'none'}); add it there "
                    "or pass its images with FCDD.set_outlier_exposure(images) before fit")
            key = ("oe-images", source.name, json.dumps(dict(source.params), sort_keys=True),
                   setup.raw_size, setup.channels, "luma")
            pool = self.ctx.cached(key, lambda: self._oe_uint8(source.load().images, setup))
            origin = source.describe()
            self._supervision["oe_dataset"] = source.name
        else:
            pool = self._oe_uint8(self._oe_images, setup)
            origin = self._oe_origin
        if p.oe_limit is not None and p.oe_limit < len(pool):
            pool = pool[torch.randperm(len(pool), generator=g)[:p.oe_limit]]
        if len(pool) == 0:
            raise ValueError("the outlier-exposure set is empty")
        self._supervision.update(oe_origin=origin, oe_pool_size=len(pool))
        return pool

    def _true_pool(self, train: Split, setup: Setup, g: torch.Generator):
        sources = [train] + self._true_anomalies
        xs, masks, have_masks = [], [], True
        for s in sources:
            idx = np.flatnonzero(np.asarray(s.labels) == 1)
            if len(idx) == 0:
                continue
            imgs = s.images[idx] if isinstance(s.images, np.ndarray) else [s.images[i] for i in idx]
            xs.append(self._raw(imgs, setup))
            if s.masks is None:
                have_masks = False
            else:
                m = s.masks[idx] if isinstance(s.masks, np.ndarray) else [s.masks[i] for i in idx]
                masks.append(torch.from_numpy(resize_masks(m, setup.raw_size)).float()[:, None])
        if not xs:
            raise ValueError("anomaly_source 'semi' needs labelled anomalies: rows with label 1 in the train "
                             "split or a split passed with set_true_anomalies() before fit")
        x = torch.cat(xs)
        gt = torch.cat(masks) if (have_masks and masks) else None
        n = self.params.n_true_anomalies
        if n is not None and n < len(x):
            pick = torch.randperm(len(x), generator=g)[:n]
            x, gt = x[pick], (gt[pick] if gt is not None else None)
        self._supervision.update(n_true_anomalies=len(x), true_anomaly_masks=gt is not None)
        return x, gt

    # fit / score ----------------------------------------------------------------------------
    def fit(self, train: Split) -> None:
        p, ctx = self.params, self.ctx
        self.setup = setup = self._resolve(train)
        # the geometry of the maps (resize to image_size, no crop) for the orchestrator's masks
        self.transform = Transform(resize=setup.size, channels=setup.channels, mean=None, std=None)
        g = torch.Generator().manual_seed(ctx.seed)

        labels = np.asarray(train.labels)
        raw = self._raw(train.images, setup)
        normal = raw[torch.from_numpy(labels == 0)]
        if len(normal) == 0:
            raise ValueError("the train split has no normal images (labels == 0)")
        first = np.asarray(train.images[0])
        self.normalizer = fit_normalizer(setup.preprocessing, to_net_size(normal, setup.size), train,
                                         stats=p.stats, raw_hw=(first.shape[0], first.shape[1]),
                                         raw_channels=image_channels(train.images))

        source = self._anomaly_source(setup)
        self._supervision = {"anomaly_source": source}
        oe_pool = true_x = true_gt = None
        if source == "oe":
            oe_pool = self._oe_pool(train, setup, g)
        elif source == "semi":
            true_x, true_gt = self._true_pool(train, setup, g)
        elif source == "confetti":
            self._supervision["confetti"] = asdict(ConfettiSpec()) | {
                "scaled_to": f"{setup.raw_size}/{CONFETTI_REF_SIDE}", "mode": "malformed normal"}
        if source != "none":
            self._supervision["supervise_p"] = p.supervise_p
        use_gt = true_gt is not None and self.objective == "fcdd"

        pretrained_state = None
        if setup.family == "224" and p.pretrained:
            pretrained_state, sha = load_vgg11_bn_state(p.weights)
            ctx.weights_sha256 = sha
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            self.net = self._build(setup, pretrained_state).to(ctx.device)
        self.reception = fcdd_reception(self._fcdd_net_name(setup.net), setup.channels, setup.size)

        trainable = [q for q in self.net.parameters() if q.requires_grad]
        if setup.optimizer == "sgd":
            opt = torch.optim.SGD(trainable, lr=setup.lr, weight_decay=setup.weight_decay, momentum=0.9, nesterov=True)
        else:
            opt = torch.optim.Adam(trainable, lr=setup.lr, weight_decay=setup.weight_decay)
        if setup.scheduler == "lambda":
            decay = setup.lr_decay
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda ep: decay ** ep)
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=setup.milestones, gamma=setup.gamma)

        self.net.train()
        for epoch in range(1, setup.epochs + 1):
            total, count = 0.0, 0
            # the train set repeated ``enlarge`` times and shuffled (fcdd mvtec_base.py:90-91)
            perm = torch.randperm(len(normal) * setup.enlarge, generator=g) % len(normal)
            for start in range(0, len(perm), setup.batch_size):
                idx = perm[start:start + setup.batch_size]
                x = normal[idx].clone()
                y = torch.zeros(len(idx), dtype=torch.long)
                gt = torch.zeros(len(idx), 1, *x.shape[-2:]) if use_gt else None
                if source != "none":
                    rep = torch.rand(len(idx), generator=g) < p.supervise_p
                    k = int(rep.sum())
                    if k:
                        if source == "confetti":
                            noise = confetti_noise(k, x.shape[1], x.shape[2], x.shape[3], g)
                            x[rep] = malform(x[rep], noise)
                        elif source == "oe":
                            x[rep] = oe_pool[torch.randint(0, len(oe_pool), (k,), generator=g)].float() / 255
                        else:
                            j = torch.randint(0, len(true_x), (k,), generator=g)
                            x[rep] = true_x[j]
                            if use_gt:
                                gt[rep] = true_gt[j]
                        y[rep] = 1
                x, gt = augment(x, gt, setup.family, g, p.augment)
                x = self.normalizer(x).to(ctx.device)
                gt = gt.to(ctx.device) if gt is not None else None
                opt.zero_grad(set_to_none=True)
                out = self.net(x)
                loss = self._losses(out, x, y.to(ctx.device), gt).mean()
                check_finite(loss.item(), epoch)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                count += len(idx)
            ctx.log_epoch(epoch, total / max(count, 1))
            sched.step()
        self.net.eval()

    def score(self, test: Split) -> Scores:
        setup = self.setup
        raw = to_net_size(self._raw(test.images, setup), setup.size)
        images, maps = [], []
        self.net.eval()
        for start in range(0, len(raw), self.params.eval_batch_size):
            x = self.normalizer(raw[start:start + self.params.eval_batch_size]).to(self.ctx.device)
            s, m = self._score_batch(x)
            images.append(s.detach().cpu())
            maps.append(m.detach().cpu())
        image = torch.cat(images).numpy().astype(np.float64) if images else np.zeros(0)
        pixel = torch.cat(maps).numpy().astype(np.float32) if maps else np.zeros((0, setup.size, setup.size), np.float32)
        return Scores(image=image, pixel=pixel)

    def resolved_params(self) -> dict:
        out = self.params.model_dump(mode="json")
        if self.setup is None:
            return out
        out.update(self.setup.describe())
        if "enlarge" not in self.setup.describe():
            out.pop("enlarge", None)
        for k in (("milestones", "gamma") if self.setup.scheduler == "lambda" else ("lr_decay",)):
            if k not in self.setup.describe():
                out.pop(k, None)
        out["preprocessing"] = self.normalizer.describe() if self.normalizer else self.setup.preprocessing
        out["augmentation"] = AUGMENTATION[self.setup.family] if self.params.augment else (
            "none" if self.setup.family != "224" else "nearest resize 240 -> 224")
        out["raw_resize"] = {"side": self.setup.raw_size, "mode": "bilinear (antialias)"}
        out["reception"] = asdict(self.reception) if self.reception else None
        if self.setup.family != "224":
            for k in ("pretrained", "weights", "freeze"):
                out.pop(k, None)
        out.update(self._supervision)
        out["objective"] = self.objective
        return out

    @classmethod
    def affinity_key(cls, params) -> tuple:
        if isinstance(params, dict):
            params = cls.Params(**params)
        source = getattr(params, "anomaly_source", None)
        if source == "oe" or (source == "auto" and params.net != "vgg11_224"):
            # 'auto' is oe except on the 224 px recipe (a grouping hint: 'auto' nets may still be 224)
            return ("oe-images", params.oe_dataset or "cifar100")
        return ()
