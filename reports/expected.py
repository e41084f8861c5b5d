"""Paper numbers (``reports/expected.csv``) and how a measured cell finds its own.

Matching rule (also in the README, "Reading results"):

1. Same ``method``, ``dataset``, ``protocol`` and ``metric``.
2. Same class, compared as a canonical key: class names of datasets whose references use indices
   (CIFAR-10, Fashion-MNIST, MNIST, SVHN, digits) become their index, so ``cat``, ``3`` match;
   a class set is split on ``+`` (rows) or ``-`` between indices (the file: ``0-1-2-3-4``) and
   sorted. The leaderboard's mean column matches ``mean`` (also ``avg``, ``average``), and for the
   ``ood`` protocol ``all`` (every in-distribution class), since its columns are OOD sets.
3. A mean is compared only when the run covers every class the reference averages over (all 15
   MVTec categories, all 10 CIFAR-10 classes...); otherwise it has no reference.
4. OOD references whose setting starts with ``near-ood`` / ``far-ood`` (OpenOOD's groups) are kept
   for the mean only when every OOD set the method was measured on belongs to that group. Ood
   boards of a dataset with OpenOOD groups (``OOD_GROUPS``) also average each group's measured sets;
   a group's mean takes that group's references only, and only when the run measures every set
   of the group (``group_complete``).
5. Several references left (different settings): each setting scores +1 for every resolved
   hyper-parameter of the row it names (backbone, layers, coreset %, image size in px, k=, d=,
   epochs, pretrained...), -1 for every value it states differently (another %, px, k=, backbone),
   -0.5 when it is a reproduction rather than the paper's number; the highest score wins, equal
   scores go to the first in the file. The chosen setting is shown beside the number.
6. A run that trains on anomalies of a named kind (FCDD's ``anomaly_source``: confetti noise,
   outlier exposure, true anomalies, none) keeps only references that state no source or its own,
   and with outlier exposure only those that name no OE set or its own (``oe_dataset``): FCDD with
   confetti noise on Fashion-MNIST has no reference rather than the paper's outlier-exposure
   number, an EMNIST-OE reproduction is not a CIFAR-100-OE run's (``source_ok``).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

EXPECTED_CSV = Path(__file__).with_name("expected.csv")
EXPECTED_COLUMNS = ["method", "dataset", "protocol", "normal_class", "metric", "value", "setting", "source"]
STATUSES = ("reproduced", "below", "above", "no reference")
MEAN_LABELS = ("mean", "avg", "average")
LOWER_IS_BETTER = frozenset({"fpr95", "fpr95_openood", "detection_error"})

DIGITS = tuple(str(d) for d in range(10))
#: Class names of the datasets whose references write classes as indices.
INDEXED_CLASSES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"),
    "mnist": DIGITS, "svhn": DIGITS, "digits": DIGITS,
}
MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
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
BACKBONE_ALIASES = {
    "wide_resnet50_2": ("wrn50", "wr50", "wideresnet50"),
    "wide_resnet101_2": ("wrn101", "wr101", "wideresnet101"),
    "resnet18": ("resnet18", "r18"),
    "resnet50": ("resnet50", "r50"),
    "efficientnet_b5": ("efficientnetb5",),
    "efficientnet_b4": ("efficientnetb4",),
}
NOT_PAPER = ("reproduction", "not the paper", "not paper")
#: How a setting states where the anomalies seen in training came from (rule 6), per value of a
#: run's ``anomaly_source``; read from the setting's lower-case text ("NO OE" states none of them).
ANOMALY_SOURCE_MARKS = {
    "oe": r"\bwith (?:outlier exposure|oe)\b",
    "confetti": r"\bconfetti\b",
    "semi": r"\bsemi-supervised\b|\btrue anomalies\b",
}
#: How a setting names the outlier-exposure set, per registered dataset name (``oe_dataset``).
OE_SET_MARKS = {"cifar100": r"cifar-?100", "emnist": r"\bemnist", "tin": r"tiny ?imagenet|\btin\b"}


def load_expected(path: str | Path = EXPECTED_CSV) -> pd.DataFrame:
    """The reference table, with ``class_key`` added; rows keep their file order (``ref_row``)."""
    table = pd.read_csv(path, dtype={"normal_class": str})
    missing = [c for c in EXPECTED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    table = table[EXPECTED_COLUMNS].copy()
    table["ref_row"] = range(len(table))
    table["class_key"] = [expected_class_key(d, c) for d, c in zip(table["dataset"], table["normal_class"])]
    return table


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


def normalise(text: str) -> str:
    return re.sub(r"[\s_\-]", "", str(text).lower())


def _scalar_tokens(key: str, value) -> set[str]:
    key = key.lower()
    out: set[str] = set()
    if isinstance(value, bool):
        return {"pretrained"} if key == "pretrained" and value else ({"scratch"} if key == "pretrained" else set())
    if isinstance(value, str):
        out |= set(BACKBONE_ALIASES.get(value, ()))
        if len(value) >= 3:
            out.add(normalise(value))
        return out
    if isinstance(value, (int, float)) and math.isfinite(value):
        number = f"{value:g}"
        out |= {f"{key}={number}", f"{key}{number}"}
        if "ratio" in key and 0 < value <= 1:
            out.add(f"{value * 100:g}%")
        if key in ("crop", "image_size", "resolution", "size"):
            out.add(f"{number}px")
        if "epoch" in key:
            out.add(f"{number}ep")
    return out


def setting_tokens(params: dict) -> set[str]:
    """Words a setting may use for these hyper-parameters (normalised: lower case, no -_ or spaces)."""
    tokens: set[str] = set()
    for key, value in (params or {}).items():
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            digits = [re.sub(r"\D", "", v) for v in value]
            if all(digits) and all(v.startswith("layer") for v in value):
                tokens.add("layer" + "+".join(digits))
            continue
        if key == "crop" and value is None:
            continue
        tokens |= {normalise(t) for t in _scalar_tokens(key, value)}
    return {t for t in tokens if t}


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


#: Values a setting may state (read from its lower-case text), each with how the run's own
#: token of that kind is written; a stated value the run has otherwise is a conflict.
STATED_VALUES = ((r"(?<![\d.])(\d+(?:\.\d+)?)\s*%", "{}%"), (r"(?<!\d)(\d+)\s*px", "{}px"),
                 (r"\bk\s*=\s*(\d+)", "k={}"))


def _conflicts(setting: str, tokens: set[str]) -> int:
    """How many values the setting states that differ from the run's: another percentage, image
    size or k (where the run has one of that kind), or another backbone and not the run's."""
    lower, count = str(setting).lower(), 0
    for pattern, form in STATED_VALUES:
        stated = {form.format(m.group(1)) for m in re.finditer(pattern, lower)}
        ours = {t for t in tokens if re.fullmatch(form.format(r"[\d.]+"), t)}
        if stated and ours and not stated & ours:
            count += 1
    text = normalise(setting)
    aliases = {a for names in BACKBONE_ALIASES.values() for a in names}
    ours = tokens & aliases
    if ours and not any(a in text for a in ours) and any(a in text for a in aliases - ours):
        count += 1
    return count


def setting_score(setting: str, tokens: set[str]) -> float:
    """+1 per run token the setting names, -1 per value it states differently, -0.5 when it is a
    reproduction rather than the paper's number."""
    text = normalise(setting)
    score = float(sum(1 for t in tokens if t in text)) - _conflicts(setting, tokens)
    if any(normalise(mark) in text for mark in NOT_PAPER):
        score -= 0.5
    return score


def ood_set_name(name: str) -> str:
    """An OOD set's name as registered here (OpenOOD's ``textures`` is ``dtd``)."""
    return OOD_SET_ALIASES.get(str(name).lower(), str(name))


def group_of(setting, dataset: str) -> str | None:
    """The OpenOOD group a reference's setting starts with (``near-ood; ResNet18...``), or None."""
    head = str(setting).strip().lower()
    return next((group for group in OOD_GROUPS.get(dataset, {}) if head.startswith(group)), None)


def group_members(dataset: str, group: str) -> tuple[str, ...]:
    return OOD_GROUPS.get(dataset, {}).get(group, ())


def group_complete(dataset: str, group: str, ood_sets) -> bool:
    """True when ``ood_sets`` hold every OOD set of the group (what OpenOOD's group mean averages)."""
    measured = {ood_set_name(s) for s in ood_sets}
    members = group_members(dataset, group)
    return bool(members) and set(members) <= measured


def ood_group_ok(setting: str, dataset: str, ood_sets: set[str] | None) -> bool:
    """False when the setting names an OpenOOD group and a measured OOD set lies outside it."""
    group = group_of(setting, dataset)
    if group is None:
        return True
    members = group_members(dataset, group)
    return bool(ood_sets) and all(ood_set_name(s) in members for s in ood_sets)


def group_references(found: pd.DataFrame, dataset: str, group: str) -> pd.DataFrame:
    """The references among ``found`` whose setting names ``group``."""
    return found[[group_of(s, dataset) == group for s in found["setting"]]]


def by_key(expected: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """References grouped by (method, dataset, protocol, metric), for fast look-ups."""
    return {key: g for key, g in expected.groupby(["method", "dataset", "protocol", "metric"], sort=False)}


def candidates(index: dict, method: str, dataset: str, protocol: str, key: str, metric: str) -> pd.DataFrame:
    """References for one class key (rules 1, 2); ``index`` from :func:`by_key`."""
    found = index.get((method, dataset, protocol, metric))
    if found is None:
        return pd.DataFrame(columns=EXPECTED_COLUMNS + ["ref_row", "class_key"])
    keys = [key, "all"] if key == "mean" and protocol in ("ood", "osr") else [key]
    return found[found["class_key"].isin(keys)]


def stated_sources(setting) -> set[str]:
    """The anomaly sources a reference's setting says its training used (rule 6), often none."""
    lower = str(setting).lower()
    return {source for source, pattern in ANOMALY_SOURCE_MARKS.items() if re.search(pattern, lower)}


def stated_oe_sets(setting) -> set[str]:
    """The outlier-exposure sets a reference's setting names (registered dataset names)."""
    lower = str(setting).lower()
    return {name for name, pattern in OE_SET_MARKS.items() if re.search(pattern, lower)}


def source_ok(setting, params: dict | None) -> bool:
    """False when the setting states an anomaly source other than the run's ``anomaly_source``,
    or, for outlier exposure, names OE sets and not the run's ``oe_dataset`` (rule 6)."""
    params = params or {}
    source, stated = params.get("anomaly_source"), stated_sources(setting)
    if source is None or not stated:
        return True
    if source not in stated:
        return False
    oe_sets, oe_dataset = stated_oe_sets(setting), params.get("oe_dataset")
    return source != "oe" or not oe_sets or oe_dataset is None or oe_dataset in oe_sets


def choose(found: pd.DataFrame, params: dict, dataset: str, ood_sets: set[str] | None):
    """The best reference among ``found`` for a run with these resolved ``params`` (rules 4 to 6
    above), or None."""
    kept = found[[ood_group_ok(s, dataset, ood_sets) and source_ok(s, params) for s in found["setting"]]]
    if kept.empty:
        return None
    tokens = setting_tokens(params)
    scores = [setting_score(s, tokens) for s in kept["setting"]]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return kept.iloc[best]


def mean_classes(index: dict, method: str, dataset: str, protocol: str, metric: str) -> set[str] | None:
    """Rule 3: the class keys a paper's mean is taken over (None: no class condition, ood / osr)."""
    if protocol in ("ood", "osr"):
        return None
    full = FULL_CLASSES.get(dataset)
    if full is not None:
        return {class_key(dataset, c) for c in full}
    same = index.get((method, dataset, protocol, metric))  # unknown list: the classes with their own number
    return set() if same is None else set(same["class_key"]) - {"mean", "all"}


def status_of(measured: float, expected: float, tolerance_points: float) -> str:
    """reproduced within ``tolerance_points`` (metric x 100), else below / above; no reference."""
    if expected is None or measured is None or not (math.isfinite(expected) and math.isfinite(measured)):
        return "no reference"
    diff = measured - expected
    if abs(diff) <= tolerance_points / 100.0 + 1e-9:
        return "reproduced"
    return "below" if diff < 0 else "above"
