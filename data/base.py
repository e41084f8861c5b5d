"""Dataset registry and the Split contract shared by data, methods and the orchestrator.

A *dataset* returns raw images (uint8, H×W×C with C = 1 or 3), integer class targets, class
names and, where it has them, pixel masks. Image size, normalisation and augmentation are the
method's business (see ``data.transforms``). A *protocol* (``data.protocols``) turns a dataset
into a train ``Split`` and one or more test ``Split``s with binary labels (1 = anomalous / OOD).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from plugins.registry import Registry


class DataError(ValueError):
    """Bad or missing data; the message says which file or class, and what to do."""


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
                 class set, side, OOD set); the feature cache keys on it.
    """

    images: np.ndarray | list
    labels: np.ndarray
    targets: np.ndarray
    class_names: list[str]
    key: str
    masks: np.ndarray | list | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


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

    def __init__(self, params: DatasetParams):
        self.params = params

    def classes(self) -> list[str]:
        raise NotImplementedError

    def load(self, side: str, classes: Sequence[str] | None = None) -> RawData:
        raise NotImplementedError


#: Every dataset, built-in or plugin: name -> class, with each entry's source (plugins/registry.py).
DATASETS: Registry = Registry("dataset")


def register_dataset(name: str) -> Callable[[type[Dataset]], type[Dataset]]:
    """``@register_dataset("name")``: add a Dataset subclass to ``DATASETS``."""
    return DATASETS.register(name)


def create_dataset(name: str, params: dict | None = None) -> Dataset:
    return DATASETS.create(name, params)
