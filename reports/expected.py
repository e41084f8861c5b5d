"""Paper numbers (``reports/expected.csv``) and how a measured cell finds its own.

Each number states, in columns, what decides whether a run is comparable with it (``SETTING_COLUMNS``):
where it comes from (``source_kind``: paper | official_code | reproduction), the backbone and its
weights, image size and crop, the image-score rule, the anomaly source and outlier-exposure set,
epochs, checkpoint rule (last | best), FPR convention, OOD image lists (filtered | full), seeds, the
OpenOOD group it averages (``ood_group``), which images a pixel metric averages over
(``metric_variant``: all | anomalous_only, e.g. PatchCore's ``anomaly_pro``) and any other hyper-parameters as ``key=value; ...``
(``params``, named as the method's resolved parameters). An empty cell: the source does not say.
``setting`` and ``source`` stay free text, for people.

Matching rule (also in the README, "Reading results"):

1. Same ``method``, ``dataset``, ``protocol`` and ``metric`` (a number whose ``fpr_convention`` is
   ``ood_positive`` is OpenOOD's FPR95, compared with ``fpr95_openood``; ``id_positive`` with ``fpr95``).
2. Same class, compared as a canonical key: class names of datasets whose references use indices
   (CIFAR-10, Fashion-MNIST, MNIST, SVHN, digits) become their index, so ``cat``, ``3`` match;
   a class set is split on ``+`` (rows) or ``-`` between indices (the file: ``0-1-2-3-4``) and
   sorted. The leaderboard's mean column matches ``mean`` (also ``avg``, ``average``), and for the
   ``ood`` protocol ``all`` (every in-distribution class), since its columns are OOD sets.
3. A mean is compared only when the run covers every class the reference averages over (all 15
   MVTec categories, all 10 CIFAR-10 classes...); otherwise it has no reference.
4. A number with an ``ood_group`` (OpenOOD's near-ood / far-ood) is kept for the mean only when
   every OOD set the method was measured on belongs to that group; a group's mean on an ood board
   takes that group's numbers only, and only when the run measures every set of the group.
5. Each stated comparability column is compared with the row's resolved parameters
   (``run_setting``); a column the number leaves empty, or one the row does not record, never
   blocks. A ``params`` entry the row does not have at all differs (the run is not that variant).
   The numbers with no difference win, the one stating most matching columns first, then paper
   before official code before reproduction, then file order. Where every number differs, the
   closest (fewest differences) is shown with the status ``setting differs`` and the differences
   named (``weights: tv_in1k vs racm_in1k``, the run's value first), never ``reproduced`` /
   ``below`` / ``above``.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from data.class_names import CIFAR10_CLASSES, DIGITS, FASHION_MNIST_CLASSES, MVTEC_CATEGORIES

EXPECTED_CSV = Path(__file__).with_name("expected.csv")
EXPECTED_COLUMNS = ["method", "dataset", "protocol", "normal_class", "metric", "value", "setting", "source"]
#: What decides whether a measured row is comparable with a number (empty: not stated).
SETTING_COLUMNS = ["source_kind", "backbone", "weights", "image_size", "crop", "score", "anomaly_source",
                   "oe_dataset", "epochs", "checkpoint", "fpr_convention", "ood_lists", "seeds", "ood_group",
                   "metric_variant", "params"]
ALL_COLUMNS = EXPECTED_COLUMNS + SETTING_COLUMNS
#: Columns whose values are one of a fixed set.
CHOICES = {"source_kind": ("paper", "official_code", "reproduction"), "checkpoint": ("last", "best"),
           "fpr_convention": ("id_positive", "ood_positive"), "ood_lists": ("filtered", "full"),
           "ood_group": ("near-ood", "far-ood"), "metric_variant": ("all", "anomalous_only")}
INTEGER_COLUMNS = ("image_size", "crop", "epochs", "seeds")
#: The columns compared with a row's resolved parameters, each with the parameter keys that hold the
#: row's value (first present wins); ``weights`` (the row's ``pretrained_tag``, ``scratch`` when
#: ``pretrained`` is false), ``crop`` and ``params`` have rules of their own.
ROW_KEYS = {"backbone": ("backbone", "arch"), "image_size": ("image_size",), "score": ("image_score",),
            "anomaly_source": ("anomaly_source",), "oe_dataset": ("oe_dataset",), "epochs": ("epochs",),
            "checkpoint": ("checkpoint_rule", "checkpoint"), "ood_lists": ("ood_lists",)}
COMPARED = ("backbone", "weights", "image_size", "crop", "score", "anomaly_source", "oe_dataset", "epochs",
            "checkpoint", "ood_lists", "metric_variant")
SOURCE_KIND_ORDER = {"paper": 0, "official_code": 1, "reproduction": 2, "": 3}
#: Which FPR column a number of each convention is compared with.
FPR_METRIC = {"id_positive": "fpr95", "ood_positive": "fpr95_openood"}
STATUSES = ("reproduced", "below", "above", "setting differs", "no reference")
MEAN_LABELS = ("mean", "avg", "average")
LOWER_IS_BETTER = frozenset({"fpr95", "fpr95_openood", "detection_error"})

#: Class names of the datasets whose references write classes as indices (data/class_names.py, the
#: datasets' own lists: importing it loads no dataset module, so the report stays torch-free).
INDEXED_CLASSES = {"cifar10": CIFAR10_CLASSES, "fashion_mnist": FASHION_MNIST_CLASSES,
                   "mnist": DIGITS, "svhn": DIGITS, "digits": DIGITS}
#: Every class a paper's mean is taken over.
FULL_CLASSES = {"mvtec": MVTEC_CATEGORIES, **INDEXED_CLASSES}
#: OpenOOD v1.5 groups of OOD sets per in-distribution set (dataset names as registered here), in
#: the order its tables list them (Zhang et al. 2023, arXiv:2306.09301, Table 1).
OOD_GROUPS = {
    "cifar10": {"near-ood": ("cifar100", "tin"), "far-ood": ("mnist", "svhn", "dtd", "places365")},
    "cifar100": {"near-ood": ("cifar10", "tin"), "far-ood": ("mnist", "svhn", "dtd", "places365")},
}
#: OpenOOD's names of OOD sets registered here under another name.
OOD_SET_ALIASES = {"textures": "dtd", "texture": "dtd"}


class ExpectedFileError(ValueError):
    """A reference CSV that cannot be used; the message names the file and the line."""


def load_expected(path: str | Path = EXPECTED_CSV, extra: list[str | Path] | tuple = ()) -> pd.DataFrame:
    """The reference table (``path``, then each ``extra`` file: a user's own numbers in the same
    columns), validated, with ``class_key`` added; rows keep their order (``ref_row``)."""
    tables = [read_expected(p) for p in [path, *extra]]
    table = pd.concat(tables, ignore_index=True)
    table["ref_row"] = range(len(table))
    table["class_key"] = [expected_class_key(d, c) for d, c in zip(table["dataset"], table["normal_class"])]
    return table


def read_expected(path: str | Path) -> pd.DataFrame:
    """One reference CSV, every cell checked (``ExpectedFileError`` naming the file and line). The
    comparability columns may be left out (not stated); unknown columns are an error, so a typo
    never silently drops a condition."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ExpectedFileError(f"{path}: no such file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ExpectedFileError(f"{path}: not a readable CSV file ({str(e).strip()})") from None
    missing = [c for c in EXPECTED_COLUMNS if c not in table.columns]
    unknown = [c for c in table.columns if c not in ALL_COLUMNS]
    if missing or unknown:
        raise ExpectedFileError(f"{path}: " + "; ".join(
            [f"missing columns {missing}"] * bool(missing) + [f"unknown columns {unknown}"] * bool(unknown))
            + f" (columns: {', '.join(ALL_COLUMNS)})")
    table = table.reindex(columns=ALL_COLUMNS, fill_value="")
    for column in table.columns:
        table[column] = table[column].str.strip()
    for i, row in enumerate(table.to_dict("records")):
        problem = row_problem(row)
        if problem:
            raise ExpectedFileError(f"{path} line {i + 2}: {problem}")
    table["value"] = table["value"].astype(float)
    for column in INTEGER_COLUMNS:
        table[column] = [int(v) if v else None for v in table[column]]
    table["metric"] = [FPR_METRIC.get(c, m) if m in FPR_METRIC.values() else m
                       for m, c in zip(table["metric"], table["fpr_convention"])]
    table["source_file"] = str(path)
    return table


def row_problem(row: dict) -> str | None:
    """What is wrong with one reference row (all values strings), or None."""
    for column in ("method", "dataset", "protocol", "normal_class", "metric", "value", "source"):
        if not row[column]:
            return f"{column} is empty"
    try:
        value = float(row["value"])
    except ValueError:
        return f"value {row['value']!r} is not a number"
    if not math.isfinite(value):
        return f"value {row['value']!r} is not finite"
    for column, choices in CHOICES.items():
        if row[column] and row[column] not in choices:
            return f"{column} {row[column]!r} is not one of {', '.join(choices)}"
    for column in INTEGER_COLUMNS:
        if row[column] and not re.fullmatch(r"\d+", row[column]):
            return f"{column} {row[column]!r} is not a whole number"
    convention, metric = row["fpr_convention"], row["metric"]
    if convention and metric not in FPR_METRIC.values():
        return f"fpr_convention is set but metric {metric!r} is not an FPR"
    if metric in FPR_METRIC.values() and not convention:
        return f"metric {metric!r} needs its fpr_convention ({' or '.join(FPR_METRIC)})"
    try:
        parse_params(row["params"])
    except ValueError as e:
        return str(e)
    return None


def parse_params(text: str) -> dict[str, str]:
    """``"k=100; layers=layer2+layer3"`` -> ``{"k": "100", "layers": "layer2+layer3"}``."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in str(text or "").split(";"))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"params entry {part!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


def _index_of(dataset: str, name: str) -> str:
    names = INDEXED_CLASSES.get(dataset)
    if names and name in names:
        return str(names.index(name))
    return name


def _sorted_parts(parts: list[str]) -> str:
    return "+".join(sorted(parts, key=lambda p: (0, int(p), p) if p.isdigit() else (1, 0, p)))


def class_key(dataset: str, label) -> str:
    """Canonical key of a row's class label (``cat`` -> ``3``, ``bird+airplane`` -> ``0+2``)."""
    label = str(label)
    if label.lower() in MEAN_LABELS:
        return "mean"
    return _sorted_parts([_index_of(dataset, p) for p in label.split("+")])


def expected_class_key(dataset: str, label) -> str:
    """Canonical key of a reference's class (``0-1-2-3-4`` -> ``0+1+2+3+4``)."""
    label = str(label)
    if re.fullmatch(r"\d+(-\d+)+", label):
        label = label.replace("-", "+")
    return class_key(dataset, label)


def row_params(row) -> dict:
    """The resolved hyper-parameters of a row (its grid params where they were not recorded)."""
    for column in ("resolved_params", "params"):
        text = row.get(column) if hasattr(row, "get") else None
        if isinstance(text, str) and text:
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict) and value:
                return value
    return {}


def row_variants(row) -> dict:
    """The row's ``metric_variants`` (which images each metric averages over), {} where absent."""
    text = row.get("metric_variants") if hasattr(row, "get") else None
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def ood_set_name(name: str) -> str:
    """An OOD set's name as registered here (OpenOOD's ``textures`` is ``dtd``)."""
    return OOD_SET_ALIASES.get(str(name).lower(), str(name))


def group_of(ref) -> str | None:
    """The OpenOOD group a reference averages (its ``ood_group``), or None."""
    group = ref.get("ood_group") if hasattr(ref, "get") else None
    return group if isinstance(group, str) and group else None


def group_members(dataset: str, group: str) -> tuple[str, ...]:
    return OOD_GROUPS.get(dataset, {}).get(group, ())


def group_complete(dataset: str, group: str, ood_sets) -> bool:
    """True when ``ood_sets`` hold every OOD set of the group (what OpenOOD's group mean averages)."""
    measured = {ood_set_name(s) for s in ood_sets}
    members = group_members(dataset, group)
    return bool(members) and set(members) <= measured


def ood_group_ok(ref, dataset: str, ood_sets: set[str] | None) -> bool:
    """False when the reference averages an OpenOOD group and a measured OOD set lies outside it."""
    group = group_of(ref)
    if group is None:
        return True
    members = group_members(dataset, group)
    return bool(ood_sets) and all(ood_set_name(s) in members for s in ood_sets)


def group_references(found: pd.DataFrame, group: str) -> pd.DataFrame:
    """The references among ``found`` that average ``group``."""
    return found[found["ood_group"] == group]


def by_key(expected: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """References grouped by (method, dataset, protocol, metric), for fast look-ups."""
    return {key: g for key, g in expected.groupby(["method", "dataset", "protocol", "metric"], sort=False)}


def candidates(index: dict, method: str, dataset: str, protocol: str, key: str, metric: str) -> pd.DataFrame:
    """References for one class key (rules 1, 2); ``index`` from :func:`by_key`."""
    found = index.get((method, dataset, protocol, metric))
    if found is None:
        return pd.DataFrame(columns=ALL_COLUMNS + ["ref_row", "class_key"])
    keys = [key, "all"] if key == "mean" and protocol in ("ood", "osr") else [key]
    return found[found["class_key"].isin(keys)]


def _text(value) -> str:
    """A value as the reference file writes it: lists joined by ``+``, whole floats as integers."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "+".join(_text(v) for v in value)
    return str(value)


def _same(ours, theirs: str) -> bool:
    """Equal as numbers where both are numbers, else as lower-case text."""
    ours = _text(ours)
    try:
        return math.isclose(float(ours), float(theirs), rel_tol=1e-9, abs_tol=1e-12)
    except ValueError:
        return ours.lower() == str(theirs).lower()


def run_setting(params: dict, metric: str | None = None) -> dict:
    """The row's value of each compared column (absent: the row does not record it); ``params`` may
    carry the row's ``metric_variants`` (which test images a pixel metric averages over)."""
    params = params or {}
    out = {}
    variant = (params.get("metric_variants") or {}).get(metric)
    if variant is not None:
        out["metric_variant"] = variant
    for column, keys in ROW_KEYS.items():
        values = [params[k] for k in keys if params.get(k) is not None]
        if column in CHOICES:   # e.g. a classifier's ``checkpoint`` is a file, not a rule
            values = [v for v in values if v in CHOICES[column]]
        if values:
            out[column] = values[0]
    weights = params.get("pretrained_tag")
    if params.get("pretrained") is False:
        weights = "scratch"
    if weights is not None:
        out["weights"] = weights
    if "image_size" in out:   # no crop keeps the whole frame: a crop of the image size
        crop = params.get("crop")
        out["crop"] = out["image_size"] if crop in (None, 0) else crop
    return out


def differences(ref, params: dict) -> tuple[list[str], int]:
    """(the stated columns whose value the row has otherwise, as ``column: ours vs theirs``; how many
    stated columns it matches). A ``params`` entry the row lacks differs (``—`` for ours)."""
    ours, differ, matched = run_setting(params, ref.get("metric")), [], 0
    for column in COMPARED:
        theirs = ref.get(column)
        if theirs is None or (isinstance(theirs, float) and math.isnan(theirs)) or theirs == "":
            continue
        if column not in ours:
            continue
        mine = ours[column]
        if column == "backbone":   # the architecture; its weights are the ``weights`` column's
            mine, theirs = str(mine).partition(".")[0], str(theirs).partition(".")[0]
        if _same(mine, _text(theirs)):
            matched += 1
        else:
            differ.append(f"{column}: {_text(mine)} vs {_text(theirs)}")
    for key, theirs in parse_params(ref.get("params") or "").items():
        if key in (params or {}) and _same(params[key], theirs):
            matched += 1
        else:
            differ.append(f"{key}: {_text(params[key]) if key in (params or {}) else '—'} vs {theirs}")
    return differ, matched


def choose(found: pd.DataFrame, params: dict, dataset: str, ood_sets: set[str] | None):
    """(the best reference among ``found`` for a run with these resolved ``params``, the differences
    that keep it from being compared: empty when it is comparable), or (None, []) (rules 4, 5)."""
    best, best_key, best_diff = None, None, []
    for ref in found.to_dict("records"):
        if not ood_group_ok(ref, dataset, ood_sets):
            continue
        differ, matched = differences(ref, params)
        key = (len(differ), -matched, SOURCE_KIND_ORDER.get(ref.get("source_kind") or "", 3), ref["ref_row"])
        if best_key is None or key < best_key:
            best, best_key, best_diff = ref, key, differ
    return best, best_diff


def mean_classes(index: dict, method: str, dataset: str, protocol: str, metric: str) -> set[str] | None:
    """Rule 3: the class keys a paper's mean is taken over (None: no class condition, ood / osr)."""
    if protocol in ("ood", "osr"):
        return None
    full = FULL_CLASSES.get(dataset)
    if full is not None:
        return {class_key(dataset, c) for c in full}
    same = index.get((method, dataset, protocol, metric))  # unknown list: the classes with their own number
    return set() if same is None else set(same["class_key"]) - {"mean", "all"}


def status_of(measured: float, expected: float, tolerance_points: float, differs=()) -> str:
    """reproduced within ``tolerance_points`` (metric x 100), else below / above; ``setting differs``
    when the number's stated setting is not the run's; no reference."""
    if expected is None or measured is None or not (math.isfinite(expected) and math.isfinite(measured)):
        return "no reference"
    if differs:
        return "setting differs"
    diff = measured - expected
    if abs(diff) <= tolerance_points / 100.0 + 1e-9:
        return "reproduced"
    return "below" if diff < 0 else "above"
