"""A tiny document model (headings, paragraphs, bullets, tables, images) and its renderers.

The report is built once as blocks and rendered to Markdown (images linked relatively),
self-contained HTML (inline CSS, images as base64 data URIs) and plain text tables.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    """Cells are display strings; ``bold`` holds (row, column) of cells to emphasise.

    The first ``left_columns`` columns are left-aligned (names), the rest right-aligned.
    """
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)
    left_columns: int = 1


@dataclass
class Image:
    """A PNG on disk at ``path``, linked from Markdown as ``relative``."""
    path: Path
    relative: str
    caption: str


Block = Heading | Paragraph | Bullets | Table | Image

_CSS = """body{font-family:system-ui,sans-serif;max-width:64em;margin:1.5em auto;padding:0 1em;
color:#222;line-height:1.4}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em}th{background:#f2f2f2}td.num,th.num{text-align:right}
figure{margin:.8em 0}figcaption{font-size:.85em;color:#555}img{max-width:100%}"""


def _markdown_cell(text: str, bold: bool) -> str:
    text = text.replace("|", "\\|")
    return f"**{text}**" if bold and text else text


def _markdown_table(table: Table) -> str:
    align = ["---" if i < table.left_columns else "--:" for i in range(len(table.header))]
    lines = ["| " + " | ".join(_markdown_cell(h, False) for h in table.header) + " |",
             "|" + "|".join(align) + "|"]
    for r, row in enumerate(table.rows):
        cells = [_markdown_cell(cell, (r, c) in table.bold) for c, cell in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(blocks: list[Block]) -> str:
    """Markdown text of ``blocks``; images are ``![caption](relative)`` links."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            parts.append(_markdown_table(block))
        elif isinstance(block, Image):
            parts.append(f"![{block.caption}]({block.relative})")
    return "\n\n".join(parts) + "\n"


def _html_table(table: Table) -> str:
    def cell(tag: str, text: str, column: int, bold: bool) -> str:
        numeric = "" if column < table.left_columns else ' class="num"'
        body = html.escape(text)
        return f"<{tag}{numeric}>{'<strong>' + body + '</strong>' if bold else body}</{tag}>"

    head = "".join(cell("th", h, c, False) for c, h in enumerate(table.header))
    rows = ["<tr>" + "".join(cell("td", text, c, (r, c) in table.bold)
                             for c, text in enumerate(row)) + "</tr>"
            for r, row in enumerate(table.rows)]
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _html_image(image: Image) -> str:
    data = base64.b64encode(Path(image.path).read_bytes()).decode("ascii")
    caption = html.escape(image.caption)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
            f"<figcaption>{caption}</figcaption></figure>")


def render_html(blocks: list[Block], title: str) -> str:
    """A self-contained HTML page of ``blocks``: inline CSS, PNGs embedded, no external links."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 1), 6)
            parts.append(f"<h{level}>{html.escape(block.text)}</h{level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{html.escape(item)}</li>" for item in block.items)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif isinstance(block, Image):
            parts.append(_html_image(block))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


def render_plain(table: Table) -> str:
    """``table`` as aligned plain text (two spaces between columns, no emphasis)."""
    grid = [table.header] + table.rows
    widths = [max(len(line[c]) for line in grid) for c in range(len(table.header))]
    lines = []
    for line in grid:
        cells = [text.ljust(width) if c < table.left_columns else text.rjust(width)
                 for c, (text, width) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
