"""Method contract and registry (timm-style ``@register`` + ``create``).

A method knows nothing of Ray, Parquet or metrics: it gets validated params and a ``RunContext``,
``fit``s on a train ``Split`` and ``score``s a test ``Split`` (higher = more anomalous).
Default hyper-parameters are the paper's; grids shrink them explicitly.
"""
from __future__ import annotations

import logging
import math
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from data.base import Split
from plugins.registry import Registry


class MethodParams(BaseModel):
    """Base for every method's parameter model: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


#: Every learning-rate parameter (``lr``, ``*_lr``): positive and finite, so NaN, inf, 0 or a
#: negative rate fails grid validation instead of every cell (tests/test_grid_config.py checks
#: that every registered method's learning rates use it).
LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN / infinite loss (or weights); the cell fails with this message."""

    def __init__(self, epoch: int, what: str = "loss"):
        super().__init__(f"non-finite {what} at epoch {epoch}: training diverged (learning rate too high?)")
        self.epoch = epoch


def check_finite(loss: float, epoch: int) -> float:
    if not math.isfinite(float(loss)):
        raise NonFiniteLoss(epoch)
    return float(loss)


def check_finite_weights(module, epoch: int) -> None:
    """After training: the last optimizer step can make the weights NaN / inf after a finite loss
    (a diverged learning rate), which would otherwise surface as NaN scores, not as divergence."""
    import torch

    if not all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point()):
        raise NonFiniteLoss(epoch, "weights")


def index_batches(n: int, batch_size: int, generator=None, *, drop_single: bool = False):
    """The one mini-batch helper: index tensors over ``n`` samples, ``batch_size`` at a time;
    shuffled by one ``torch.randperm`` with ``generator`` (a seeded ``torch.Generator``), in order
    without one. ``drop_single``: drop a last batch of one sample (training BatchNorm needs two)
    unless ``n`` is 1."""
    import torch

    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if not drop_single or len(idx) >= 2 or n == 1:
            yield idx


@dataclass
class Scores:
    """image: N floats; pixel: optional N×h×w maps; pred: optional N predicted class ids."""

    image: np.ndarray
    pixel: np.ndarray | None = None
    pred: np.ndarray | None = None


def nbytes_of(value: Any) -> int:
    """Best-effort size of a cached value (arrays, tensors, and containers of them)."""
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if hasattr(value, "element_size") and hasattr(value, "nelement"):
        return int(value.element_size() * value.nelement())
    if isinstance(value, dict):
        return sum(nbytes_of(v) for v in value.values()) + 64
    if isinstance(value, (list, tuple)):
        return sum(nbytes_of(v) for v in value) + 64
    if hasattr(value, "state_dict"):
        return nbytes_of(value.state_dict())
    return sys.getsizeof(value)


class ArtifactCache:
    """LRU cache with a byte budget for seed-independent artefacts (features, classifiers...).

    ``get_or_compute(key, fn)`` returns ``(value, hit)``. A budget of 0 disables caching.
    """

    def __init__(self, budget_bytes: int = 4 << 30):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def __contains__(self, key) -> bool:
        return key in self._entries

    def get(self, key, default=None):
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key][0]
        return default

    def put(self, key, value) -> None:
        if self.budget_bytes <= 0:
            return
        size = nbytes_of(value)
        if size > self.budget_bytes:
            return
        self._entries.pop(key, None)
        self._entries[key] = (value, size)
        while self.used_bytes > self.budget_bytes:
            self._entries.popitem(last=False)

    def get_or_compute(self, key, fn: Callable[[], Any]) -> tuple[Any, bool]:
        if key in self._entries:
            self.hits += 1
            return self.get(key), True
        self.misses += 1
        value = fn()
        self.put(key, value)
        return value, False

    def keys(self):
        return list(self._entries)


@dataclass
class RunContext:
    """What the orchestrator gives a method: device, seed, cache, logger, and a place to report.

    Methods append to ``loss_curve`` (one float per epoch), set ``cache_hit`` when a cached
    artefact served them, and record ``weights_sha256`` of any pretrained file they load.
    """

    device: str = "cpu"
    seed: int = 0
    cache: ArtifactCache = field(default_factory=lambda: ArtifactCache(0))
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("adgrid.method"))
    loss_curve: list[float] = field(default_factory=list)
    cache_hit: bool | None = None
    weights_sha256: str | None = None

    def cached(self, key, fn: Callable[[], Any]) -> Any:
        value, hit = self.cache.get_or_compute(key, fn)
        self.cache_hit = hit if self.cache_hit is None else (self.cache_hit and hit)
        return value

    def log_epoch(self, epoch: int, loss: float) -> None:
        """Record one epoch's mean loss; raises NonFiniteLoss for NaN / inf."""
        check_finite(loss, epoch)
        self.loss_curve.append(float(loss))
        self.log.info("epoch %d loss %.6f", epoch, loss)


class Method:
    """Base class of every method. Subclasses set ``Params`` and ``protocols``."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    protocols: ClassVar[set[str]] = {"one_class"}
    paper: ClassVar[str] = ""
    # The code whose behaviour the defaults follow: "owner/repo@commit: file, file" (what
    # ``bench.py list`` prints); empty where the method follows the paper alone.
    reference: ClassVar[str] = ""
    # The input transform (data.transforms.Transform) a method applies, set in __init__ by methods
    # with pixel maps: the orchestrator maps ground-truth masks through the same resize and
    # centre crop, so masks and maps are aligned.
    transform = None
    # How the orchestrator resizes ground-truth masks to the maps (data.transforms.MASK_RESIZE_RULES):
    # PIL's NEAREST unless a method's reference code thresholds a bilinear resize.
    mask_resize: str = "nearest"

    def __init__(self, params: MethodParams, ctx: RunContext):
        self.params = params
        self.ctx = ctx

    def fit(self, train: Split) -> None:
        raise NotImplementedError

    def score(self, test: Split) -> Scores:
        raise NotImplementedError

    def resolved_params(self) -> dict:
        """Every hyper-parameter after defaults (image size, normalisation, epochs...)."""
        return self.params.model_dump(mode="json")

    @classmethod
    def affinity_key(cls, params: MethodParams) -> tuple:
        """What, beyond the data split, decides whether cells can share cached artefacts.

        The runner sends cells with equal (split, affinity_key) to the same worker.
        Frozen-feature methods return e.g. ("features", backbone, image_size).
        """
        return ()


#: Every method, built-in or plugin: name -> class, with each entry's source (plugins/registry.py).
METHODS: Registry = Registry("method")


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """``@register("name")``: add a Method subclass to ``METHODS`` (built-ins and plugins alike)."""
    return METHODS.register(name)


def create(name: str, params: dict | None, ctx: RunContext) -> Method:
    return METHODS.create(name, params, ctx)
