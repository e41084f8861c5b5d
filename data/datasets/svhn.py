"""SVHN (cropped digits) through torchvision's reader (``<root>/{train,test}_32x32.mat``)."""
from __future__ import annotations

import os

import numpy as np
from torchvision.datasets import SVHN as TorchSVHN

from data.base import DatasetParams, register_dataset
from data.datasets._arrays import ArrayDataset, via_torchvision
from data.datasets.mnist import DIGITS


class SVHNReader(TorchSVHN):
    """torchvision's reader checking that the .mat file exists instead of its MD5 sum."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


class SVHNParams(DatasetParams):
    root: str = "~/data/svhn"
    download: bool = False


@register_dataset("svhn")
class SVHN(ArrayDataset):
    """73,257 train / 26,032 test 32×32 colour house-number digits; classes "0".."9" (torchvision
    maps SVHN's label 10 to 0)."""

    Params = SVHNParams
    CLASSES = DIGITS
    recipe_family = "cifar_like"

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        root = self.root()
        file = root / TorchSVHN.split_list[side][1]
        data = via_torchvision(
            self.name, lambda: SVHNReader(str(root), split=side, download=self.params.download),
            f"SVHN file {file} (from http://ufldl.stanford.edu/housenumbers/)", self.params.download)
        return data.data.transpose(0, 2, 3, 1), data.labels
