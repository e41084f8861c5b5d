"""Protocols: a dataset -> one train ``Split`` and one or more test ``Split``s (1 = anomalous / OOD).

A normal class is a class name, a tuple of names (a class set) or "all". Splits of fixed datasets
do not depend on ``seed``: no protocol here subsamples (the argument is kept for ones that will).
Datasets whose categories hold their own anomalies (``per_class_anomalies``: mvtec, synthetic,
folder) label their defect images 1; classification datasets label the other classes 1.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from data.base import DATASETS, DataError, Dataset, OutlierExposure, RawData, Split, create_dataset

PROTOCOLS: dict[str, str] = {
    "one_class": "train on the normal class(es) only; test label 1 for every other class, or for "
                 "defect datasets (MVTec-style) the category's defect images",
    "unified": "one model on the normal images of every category (UniAD); one test split per "
               "category, labelled as one_class",
    "ood": "train a classifier on the in-distribution classes; test = ID test images (0) plus each "
           "OOD dataset's test images (1), one test split per OOD dataset",
    "osr": "train a classifier on the known classes; test label 1 for the unknown classes of the "
           "same dataset",
}
NON_CONTENT_PARAMS = frozenset({"download"})  # params that never change what a dataset holds

NormalClass = str | tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# datasets and class resolution

@lru_cache(maxsize=64)
def _dataset_cached(name: str, params_json: str) -> Dataset:
    return create_dataset(name, json.loads(params_json))


def get_dataset(name: str, params: dict | None = None) -> Dataset:
    """A validated dataset instance (memoized per process)."""
    return _dataset_cached(name, json.dumps(params or {}, sort_keys=True))


def canonical_params(dataset: Dataset) -> str:
    """JSON of every param after defaults are filled, minus ones that never change the content."""
    values = {k: v for k, v in dataset.params.model_dump(mode="json").items() if k not in NON_CONTENT_PARAMS}
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


_PLANNING: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("planning", default=None)


@contextlib.contextmanager
def planning():
    """Within it, a dataset whose files are absent lists its ``declared_classes`` (MVTec AD's 15
    categories) instead of failing, so a dry run can show a grid's cells on a machine without the
    data. Yields the list of notes saying which datasets were planned that way."""
    notes: list[str] = []
    token = _PLANNING.set(notes)
    try:
        yield notes
    finally:
        _PLANNING.reset(token)


def is_planning() -> bool:
    return _PLANNING.get() is not None


def dataset_classes(name: str, ds: Dataset) -> list[str]:
    """``ds.classes()``, or its declared classes while planning and its files are absent."""
    try:
        return ds.classes()
    except DataError as e:
        notes = _PLANNING.get()
        if notes is None or not ds.declared_classes:
            raise
        note = f"{e} Planned with its {len(ds.declared_classes)} published classes."
        if note not in notes:
            notes.append(note)
        return list(ds.declared_classes)


def _class_name(dataset: str, names: Sequence[str], item) -> str:
    if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
        if 0 <= item < len(names):
            return names[item]
    elif isinstance(item, str) and item in names:
        return item
    raise DataError(f"{dataset}: unknown class {item!r}; valid classes (by name, or index 0.."
                    f"{len(names) - 1}): {', '.join(names)}")


def resolve_classes(dataset: str, dataset_params: dict | None, spec) -> list[NormalClass]:
    """"all" -> every class name; a list of ints (indices), names, or lists of those (class
    sets, returned as tuples of names in the dataset's class order). Duplicates are dropped."""
    ds = get_dataset(dataset, dataset_params)
    names = dataset_classes(dataset, ds)
    if isinstance(spec, str) and spec == "all":
        return list(names)
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    resolved: list[NormalClass] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            if not item:
                raise DataError(f"{dataset}: an empty class set in classes {spec!r}")
            members = {_class_name(dataset, names, x) for x in item}
            value: NormalClass = tuple(sorted(members, key=names.index))
        else:
            value = _class_name(dataset, names, item)
        if value not in resolved:
            resolved.append(value)
    if not resolved:
        raise DataError(f"{dataset}: no classes given")
    return resolved


def class_label(normal_class) -> str:
    """"bottle", or "0+1+2+3+4" for a class set (the ``normal_class`` of rows)."""
    if isinstance(normal_class, (list, tuple)):
        return "+".join(str(c) for c in normal_class)
    return str(normal_class)


# ---------------------------------------------------------------------------------------------
# building splits

@dataclass
class Setup:
    """What every protocol gets: the dataset, its canonical params and the normal classes."""

    name: str
    ds: Dataset
    params_json: str
    protocol: str
    normal: list[str]      # the normal / in-distribution / known class names
    label: str             # class_label of the normal class as given
    outlier_exposure: OutlierExposure | None = None

    def declared(self) -> dict:
        """The typed fields every split of this setup carries (``Split.dataset`` ...)."""
        return dict(dataset=self.name, normal_classes=tuple(self.normal), statistics=self.ds.statistics,
                    recipe_family=self.ds.recipe_family)

    def normal_ids(self) -> np.ndarray:
        names = self.ds.classes()
        return np.asarray([names.index(c) for c in self.normal], dtype=np.int64)

    def reindex(self, targets: np.ndarray) -> np.ndarray:
        """Original class ids -> position in the normal set (0..K-1), -1 for other classes."""
        lookup = np.full(len(self.ds.classes()), -1, dtype=np.int64)
        lookup[self.normal_ids()] = np.arange(len(self.normal))
        return lookup[targets]

    def split(self, raw: RawData, side: str, labels: np.ndarray, *, loaded: Sequence[str] | None,
              targets: np.ndarray | None = None, class_names: list[str] | None = None) -> Split:
        """A Split of ``raw`` (loaded for classes ``loaded``, None = all). Its key names all that
        decides its content; ``meta["images_key"]`` only what decides its images (e.g. the
        one_class test images of CIFAR-10 are the same for every normal class)."""
        meta = dict(raw.meta)
        files = meta.pop("content_id", None)
        subset = meta.pop("subset", None)
        suffix = "".join(f"|{name}={value}" for name, value in (("subset", subset), ("files", files)) if value)
        loaded_label = "all" if loaded is None else class_label(tuple(loaded))
        meta.update(dataset=self.name, protocol=self.protocol, normal_class=self.label, side=side,
                    images_key=f"{self.name}|{self.params_json}|{side}|{loaded_label}{suffix}")
        split = Split(images=raw.images, labels=np.asarray(labels, dtype=np.int64),
                      targets=np.asarray(raw.targets if targets is None else targets, dtype=np.int64),
                      class_names=list(raw.class_names if class_names is None else class_names),
                      key=f"{self.name}|{self.params_json}|{self.protocol}|{self.label}|{side}{suffix}",
                      masks=raw.masks, meta=meta, **self.declared(),
                      outlier_exposure=self.outlier_exposure if side == "train" else None)
        if len(split) == 0:
            raise DataError(f"{self.name}: the {side} split of {self.protocol} for {self.label!r} is empty")
        return split


def normal_only(raw: RawData) -> RawData:
    """The images of ``raw`` that are not defect images (per-category anomalies dropped)."""
    if raw.is_anomalous is None or not raw.is_anomalous.any():
        return raw
    keep = np.flatnonzero(~raw.is_anomalous)
    n = len(raw.targets)
    meta = {k: take(v, keep) if isinstance(v, (list, np.ndarray)) and len(v) == n else v
            for k, v in raw.meta.items()}
    return RawData(images=take(raw.images, keep), targets=raw.targets[keep], class_names=raw.class_names,
                   masks=None if raw.masks is None else take(raw.masks, keep),
                   is_anomalous=raw.is_anomalous[keep], meta={**meta, "subset": "normal"})


def take(values, index: np.ndarray):
    """Rows ``index`` of an array, or items of a list."""
    if isinstance(values, np.ndarray):
        return values[index]
    return [values[i] for i in index]


def require_both_labels(split: Split, dataset: str) -> Split:
    present = set(np.unique(split.labels).tolist())
    if present != {0, 1}:
        only = "normal" if present == {0} else "anomalous"
        raise DataError(f"{dataset}: test split {split.meta.get('side')} of {split.meta.get('protocol')} "
                        f"for {split.meta.get('normal_class')!r} has only {only} images; AUROC needs both")
    return split


def _one_class(setup: Setup, **_) -> tuple[Split, list]:
    raw_train = setup.ds.load("train", setup.normal)
    train = setup.split(raw_train, "train", np.zeros(len(raw_train.targets)), loaded=setup.normal)
    if setup.ds.per_class_anomalies:
        raw_test = setup.ds.load("test", setup.normal)
        test = setup.split(raw_test, "test", raw_test.is_anomalous.astype(np.int64), loaded=setup.normal)
    else:
        raw_test = setup.ds.load("test")
        labels = ~np.isin(raw_test.targets, setup.normal_ids())
        test = setup.split(raw_test, "test", labels, loaded=None)
    return train, [(None, require_both_labels(test, setup.name))]


def _unified(setup: Setup, **_) -> tuple[Split, list]:
    if not setup.ds.per_class_anomalies:
        raise DataError(f"{setup.name}: the unified protocol needs a dataset whose categories hold their "
                        f"own anomalies (mvtec, synthetic, folder); use one_class with a class set instead")
    raw_train = setup.ds.load("train", setup.normal)
    train = setup.split(raw_train, "train", np.zeros(len(raw_train.targets)), loaded=setup.normal)
    tests = []
    for category in setup.normal:
        raw = setup.ds.load("test", [category])
        split = setup.split(raw, f"test:{category}", raw.is_anomalous.astype(np.int64), loaded=[category])
        tests.append((category, require_both_labels(split, setup.name)))
    return train, tests


def _ood(setup: Setup, *, ood: list[str] | None, ood_params: dict | None, **_) -> tuple[Split, list]:
    if not ood:
        raise DataError(f"{setup.name}: the ood protocol needs at least one OOD dataset (`ood: [...]`)")
    ood_params = ood_params or {}
    stray = sorted(set(ood_params) - set(ood))
    if stray:
        raise DataError(f"ood_params names {stray}, which are not in the OOD datasets {ood}")
    if setup.name in ood:
        raise DataError(f"{setup.name}: a dataset cannot be its own OOD set")
    raw_train = setup.ds.load("train", setup.normal)
    train = setup.split(raw_train, "train", np.zeros(len(raw_train.targets)), loaded=setup.normal,
                        targets=setup.reindex(raw_train.targets), class_names=setup.normal)
    raw_test = normal_only(setup.ds.load("test", setup.normal))
    id_test = setup.split(raw_test, "test", np.zeros(len(raw_test.targets)), loaded=setup.normal,
                          targets=setup.reindex(raw_test.targets), class_names=setup.normal)
    if not isinstance(id_test.images, np.ndarray):
        raise DataError(f"{setup.name}: the ood protocol needs in-distribution images of one size")
    _, height, width, channels = id_test.images.shape
    n_id = len(id_test)
    tests = []
    for ood_name in ood:
        params, options = ood_options(ood_name, ood_params.get(ood_name) or {})
        ood_images, ood_files = _ood_images(ood_name, json.dumps(params, sort_keys=True), height, width, channels,
                                            json.dumps(options, sort_keys=True))
        n_ood = len(ood_images)
        listed = options.get("image_list") or params.get("image_list")
        extra = f"|ood={ood_name}|{canonical_params(get_dataset(ood_name, params))}|resize={options['resize']}"
        extra += f"|ood_files={ood_files}" if ood_files else ""
        tests.append((ood_name, Split(
            images=np.concatenate([id_test.images, ood_images]),
            labels=np.concatenate([np.zeros(n_id, np.int64), np.ones(n_ood, np.int64)]),
            targets=np.concatenate([id_test.targets, np.full(n_ood, -1, np.int64)]),
            class_names=list(setup.normal),
            key=id_test.key + extra,
            meta={"dataset": setup.name, "protocol": setup.protocol, "normal_class": setup.label,
                  "side": f"test:{ood_name}", "ood_set": ood_name,
                  "ood_list": "filtered" if listed else "full", "ood_resize": options["resize"],
                  "images_key": id_test.meta["images_key"] + extra},
            channels=channels, size=(height, width), **setup.declared(),
        )))
    return train, tests


def _osr(setup: Setup, **_) -> tuple[Split, list]:
    if setup.ds.per_class_anomalies:
        raise DataError(f"{setup.name}: the osr protocol needs a classification dataset, not one with "
                        f"per-category defects")
    if len(setup.normal) == len(setup.ds.classes()):
        raise DataError(f"{setup.name}: osr needs a known class set smaller than all classes "
                        f"(classes: [[...known...]])")
    raw_train = setup.ds.load("train", setup.normal)
    train = setup.split(raw_train, "train", np.zeros(len(raw_train.targets)), loaded=setup.normal,
                        targets=setup.reindex(raw_train.targets), class_names=setup.normal)
    raw_test = setup.ds.load("test")
    targets = setup.reindex(raw_test.targets)
    test = setup.split(raw_test, "test", targets < 0, loaded=None, targets=targets, class_names=setup.normal)
    return train, [(None, require_both_labels(test, setup.name))]


PROTOCOL_BUILDERS: dict[str, Callable[..., tuple[Split, list]]] = {
    "one_class": _one_class, "unified": _unified, "ood": _ood, "osr": _osr,
}


#: Per-OOD-set keys of ``ood_params`` the protocol reads itself (not the dataset's params).
OOD_RESIZE = ("short_side_crop", "squash")


def ood_options(name: str, params: dict) -> tuple[dict, dict]:
    """(the dataset's params, the protocol's options) from one OOD set's ``ood_params`` entry.

    Options: ``resize`` — ``short_side_crop`` (default: OpenOOD's test preprocessor,
    ``openood/evaluation_api/preprocessor.py`` ``TestStandardPreProcessor``: ``Resize(pre_size)`` of
    the short side, then ``CenterCrop(img_size)``) or ``squash`` (both sides to the ID size, aspect
    ratio lost); ``image_list`` / ``images_root`` — an OpenOOD benchmark_imglist file ("path label"
    lines) whose images, relative to ``images_root`` (OpenOOD's ``images_classic`` folder), replace
    the dataset's test side. A dataset with its own ``image_list`` param (``tin``) keeps it."""
    params = dict(params)
    fields = getattr(DATASETS.get(name), "Params", None)
    own = set(getattr(fields, "model_fields", {}) or {})
    options = {"resize": params.pop("resize", "short_side_crop")}
    if options["resize"] not in OOD_RESIZE:
        raise DataError(f"ood_params.{name}.resize: {options['resize']!r}; valid: {', '.join(OOD_RESIZE)}")
    for key in ("image_list", "images_root"):
        if key in params and key not in own:
            options[key] = params.pop(key)
    if options.get("images_root") and not options.get("image_list"):
        raise DataError(f"ood_params.{name}: images_root is where image_list's paths start: give image_list too")
    if options.get("image_list") and not options.get("images_root"):
        raise DataError(f"ood_params.{name}: image_list needs images_root, the folder its paths start from "
                        f"(OpenOOD's data/images_classic)")
    return params, options


def listed_images(name: str, image_list: str, images_root: str) -> list[Path]:
    """The files an OpenOOD benchmark_imglist file names (first field of each line)."""
    file = Path(image_list).expanduser()
    if not file.is_file():
        raise DataError(f"{name}: image_list {file} not found (OpenOOD's benchmark_imglist, see the README)")
    base = Path(images_root).expanduser()
    paths = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        path = base / line.split()[0]
        if not path.is_file():
            raise DataError(f"{name}: {file} line {number}: {path} not found (paths are relative to images_root {base})")
        paths.append(path)
    if not paths:
        raise DataError(f"{name}: image_list {file} lists no images")
    return paths


@lru_cache(maxsize=8)
def _ood_images(name: str, params_json: str, height: int, width: int, channels: int,
                options_json: str = '{"resize": "short_side_crop"}') -> tuple[np.ndarray, str | None]:
    """An OOD dataset's test images (or its ``image_list``'s) converted to the ID size and channels
    (memoized)."""
    options = json.loads(options_json)
    if options.get("image_list"):
        from data.cache import decode_files
        from data.datasets._image_folders import content_id

        decoded = decode_files(listed_images(name, options["image_list"], options["images_root"]))
        source, files = decoded.images, content_id([decoded.entry])
    else:
        raw = get_dataset(name, json.loads(params_json)).load("test")
        source, files = raw.images, raw.meta.get("content_id")
    images = convert_images(source, height, width, channels, resize=options.get("resize", "short_side_crop"))
    images.setflags(write=False)
    return images, files


def short_side_geometry(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(resized h, resized w, crop top, crop left) of resize-short-side-then-centre-crop to
    height×width. For a square target this is torchvision's ``Resize(size)`` (short side to size,
    long side ``int(size · long / short)``) and ``CenterCrop(size)`` (offsets ``round((in − out) / 2)``)."""
    if height == width:
        if h <= w:
            rh, rw = height, int(height * w / h)
        else:
            rh, rw = int(width * h / w), width
    else:
        scale = max(height / h, width / w)
        rh, rw = max(height, int(round(h * scale))), max(width, int(round(w * scale)))
    return rh, rw, int(round((rh - height) / 2.0)), int(round((rw - width) / 2.0))


def convert_images(images, height: int, width: int, channels: int, batch: int = 512,
                   resize: str = "short_side_crop") -> np.ndarray:
    """uint8 images (N×H×W×C array or list) -> N×height×width×channels uint8: colour -> grey by
    the channel mean, grey -> colour by repetition, then bilinear (antialiased) resizing —
    ``short_side_crop``: the short side to the target and a centre crop (OpenOOD), ``squash``:
    both sides to the target."""
    groups = ([images[i:i + batch] for i in range(0, len(images), batch)]
              if isinstance(images, np.ndarray) else [np.asarray(img)[None] for img in images])
    out = np.empty((len(images), height, width, channels), dtype=np.uint8)
    start = 0
    for group in groups:
        x = torch.from_numpy(np.array(group, dtype=np.float32))
        if x.ndim == 3:
            x = x[..., None]
        x = x.permute(0, 3, 1, 2)
        if x.shape[1] != channels:
            x = x.mean(dim=1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
        if x.shape[-2:] != (height, width):
            if resize == "squash":
                x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            else:
                rh, rw, top, left = short_side_geometry(x.shape[-2], x.shape[-1], height, width)
                if (rh, rw) != tuple(x.shape[-2:]):
                    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
                x = x[..., top:top + height, left:left + width]
        out[start:start + len(x)] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        start += len(x)
    return out


def _normal_names(dataset: str, names: Sequence[str], normal_class) -> tuple[list[str], str]:
    if isinstance(normal_class, str) and normal_class == "all":
        return list(names), "all"
    if isinstance(normal_class, (list, tuple)):
        members = {_class_name(dataset, names, c) for c in normal_class}
        ordered = sorted(members, key=names.index)
        if not ordered:
            raise DataError(f"{dataset}: empty normal class set")
        return ordered, class_label(tuple(ordered))
    name = _class_name(dataset, names, normal_class)
    return [name], name


def make_splits(dataset: str, dataset_params: dict | None, protocol: str, normal_class, *,
                ood: list[str] | None = None, ood_params: dict | None = None,
                outlier_exposure: dict | None = None,
                seed: int = 0) -> tuple[Split, list[tuple[str | None, Split]]]:
    """(train split, [(test name, test split), ...]) for one cell. ``normal_class``: a name, an
    index, a tuple of those, or "all". ``ood_params`` maps an OOD dataset name to its params.
    ``outlier_exposure``: the grid dataset entry's outlier-exposure set, ``{name, **params}``
    (see ``outlier_exposure_source``), carried by the train split. ``seed`` is unused: no
    protocol subsamples."""
    if protocol not in PROTOCOL_BUILDERS:
        raise DataError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    ds = get_dataset(dataset, dataset_params)
    normal, label = _normal_names(dataset, ds.classes(), normal_class)
    setup = Setup(name=dataset, ds=ds, params_json=canonical_params(ds), protocol=protocol,
                  normal=normal, label=label, outlier_exposure=outlier_exposure_source(outlier_exposure))
    return PROTOCOL_BUILDERS[protocol](setup, ood=ood, ood_params=ood_params, seed=seed)


# ---------------------------------------------------------------------------------------------
# outlier exposure

def outlier_exposure_source(entry: dict | None) -> OutlierExposure | None:
    """The dataset entry's ``outlier_exposure: {name: DATASET, PARAM: VALUE...}`` as an
    ``OutlierExposure`` (None when the entry names none). The name must be a registered dataset.

    The rule a method follows (FCDD's ``anomaly_source: oe``, or ``auto`` at 28 / 32 px): the set
    the dataset entry names; else the set the method's own params name (``oe_dataset``, kept for
    existing grids); else its recipe's default (CIFAR-100's train side for FCDD's 28 / 32 px
    recipes). Either way the images are read here, on the data side."""
    if not entry:
        return None
    entry = dict(entry)
    name = entry.pop("name", None)
    if not isinstance(name, str) or not name:
        raise DataError(f"outlier_exposure needs name: DATASET (a registered dataset); got {entry!r}")
    if name not in DATASETS:
        raise DataError(f"outlier_exposure: unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    return OutlierExposure(name=name, params=entry)


@lru_cache(maxsize=4)
def _outlier_exposure_cached(name: str, params_json: str) -> Split:
    ds = get_dataset(name, json.loads(params_json))
    raw = ds.load("train")
    n = len(raw.targets)
    return Split(images=raw.images, labels=np.ones(n, np.int64), targets=np.asarray(raw.targets, np.int64),
                 class_names=list(raw.class_names), key=f"{name}|{canonical_params(ds)}|outlier_exposure|train",
                 masks=None, meta={"side": "outlier_exposure"}, dataset=name, statistics=ds.statistics,
                 recipe_family=ds.recipe_family)


def outlier_exposure_split(source: OutlierExposure) -> Split:
    """The train side of ``source``'s dataset, every image labelled 1 (memoized per process)."""
    if source.name not in DATASETS:
        raise DataError(f"outlier exposure needs the dataset {source.name!r}, which is not registered "
                        f"(registered: {', '.join(sorted(DATASETS)) or 'none'})")
    return _outlier_exposure_cached(source.name, json.dumps(dict(source.params), sort_keys=True))


def clear_memo() -> None:
    """Forget memoized datasets, reads and OOD conversions (tests; files changed in-process)."""
    from data.datasets._arrays import clear_memo as clear_reads
    _dataset_cached.cache_clear()
    _ood_images.cache_clear()
    _outlier_exposure_cached.cache_clear()
    clear_reads()
