"""Load users' methods and datasets: a grid's ``plugins:`` entries and installed entry points.

A grid names its plugins: ``plugins: [my_methods.py, my_package.detectors]``. An entry ending in
``.py`` or holding a path separator is a file, relative to the grid file; anything else is a module
name, imported as is or, failing that, from the grid file's folder. Installed packages declare
entry points in the groups ``adgrid.methods`` / ``adgrid.datasets`` (``importlib.metadata``); an
entry point's object is a module whose decorators register, or a class registered under the entry
point's name.

A plugin registers with the built-ins' decorators (``methods.register``, ``data.register_dataset``)
and each entry records its source (``plugins.registry``): ``file:NAME@sha256:HEX`` (a file, hashed
as read and executed from those very bytes under the stable module name
``adgrid_plugin_<stem>_<hash>``), ``package:DIST==VERSION`` (an installed distribution's module) or
``module:NAME@sha256:HEX`` (a module found on the path but in no distribution).

Every failure is a ``PluginError`` naming the plugin: a missing file, an import error (with the
traceback's last line), a name that clashes with a built-in or another plugin, a class without the
contract (a Method / Dataset subclass with ``fit`` and ``score`` / ``classes`` and ``load`` and a
pydantic ``Params``). ``bench.py`` turns it into exit code 2 before Ray starts. A failed plugin is
rolled back: nothing it registered stays.

On Ray workers ``ensure_loaded(specs)`` (called by ``orchestrator.cell.run_cell``) loads the same
plugins from the specs a cell carries: a file by its path where it exists with the same hash, else
from the job's runtime environment (``py_modules``, see ``ship_paths``), found by name and hash.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import importlib.util
import inspect
import re
import sys
import traceback
import types
from dataclasses import asdict, dataclass
from pathlib import Path

from plugins.registry import BUILTIN, Registry, RegistryError, registering_from

GROUPS = {"adgrid.methods": "method", "adgrid.datasets": "dataset"}


class PluginError(ValueError):
    """A plugin that cannot be used; the message names the file or module and says why."""


@dataclass(frozen=True)
class PluginSpec:
    """What a worker needs to load one plugin again, as plain data (it travels inside each cell).

    kind:     "file", "module" or "entry_point"
    target:   the file's absolute path, the module name, or "GROUP:NAME" of an entry point
    label:    how the grid (or the package) named it, for messages
    source:   the provenance tag its entries record (``plugins.registry``)
    sha256:   the file's hash (file plugins and path modules), None for installed packages
    sys_path: a folder put on ``sys.path`` to import a module plugin (the grid file's folder)
    """

    kind: str
    target: str
    label: str
    source: str
    sha256: str | None = None
    sys_path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PluginSpec":
        return cls(**d)

    @property
    def key(self) -> tuple:
        return (self.kind, self.target, self.sha256)


#: specs loaded in this process -> the (registry kind, name) pairs each registered
_loaded: dict[tuple, list[tuple[str, str]]] = {}


def registries() -> dict[str, Registry]:
    from data.base import DATASETS
    from methods.base import METHODS

    import data  # noqa: F401  (registers the built-in datasets first: a clash is then detected)
    import methods  # noqa: F401

    return {"method": METHODS, "dataset": DATASETS}


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def module_name_for(path: Path, sha256: str) -> str:
    """The stable module name a plugin file is imported under: the same file (by content) gets the
    same name in the driver and on every worker, and two files never share one."""
    stem = re.sub(r"\W", "_", path.stem)
    return f"adgrid_plugin_{stem}_{sha256[:12]}"


def _last_line(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return lines[-1].strip() if lines else repr(exc)


def _where(exc: BaseException, label: str) -> str:
    """`` (line N)``: the deepest frame inside the plugin, where the traceback has one."""
    if isinstance(exc, SyntaxError) and exc.lineno and Path(exc.filename or "").name == Path(label).name:
        return f" (line {exc.lineno})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).name == Path(label).name]
    return f" (line {frames[-1].lineno})" if frames else ""


# -------------------------------------------------------------------------------- resolution
def is_file_entry(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def resolve(entries: list[str], base_dir: str | Path) -> list[PluginSpec]:
    """A grid's ``plugins:`` entries -> specs (files hashed, modules located), without importing
    file plugins; raises PluginError for a file that does not exist or a module not found."""
    base = Path(base_dir)
    specs: list[PluginSpec] = []
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise PluginError(f"plugin entry {entry!r}: expected a .py file path or a module name")
        if is_file_entry(entry):
            path = Path(entry).expanduser()
            path = (path if path.is_absolute() else base / path).resolve()
            if not path.is_file():
                raise PluginError(f"plugin {entry}: no such file {path}")
            if path.suffix != ".py":
                raise PluginError(f"plugin {entry}: a plugin file is a Python file ending in .py")
            data = path.read_bytes()
            digest = sha256_bytes(data)
            specs.append(PluginSpec("file", str(path), entry, f"file:{path.name}@sha256:{digest}", digest))
        else:
            specs.append(_module_spec(entry, base))
    return specs


def _distribution_of(module: str) -> tuple[str, str] | None:
    top = module.split(".")[0]
    dists = md.packages_distributions().get(top) or []
    for dist in dists:
        try:
            return dist, md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None


def _module_spec(name: str, base: Path) -> PluginSpec:
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
        raise PluginError(f"plugin {name}: not a module name nor a .py file")
    sys_path = None
    found = _find_spec(name)
    if found is None and base.is_dir():
        sys.path.insert(0, str(base.resolve()))
        try:
            found = _find_spec(name)
        finally:
            sys.path.remove(str(base.resolve()))
        if found is not None:
            sys_path = str(base.resolve())
    if found is None:
        raise PluginError(f"plugin {name}: no module named {name!r} (not installed, and not in {base})")
    dist = _distribution_of(name)
    if dist is not None:
        return PluginSpec("module", name, name, f"package:{dist[0]}=={dist[1]}", None, sys_path)
    origin = found.origin if found.origin and Path(found.origin).is_file() else None
    digest = sha256_bytes(Path(origin).read_bytes()) if origin else None
    return PluginSpec("module", name, name, f"module:{name}" + (f"@sha256:{digest}" if digest else ""),
                      digest, sys_path)


def _find_spec(name: str):
    """The module's spec, or None where it (or a parent package) does not exist. Finding a submodule
    imports its parent packages: one that fails to import is a PluginError with its last line."""
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            return None
        raise PluginError(f"plugin {name}: import failed: {_last_line(e)}") from None
    except ValueError:
        return None
    except Exception as e:
        raise PluginError(f"plugin {name}: import failed: {_last_line(e)}") from None


def entry_point_specs() -> list[PluginSpec]:
    """Specs of every installed entry point in the ``adgrid.methods`` / ``adgrid.datasets`` groups."""
    specs = []
    for group in GROUPS:
        for ep in md.entry_points(group=group):
            dist = getattr(ep, "dist", None)
            source = (f"package:{dist.metadata['Name']}=={dist.version}" if dist is not None
                      else f"module:{ep.value}")
            label = f"entry point {ep.name} = {ep.value} ({group}" + (f", {source[8:]})" if dist else ")")
            specs.append(PluginSpec("entry_point", f"{group}:{ep.name}", label, source))
    return specs


# -------------------------------------------------------------------------------- loading
def load_all(specs: list[PluginSpec]) -> list[tuple[str, str]]:
    """Load each spec (once per process); returns every (kind, name) they registered."""
    out = []
    for spec in specs:
        out += load(spec)
    return out


def load(spec: PluginSpec) -> list[tuple[str, str]]:
    """Import one plugin with its source set, check what it registered, roll back on failure."""
    if spec.key in _loaded:
        return _loaded[spec.key]
    regs = registries()
    before = {kind: set(reg) for kind, reg in regs.items()}
    module_name, adopted = None, []
    try:
        with registering_from(spec.source):
            if spec.kind == "file":
                module_name = _exec_file(spec)
            elif spec.kind == "module":
                adopted = _import_module(spec)
            elif spec.kind == "entry_point":
                _load_entry_point(spec, regs)
            else:
                raise PluginError(f"plugin {spec.label}: unknown kind {spec.kind!r}")
        added = adopted + [(kind, name) for kind, reg in regs.items() for name in reg if name not in before[kind]]
        if not added and spec.kind != "entry_point":
            raise PluginError(f"plugin {spec.label}: registers no method or dataset (decorate a class "
                              "with @methods.register(\"name\") or @data.register_dataset(\"name\"))")
        for kind, name in added:
            check_contract(kind, name, regs[kind][name], spec)
    except BaseException as exc:
        for kind, reg in regs.items():
            for name in [n for n in reg if n not in before[kind]]:
                reg.remove(name)
        if module_name:
            sys.modules.pop(module_name, None)
        if isinstance(exc, (PluginError, KeyboardInterrupt)):
            raise
        if isinstance(exc, RegistryError):
            raise PluginError(f"plugin {spec.label}: {exc}") from None
        raise PluginError(f"plugin {spec.label}: import failed{_where(exc, spec.target)}: {_last_line(exc)}") from None
    _loaded[spec.key] = added
    return added


def _exec_file(spec: PluginSpec) -> str:
    """Run the plugin file's bytes, checked against the spec's hash, as module
    ``adgrid_plugin_<stem>_<hash>``; returns that name."""
    path = _locate_file(spec)
    data = path.read_bytes()
    name = module_name_for(path, spec.sha256)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(data, str(path), "exec"), module.__dict__)
    return name


def _locate_file(spec: PluginSpec) -> Path:
    """The spec's file where it exists with the same content, else a file of that name and hash on
    ``sys.path`` (a cluster worker: the job's runtime environment shipped it as a py_module)."""
    path = Path(spec.target)
    if path.is_file():
        if sha256_bytes(path.read_bytes()) == spec.sha256:
            return path
        changed = path
    else:
        changed = None
    for folder in sys.path:
        candidate = Path(folder or ".") / path.name
        if candidate != path and candidate.is_file() and sha256_bytes(candidate.read_bytes()) == spec.sha256:
            return candidate
    if changed is not None:
        raise PluginError(f"plugin {spec.label}: {path} changed since the run started (sha256 "
                          f"{spec.sha256[:12]}... expected); run the grid again")
    raise PluginError(f"plugin {spec.label}: {path} is not on this machine and no {path.name} with sha256 "
                      f"{spec.sha256[:12]}... is on its path (was the job's runtime environment shipped?)")


def _import_module(spec: PluginSpec) -> list[tuple[str, str]]:
    """Import a module plugin; returns the entries it had registered where it was imported before."""
    added_path = False
    if spec.sys_path and spec.sys_path not in sys.path and Path(spec.sys_path).is_dir():
        sys.path.insert(0, spec.sys_path)
        added_path = True
    try:
        if spec.target in sys.modules:  # imported before: its decorators ran under another source
            return _adopt(sys.modules[spec.target], spec)
        importlib.import_module(spec.target)
        return []
    finally:
        if added_path:
            sys.path.remove(spec.sys_path)


def _adopt(module, spec: PluginSpec) -> list[tuple[str, str]]:
    """A module imported before it was named as a plugin: its classes registered as built-ins (from
    this module, outside methods/ and data/) take the spec's source."""
    adopted = []
    for kind, reg in registries().items():
        for name in list(reg):
            cls = reg[name]
            if cls.__module__ == module.__name__ and reg.source(name) == BUILTIN \
                    and not module.__name__.startswith(("methods.", "data.")):
                reg.remove(name)
                reg.add(name, cls, spec.source)
                adopted.append((kind, name))
    return adopted


def _load_entry_point(spec: PluginSpec, regs: dict[str, Registry]) -> None:
    group, _, ep_name = spec.target.partition(":")
    matches = [ep for ep in md.entry_points(group=group) if ep.name == ep_name]
    if not matches:
        raise PluginError(f"plugin {spec.label}: entry point {ep_name!r} of group {group} is not installed here")
    obj = matches[0].load()
    if inspect.isclass(obj):
        reg = regs[GROUPS[group]]
        if not any(reg[name] is obj for name in reg):
            reg.register(ep_name)(obj)
        elif ep_name in reg and reg[ep_name] is not obj:
            raise PluginError(f"plugin {spec.label}: {GROUPS[group]} {ep_name!r} is another class")


# -------------------------------------------------------------------------------- contract
def _overrides(cls, base, attr: str) -> bool:
    own = getattr(cls, attr, None)
    return callable(own) and own is not getattr(base, attr, None)


def check_contract(kind: str, name: str, cls, spec: PluginSpec) -> None:
    """A plugin class must be usable exactly like a built-in: raise PluginError saying what is missing."""
    from pydantic import BaseModel

    what = f"plugin {spec.label}: {kind} {name!r} ({getattr(cls, '__qualname__', cls)})"
    if kind == "method":
        from methods.base import Method as base
        needs = ("fit", "score")
    else:
        from data.base import Dataset as base
        needs = ("classes", "load")
    if not inspect.isclass(cls) or not issubclass(cls, base):
        raise PluginError(f"{what} is not a subclass of {base.__module__}.{base.__name__}")
    missing = [attr for attr in needs if not _overrides(cls, base, attr)]
    if missing:
        raise PluginError(f"{what} has no {' / '.join(missing)} method (the {kind} contract: "
                          f"{', '.join(needs)} and Params)")
    params = cls.__dict__.get("Params", getattr(cls, "Params", None))
    if not (inspect.isclass(params) and issubclass(params, BaseModel)):
        raise PluginError(f"{what} has no Params: set Params to a pydantic model of its parameters "
                          f"(a subclass of {'methods.base.MethodParams' if kind == 'method' else 'data.base.DatasetParams'})")
    if kind == "method":
        from data.protocols import PROTOCOLS

        protocols = getattr(cls, "protocols", None)
        if not protocols or not set(protocols) <= set(PROTOCOLS):
            raise PluginError(f"{what}: protocols {protocols!r} must be a non-empty set of "
                              f"{', '.join(PROTOCOLS)}")


# -------------------------------------------------------------------------------- workers
def ensure_loaded(spec_dicts) -> None:
    """On a worker: load the plugins a cell carries (plain dicts), once per process."""
    for d in spec_dicts or ():
        spec = PluginSpec.from_dict(d) if isinstance(d, dict) else d
        if spec.key not in _loaded:
            load(spec)


def ship_paths(specs: list[PluginSpec]) -> list[str]:
    """What a cluster job's runtime environment must carry as ``py_modules`` for the workers to
    load these plugins: each plugin file, and the top package (or module file) of each module
    plugin that no installed distribution provides (installed packages must be installed there)."""
    out: list[str] = []
    for spec in specs:
        if spec.kind == "file":
            out.append(spec.target)
        elif spec.kind == "module" and not spec.source.startswith("package:"):
            top = spec.target.split(".")[0]
            if spec.sys_path:
                sys.path.insert(0, spec.sys_path)
            try:
                found = _find_spec(top)
            finally:
                if spec.sys_path:
                    sys.path.remove(spec.sys_path)
            if found is not None and found.submodule_search_locations:
                out.append(list(found.submodule_search_locations)[0])
            elif found is not None and found.origin and Path(found.origin).is_file():
                out.append(found.origin)
    return list(dict.fromkeys(out))


def unload_all() -> None:
    """Forget every plugin loaded in this process (its registry entries and modules): for tests."""
    for kind, reg in registries().items():
        for name, source in reg.sources().items():
            if source != BUILTIN:
                reg.remove(name)
    for name in [n for n in sys.modules if n.startswith("adgrid_plugin_")]:
        sys.modules.pop(name, None)
    _loaded.clear()
