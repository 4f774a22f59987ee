"""The report renderers: one Document becomes Markdown and HTML that hold the same headings, tables, figures and
text; CSV cells in full precision."""

from __future__ import annotations

import base64
import csv
import html
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcdit_platform.reports.render import (Bullets, Document, Figure, Gallery, Section, Table, Text, render_html,
                                           render_markdown, write_csv)


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 6, 3), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def document(tmp_path):
    folder = tmp_path / "report"
    outside = _png(tmp_path / "downloads" / "samples.png", 200)  # like sample grids: not in the report folder
    return folder, Document(
        title="Sweep report: demo <1>", meta="MLflow parent run `abc` at `sqlite:///x.db`; 2 run(s).",
        notes=["run abc has no child runs"],
        sections=[
            Section("Findings", [Bullets("Quality vs compute", ["WARNING: two protocols", "a < b & c"]),
                                 Bullets("Caveats", ["short runs"])]),
            Section("Runs", [Table(["run", "N"], [["a|b", "2"], ["c", "-"]]), Text("Cells: last values.", "caption")]),
            Section("Quality by evaluation protocol", [Text("WARNING: 2 protocols", "warning", "protocol-warning")]),
            Section("P1: FD, 256 samples", [Table(["rank", "run"], [["1", "a"]]),
                                            Figure(_png(folder / "figures" / "p1.png", 10), "quality vs GFLOPs, P1",
                                                   "ringed: the Pareto front")], level=3, anchor="P1"),
            Section("Loss curves", [Figure(_png(folder / "figures" / "loss.png", 90), "Loss curves")]),
            Section("Empty"),
            Section("Samples", [Gallery([(outside, "samples a", ["a", "slug"])])]),
        ])


class _Page(HTMLParser):
    """Headings, texts (paragraphs, list items, warnings, captions), ids and pictures (alt -> bytes) of a page."""

    TEXT = ("h1", "h2", "h3", "p", "li")

    def __init__(self):
        super().__init__()
        self.headings, self.paragraphs, self.ids, self.images = [], [], [], {}
        self._open: list[tuple[str, list[str]]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag in self.TEXT or (tag == "div" and attrs.get("class") in ("warn", "caption")):
            self._open.append((tag, []))
        if tag == "img":
            head, data = attrs["src"].split(",", 1)
            assert head == "data:image/png;base64"
            self.images[attrs["alt"]] = base64.b64decode(data)

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            _, parts = self._open.pop()
            text = "".join(parts)
            if tag in ("h1", "h2", "h3"):
                self.headings.append((int(tag[1]), text))
            else:
                self.paragraphs.append(text)

    def handle_data(self, data):
        if self._open:
            self._open[-1][1].append(data)


def _tables_html(page: str) -> list[list[list[str]]]:
    return [[[html.unescape(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)]
             for row in re.findall(r"<tr>(.*?)</tr>", table)] for table in re.findall(r"<table>(.*?)</table>", page)]


def _tables_markdown(text: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if line.startswith("|---"):
                continue
            if current is None:
                current = []
                tables.append(current)
            cells = re.split(r"(?<!\\) \| ", line[2:-2])
            current.append([c.replace("\\|", "|") for c in cells])
        else:
            current = None
    return tables


def test_markdown_and_html_hold_the_same_headings_tables_and_figures(document):
    folder, doc = document
    markdown = render_markdown(doc, folder)
    page = render_html(doc, generated="2026-01-01 00:00:00")
    parsed = _Page()
    parsed.feed(page)

    md_headings = [(len(m.group(1)), m.group(2)) for m in re.finditer(r"^(#+) (.*)$", markdown, re.M)]
    # Every section is a heading in both, except the gallery-only one: its pictures are not beside report.md.
    assert md_headings == [(1, "Sweep report: demo <1>"), (2, "Findings"), (2, "Runs"),
                           (2, "Quality by evaluation protocol"), (3, "P1: FD, 256 samples"), (2, "Loss curves"),
                           (2, "Empty")]
    assert parsed.headings == md_headings + [(2, "Samples")]

    assert _tables_markdown(markdown) == _tables_html(page) == [[["run", "N"], ["a|b", "2"], ["c", "-"]],
                                                                [["rank", "run"], ["1", "a"]]]

    md_figures = dict(re.findall(r"!\[([^]]+)\]\(([^)]+)\)", markdown))
    assert md_figures == {"quality vs GFLOPs, P1": "figures/p1.png", "Loss curves": "figures/loss.png"}
    for alt, rel in md_figures.items():  # the same picture, linked in Markdown and embedded in HTML
        assert parsed.images[alt] == (folder / rel).read_bytes()
    assert set(parsed.images) == set(md_figures) | {"samples a"}

    for title in ("Quality vs compute", "Caveats"):  # titled lists: bold in Markdown, in HTML as text
        assert f"**{title}**" in markdown and title in parsed.paragraphs
    for item in ("WARNING: two protocols", "a < b & c", "short runs"):
        assert f"\n- {item}\n" in markdown and item in parsed.paragraphs
    assert "> **WARNING: 2 protocols**" in markdown and "WARNING: 2 protocols" in parsed.paragraphs
    assert {"protocol-warning", "P1"} <= set(parsed.ids)
    assert "\nCells: last values.\n" in markdown and "Cells: last values." in parsed.paragraphs
    assert "ringed: the Pareto front" in parsed.paragraphs and "ringed" not in markdown  # captions: HTML only
    assert "> run abc has no child runs\n## Findings" in markdown and "run abc has no child runs" in parsed.paragraphs
    meta = "MLflow parent run `abc` at `sqlite:///x.db`; 2 run(s)."
    assert f"\n\n{meta}\n\n" in markdown
    assert "MLflow parent run <code>abc</code> at <code>sqlite:///x.db</code>; 2 run(s). &middot; generated " \
           "2026-01-01 00:00:00" in page
    assert "<script" not in page and "<title>Sweep report: demo &lt;1&gt;</title>" in page


def test_markdown_ends_with_one_newline_and_separates_blocks_with_blank_lines(document):
    folder, doc = document
    markdown = render_markdown(doc, folder)
    assert markdown.endswith("![Loss curves](figures/loss.png)\n\n## Empty\n")
    assert "\n\n\n" not in markdown
    assert "| a\\|b | 2 |" in markdown  # a pipe in a cell cannot split it


def test_csv_writes_full_precision_and_blanks(tmp_path):
    records = [{"a": 0.1 + 0.2, "b": True, "c": None}, {"a": float("nan"), "b": False, "c": 3, "ignored": 1}]
    path = write_csv(tmp_path / "x.csv", ("a", "b", "c"), records)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["a", "b", "c"], ["0.30000000000000004", "true", ""], ["", "false", "3"]]
