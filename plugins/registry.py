"""One registry for methods and datasets (timm-style ``@register(name)``), with each entry's source.

``METHODS`` (methods/base.py) and ``DATASETS`` (data/base.py) are ``Registry`` instances: a read-only
mapping name -> class (``METHODS[name]``, ``name in METHODS``, ``sorted(METHODS)``, ``.items()``)
plus ``register``. Every entry remembers where its code came from: ``"builtin"`` for this
repository's modules, ``"file:NAME@sha256:HEX"`` for a plugin file, ``"package:DIST==VERSION"`` or
``"module:NAME"`` for an imported plugin module. The plugin loader (``plugins.loader``) sets the
source while it imports a plugin (``registering_from``), so a plugin registers with the very
decorators the built-ins use and its rows still say which code produced them.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping
from typing import Callable, Iterator, TypeVar

BUILTIN = "builtin"
T = TypeVar("T", bound=type)

_source: contextvars.ContextVar[str] = contextvars.ContextVar("adgrid_registry_source", default=BUILTIN)


@contextlib.contextmanager
def registering_from(source: str):
    """Entries registered inside this block record ``source`` (the plugin loader's tag)."""
    token = _source.set(source)
    try:
        yield
    finally:
        _source.reset(token)


class RegistryError(ValueError):
    """A registration that cannot stand: a name taken by another entry."""


class Registry(Mapping):
    """Name -> class, in registration order, with the source of each entry.

    ``kind`` ("method", "dataset") words the messages. ``register(name)`` is the decorator; a name
    registered twice is an error that names both sources (a plugin cannot replace a built-in)."""

    def __init__(self, kind: str, builtins: Callable[[], None] | None = None):
        self.kind = kind
        self._entries: dict[str, type] = {}
        self._sources: dict[str, str] = {}
        # imports the modules that register the built-ins, on the first use of the registry (so a
        # light import of the package, e.g. data.class_names for the report, loads none of them)
        self._builtins = builtins

    def _ensure_builtins(self) -> None:
        load, self._builtins = self._builtins, None
        if load is not None:
            try:
                with registering_from(BUILTIN):
                    load()
            except BaseException:  # a module that fails to import: said now, and tried again next use
                self._builtins = load
                raise

    # -- mapping -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> type:
        self._ensure_builtins()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._ensure_builtins()
        return iter(self._entries)

    def __len__(self) -> int:
        self._ensure_builtins()
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._entries)})"

    # -- registration ------------------------------------------------------------------------
    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` sets ``cls.name`` and records the source."""
        if not isinstance(name, str) or not name:
            raise RegistryError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def deco(cls: T) -> T:
            self.add(name, cls)
            return cls

        return deco

    def add(self, name: str, cls: type, source: str | None = None) -> None:
        source = source or _source.get()
        if source != BUILTIN:  # a plugin: the built-ins first, so that a clash with one is found
            self._ensure_builtins()
        if name in self._entries:
            have = self._sources[name]
            what = "the built-in" if have == BUILTIN else f"the one from {have}"
            raise RegistryError(f"{self.kind} {name!r} registered twice: {source} clashes with {what} "
                                f"({self._entries[name].__module__}.{self._entries[name].__qualname__})")
        cls.name = name
        self._entries[name] = cls
        self._sources[name] = source

    def remove(self, name: str) -> None:
        """Forget an entry (a plugin whose contract check failed is not left half-registered)."""
        self._entries.pop(name, None)
        self._sources.pop(name, None)

    def source(self, name: str) -> str | None:
        """Where ``name``'s code came from, or None for a name not registered."""
        self._ensure_builtins()
        return self._sources.get(name)

    def sources(self) -> dict[str, str]:
        self._ensure_builtins()
        return dict(self._sources)

    def create(self, name: str, params: dict | None, *args):
        """``cls(cls.Params(**params), *args)`` with a clear message for an unknown name."""
        self._ensure_builtins()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self._entries))}")
        cls = self._entries[name]
        return cls(cls.Params(**(params or {})), *args)
