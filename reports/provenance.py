"""Where each method's code came from (the rows' ``method_source``): a report block that names the
plugin methods' sources and warns when one method's rows come from different code.

``method_source`` is "builtin", "file:NAME@sha256:HEX" (a plugin file, by content) or
"package:DIST==VERSION" (plugins/registry.py). A method whose rows mix sources (a plugin file edited
between resumed runs, another package version on some node) mixes numbers of different code.
"""
from __future__ import annotations

import re

import pandas as pd

from reports.document import Bullets, Heading

BUILTIN = "builtin"


def short(source: str) -> str:
    """A source tag with its hash cut to 12 hex digits, for reading."""
    return re.sub(r"(sha256:[0-9a-f]{12})[0-9a-f]+", r"\1…", source)


def method_sources(rows: pd.DataFrame) -> dict[str, dict[str, int]]:
    """method -> {source: rows}, over rows that record a source (older rows may not)."""
    if "method_source" not in rows or rows.empty:
        return {}
    known = rows[rows["method_source"].notna()]
    counts = known.groupby(["method", "method_source"]).size()
    out: dict[str, dict[str, int]] = {}
    for (method, source), n in counts.items():
        out.setdefault(str(method), {})[str(source)] = int(n)
    return out


def source_warnings(rows: pd.DataFrame) -> list[str]:
    """One line per method whose rows come from more than one source."""
    return [f"method {method}: its rows come from {len(by)} different sources ("
            + ", ".join(f"{short(s)}: {n} rows" for s, n in sorted(by.items()))
            + "); its numbers mix different code: run it again from one source (--rerun all --only method="
            + f"{method})"
            for method, by in sorted(method_sources(rows).items()) if len(by) > 1]


def provenance_blocks(rows: pd.DataFrame) -> list:
    """A "Method sources" section where a plugin method ran or a method's sources differ, else none."""
    sources = method_sources(rows)
    plugins = [f"{method}: {', '.join(short(s) for s in sorted(by))}" for method, by in sorted(sources.items())
               if set(by) != {BUILTIN}]
    warnings = [f"warning: {w}" for w in source_warnings(rows)]
    if not plugins and not warnings:
        return []
    return [Heading("Method sources"), Bullets(warnings + [f"plugin method {p}" for p in plugins])]
