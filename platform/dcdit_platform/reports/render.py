"""One section model for a report and its renderers: a `Document` (title, meta line, notes, sections of text,
bullet lists, tables and figures) written as Markdown or as a self-contained HTML page, and records written as CSV.
What a report says is decided once, when the document is built (reports.contents); these functions only spell it.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Text:
    """A paragraph; `code` spans in backticks. kind: "plain", "caption" (explains the block above) or "warning"."""

    text: str
    kind: str = "plain"
    anchor: str | None = None  # an id to link to (HTML)


@dataclass
class Bullets:
    """A titled list of statements (the findings)."""

    title: str
    items: list[str]


@dataclass
class Table:
    header: Sequence[str]
    rows: list[list[str]]


@dataclass
class Figure:
    """A PNG in the report folder; the caption is shown under it in HTML, Markdown shows the picture alone."""

    path: Path
    alt: str
    caption: str = ""


@dataclass
class Gallery:
    """Pictures with a few lines of text under each (sample grids). They are downloaded into a temporary folder,
    not kept beside report.md, so only the HTML page (which embeds them) shows a gallery."""

    items: list[tuple[Path, str, list[str]]]  # picture, alt text, lines under it


Block = Text | Bullets | Table | Figure | Gallery


@dataclass
class Section:
    heading: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2
    anchor: str | None = None


@dataclass
class Document:
    title: str
    meta: str  # one line under the title; `code` spans in backticks
    sections: list[Section]
    notes: list[str] = field(default_factory=list)  # shown between the meta line and the first section


# --- Markdown ---------------------------------------------------------------------------------------------------------

def render_markdown(doc: Document, folder: Path) -> str:
    """The document as Markdown whose figure links are relative to `folder` (where report.md is written)."""
    lines = [f"# {doc.title}", "", doc.meta, ""]
    lines += [f"> {note}" for note in doc.notes]  # a quote block that runs into the first heading
    for section in doc.sections:
        if section.blocks and all(isinstance(b, Gallery) for b in section.blocks):
            continue
        lines += ["#" * section.level + f" {section.heading}", ""]
        for block in section.blocks:
            lines += _md_block(block, folder)
    return "\n".join(lines).rstrip() + "\n"


def _md_block(block: Block, folder: Path) -> list[str]:
    """The block's lines followed by a blank line (nothing for a gallery)."""
    if isinstance(block, Text):
        return [f"> **{block.text}**" if block.kind == "warning" else block.text, ""]
    if isinstance(block, Bullets):
        return [f"**{block.title}**", ""] + [f"- {item}" for item in block.items] + [""]
    if isinstance(block, Table):
        return [_md_table(block), ""]
    if isinstance(block, Figure):
        return [f"![{block.alt}]({Path(block.path).relative_to(folder).as_posix()})", ""]
    return []


def _md_table(table: Table) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in table.rows]
    return "\n".join(lines)


# --- HTML -------------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em;margin-top:1.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}th{background:#f3f3f3}
td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}
.meta{color:#555;font-size:.9em}.warn{background:#fff3cd;border:1px solid #e0b400;padding:.6em .9em;margin:.8em 0;
font-weight:600}.note{background:#eef4fb;border-left:4px solid #4a78b0;padding:.4em .8em;margin:.6em 0}
.finding-title{font-size:1.05em;font-weight:600;margin:1.2em 0 .4em}
.finding li{margin:.25em 0}.figure{margin:.8em 0}.figure img{max-width:100%;border:1px solid #eee}
.caption{color:#555;font-size:.85em}code{background:#f5f5f5;padding:0 .25em}
.samples{display:flex;flex-wrap:wrap;gap:1em}.samples div{text-align:center;font-size:.8em}
.samples img{image-rendering:pixelated;width:256px}
"""


def render_html(doc: Document, *, generated: str) -> str:
    """The document as one HTML page with every picture embedded (no scripts, nothing fetched); `generated` is the
    time stamp shown after the meta line."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{e(doc.title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(doc.title)}</h1>",
             f'<p class="meta">{_inline(doc.meta)} &middot; generated {e(generated)}</p>']
    parts += [f'<p class="note">{e(note)}</p>' for note in doc.notes]
    for section in doc.sections:
        tag = f"h{section.level}"
        parts.append(f"<{tag}{_id(section.anchor)}>{e(section.heading)}</{tag}>")
        parts += [_html_block(block) for block in section.blocks]
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Text):
        if block.kind == "warning":
            return f'<div class="warn"{_id(block.anchor)}>{_inline(block.text)}</div>'
        kind = ' class="caption"' if block.kind == "caption" else ""
        return f"<p{kind}{_id(block.anchor)}>{_inline(block.text)}</p>"
    if isinstance(block, Bullets):
        items = "".join(("<li class=\"warn\">" if item.startswith("WARNING") else "<li>") + f"{e(item)}</li>"
                        for item in block.items)
        return f'<p class="finding-title">{e(block.title)}</p><ul class="finding">{items}</ul>'
    if isinstance(block, Table):
        head = "".join(f"<th>{e(str(h))}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Figure):
        caption = f'<div class="caption">{e(block.caption)}</div>' if block.caption else ""
        return f'<div class="figure">{_img(block.path, block.alt)}{caption}</div>'
    cells = "".join(f"<div>{_img(path, alt)}" + "".join(f"<br>{e(line)}" for line in lines) + "</div>"
                    for path, alt, lines in block.items)
    return f'<div class="samples">{cells}</div>'


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _id(anchor: str | None) -> str:
    return f' id="{html.escape(anchor)}"' if anchor else ""


def _img(path: Path | str, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# --- CSV --------------------------------------------------------------------------------------------------------------

def write_csv(path: Path, columns: Sequence[str], records: list[dict[str, Any]]) -> Path:
    """One line per record; floats in full precision (repr, as MLflow returns them), None and NaN as empty."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({k: _csv_value(record.get(k)) for k in columns})
    return path


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)
