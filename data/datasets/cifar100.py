"""CIFAR-100 from the python files in ``<root>/cifar-100-python/{train,test,meta}`` (torchvision's
layout and download: ``torchvision.datasets.CIFAR100``), read without running code as CIFAR-10 is
(``data.datasets.cifar10.read_batch``).

``coarse: true`` uses the 20 superclasses (the usual one-class AD setting) instead of the 100
fine classes.
"""
from __future__ import annotations

import numpy as np
from torchvision.datasets import CIFAR100 as TorchCIFAR100

from data.base import DatasetParams, Statistics, register_dataset
from data.datasets._arrays import ArrayDataset, via_torchvision
from data.datasets.cifar10 import CIFAR_URL, read_cifar

FINE_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
COARSE_CLASSES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "large_omnivores_and_herbivores",
    "medium_mammals", "non-insect_invertebrates", "people", "reptiles", "small_mammals", "trees",
    "vehicles_1", "vehicles_2",
)

#: The superclass (index into COARSE_CLASSES) of each fine class, the dataset's ``coarse_labels``
#: (Krizhevsky 2009, the CIFAR-100 class list); MOS's default groups on CIFAR-100.
COARSE_OF_FINE = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)


class CIFAR100Params(DatasetParams):
    root: str = "~/data/cifar100"
    download: bool = False
    coarse: bool = False


@register_dataset("cifar100")
class CIFAR100(ArrayDataset):
    """50,000 train / 10,000 test 32×32 colour images, 100 fine (or 20 coarse) classes."""

    Params = CIFAR100Params
    #: OpenOOD v1.5 ``normalization_dict['cifar100']`` (openood/preprocessors/transform.py)
    statistics = Statistics(mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),
                            source="OpenOOD normalization_dict['cifar100']")
    recipe_family = "cifar_like"

    def classes(self) -> list[str]:
        return list(COARSE_CLASSES if self.params.coarse else FINE_CLASSES)

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        root = self.root()
        folder = root / TorchCIFAR100.base_folder
        images, fine, coarse = via_torchvision(
            self.name, lambda: read_cifar(TorchCIFAR100, root, side == "train", self.params.download,
                                          ("fine_labels", "coarse_labels")),
            f"CIFAR-100 python files in {folder} (train, test, meta; cifar-100-python.tar.gz from "
            f"{CIFAR_URL} extracted into {root})", self.params.download)
        return images, coarse if self.params.coarse else fine
