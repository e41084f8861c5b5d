"""A report as a list of blocks, rendered to Markdown (terminal, repository) and to one
self-contained HTML page (CSS inline, images embedded as base64)."""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Code:
    text: str
    language: str = ""


@dataclass
class Table:
    header: list[str]
    rows: list[list]  # a cell: text, or (text, second line in HTML, suffix in Markdown)
    name: str = ""
    styles: list[list[str]] | None = None  # a CSS class per cell (HTML), e.g. the cell's status
    numeric: set[int] = field(default_factory=set)  # right-aligned columns


@dataclass
class Image:
    path: Path  # relative to the report folder
    caption: str


def anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _md_cell(cell) -> str:
    if isinstance(cell, tuple):
        return f"{cell[0]} {cell[2]}".strip() if len(cell) > 2 else cell[0]
    return "" if cell is None else str(cell)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(blocks: list) -> str:
    """GitHub-flavoured Markdown; images are linked by their relative path."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Code):
            out.append(f"```{b.language}\n{b.text}\n```")
        elif isinstance(b, Table):
            align = ["---:" if i in b.numeric else "---" for i in range(len(b.header))]
            lines = ["| " + " | ".join(_md_escape(h) for h in b.header) + " |", "| " + " | ".join(align) + " |"]
            lines += ["| " + " | ".join(_md_escape(_md_cell(c)) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.caption}]({b.path.as_posix()})\n\n*{b.caption}*")
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, 'Segoe UI', 'DejaVu Sans', sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }
div.scroll { overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ccc; padding: 3px 7px; vertical-align: top; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td small { display: block; color: #666; font-size: 11px; }
.reproduced { background: #e3f5e1; } .below { background: #fde2e0; } .above { background: #e1ecfb; } .setting-differs { background: #eeeeee; }
.failed, .timeout { background: #fff0c2; } .leader { font-weight: bold; } .flagged { background: #fde2e0; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 12px; color: #555; } pre { background: #f6f6f6; padding: 0.7em; overflow-x: auto; }
nav ul { columns: 2; font-size: 13px; }
"""

# Marks <body data-images-loaded="N"> with the number of images that decoded (for headless checks).
SCRIPT = """
window.addEventListener('load', function () {
  var ok = Array.prototype.filter.call(document.images, function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images-loaded', String(ok.length));
  document.body.setAttribute('data-tables', String(document.getElementsByTagName('table').length));
});
"""


def _html_cell(cell, style: str, numeric: bool) -> str:
    classes = " ".join(c for c in (style, "num" if numeric else "") if c)
    attr = f' class="{classes}"' if classes else ""
    if isinstance(cell, tuple):
        body = html.escape(cell[0]) + (f"<small>{html.escape(cell[1])}</small>" if cell[1] else "")
    else:
        body = html.escape("" if cell is None else str(cell))
    return f"<td{attr}>{body}</td>"


def _html_block(b, folder: Path) -> str:
    if isinstance(b, Heading):
        return f'<h{b.level} id="{anchor(b.text)}">{html.escape(b.text)}</h{b.level}>'
    if isinstance(b, Paragraph):
        return f"<p>{html.escape(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Code):
        return f"<pre><code>{html.escape(b.text)}</code></pre>"
    if isinstance(b, Table):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
        body = []
        for i, row in enumerate(b.rows):
            styles = b.styles[i] if b.styles else [""] * len(row)
            body.append("<tr>" + "".join(_html_cell(c, styles[j], j in b.numeric) for j, c in enumerate(row)) + "</tr>")
        return (f'<div class="scroll"><table data-name="{html.escape(b.name)}"><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(body)}</tbody></table></div>")
    if isinstance(b, Image):
        data = base64.b64encode((folder / b.path).read_bytes()).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption)}">'
                f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
    raise TypeError(f"unknown block {type(b).__name__}")


def html_page(blocks: list, title: str, folder: Path) -> str:
    """One self-contained page: a contents list of the level-2 headings, then every block."""
    toc = "".join(f'<li><a href="#{anchor(b.text)}">{html.escape(b.text)}</a></li>'
                  for b in blocks if isinstance(b, Heading) and b.level == 2)
    body = "\n".join(_html_block(b, folder) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style><script>{SCRIPT}</script></head>\n<body>\n"
            f"<nav><ul>{toc}</ul></nav>\n{body}\n</body></html>\n")
