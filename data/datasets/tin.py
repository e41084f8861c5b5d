"""TinyImageNet: CS231n's tiny-imagenet-200, 200 ImageNet classes at 64×64 RGB; an OOD set
(OpenOOD v1.5's near-OOD set for CIFAR-10 and CIFAR-100, Zhang et al. 2023, arXiv:2306.09301).

``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/tiny-imagenet-200.zip) extracted into ``root``:

    <root>/tiny-imagenet-200/wnids.txt                    the 200 class ids (WordNet ids)
    <root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG   500 train images per class
    <root>/tiny-imagenet-200/val/images/*.JPEG            10,000 val images
    <root>/tiny-imagenet-200/val/val_annotations.txt      "<file>\\t<wnid>\\t<box>" per val image

The train side is ``train/``, the test side ``val/`` in val_annotations.txt order (the official
``test/`` images have no labels). As an OOD set (``ood: [tin]``) the test side is used and the
ood protocol resizes it to the in-distribution size. Without ``image_list`` every val image is
used. OpenOOD drops the TIN images whose classes overlap CIFAR; to score its subset, give its list
(``benchmark_imglist/cifar10/test_tin.txt``) as ``image_list``: lines "path label" (OpenOOD's
benchmark_imglist format), each path relative to ``images_root`` (e.g. OpenOOD's
``images_classic`` folder) or, without it, to ``root``; the label column is not read. A listed
image's class is the wnid folder in its path, else its file name's line in val_annotations.txt.
Classes are the wnids sorted (as torchvision's ImageFolder numbers ``train/``); words.txt is
not read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import model_validator

from data.base import DataError, DatasetParams, register_dataset
from data.datasets._image_folders import FileListDataset, list_images

TIN_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TIN_FOLDER = "tiny-imagenet-200"


class TinyImageNetParams(DatasetParams):
    root: str = "~/data/tin"
    image_list: str | None = None   # OpenOOD benchmark_imglist file restricting the test side
    images_root: str | None = None  # where image_list's paths start (default: root)

    @model_validator(mode="after")
    def _images_root_needs_a_list(self):
        if self.images_root is not None and self.image_list is None:
            raise ValueError("images_root is where image_list's paths start: give image_list too")
        return self


@register_dataset("tin")
class TinyImageNet(FileListDataset):
    """200 classes (wnids, sorted); 100,000 train and 10,000 val (test side) 64×64 images."""

    Params = TinyImageNetParams

    def root(self) -> Path:
        return Path(self.params.root).expanduser()

    def folder(self) -> Path:
        return self.root() / TIN_FOLDER

    def _existing(self, path: Path) -> Path:
        if not path.exists():
            raise DataError(f"{self.name}: {path} not found. Place tiny-imagenet-200.zip (from {TIN_URL}) "
                            f"extracted into {self.root()}, giving {self.folder()}/wnids.txt, train/ and val/")
        return path

    def classes(self) -> list[str]:
        return sorted(set(self._existing(self.folder() / "wnids.txt").read_text().split()))

    def files(self, side: str) -> tuple[list[Path], np.ndarray]:
        index = {wnid: i for i, wnid in enumerate(self.classes())}
        if side == "train":
            paths, targets = [], []
            for wnid, target in index.items():
                images = list_images(self._existing(self.folder() / "train" / wnid / "images"))
                paths += images
                targets += [target] * len(images)
            return paths, np.asarray(targets, dtype=np.int64)
        if self.params.image_list is not None:
            return self.listed(index)
        val = self.val_classes(index)
        folder = self.folder() / "val" / "images"
        return [folder / name for name in val], np.asarray(list(val.values()), dtype=np.int64)

    def val_classes(self, index: dict[str, int]) -> dict[str, int]:
        """``{val image file name: class index}`` from val_annotations.txt, in its order."""
        file = self._existing(self.folder() / "val" / "val_annotations.txt")
        classes = {}
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise DataError(f"{self.name}: {file} line {number}: expected '<file>\\t<wnid>\\t<box>' with a "
                                f"wnid of wnids.txt, got {line!r}")
            classes[fields[0]] = index[fields[1]]
        return classes

    def listed(self, index: dict[str, int]) -> tuple[list[Path], np.ndarray]:
        """The images ``image_list`` names (OpenOOD's "path label" lines) and their classes."""
        file = Path(self.params.image_list).expanduser()
        if not file.is_file():
            raise DataError(f"{self.name}: image_list {file} not found")
        base = Path(self.params.images_root).expanduser() if self.params.images_root else self.root()
        val: dict[str, int] | None = None
        paths, targets = [], []
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            relative = Path(line.split()[0])
            path = base / relative
            if not path.is_file():
                raise DataError(f"{self.name}: {file} line {number}: {path} not found (image_list paths are "
                                f"relative to {'images_root' if self.params.images_root else 'root'}, {base})")
            target = next((index[part] for part in reversed(relative.parts[:-1]) if part in index), None)
            if target is None:
                val = self.val_classes(index) if val is None else val
                target = val.get(path.name)
            if target is None:
                raise DataError(f"{self.name}: {file} line {number}: no class for {relative}: no wnid folder in "
                                f"its path and {path.name} is not in val_annotations.txt")
            paths.append(path)
            targets.append(target)
        if not paths:
            raise DataError(f"{self.name}: image_list {file} lists no images")
        return paths, np.asarray(targets, dtype=np.int64)
