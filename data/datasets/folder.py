"""Your own images in FCDD's custom layout.

    <root>/train/<class>/*                 normal training images (or <root>/train/<class>/normal/*)
    <root>/test/<class>/normal/*           normal test images
    <root>/test/<class>/anomalous/*        anomalous test images
    <root>/ground_truth/<class>/<name>_mask.png   optional: one mask per anomalous test image
                                                  (<name>.png is accepted too)

Masks are used for a class when its ground_truth folder exists; then every anomalous image needs
one (normal images get all-zero masks). Images of different sizes are kept at their own size
(the split holds a list), so masks stay pixel-aligned; the method's transform resizes them.
A ``train/<class>/anomalous`` folder (FCDD's outlier exposure) is ignored.
"""
from __future__ import annotations

from pathlib import Path

from data.base import DataError, DatasetParams, register_dataset
from data.cache import IMAGE_SUFFIXES
from data.datasets._image_folders import DefectFolderDataset, ImageRecord, list_dirs, list_images

LAYOUT = ("<root>/train/<class>/*, <root>/test/<class>/normal/*, <root>/test/<class>/anomalous/*, "
          "optional <root>/ground_truth/<class>/<name>_mask.png")


class FolderParams(DatasetParams):
    root: str


@register_dataset("folder")
class Folder(DefectFolderDataset):
    """Classes are the folders under ``<root>/train``, sorted by name."""

    Params = FolderParams
    recipe_family = "mvtec"

    def root(self) -> Path:
        return Path(self.params.root).expanduser()

    def classes(self) -> list[str]:
        train = self.root() / "train"
        if not train.is_dir():
            raise DataError(f"{self.name}: {train} does not exist. Expected layout: {LAYOUT}")
        names = list_dirs(train)
        if not names:
            raise DataError(f"{self.name}: no class folders in {train}. Expected layout: {LAYOUT}")
        return names

    def masks_available(self, category: str) -> bool:
        return (self.root() / "ground_truth" / category).is_dir()

    def _mask_for(self, category: str, image: Path) -> Path:
        folder = self.root() / "ground_truth" / category
        for name in (f"{image.stem}_mask", image.stem):
            for suffix in sorted(IMAGE_SUFFIXES):
                if (folder / f"{name}{suffix}").is_file():
                    return folder / f"{name}{suffix}"
        raise DataError(f"{self.name}: missing mask {folder / (image.stem + '_mask.png')} for anomalous "
                        f"image {image} (masks are required for every anomalous image once {folder} exists)")

    def records(self, category: str, side: str) -> list[ImageRecord]:
        if side == "train":
            folder = self.root() / "train" / category
            if (folder / "normal").is_dir():
                folder = folder / "normal"
            records = [ImageRecord(p) for p in list_images(folder)]
            if not records:
                raise DataError(f"{self.name}: no images in {folder}")
            return records
        base = self.root() / "test" / category
        with_masks = self.masks_available(category)
        records = [ImageRecord(p) for p in list_images(base / "normal")]
        records += [ImageRecord(p, "anomalous", self._mask_for(category, p) if with_masks else None)
                    for p in list_images(base / "anomalous")]
        if not records:
            raise DataError(f"{self.name}: no images in {base}/normal or {base}/anomalous")
        return records
