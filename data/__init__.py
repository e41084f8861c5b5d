"""Importing this package registers every dataset module under data/datasets/."""
import importlib
import pkgutil

from data.base import DATASETS, DataError, Dataset, RawData, Split, create_dataset, register_dataset  # noqa: F401
from data import datasets as _datasets_pkg

for _info in pkgutil.iter_modules(_datasets_pkg.__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{_datasets_pkg.__name__}.{_info.name}")
