"""Dataset registry and the Split contract shared by data, methods and the orchestrator.

A *dataset* returns raw images (uint8, H×W×C with C = 1 or 3), integer class targets, class
names and, where it has them, pixel masks. Image size, normalisation and augmentation are the
method's business (see ``data.transforms``). A *protocol* (``data.protocols``) turns a dataset
into a train ``Split`` and one or more test ``Split``s with binary labels (1 = anomalous / OOD).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from plugins.registry import Registry


class DataError(ValueError):
    """Bad or missing data; the message says which file or class, and what to do."""


@dataclass(frozen=True)
class ClassStatistics:
    """Constants a published recipe computed on one normal class's training images, so that a
    method preprocesses that class as the recipe did. Per channel (one value = every channel).

    gcn_min / gcn_max: min and max over the class's images after global contrast normalisation
    with the l1 scale (Deep SVDD Sec. 4.1, FCDD's ``min_max_l1``); the GCN + min-max inputs of the
    deep one-class methods. mean / std: channel mean and std of the raw [0, 1] pixels (FCDD's
    CIFAR-10 preprocessing ``aug1``)."""

    gcn_min: tuple[float, ...] = ()
    gcn_max: tuple[float, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class Statistics:
    """The preprocessing statistics a dataset declares (``Dataset.statistics``); empty = none, and
    methods compute their own from the training images.

    mean / std:  channel mean / std of the [0, 1] pixels over the whole dataset, what a classifier
                 normalises with (OpenOOD's ``normalization_dict``); ``source`` says where they come from.
    per_class:   ``ClassStatistics`` by class name, used when a split's normal class is that one class.
    class_source: what the per-class constants are, as a row's preprocessing records it
                 ("official constants": transcribed from the recipe's code).
    side / channels: the raw image geometry the per-class constants hold at (None = any); images of
                 another size (a resized variant of the dataset) get computed statistics instead."""

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    source: str = ""
    per_class: Mapping[str, ClassStatistics] = field(default_factory=dict)
    class_source: str = "declared constants"
    side: int | None = None
    channels: int | None = None

    def __post_init__(self):
        if len(self.mean) != len(self.std):
            raise ValueError(f"Statistics: mean has {len(self.mean)} channels, std {len(self.std)}")
        if any(v <= 0 for v in self.std):
            raise ValueError(f"Statistics: std must be positive, got {self.std}")
        for name, c in self.per_class.items():
            if any(v <= 0 for v in c.std):
                raise ValueError(f"Statistics: class {name!r}: std must be positive, got {c.std}")
            if len(c.gcn_min) != len(c.gcn_max) or len(c.mean) != len(c.std):
                raise ValueError(f"Statistics: class {name!r} declares mismatched gcn_min/gcn_max or mean/std")
            if any(hi <= lo for lo, hi in zip(c.gcn_min, c.gcn_max)):
                raise ValueError(f"Statistics: class {name!r} has gcn_max <= gcn_min")

    def for_class(self, name: str) -> ClassStatistics | None:
        return self.per_class.get(name)

    def fits(self, side: tuple[int, int] | None, channels: int | None) -> bool:
        """Whether the per-class constants hold for raw images of ``side`` (h, w) and ``channels``."""
        return ((self.channels is None or self.channels == channels)
                and (self.side is None or side == (self.side, self.side)))


@dataclass(frozen=True)
class OutlierExposure:
    """Outlier-exposure images the data side provides (FCDD's outlier exposure): the train side of
    the registered dataset ``name`` with ``params``. ``load`` reads it through ``data.protocols``
    (memoized per process), so a method never loads a dataset itself."""

    name: str
    params: Mapping = field(default_factory=dict)

    def load(self) -> "Split":
        from data.protocols import outlier_exposure_split
        return outlier_exposure_split(self)

    def describe(self) -> str:
        return f"dataset {self.name} (train side)"


@dataclass
class Split:
    """One side (train or test) of a protocol, ready for a method.

    images:      N×H×W×C uint8 array (may be a np.memmap), or a list of H×W×C uint8 arrays when
                 sizes differ (e.g. the `unified` train split over MVTec categories).
    labels:      N int64, 0 = normal / in-distribution, 1 = anomalous / OOD.
    targets:     N int64, the original class index into ``class_names`` (for classifier methods:
                 the in-distribution class id; -1 for OOD samples from another dataset).
    class_names: names of the classes ``targets`` index.
    masks:       N×H×W uint8 {0,1} at each image's size, or None where the dataset has no masks.
    key:         a string that identifies the content exactly (dataset, its params, protocol,
                 class set, side, OOD set); the feature cache keys on it. Methods never parse it.

    What the split is, in typed fields (``data.protocols.make_splits`` fills them from the
    dataset's declarations; a split built by hand may leave them empty):

    dataset:        the registered dataset's name ("" = unknown).
    normal_classes: the normal / in-distribution / known class names of the cell.
    channels, size: channels and (height, width) of the images; size None when sizes differ.
    statistics:     the preprocessing statistics the dataset declares (``Statistics``).
    recipe_family:  the published benchmark whose recipes fit the dataset ("mnist", "cifar10",
                    "cifar_like", "mvtec"; None = none declared, methods decide by geometry).
    outlier_exposure: the outlier-exposure set the grid's dataset entry names, or None.
    """

    images: np.ndarray | list
    labels: np.ndarray
    targets: np.ndarray
    class_names: list[str]
    key: str
    masks: np.ndarray | list | None = None
    meta: dict = field(default_factory=dict)
    dataset: str = ""
    normal_classes: tuple[str, ...] = ()
    channels: int | None = None
    size: tuple[int, int] | None = None
    statistics: Statistics = field(default_factory=Statistics)
    recipe_family: str | None = None
    outlier_exposure: OutlierExposure | None = None

    def __post_init__(self):
        if (self.channels is None or self.size is None) and len(self.images):
            channels, size = image_geometry(self.images)
            self.channels = channels if self.channels is None else self.channels
            self.size = size if self.size is None else self.size
        self.normal_classes = tuple(self.normal_classes)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def normal_class(self) -> str | None:
        """The one normal class of a single-class split, else None (class sets, "all")."""
        return self.normal_classes[0] if len(self.normal_classes) == 1 else None


def image_geometry(images) -> tuple[int, tuple[int, int] | None]:
    """(channels, (height, width)) of uint8 images; the size is None when the images differ in size
    (channels are the first image's)."""
    if isinstance(images, np.ndarray):
        return (1 if images.ndim == 3 else int(images.shape[-1])), (int(images.shape[1]), int(images.shape[2]))
    first = np.asarray(images[0])
    sizes = {tuple(np.shape(img)[:2]) for img in images}
    return (1 if first.ndim == 2 else int(first.shape[-1])), (tuple(int(v) for v in first.shape[:2])
                                                              if len(sizes) == 1 else None)


@dataclass
class RawData:
    """What a dataset's ``load`` returns for one side (train / test) and class subset."""

    images: np.ndarray | list
    targets: np.ndarray
    class_names: list[str]
    masks: np.ndarray | list | None = None
    is_anomalous: np.ndarray | None = None  # MVTec-style: test defect flags within a category
    meta: dict = field(default_factory=dict)


class DatasetParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dataset:
    """Base class. Subclasses set ``name``, ``Params`` and implement ``classes`` and ``load``."""

    name: ClassVar[str]
    Params: ClassVar[type[DatasetParams]] = DatasetParams
    has_masks: ClassVar[bool] = False
    # True where each category's test side holds its own normal and anomalous images (MVTec-style;
    # ``load`` then fills ``RawData.is_anomalous``); False for plain classification datasets.
    per_class_anomalies: ClassVar[bool] = False
    # The class names the dataset is published with, where ``classes`` reads them from its files:
    # a dry run plans a grid with these when the files are absent (``data.protocols.planning``).
    declared_classes: ClassVar[tuple[str, ...]] = ()
    # What methods preprocess by (``Statistics``: mean / std, per-class GCN min-max ...) and the
    # published benchmark whose recipes fit it (see ``Split.recipe_family``); copied onto every split.
    statistics: ClassVar[Statistics] = Statistics()
    recipe_family: ClassVar[str | None] = None

    def __init__(self, params: DatasetParams):
        self.params = params

    def classes(self) -> list[str]:
        raise NotImplementedError

    def load(self, side: str, classes: Sequence[str] | None = None) -> RawData:
        raise NotImplementedError


def _import_builtin_datasets() -> None:
    """Import every module under data/datasets/ (each registers itself with @register_dataset)."""
    import importlib
    import pkgutil

    from data import datasets

    for info in pkgutil.iter_modules(datasets.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{datasets.__name__}.{info.name}")


#: Every dataset, built-in or plugin: name -> class, with each entry's source (plugins/registry.py).
#: The built-in modules (torch, torchvision, sklearn) are imported on the registry's first use.
DATASETS: Registry = Registry("dataset", builtins=_import_builtin_datasets)


def register_dataset(name: str) -> Callable[[type[Dataset]], type[Dataset]]:
    """``@register_dataset("name")``: add a Dataset subclass to ``DATASETS``."""
    return DATASETS.register(name)


def create_dataset(name: str, params: dict | None = None) -> Dataset:
    return DATASETS.create(name, params)
