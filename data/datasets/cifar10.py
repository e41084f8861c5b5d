"""CIFAR-10 from the python batches in ``<root>/cifar-10-batches-py`` (torchvision's layout, file
names and download: ``torchvision.datasets.CIFAR10``).

The batches are pickles, and unpickling runs whatever callables a file names. ``read_batch`` uses
an Unpickler that resolves only the globals a CIFAR batch holds (numpy's array reconstruction and
latin-1 bytes), so a crafted file in a dataset root fails with a DataError naming it instead of
running code. The files' presence is checked, not their MD5 sums (hashing 170 MB at every load is
slow); a download is verified by the archive's MD5, as torchvision does.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from torchvision.datasets import CIFAR10 as TorchCIFAR10
from torchvision.datasets.utils import download_and_extract_archive

from data.base import DataError, DatasetParams, register_dataset
from data.datasets._arrays import ArrayDataset, via_torchvision

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR_ROW = 3 * 32 * 32


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` call it; latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's _reconstruct, under whichever module name
BATCH_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,   # the official files (numpy 1)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # files pickled with numpy 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class _BatchUnpickler(pickle.Unpickler):
    """Dicts, lists, strings, numbers (built by opcodes) and numpy arrays; no other global."""

    def find_class(self, module: str, name: str):
        try:
            return BATCH_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never holds") from None


def read_batch(path: Path, archive: str) -> dict:
    """One CIFAR python batch or meta file, read without running code it may name."""
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise DataError(f"cannot read CIFAR file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # UnpicklingError, EOFError, a reconstructor's TypeError...
        raise DataError(f"{path} is not a CIFAR python batch, refused without running it ({exc}); "
                        f"replace it with the file from {archive} ({CIFAR_URL})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python batch (a {type(obj).__name__}, not a dict); "
                        f"replace it with the file from {archive} ({CIFAR_URL})")
    return obj


def batch_arrays(entry: dict, path: Path, label_keys: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """A batch's N×3072 uint8 rows and its label lists (N ints each), checked."""
    data = entry.get("data")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == CIFAR_ROW):
        raise DataError(f"{path}: 'data' is not an N×{CIFAR_ROW} uint8 array")
    labels = []
    for key in label_keys:
        values = entry.get(key)
        if not (isinstance(values, list) and len(values) == len(data) and all(isinstance(v, int) for v in values)):
            raise DataError(f"{path}: {key!r} is not a list of {len(data)} ints")
        labels.append(np.asarray(values, dtype=np.int64))
    return (data, *labels)


def read_cifar(reader: type[TorchCIFAR10], root: Path, train: bool, download: bool,
               label_keys: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """One side's images (N×32×32×3 uint8, HWC) and label arrays from torchvision's CIFAR layout.
    ``download``: fetch and extract the archive (MD5-checked) when a file is missing."""
    folder = root / reader.base_folder
    names = [f for f, _ in reader.train_list + reader.test_list] + [reader.meta["filename"]]
    if download and not all((folder / n).is_file() for n in names):
        download_and_extract_archive(reader.url, str(root), filename=reader.filename, md5=reader.tgz_md5)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")
    parts = [batch_arrays(read_batch(folder / f, reader.filename), folder / f, label_keys)
             for f, _ in (reader.train_list if train else reader.test_list)]
    images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return (images, *(np.concatenate([p[i] for p in parts]) for i in range(1, 1 + len(label_keys))))


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
        folder = root / TorchCIFAR10.base_folder
        return via_torchvision(
            self.name, lambda: read_cifar(TorchCIFAR10, root, side == "train", self.params.download, ("labels",)),
            f"CIFAR-10 python batches in {folder} (data_batch_1..5, test_batch, batches.meta; "
            f"cifar-10-python.tar.gz from {CIFAR_URL} extracted into {root})", self.params.download)
