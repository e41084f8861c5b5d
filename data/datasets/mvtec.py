"""MVTec AD (Bergmann et al., CVPR 2019) and any category folder in its layout."""
from __future__ import annotations

from pathlib import Path

from data.base import DataError, DatasetParams, register_dataset
from data.datasets._image_folders import DefectFolderDataset, ImageRecord, list_dirs, list_images

OFFICIAL_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather",
                       "metal_nut", "pill", "screw", "tile", "toothbrush", "transistor", "wood",
                       "zipper")
LAYOUT = ("<root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png "
          "('good' = normal), <root>/<category>/ground_truth/<defect>/<name>_mask.png")
URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"


class MVTecParams(DatasetParams):
    root: str = "~/data/mvtec_anomaly_detection"


@register_dataset("mvtec")
class MVTec(DefectFolderDataset):
    """Every folder under ``root`` with ``train/`` and ``test/`` is a category (the 15 official
    ones and any of your own in the same layout); classes() lists them sorted by name."""

    Params = MVTecParams
    declared_classes = OFFICIAL_CATEGORIES

    def root(self) -> Path:
        return Path(self.params.root).expanduser()

    def classes(self) -> list[str]:
        root = self.root()
        if not root.is_dir():
            raise DataError(f"{self.name}: root {root} does not exist. Expected layout: {LAYOUT}. "
                            f"MVTec AD is obtainable from {URL} ; extract it there or set `root`.")
        categories = [d for d in list_dirs(root) if (root / d / "train").is_dir() and (root / d / "test").is_dir()]
        if not categories:
            raise DataError(f"{self.name}: no category folders under {root}. Expected layout: {LAYOUT} "
                            f"(categories such as {', '.join(OFFICIAL_CATEGORIES[:3])}...; see {URL}).")
        return categories

    def records(self, category: str, side: str) -> list[ImageRecord]:
        base = self.root() / category
        if side == "train":
            folder = base / "train" / "good"
            records = [ImageRecord(p) for p in list_images(folder)]
            if not records:
                raise DataError(f"{self.name}: no training images in {folder}")
            return records
        records = []
        for defect in list_dirs(base / "test"):
            for path in list_images(base / "test" / defect):
                mask = None
                if defect != "good":
                    mask = base / "ground_truth" / defect / f"{path.stem}_mask.png"
                    if not mask.is_file():
                        raise DataError(f"{self.name}: missing ground-truth mask {mask} for defect image {path}")
                records.append(ImageRecord(path, defect, mask))
        if not records:
            raise DataError(f"{self.name}: no test images in {base / 'test'}/<defect>/")
        return records
