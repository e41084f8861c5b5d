"""Describable Textures (DTD) through torchvision's file lists (``<root>/dtd/dtd/{images,labels}``);
an OOD set. Images (300..640 px, sizes vary) are decoded once through the decode cache."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import Field
from torchvision.datasets import DTD as TorchDTD

from data.base import DatasetParams, register_dataset
from data.datasets._arrays import via_torchvision
from data.datasets._image_folders import FileListDataset

DTD_CLASSES = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
    "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy",
    "grid", "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled",
    "matted", "meshed", "paisley", "perforated", "pitted", "pleated", "polka-dotted", "porous",
    "potholed", "scaly", "smeared", "spiralled", "sprinkled", "stained", "stratified", "striped",
    "studded", "swirly", "veined", "waffled", "woven", "wrinkled", "zigzagged",
)


class DTDParams(DatasetParams):
    root: str = "~/data/dtd"
    download: bool = False
    partition: int = Field(1, ge=1, le=10)


@register_dataset("dtd")
class DTD(FileListDataset):
    """5,640 texture images, 47 classes; the train side is DTD's train{partition}.txt list, the
    test side its test{partition}.txt list (1,880 images each)."""

    Params = DTDParams

    def classes(self) -> list[str]:
        return list(DTD_CLASSES)

    def files(self, side: str) -> tuple[list[Path], np.ndarray]:
        root = Path(self.params.root).expanduser()
        reader = via_torchvision(
            self.name, lambda: TorchDTD(str(root), split=side, partition=self.params.partition,
                                        download=self.params.download),
            f"DTD in {root / 'dtd' / 'dtd'} (images/<class>/*.jpg and labels/{side}{self.params.partition}.txt; "
            f"dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ extracted into {root / 'dtd'})",
            self.params.download)
        names = self.classes()
        targets = np.asarray([names.index(reader.classes[t]) for t in reader._labels], dtype=np.int64)
        return [Path(p) for p in reader._image_files], targets
