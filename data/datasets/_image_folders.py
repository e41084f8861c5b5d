"""Shared code for datasets read from image files through the decode cache (``data.cache``).

``DefectFolderDataset``: categories whose test side mixes normal and anomalous images, with
optional pixel masks (MVTec AD, the procedural set, users' FCDD-style folders).
``FileListDataset``: plain classification sets given as file lists (DTD, Places365).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from data.base import DataError, Dataset, RawData
from data.cache import IMAGE_SUFFIXES, decode_files

SIDES = ("train", "test")
COMBINE_LIMIT_BYTES = 1 << 30  # equal-shape parts below this are concatenated, else kept as views


def check_side(side: str) -> None:
    if side not in SIDES:
        raise DataError(f"side must be one of {SIDES}, got {side!r}")


def check_classes(dataset: str, chosen: Sequence[str], valid: Sequence[str]) -> None:
    unknown = [c for c in chosen if c not in valid]
    if unknown:
        raise DataError(f"{dataset}: unknown class {', '.join(map(repr, unknown))}; "
                        f"valid: {', '.join(valid)}")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def list_dirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def combine(parts: list) -> np.ndarray | list:
    """Join per-group image (or mask) arrays: one array when shapes agree and the total is small,
    else a list of per-image views (no copy of memory-mapped data)."""
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    if len(parts) == 1:
        return parts[0]
    if len(arrays) == len(parts) and len({a.shape[1:] for a in arrays}) == 1 \
            and sum(a.nbytes for a in arrays) <= COMBINE_LIMIT_BYTES:
        return np.concatenate(arrays)
    return [img for part in parts for img in part]


def content_id(entries: Sequence[str]) -> str:
    """A short hash of decode-cache entry names: changes whenever any underlying file changes."""
    return hashlib.sha256("+".join(entries).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ImageRecord:
    """One image file; ``defect`` is "good" for normal images; ``mask``: its mask file, or None for
    an all-zero mask."""

    path: Path
    defect: str = "good"
    mask: Path | None = None

    @property
    def anomalous(self) -> bool:
        return self.defect != "good"


class DefectFolderDataset(Dataset):
    """Categories with normal train images and normal + anomalous test images.

    ``load`` returns, per image: ``targets`` = category index, ``is_anomalous``, ``meta["defect"]``
    (defect type, "good" for normal) and ``meta["path"]``; ``masks`` on the test side only (None
    for train, and None if any chosen category has no masks). ``meta["content_id"]`` changes with
    any file.
    """

    has_masks = True
    per_class_anomalies = True

    def records(self, category: str, side: str) -> list[ImageRecord]:
        """The category's images for one side; raise DataError if there are none."""
        raise NotImplementedError

    def masks_available(self, category: str) -> bool:
        return True

    def load(self, side: str, classes: Sequence[str] | None = None) -> RawData:
        check_side(side)
        names = self.classes()
        chosen = list(names if classes is None else classes)
        check_classes(self.name, chosen, names)
        images, masks, defects, paths, entries, targets = [], [], [], [], [], []
        for category in chosen:
            records = self.records(category, side)
            with_masks = side == "test" and self.masks_available(category)
            decoded = decode_files([r.path for r in records],
                                   [r.mask for r in records] if with_masks else None)
            images.append(decoded.images)
            masks.append(decoded.masks)
            defects += [r.defect for r in records]
            paths += [str(r.path) for r in records]
            entries.append(decoded.entry)
            targets.append(np.full(len(records), names.index(category), dtype=np.int64))
        defects_arr = np.asarray(defects)
        return RawData(
            images=combine(images),
            targets=np.concatenate(targets),
            class_names=list(names),
            masks=None if any(m is None for m in masks) else combine(masks),
            is_anomalous=defects_arr != "good",
            meta={"defect": defects_arr, "path": paths, "content_id": content_id(entries)},
        )


class FileListDataset(Dataset):
    """A classification set given as image files and class indices (``files(side)``)."""

    def files(self, side: str) -> tuple[list[Path], np.ndarray]:
        raise NotImplementedError

    def load(self, side: str, classes: Sequence[str] | None = None) -> RawData:
        check_side(side)
        names = self.classes()
        paths, targets = self.files(side)
        if classes is not None:
            check_classes(self.name, list(classes), names)
            keep = np.isin(targets, [names.index(c) for c in classes])
            paths = [p for p, k in zip(paths, keep) if k]
            targets = targets[keep]
        if not paths:
            raise DataError(f"{self.name}: no {side} images for classes {list(classes or names)}")
        decoded = decode_files(paths)
        return RawData(images=decoded.images, targets=np.asarray(targets, dtype=np.int64),
                       class_names=list(names),
                       meta={"path": [str(p) for p in paths], "content_id": content_id([decoded.entry])})
