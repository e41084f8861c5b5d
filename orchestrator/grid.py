"""Expand a validated grid into Cells with stable ids; drop incompatible cells with a reason."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

from orchestrator.config import GridConfig, sweep

# Dataset params that say where data lives, not what it is: two machines with different roots
# must agree on which cells are done, so these stay out of cell_id.
LOCATION_PARAMS = frozenset({"root", "download", "cache_dir"})


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def short_hash(obj: Any) -> str:
    return _hash_text(canonical(obj))


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _identity_class(normal_class):
    """A normal class as the identity holds it: a class set as a list."""
    return list(normal_class) if isinstance(normal_class, tuple) else normal_class


@dataclass(frozen=True)
class Cell:
    """One (method, params, dataset, protocol, normal class or class set, seed).

    ``cell_id``, ``params_json`` and ``data_key`` are computed once per cell and kept (a grid of
    100,000 cells asks for each many times); ``expand`` fills them in from what cells share. The
    fields must not be changed in place after that (the dataclass is frozen; its dicts are not)."""

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
                 "normal_class": _identity_class(self.normal_class), "seed": self.seed}
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

    @functools.cached_property
    def cell_id(self) -> str:
        return short_hash(self.identity)

    @functools.cached_property
    def params_json(self) -> str:
        """``canonical(params)``: the rows' params column, and the key of the method's affinity."""
        return canonical(self.params)

    def row_id(self, subkey: str | None) -> str:
        """Id of one row of this cell: the cell's id, or, for a cell that yields several rows
        (unified: one per category; ood: one per OOD set), a hash of the cell and the subkey."""
        return self.cell_id if subkey is None else short_hash([self.identity, subkey])

    @property
    def class_label(self) -> str:
        from data.protocols import class_label

        return class_label(self.normal_class)

    @functools.cached_property
    def data_key(self) -> tuple:
        """Cells with equal data_key read the same split (the runner's affinity, with the method's)."""
        return (self.dataset, canonical(self.dataset_params), self.protocol,
                canonical(self.normal_class), self.ood)

    def to_dict(self) -> dict:
        values = self.__dict__
        d = {name: values[name] for name in _FIELDS}   # the fields, not the cached properties
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
        return (f"{self.cell_id}  {self.method} {self.params_json}  {self.dataset}/{self.protocol}"
                f"  class={self.class_label} seed={self.seed}{extra}")


_FIELDS = tuple(f.name for f in fields(Cell))


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
    return (rule.seed is None or rule.seed == cell.seed) and _matches_but_seed(rule, cell)


def _matches_but_seed(rule, cell: Cell) -> bool:
    """Whether ``rule`` matches the cell in all but the seed: the same answer for every seed of one
    (method, params, dataset entry, class), so ``expand`` asks once per such group, not per cell."""
    checks = [(rule.method, cell.method), (rule.dataset, cell.dataset), (rule.protocol, cell.protocol)]
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


# Placeholders for the normal class and the seed in an _IdTemplate (JSON-escaped: "\u0000...").
_CLASS_SLOT = "\x00adgrid:normal_class\x00"
_SEED_SLOT = "\x00adgrid:seed\x00"


class _IdTemplate:
    """The canonical identity of one (method, params, dataset entry) with the normal class and
    the seed left open, so that each of its cells' ids costs a string join and one sha256 instead
    of building and JSON-encoding a dict. The identity is encoded once, by ``Cell.identity``
    itself, with placeholders that are then cut out: the ids are byte-identical to
    ``short_hash(cell.identity)`` (tests/test_grid_scale.py compares both). ``ok`` is False where a
    placeholder does not occur exactly once (then each cell computes its own id)."""

    def __init__(self, proto: Cell):
        text = canonical(proto.identity)
        slot_class, slot_seed = canonical(_CLASS_SLOT), canonical(_SEED_SLOT)
        self.ok = (text.count(slot_class) == 1 and text.count(slot_seed) == 1
                   and text.index(slot_class) < text.index(slot_seed))
        if self.ok:
            self.head, rest = text.split(slot_class)
            self.mid, self.tail = rest.split(slot_seed)

    def cell_id(self, class_json: str, seed_json: str) -> str:
        return _hash_text(f"{self.head}{class_json}{self.mid}{seed_json}{self.tail}")


def expand(grid: GridConfig, only: dict[str, list[str]] | None = None) -> Expansion:
    """Grid -> cells: methods × param sweep × datasets × classes × seeds, minus exclusions,
    minus cells whose method does not support the dataset's protocol (with a reason).

    Linear in the cells with a small constant: params are validated, exclusion rules and --only
    filters matched, and the identity encoded once per (method, params, dataset entry, class);
    per cell there is the seed's check, one sha256 and the Cell itself."""
    from data.protocols import resolve_classes
    from methods import METHODS

    only = only or {}
    class_only = {key: values for key, values in only.items() if key != "seed"}
    seeds = [(seed, canonical(seed)) for seed in grid.seeds if "seed" not in only or str(seed) in only["seed"]]
    cells: list[Cell] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    plugins = tuple(spec.to_dict() for spec in grid.plugin_specs)
    for d in grid.datasets:
        if d.protocol in ("unified", "ood") and d.classes == "all":
            normal_classes = ["all"]
        else:
            normal_classes = resolve_classes(d.name, d.params, d.classes)
        # shared by all cells of this entry (a Cell's dicts are never changed in place)
        dataset_params, ood, ood_params = d.params, tuple(d.ood), d.ood_params
        outlier_exposure = d.outlier_exposure_spec
        for m in grid.methods:
            method_cls = METHODS[m.name]
            if d.protocol not in method_cls.protocols:
                dropped.append((f"{m.name} × {d.name}/{d.protocol}",
                                f"{m.name} does not support protocol {d.protocol!r} "
                                f"(supports {', '.join(sorted(method_cls.protocols))})"))
                continue
            resources = m.resources.model_dump()
            for params in sweep(m.params_for(d.name, d.protocol)):
                resolved = method_cls.Params(**params).model_dump(mode="json", exclude_unset=True)
                params_json = canonical(resolved)

                def make(normal_class, seed) -> Cell:
                    return Cell(method=m.name, params=resolved, dataset=d.name, dataset_params=dataset_params,
                                protocol=d.protocol, normal_class=normal_class, seed=seed, ood=ood,
                                ood_params=ood_params, resources=resources, outlier_exposure=outlier_exposure,
                                plugins=plugins)

                template = _IdTemplate(make(_CLASS_SLOT, _SEED_SLOT))
                for normal_class in normal_classes:
                    if not seeds:
                        break
                    proto = make(normal_class, seeds[0][0])
                    if not _selected(proto, class_only):
                        continue
                    rules = [rule for rule in grid.exclude if _matches_but_seed(rule, proto)]
                    class_json, data_key = canonical(_identity_class(normal_class)), proto.data_key
                    for seed, seed_json in seeds:
                        cell = make(normal_class, seed)
                        cached = cell.__dict__   # what Cell's cached properties would compute
                        cached["params_json"], cached["data_key"] = params_json, data_key
                        if template.ok:
                            cached["cell_id"] = template.cell_id(class_json, seed_json)
                        cell_id = cell.cell_id
                        if cell_id in seen:
                            continue
                        if any(rule.seed is None or rule.seed == seed for rule in rules):
                            dropped.append((cell.describe(), "excluded by the grid"))
                            continue
                        seen.add(cell_id)
                        cells.append(cell)
    return Expansion(cells, dropped)


#: (method class, canonical params) -> the method's affinity_key of those params, validated
_AFFINITY_KEYS: dict[tuple, tuple] = {}
_AFFINITY_KEYS_MAX = 1 << 16


def affinity(cell: Cell) -> tuple:
    """The runner's scheduling key: (the cell's data split, the method's ``affinity_key``). The
    method's Params are validated once per distinct (method, params), not once per cell: a grid of
    10,000 seeds of one method has one set of params."""
    from methods import METHODS

    method_cls = METHODS[cell.method]
    key = (method_cls, cell.params_json)
    try:
        method_key = _AFFINITY_KEYS[key]
    except KeyError:
        method_key = method_cls.affinity_key(method_cls.Params(**cell.params))
        if len(_AFFINITY_KEYS) >= _AFFINITY_KEYS_MAX:
            _AFFINITY_KEYS.clear()
        _AFFINITY_KEYS[key] = method_key
    return (cell.data_key, method_key)


ONLY_KEYS = ("method", "dataset", "class", "seed", "protocol")


def _selected(cell: Cell, only: dict[str, list[str]]) -> bool:
    """--only KEY=VALUE filters: values of one key are alternatives, keys must all match."""
    if not only:
        return True
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
