"""MNIST through torchvision's reader (IDX files in ``<root>/MNIST/raw/``)."""
from __future__ import annotations

import numpy as np
from torchvision.datasets import MNIST as TorchMNIST

from data.base import DatasetParams, register_dataset
from data.datasets._arrays import ArrayDataset, via_torchvision

DIGITS = tuple(str(d) for d in range(10))
IDX_FILES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"


class MNISTParams(DatasetParams):
    root: str = "~/data/mnist"
    download: bool = False


@register_dataset("mnist")
class MNIST(ArrayDataset):
    """60,000 train / 10,000 test 28×28 grey digits; classes "0".."9"."""

    Params = MNISTParams
    CLASSES = DIGITS
    reader = TorchMNIST

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        root = self.root()
        folder = root / self.reader.__name__ / "raw"
        data = via_torchvision(
            self.name, lambda: self.reader(str(root), train=side == "train", download=self.params.download),
            f"{self.reader.__name__} IDX files ({IDX_FILES}, uncompressed) in {folder}", self.params.download)
        return data.data.numpy(), data.targets.numpy()
