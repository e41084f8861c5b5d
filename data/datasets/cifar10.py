"""CIFAR-10 through torchvision's reader (python pickles in ``<root>/cifar-10-batches-py``)."""
from __future__ import annotations

import os
import pickle

import numpy as np
from torchvision.datasets import CIFAR10 as TorchCIFAR10

from data.base import DatasetParams, register_dataset
from data.datasets._arrays import ArrayDataset, via_torchvision

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


def files_only(reader: type[TorchCIFAR10]) -> type[TorchCIFAR10]:
    """torchvision's CIFAR reader checking that its files exist instead of their MD5 sums
    (hashing 170 MB at every load is slow; downloads are still verified)."""

    class Reader(reader):
        def _check_integrity(self) -> bool:
            names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
            return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in names)

        def _load_meta(self) -> None:
            with open(os.path.join(self.root, self.base_folder, self.meta["filename"]), "rb") as f:
                self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]

    Reader.__name__ = reader.__name__
    return Reader


CIFAR10Reader = files_only(TorchCIFAR10)


class CIFAR10Params(DatasetParams):
    root: str = "~/data/cifar10"
    download: bool = False


@register_dataset("cifar10")
class CIFAR10(ArrayDataset):
    """50,000 train / 10,000 test 32×32 colour images, 10 classes."""

    Params = CIFAR10Params
    CLASSES = CIFAR10_CLASSES

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        root = self.root()
        folder = root / CIFAR10Reader.base_folder
        reader = via_torchvision(
            self.name, lambda: CIFAR10Reader(str(root), train=side == "train", download=self.params.download),
            f"CIFAR-10 python batches in {folder} (data_batch_1..5, test_batch, batches.meta; "
            f"cifar-10-python.tar.gz from {CIFAR_URL} extracted into {root})", self.params.download)
        return reader.data, np.asarray(reader.targets)
