"""MNIST through torchvision's reader (IDX files in ``<root>/MNIST/raw/``)."""
from __future__ import annotations

import numpy as np
from torchvision.datasets import MNIST as TorchMNIST

from data.base import ClassStatistics, DatasetParams, Statistics, register_dataset
from data.class_names import DIGITS
from data.datasets._arrays import ArrayDataset, via_torchvision

IDX_FILES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"


# (min, max) after GCN-l1 per normal class (Deep SVDD: lukasruff/Deep-SVDD-PyTorch src/datasets/mnist.py).
MNIST_GCN_MINMAX = [
    (-0.8826567065619495, 9.001545489292527), (-0.6661464580883915, 20.108062262467364),
    (-0.7820454743183202, 11.665100841080346), (-0.7645772083211267, 12.895051191467457),
    (-0.7253923114302238, 12.683235701611533), (-0.7698501867861425, 13.103278415430502),
    (-0.778418217980696, 10.457837397569108), (-0.7129780970522351, 12.057777597673047),
    (-0.8280402650205075, 10.581538445782988), (-0.7369959242164307, 10.697039838804978),
]


class MNISTParams(DatasetParams):
    root: str = "~/data/mnist"
    download: bool = False


@register_dataset("mnist")
class MNIST(ArrayDataset):
    """60,000 train / 10,000 test 28×28 grey digits; classes "0".."9"."""

    Params = MNISTParams
    CLASSES = DIGITS
    statistics = Statistics(per_class={c: ClassStatistics(gcn_min=(lo,), gcn_max=(hi,))
                                       for c, (lo, hi) in zip(DIGITS, MNIST_GCN_MINMAX)},
                            class_source="official constants", side=28, channels=1)
    recipe_family = "mnist"
    reader = TorchMNIST

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        root = self.root()
        folder = root / self.reader.__name__ / "raw"
        data = via_torchvision(
            self.name, lambda: self.reader(str(root), train=side == "train", download=self.params.download),
            f"{self.reader.__name__} IDX files ({IDX_FILES}, uncompressed) in {folder}", self.params.download)
        return data.data.numpy(), data.targets.numpy()
