"""An adgrid dataset plugin: your own labelled images, listed in CSV files.

    train.csv   path[,label]          normal training images (a label, where given, must be normal)
    test.csv    path,label[,mask]     label: normal / anomalous (or good / 0, anomaly / 1);
                                      mask: a binary image marking the defect (optional)

Paths are relative to their CSV file. A header row names the columns. Once any test row has a
mask, every anomalous row needs one (normal rows get an all-zero mask). Images are decoded by
adgrid's decode cache, like the built-in ``folder`` dataset: images of different sizes are kept
at their own size, and each method resizes them its own way.

Use it from a grid:  plugins: [csv_images.py]
                     datasets: [{name: csv_images, train_csv: my/train.csv, test_csv: my/test.csv}]
"""
from __future__ import annotations

import csv
from pathlib import Path

from data import DataError, register_dataset
from data.base import DatasetParams
from data.datasets._image_folders import DefectFolderDataset, ImageRecord

NORMAL = {"normal", "good", "0"}
ANOMALOUS = {"anomalous", "anomaly", "defect", "1"}


class CSVImagesParams(DatasetParams):
    train_csv: str
    test_csv: str
    class_name: str = "images"  # the one class this set is (its cells' normal class)


@register_dataset("csv_images")
class CSVImages(DefectFolderDataset):
    Params = CSVImagesParams

    def classes(self) -> list[str]:
        return [self.params.class_name]

    def rows(self, side: str) -> tuple[Path, list[dict]]:
        table = Path(self.params.train_csv if side == "train" else self.params.test_csv).expanduser()
        if not table.is_file():
            raise DataError(f"{self.name}: {side} list {table} does not exist")
        with table.open(newline="") as fh:
            rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(fh)]
        if not rows or "path" not in rows[0] or (side == "test" and "label" not in rows[0]):
            raise DataError(f"{self.name}: {table} needs a header with path" + (", label" if side == "test" else ""))
        return table, rows

    def masks_available(self, category: str) -> bool:
        return any(row.get("mask") for row in self.rows("test")[1])

    def records(self, category: str, side: str) -> list[ImageRecord]:
        table, rows = self.rows(side)
        with_masks = side == "test" and self.masks_available(category)
        records = []
        for line, row in enumerate(rows, start=2):
            label = row.get("label", "normal").lower() or "normal"
            if label not in NORMAL | ANOMALOUS or (side == "train" and label not in NORMAL):
                raise DataError(f"{self.name}: {table} line {line}: label {label!r} (expected "
                                f"{'normal' if side == 'train' else 'normal or anomalous'})")
            path, mask = table.parent / row["path"], row.get("mask") and table.parent / row["mask"]
            for what, file in (("image", path), ("mask", mask)):
                if file and not file.is_file():
                    raise DataError(f"{self.name}: {table} line {line}: no {what} file {file}")
            if label in ANOMALOUS and with_masks and not mask:
                raise DataError(f"{self.name}: {table} line {line}: anomalous image without a mask "
                                "(once any row has a mask, every anomalous row needs one)")
            records.append(ImageRecord(path, "anomalous" if label in ANOMALOUS else "good",
                                       mask if label in ANOMALOUS and with_masks else None))
        if not records:
            raise DataError(f"{self.name}: {table} lists no images")
        return records
