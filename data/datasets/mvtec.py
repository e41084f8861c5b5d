"""MVTec AD (Bergmann et al., CVPR 2019) and any category folder in its layout."""
from __future__ import annotations

from pathlib import Path

from data.base import ClassStatistics, DataError, DatasetParams, Statistics, register_dataset
from data.class_names import MVTEC_CATEGORIES
from data.datasets._image_folders import DefectFolderDataset, ImageRecord, list_dirs, list_images

OFFICIAL_CATEGORIES = MVTEC_CATEGORIES
LAYOUT = ("<root>/<category>/train/good/*.png, <root>/<category>/test/<defect>/*.png "
          "('good' = normal), <root>/<category>/ground_truth/<defect>/<name>_mask.png")
URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"


# Per-channel (mins, maxs) after GCN-l1 per category: fcdd python/fcdd/datasets/mvtec.py (min_max_l1).
MVTEC_GCN_MINMAX = [
    ((-1.3336724042892456, -1.3107913732528687, -1.2445921897888184), (1.3779616355895996,) * 3),
    ((-2.2404820919036865, -2.3387579917907715, -2.2896201610565186), (4.573435306549072,) * 3),
    ((-3.184587001800537, -3.164201259613037, -3.1392977237701416),
     (1.6995097398757935, 1.6011602878570557, 1.5209171772003174)),
    ((-3.0334954261779785, -2.958242416381836, -2.7701096534729004),
     (6.503103256225586, 5.875098705291748, 5.814228057861328)),
    ((-3.100773334503174,) * 3, (4.27892541885376,) * 3),
    ((-3.6565306186676025, -3.507692813873291, -2.7635035514831543),
     (18.966819763183594, 21.64590072631836, 26.408710479736328)),
    ((-1.5192601680755615, -2.2068002223968506, -2.3948357105255127),
     (11.564697265625, 10.976534843444824, 10.378695487976074)),
    ((-1.3207964897155762, -1.2889339923858643, -1.148416519165039), (6.854909896850586,) * 3),
    ((-0.9883341193199158, -0.9822461605072021, -0.9288841485977173),
     (2.290637969970703, 2.4007883071899414, 2.3044068813323975)),
    ((-7.236185073852539,) * 3, (3.3777384757995605,) * 3),
    ((-3.2036616802215576, -3.221003532409668, -3.305514335632324),
     (7.022546768188477, 6.115569114685059, 6.310940742492676)),
    ((-0.8915618658065796, -0.8669204115867615, -0.8002046346664429),
     (4.4255571365356445, 4.642300128936768, 4.305730819702148)),
    ((-1.9086798429489136, -2.0004451274871826, -1.929288387298584), (5.463134765625,) * 3),
    ((-2.9547364711761475, -3.17536997795105, -3.143850803375244),
     (5.305514812469482, 4.535006523132324, 3.3618252277374268)),
    ((-1.2906527519226074,) * 3, (2.515115737915039,) * 3),
]


class MVTecParams(DatasetParams):
    root: str = "~/data/mvtec_anomaly_detection"


@register_dataset("mvtec")
class MVTec(DefectFolderDataset):
    """Every folder under ``root`` with ``train/`` and ``test/`` is a category (the 15 official
    ones and any of your own in the same layout); classes() lists them sorted by name."""

    Params = MVTecParams
    declared_classes = OFFICIAL_CATEGORIES
    # MVTec AD images come at 700-1024 px, grey categories possibly with one channel (fcdd used them
    # as RGB): the constants hold at any geometry
    statistics = Statistics(per_class={c: ClassStatistics(gcn_min=tuple(lo), gcn_max=tuple(hi))
                                       for c, (lo, hi) in zip(OFFICIAL_CATEGORIES, MVTEC_GCN_MINMAX)},
                            class_source="official constants")
    recipe_family = "mvtec"

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
