"""Places365 through torchvision's file lists (``<root>/categories_places365.txt``,
``places365_val.txt``, ``val_256/``...); an OOD set.

The train side is ``train-standard`` (1.8 M images), the test side the official ``val`` split
(36,500; the official test split has no labels). ``per_class`` keeps the first N images of each
class in list order (OOD benchmarks use a subset). Images are decoded once through the decode cache.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pydantic import Field
from torchvision.datasets import Places365 as TorchPlaces365

from data.base import DataError, DatasetParams, register_dataset
from data.datasets._arrays import via_torchvision
from data.datasets._image_folders import FileListDataset

SPLITS = {"train": "train-standard", "test": "val"}


class Places365Reader(TorchPlaces365):
    """torchvision's reader checking that its list files exist instead of their MD5 sums."""

    def _check_integrity(self, file: str, md5: str, download: bool) -> bool:
        if os.path.isfile(file):
            return True
        if not download:
            raise RuntimeError(f"the file {file} does not exist")
        return False


class Places365Params(DatasetParams):
    root: str = "~/data/places365"
    download: bool = False
    small: bool = True
    per_class: int | None = Field(None, ge=1)


@register_dataset("places365")
class Places365(FileListDataset):
    """365 scene classes (names such as "/a/airfield", from categories_places365.txt)."""

    Params = Places365Params

    def root(self) -> Path:
        return Path(self.params.root).expanduser()

    def classes(self) -> list[str]:
        file = self.root() / "categories_places365.txt"
        if not file.is_file():
            raise DataError(f"{self.name}: {file} not found. Set `download: true`, or place Places365's "
                            f"file lists (filelist_places365-standard.tar) and images "
                            f"(http://places2.csail.mit.edu/download.html) in {self.root()}")
        with open(file) as f:
            by_index = {int(idx): name for name, idx in (line.split() for line in f if line.strip())}
        return [by_index[i] for i in sorted(by_index)]

    def files(self, side: str) -> tuple[list[Path], np.ndarray]:
        root = self.root()
        split = SPLITS[side]
        reader = via_torchvision(
            self.name, lambda: Places365Reader(str(root), split=split, small=self.params.small,
                                               download=self.params.download),
            f"Places365 {split} in {root} (categories_places365.txt, places365_*.txt and the image "
            f"folder, from http://places2.csail.mit.edu/download.html)", self.params.download)
        paths = [Path(p) for p, _ in reader.imgs]
        targets = np.asarray(reader.targets, dtype=np.int64)
        if self.params.per_class is not None:
            keep = np.zeros(len(targets), dtype=bool)
            for cls in np.unique(targets):
                keep[np.flatnonzero(targets == cls)[: self.params.per_class]] = True
            paths = [p for p, k in zip(paths, keep) if k]
            targets = targets[keep]
        return paths, targets
