"""Grid files: parse YAML, validate with pydantic, and check every name against the registries.

Every mistake becomes a ``ConfigError`` whose message names the offending entry (``methods[1]
.params.backbone``) and, where there is a closed set, lists the valid choices; ``bench.py`` turns
it into exit code 2 before Ray starts.
"""
from __future__ import annotations

import difflib
import itertools
import os
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

ClassItem = Union[int, str, list[Union[int, str]]]
#: libyaml's safe loader where PyYAML was built with it (a grid of 100,000 seeds parses ~6x faster),
#: the pure-Python one otherwise; both build plain Python objects only.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: A grid or run name: one folder inside --results (no separator, not "." or "..", not hidden).
NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


class ConfigError(ValueError):
    """A grid file that cannot run; the message names the entry and the valid choices."""


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpu: float = Field(0.0, ge=0, description="GPU fraction per cell (0.25 lets four share one)")
    cpu: float = Field(1.0, gt=0, description="CPU slots per worker")


class ParamsOverride(BaseModel):
    """Params that replace a method's own on the datasets this entry selects (a paper's setting that
    differs per dataset: FCDD's outlier exposure on CIFAR-10, confetti noise on MVTec AD)."""

    model_config = ConfigDict(extra="forbid")
    dataset: str | None = None
    protocol: str | None = None
    params: dict[str, Any] = Field(min_length=1)

    def selects(self, dataset: str, protocol: str) -> bool:
        return all(want is None or want == have
                   for want, have in ((self.dataset, dataset), (self.protocol, protocol)))


class MethodEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    overrides: list[ParamsOverride] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)

    def params_for(self, dataset: str, protocol: str) -> dict[str, Any]:
        """The entry's params with every override that selects (dataset, protocol) applied in order."""
        merged = dict(self.params)
        for override in self.overrides:
            if override.selects(dataset, protocol):
                merged.update(override.params)
        return merged


class OutlierExposureEntry(BaseModel):
    """The outlier-exposure set of a dataset entry (FCDD's ``anomaly_source: oe``): a registered
    dataset whose train side the data layer provides; keys other than ``name`` are its params."""

    model_config = ConfigDict(extra="allow")
    name: str

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DatasetEntry(BaseModel):
    """A dataset with its protocol; keys other than these are the dataset's own params (root...).
    ``outlier_exposure``: the set a method that asks for outlier exposure gets (see
    ``data.protocols.outlier_exposure_source``); it enters a cell's identity only when given."""

    model_config = ConfigDict(extra="allow")
    name: str
    protocol: str = "one_class"
    classes: Union[Literal["all"], list[ClassItem]] = "all"
    ood: list[str] = Field(default_factory=list)
    ood_params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    outlier_exposure: OutlierExposureEntry | None = None

    @property
    def outlier_exposure_spec(self) -> dict[str, Any]:
        """``{name, **params}`` of the outlier-exposure set, {} when the entry names none."""
        oe = self.outlier_exposure
        return {"name": oe.name, **oe.params} if oe is not None else {}

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ExcludeRule(BaseModel):
    """Drops the cells it matches. ``class`` (a name, an index, or a class set as a list or as
    ``a+b``) matches that class and, unless ``exact``, every class set holding it; ``class_set``
    true matches only class-set cells, false only single-class cells."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: str | None = None
    dataset: str | None = None
    protocol: str | None = None
    normal_class: ClassItem | None = Field(None, alias="class")
    exact: bool = False
    class_set: bool | None = None
    seed: int | None = None


class GridConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    datasets: list[DatasetEntry] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    exclude: list[ExcludeRule] = Field(default_factory=list)
    #: plugin files (relative to the grid file) or module names whose methods / datasets the grid uses
    plugins: list[str] = Field(default_factory=list)
    # the loaded plugins (the grid's and the installed entry points) as specs the cells carry to the
    # workers (plugins.loader.PluginSpec); set by load_grid
    _plugin_specs: tuple = PrivateAttr(default=())

    @property
    def plugin_specs(self) -> tuple:
        return self._plugin_specs

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be unique")
        return seeds


def run_folder(results: str | Path, name: str) -> Path:
    """``<results>/<name>``, refusing a name that would land anywhere but one folder inside it."""
    inside = os.path.normpath(os.path.abspath(os.path.join(results, name)))
    root = os.path.normpath(os.path.abspath(results))
    if not re.fullmatch(NAME_PATTERN, name) or os.path.dirname(inside) != root:
        raise ConfigError(f"run name {name!r}: a run is one folder inside --results {results}; use letters, "
                          "digits, '_', '-' and '.', not starting with '.'")
    return Path(results) / name


def _choices(name: str, valid) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{name!r}{hint}; valid: {', '.join(valid)}"


def _loc(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _pydantic_message(prefix: str, err: ValidationError, valid_fields=None) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(p for p in [prefix, _loc(e["loc"])] if p)
        msg = e["msg"]
        if e["type"] == "extra_forbidden" and valid_fields is not None:
            msg = f"unknown parameter; valid: {', '.join(sorted(valid_fields))}"
        lines.append(f"{where}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden"
                                           and not isinstance(e["input"], dict) else ""))
    return "\n".join(lines)


def parse_rule_class(item):
    """An exclude rule's class as resolve_classes takes it: ``a+b`` is the class set [a, b]."""
    if isinstance(item, str) and "+" in item:
        return [int(x) if x.isdigit() else x for x in item.split("+")]
    return item


def sweep(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Expand list values into their cartesian product (a list parameter takes a nested list)."""
    keys = list(params)
    axes = [params[k] if isinstance(params[k], list) else [params[k]] for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def read_yaml(path: Path):
    """A grid file's YAML (safe loader), or a ConfigError naming the file."""
    try:
        return yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such grid file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None


def load_grid(path: str | Path) -> GridConfig:
    """Read and fully validate a grid file (structure, names, params, classes)."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid file is a mapping with name, seeds, datasets, methods")
    try:
        grid = GridConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid grid\n" + _pydantic_message("", e, GridConfig.model_fields)) from None
    grid._plugin_specs = load_plugins(grid.plugins, path.parent, str(path))
    check_names(grid, str(path))
    return grid


def load_grid_plugins(path: str | Path) -> tuple:
    """Only the plugins of a grid file (for ``bench.py list GRID``: no data needs to be present)."""
    path = Path(path)
    raw = read_yaml(path)
    entries = raw.get("plugins", []) if isinstance(raw, dict) else []
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: plugins must be a list of .py files or module names, got {entries!r}")
    return load_plugins(entries, path.parent, str(path))


def load_plugins(entries: list[str], base_dir: Path, where: str = "grid") -> tuple:
    """Load the installed entry points and the grid's plugins into the registries (before names are
    checked); a bad plugin is a ConfigError naming it. Returns the specs the cells carry."""
    from plugins.loader import PluginError, entry_point_specs, load_all, resolve

    try:
        specs = entry_point_specs() + resolve(entries, base_dir)
        load_all(specs)
    except PluginError as e:
        raise ConfigError(f"{where}: {e}") from None
    return tuple(specs)


def check_names(grid: GridConfig, where: str = "grid") -> None:
    """Check methods, datasets, protocols, params and classes against the registries."""
    from data import DATASETS
    from data.protocols import PROTOCOLS, resolve_classes
    from methods import METHODS

    problems: list[str] = []
    for i, m in enumerate(grid.methods):
        if m.name not in METHODS:
            problems.append(f"methods[{i}].name: unknown method {_choices(m.name, METHODS)}")
            continue
        params_model = METHODS[m.name].Params
        variants = [(f"methods[{i}] ({m.name}).params", m.params)]
        variants += [(f"methods[{i}] ({m.name}).overrides[{j}].params", {**m.params, **o.params})
                     for j, o in enumerate(m.overrides)]
        for where_params, params in variants:
            for combo in sweep(params):
                try:
                    params_model(**combo)
                except ValidationError as e:
                    problems.append(_pydantic_message(where_params, e, params_model.model_fields))
                    break
        for j, o in enumerate(m.overrides):
            if o.dataset is not None and o.dataset not in DATASETS:
                problems.append(f"methods[{i}] ({m.name}).overrides[{j}].dataset: unknown dataset "
                                f"{_choices(o.dataset, DATASETS)}")
            if o.protocol is not None and o.protocol not in PROTOCOLS:
                problems.append(f"methods[{i}] ({m.name}).overrides[{j}].protocol: unknown protocol "
                                f"{_choices(o.protocol, PROTOCOLS)}")
            if not any(o.selects(d.name, d.protocol) for d in grid.datasets):
                problems.append(f"methods[{i}] ({m.name}).overrides[{j}]: selects no dataset entry "
                                f"of this grid (dataset={o.dataset!r}, protocol={o.protocol!r})")
    for i, d in enumerate(grid.datasets):
        if d.name not in DATASETS:
            problems.append(f"datasets[{i}].name: unknown dataset {_choices(d.name, DATASETS)}")
            continue
        if d.protocol not in PROTOCOLS:
            problems.append(f"datasets[{i}] ({d.name}).protocol: unknown protocol "
                            f"{_choices(d.protocol, PROTOCOLS)}")
        ds_params_model = DATASETS[d.name].Params
        try:
            ds_params_model(**d.params)
        except ValidationError as e:
            problems.append(_pydantic_message(f"datasets[{i}] ({d.name})", e,
                                              set(ds_params_model.model_fields) | set(DatasetEntry.model_fields)))
            continue
        if d.protocol == "ood" and not d.ood:
            problems.append(f"datasets[{i}] ({d.name}).ood: the ood protocol needs at least one OOD dataset")
        for j, o in enumerate(d.ood):
            if o not in DATASETS:
                problems.append(f"datasets[{i}] ({d.name}).ood[{j}]: unknown dataset {_choices(o, DATASETS)}")
        if d.outlier_exposure is not None:
            oe = d.outlier_exposure
            if oe.name not in DATASETS:
                problems.append(f"datasets[{i}] ({d.name}).outlier_exposure.name: unknown dataset "
                                f"{_choices(oe.name, DATASETS)}")
            else:
                try:
                    DATASETS[oe.name].Params(**oe.params)
                except ValidationError as e:
                    problems.append(_pydantic_message(f"datasets[{i}] ({d.name}).outlier_exposure ({oe.name})", e,
                                                      set(DATASETS[oe.name].Params.model_fields) | {"name"}))
        if d.ood and d.protocol != "ood":
            problems.append(f"datasets[{i}] ({d.name}).ood: only the ood protocol takes OOD sets")
        try:
            resolve_classes(d.name, d.params, d.classes)
        except Exception as e:  # DataError: unknown class, missing root...
            problems.append(f"datasets[{i}] ({d.name}).classes: {e}")
    for i, rule in enumerate(grid.exclude):
        if rule.method is not None and rule.method not in METHODS:
            problems.append(f"exclude[{i}].method: unknown method {_choices(rule.method, METHODS)}")
        if rule.dataset is not None and rule.dataset not in DATASETS:
            problems.append(f"exclude[{i}].dataset: unknown dataset {_choices(rule.dataset, DATASETS)}")
        if rule.protocol is not None and rule.protocol not in PROTOCOLS:
            problems.append(f"exclude[{i}].protocol: unknown protocol {_choices(rule.protocol, PROTOCOLS)}")
        if rule.dataset is not None and rule.normal_class is not None and rule.dataset in DATASETS:
            entry = next((d for d in grid.datasets if d.name == rule.dataset), None)
            try:
                resolve_classes(rule.dataset, entry.params if entry else {}, [parse_rule_class(rule.normal_class)])
            except Exception as e:
                problems.append(f"exclude[{i}].class: {e}")
    if problems:
        raise ConfigError(f"{where}: invalid grid\n" + "\n".join(problems))
