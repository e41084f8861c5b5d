"""Importing this package registers every method module in it (one method per file)."""
import importlib
import pkgutil

from methods.base import METHODS, Method, MethodParams, RunContext, Scores, create, register  # noqa: F401

_SKIP = {"base", "backbones"}
for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _SKIP and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
