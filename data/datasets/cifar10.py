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

from data.base import ClassStatistics, DataError, DatasetParams, Statistics, register_dataset
from data.class_names import CIFAR10_CLASSES
from data.datasets._arrays import ArrayDataset, via_torchvision

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


# (min, max) after GCN-l1 per normal class: Deep-SVDD-PyTorch src/datasets/cifar10.py (identical in fcdd
# datasets/cifar.py).
CIFAR10_GCN_MINMAX = [
    (-28.94083453598571, 13.802961825439636), (-6.681770233365245, 9.158067708230273),
    (-34.924463588638204, 14.419298165027628), (-10.599172931391799, 11.093187820377565),
    (-11.945022995801637, 10.628045447867583), (-9.691969487694928, 8.948326776180823),
    (-9.174940012342555, 13.847014686472365), (-6.876682005899029, 12.282371383343161),
    (-15.603507135507172, 15.2464923804279), (-6.132882973622672, 8.046098172351265),
]
# Per-class channel mean / std of the raw [0, 1] images (fcdd datasets/cifar.py), used by FCDD's
# CIFAR-10 default preprocessing 'aug1'.
CIFAR10_CLASS_MEAN = [
    (0.5256516933441162, 0.5603281855583191, 0.5888723731040955),
    (0.4711322784423828, 0.45446228981018066, 0.4471212327480316),
    (0.48923906683921814, 0.49146366119384766, 0.423904687166214),
    (0.4954785108566284, 0.45636114478111267, 0.4154069721698761),
    (0.47155335545539856, 0.46515223383903503, 0.37797248363494873),
    (0.49992093443870544, 0.4646056592464447, 0.4164286255836487),
    (0.47001829743385315, 0.43829214572906494, 0.34500396251678467),
    (0.5019531846046448, 0.47983652353286743, 0.4167139232158661),
    (0.4902143180370331, 0.5253947973251343, 0.5546804070472717),
    (0.4986417591571808, 0.4852965474128723, 0.4780091941356659),
]
CIFAR10_CLASS_STD = [
    (0.2502202093601227, 0.24083486199378967, 0.2659735083580017),
    (0.26806357502937317, 0.2658274173736572, 0.2749459445476532),
    (0.22705480456352234, 0.2209445983171463, 0.24337927997112274),
    (0.2568431496620178, 0.25227081775665283, 0.25799375772476196),
    (0.21732737123966217, 0.20652702450752258, 0.21182335913181305),
    (0.2504253387451172, 0.24374878406524658, 0.2489463835954666),
    (0.22888341546058655, 0.21856172382831573, 0.2204199582338333),
    (0.2430490106344223, 0.243973046541214, 0.25171563029289246),
    (0.24962472915649414, 0.24068884551525116, 0.25149762630462646),
    (0.2680525481700897, 0.26910799741744995, 0.2810165584087372),
]
#: OpenOOD v1.5 ``normalization_dict['cifar10']`` (openood/preprocessors/transform.py).
CIFAR10_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


class CIFAR10Params(DatasetParams):
    root: str = "~/data/cifar10"
    download: bool = False


@register_dataset("cifar10")
class CIFAR10(ArrayDataset):
    """50,000 train / 10,000 test 32×32 colour images, 10 classes."""

    Params = CIFAR10Params
    CLASSES = CIFAR10_CLASSES
    statistics = Statistics(
        mean=CIFAR10_MEAN_STD[0], std=CIFAR10_MEAN_STD[1], source="OpenOOD normalization_dict['cifar10']",
        per_class={c: ClassStatistics(gcn_min=(lo,), gcn_max=(hi,), mean=tuple(m), std=tuple(s))
                   for c, (lo, hi), m, s in zip(CIFAR10_CLASSES, CIFAR10_GCN_MINMAX, CIFAR10_CLASS_MEAN,
                                                CIFAR10_CLASS_STD)},
        class_source="official constants", side=32, channels=3)
    recipe_family = "cifar10"

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        root = self.root()
        folder = root / TorchCIFAR10.base_folder
        return via_torchvision(
            self.name, lambda: read_cifar(TorchCIFAR10, root, side == "train", self.params.download, ("labels",)),
            f"CIFAR-10 python batches in {folder} (data_batch_1..5, test_batch, batches.meta; "
            f"cifar-10-python.tar.gz from {CIFAR_URL} extracted into {root})", self.params.download)
