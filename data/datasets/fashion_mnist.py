"""Fashion-MNIST through torchvision's reader (``<root>/FashionMNIST/raw/``), falling back to the
gzip'd IDX files of Debian's ``dataset-fashion-mnist`` package when that folder is absent."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from torchvision.datasets import FashionMNIST as TorchFashionMNIST

from data.base import DataError, DatasetParams, register_dataset
from data.datasets.mnist import MNIST

FASHION_CLASSES = tuple(TorchFashionMNIST.classes)
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


class FashionMNISTParams(DatasetParams):
    root: str = "~/data/fashion_mnist"
    download: bool = False
    debian_dir: str = DEBIAN_DIR


@register_dataset("fashion_mnist")
class FashionMNIST(MNIST):
    """60,000 train / 10,000 test 28×28 grey clothing images, 10 classes."""

    Params = FashionMNISTParams
    CLASSES = FASHION_CLASSES
    reader = TorchFashionMNIST

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        torchvision_folder = self.root() / self.reader.__name__ / "raw"
        prefix = "train" if side == "train" else "t10k"
        debian_files = [Path(self.params.debian_dir) / f"{prefix}-{kind}-idx{ndim}-ubyte.gz"
                        for kind, ndim in (("images", 3), ("labels", 1))]
        if torchvision_folder.is_dir() or self.params.download or not all(f.is_file() for f in debian_files):
            return super().read(side)
        return read_idx(debian_files[0]), read_idx(debian_files[1])
