"""scikit-learn's bundled 8×8 digits (1,797 images), up-sampled for CNN backbones.

Pixel values 0..16 are scaled to 0..255 and images up-sampled to ``image_size`` with bilinear
interpolation (one channel). Split: stratified 60% train / 40% test with a fixed seed (0),
independent of the cell's seed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from data.base import DatasetParams, register_dataset
from data.datasets._arrays import ArrayDataset
from data.datasets.mnist import DIGITS

TEST_FRACTION = 0.4
SPLIT_SEED = 0


class DigitsParams(DatasetParams):
    image_size: int = Field(32, ge=8, le=512)


@register_dataset("digits")
class Digits(ArrayDataset):
    """1,797 grey digits (1,078 train / 719 test); classes "0".."9"."""

    Params = DigitsParams
    CLASSES = DIGITS
    recipe_family = "mnist"

    def read(self, side: str) -> tuple[np.ndarray, np.ndarray]:
        bunch = load_digits()
        train_idx, test_idx = train_test_split(np.arange(len(bunch.target)), test_size=TEST_FRACTION,
                                               stratify=bunch.target, random_state=SPLIT_SEED)
        index = np.sort(train_idx if side == "train" else test_idx)
        pixels = torch.from_numpy(bunch.images[index] * (255.0 / 16.0)).float()[:, None]
        size = self.params.image_size
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
        images = pixels.round().clamp(0, 255).to(torch.uint8)[:, 0].numpy()
        return images, bunch.target[index]
