"""Fashion-MNIST through torchvision's reader (``<root>/FashionMNIST/raw/``), falling back to the
gzip'd IDX files of Debian's ``dataset-fashion-mnist`` package when that folder is absent."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from torchvision.datasets import FashionMNIST as TorchFashionMNIST

from data.base import ClassStatistics, DataError, DatasetParams, Statistics, register_dataset
from data.class_names import FASHION_MNIST_CLASSES
from data.datasets.mnist import MNIST

FASHION_CLASSES = FASHION_MNIST_CLASSES  # torchvision's FashionMNIST.classes (tests hold them equal)
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzip'd) of unsigned bytes -> array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


# (min, max) after GCN-l1 per normal class (fcdd python/fcdd/datasets/fmnist.py min_max_l1).
FASHION_GCN_MINMAX = [
    (-2.681239128112793, 24.85430908203125), (-2.5778584480285645, 11.169795989990234),
    (-2.808171510696411, 19.133548736572266), (-1.9533653259277344, 18.65673065185547),
    (-2.6103856563568115, 19.166685104370117), (-1.2358522415161133, 28.463092803955078),
    (-3.251605987548828, 24.196823120117188), (-1.0814440250396729, 16.878812789916992),
    (-3.6560964584350586, 11.3502836227417), (-1.3859291076660156, 11.426650047302246),
]


class FashionMNISTParams(DatasetParams):
    root: str = "~/data/fashion_mnist"
    download: bool = False
    debian_dir: str = DEBIAN_DIR


@register_dataset("fashion_mnist")
class FashionMNIST(MNIST):
    """60,000 train / 10,000 test 28×28 grey clothing images, 10 classes."""

    Params = FashionMNISTParams
    CLASSES = FASHION_CLASSES
    statistics = Statistics(per_class={c: ClassStatistics(gcn_min=(lo,), gcn_max=(hi,))
                                       for c, (lo, hi) in zip(FASHION_CLASSES, FASHION_GCN_MINMAX)},
                            class_source="official constants", side=28, channels=1)
    recipe_family = "mnist"
    reader = TorchFashionMNIST

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        torchvision_folder = self.root() / self.reader.__name__ / "raw"
        prefix = "train" if side == "train" else "t10k"
        debian_files = [Path(self.params.debian_dir) / f"{prefix}-{kind}-idx{ndim}-ubyte.gz"
                        for kind, ndim in (("images", 3), ("labels", 1))]
        if torchvision_folder.is_dir() or self.params.download or not all(f.is_file() for f in debian_files):
            return super().read(side)
        return read_idx(debian_files[0]), read_idx(debian_files[1])
