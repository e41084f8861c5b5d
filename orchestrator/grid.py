"""Expand a validated grid into Cells with stable ids; drop incompatible cells with a reason."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator.config import GridConfig, sweep

# Dataset params that say where data lives, not what it is: two machines with different roots
# must agree on which cells are done, so these stay out of cell_id.
LOCATION_PARAMS = frozenset({"root", "download", "cache_dir"})


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def short_hash(obj: Any) -> str:
    return hashlib.sha256(canonical(obj).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Cell:
    """One (method, params, dataset, protocol, normal class or class set, seed)."""

    method: str
    params: dict
    dataset: str
    dataset_params: dict
    protocol: str
    normal_class: str | tuple  # a class name, a tuple of names (a class set), or "all"
    seed: int
    ood: tuple = ()
    ood_params: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    outlier_exposure: dict = field(default_factory=dict)  # {name, **params} of the entry's OE set
    # the grid's plugins (plugins.loader.PluginSpec dicts): a worker loads them before the cell; not
    # part of the identity (a method's source is recorded in its rows, ``method_source``)
    plugins: tuple = ()

    @property
    def identity(self) -> dict:
        content = {k: v for k, v in self.dataset_params.items() if k not in LOCATION_PARAMS}
        ident = {"method": self.method, "params": self.params, "dataset": self.dataset,
                 "dataset_params": content, "protocol": self.protocol,
                 "normal_class": list(self.normal_class) if isinstance(self.normal_class, tuple)
                 else self.normal_class, "seed": self.seed}
        if self.ood:
            ident["ood"] = sorted(self.ood)
        ood_content = {name: {k: v for k, v in (params or {}).items() if k not in LOCATION_PARAMS | {"images_root"}}
                       for name, params in (self.ood_params or {}).items()}
        ood_content = {name: params for name, params in ood_content.items() if params}
        if ood_content:   # an OOD image list or resize rule changes what the cell measures
            ident["ood_params"] = ood_content
        if self.outlier_exposure:   # only when set: cells of grids without it keep their ids
            ident["outlier_exposure"] = {k: v for k, v in self.outlier_exposure.items() if k not in LOCATION_PARAMS}
        return ident

    @property
    def cell_id(self) -> str:
        return short_hash(self.identity)

    def row_id(self, subkey: str | None) -> str:
        """Id of one row of this cell: the cell's id, or, for a cell that yields several rows
        (unified: one per category; ood: one per OOD set), a hash of the cell and the subkey."""
        return self.cell_id if subkey is None else short_hash([self.identity, subkey])

    @property
    def class_label(self) -> str:
        from data.protocols import class_label

        return class_label(self.normal_class)

    @property
    def data_key(self) -> tuple:
        """Cells with equal data_key read the same split (the runner's affinity, with the method's)."""
        return (self.dataset, canonical(self.dataset_params), self.protocol,
                canonical(self.normal_class), self.ood)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["normal_class"] = list(self.normal_class) if isinstance(self.normal_class, tuple) else self.normal_class
        d["ood"] = list(self.ood)
        d["plugins"] = [p.to_dict() if hasattr(p, "to_dict") else dict(p) for p in self.plugins]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        d = dict(d)
        if isinstance(d["normal_class"], list):
            d["normal_class"] = tuple(d["normal_class"])
        d["ood"] = tuple(d.get("ood", ()))
        d["plugins"] = tuple(d.get("plugins", ()))
        return cls(**d)

    def describe(self) -> str:
        extra = f" ood={','.join(self.ood)}" if self.ood else ""
        return (f"{self.cell_id}  {self.method} {canonical(self.params)}  {self.dataset}/{self.protocol}"
                f"  class={self.class_label} seed={self.seed}{extra}")


@dataclass
class Expansion:
    cells: list[Cell]
    dropped: list[tuple[str, str]]  # (what, why)


def _resolve_rule_class(dataset: str, params_json: str, class_json: str):
    """A rule's class resolved in a dataset: a name, a tuple of names, or None where the dataset
    has no such class (then the rule cannot match the cell)."""
    from data.protocols import is_planning

    return _resolve_rule_class_cached(dataset, params_json, class_json, is_planning())


@functools.lru_cache(maxsize=4096)
def _resolve_rule_class_cached(dataset: str, params_json: str, class_json: str, planning: bool):
    """``planning`` keys the cache: a dry run may resolve against a dataset's declared classes."""
    from data.protocols import resolve_classes
    from orchestrator.config import parse_rule_class

    try:
        return resolve_classes(dataset, json.loads(params_json), [parse_rule_class(json.loads(class_json))])[0]
    except Exception:  # DataError: the class is not one of this dataset's
        return None


def _matches(rule, cell: Cell) -> bool:
    checks = [(rule.method, cell.method), (rule.dataset, cell.dataset), (rule.protocol, cell.protocol),
              (rule.seed, cell.seed)]
    if any(want is not None and want != have for want, have in checks):
        return False
    is_set = isinstance(cell.normal_class, tuple)
    if rule.class_set is not None and rule.class_set != is_set:
        return False
    if rule.normal_class is None:
        return True
    if cell.normal_class == "all":  # unified / ood cells over every class
        return str(rule.normal_class) == "all"
    want = _resolve_rule_class(cell.dataset, canonical(cell.dataset_params), canonical(rule.normal_class))
    if want is None:
        return False
    return _holds(cell, want, exact=rule.exact)


def _holds(cell: Cell, want, exact: bool = False) -> bool:
    """Whether the cell's normal class is ``want`` (a name or a tuple of names), or, unless
    ``exact``, a class set holding the name ``want``."""
    if exact or isinstance(want, tuple):
        return want == cell.normal_class
    return want in (cell.normal_class if isinstance(cell.normal_class, tuple) else (cell.normal_class,))


def expand(grid: GridConfig, only: dict[str, list[str]] | None = None) -> Expansion:
    """Grid -> cells: methods × param sweep × datasets × classes × seeds, minus exclusions,
    minus cells whose method does not support the dataset's protocol (with a reason)."""
    from data.protocols import resolve_classes
    from methods import METHODS

    only = only or {}
    cells: list[Cell] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    plugins = tuple(spec.to_dict() for spec in grid.plugin_specs)
    for d in grid.datasets:
        if d.protocol in ("unified", "ood") and d.classes == "all":
            normal_classes = ["all"]
        else:
            normal_classes = resolve_classes(d.name, d.params, d.classes)
        for m in grid.methods:
            method_cls = METHODS[m.name]
            if d.protocol not in method_cls.protocols:
                dropped.append((f"{m.name} × {d.name}/{d.protocol}",
                                f"{m.name} does not support protocol {d.protocol!r} "
                                f"(supports {', '.join(sorted(method_cls.protocols))})"))
                continue
            for params in sweep(m.params_for(d.name, d.protocol)):
                resolved = method_cls.Params(**params).model_dump(mode="json", exclude_unset=True)
                for normal_class in normal_classes:
                    for seed in grid.seeds:
                        cell = Cell(method=m.name, params=resolved, dataset=d.name,
                                    dataset_params=d.params, protocol=d.protocol,
                                    normal_class=normal_class, seed=seed, ood=tuple(d.ood),
                                    ood_params=d.ood_params, resources=m.resources.model_dump(),
                                    outlier_exposure=d.outlier_exposure_spec, plugins=plugins)
                        if not _selected(cell, only) or cell.cell_id in seen:
                            continue
                        if any(_matches(rule, cell) for rule in grid.exclude):
                            dropped.append((cell.describe(), "excluded by the grid"))
                            continue
                        seen.add(cell.cell_id)
                        cells.append(cell)
    return Expansion(cells, dropped)


ONLY_KEYS = ("method", "dataset", "class", "seed", "protocol")


def _selected(cell: Cell, only: dict[str, list[str]]) -> bool:
    """--only KEY=VALUE filters: values of one key are alternatives, keys must all match."""
    have = {"method": {cell.method}, "dataset": {cell.dataset}, "protocol": {cell.protocol},
            "seed": {str(cell.seed)},
            "class": {cell.class_label, *(cell.normal_class if isinstance(cell.normal_class, tuple)
                                          else (cell.normal_class,))}}
    return all(have[key] & set(values) or (key == "class" and _class_index_selected(cell, values))
               for key, values in only.items())


def _class_index_selected(cell: Cell, values: list[str]) -> bool:
    """--only class=3 as an index into the cell's dataset (``cat`` on CIFAR-10), as in exclude rules."""
    if cell.normal_class == "all":
        return False
    params_json = canonical(cell.dataset_params)
    for value in values:
        want = _resolve_rule_class(cell.dataset, params_json, canonical(parse_only_class(value)))
        if want is not None and _holds(cell, want):
            return True
    return False


def parse_only_class(value: str):
    """An --only class value: ``3`` an index, ``0+1`` a class set, anything else a name."""
    from orchestrator.config import parse_rule_class

    return int(value) if value.isdigit() else parse_rule_class(value)
