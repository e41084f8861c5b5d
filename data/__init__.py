"""Datasets: the contracts (``data.base``) and the registry of every dataset module under
data/datasets/, which the registry imports on its first use (``DATASETS[name]``, ``name in
DATASETS``, iteration): importing this package alone stays light (numpy, pydantic), so the report
can read ``data.class_names`` without torch."""
from data.base import DATASETS, DataError, Dataset, RawData, Split, create_dataset, register_dataset  # noqa: F401
