"""A report as plain data (sections of paragraphs, tables, figures, lists), rendered twice:
Markdown with PNG files beside it, and one self-contained HTML file (PNGs inlined as base64),
so both always say the same thing."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool] = field(default_factory=list)  # right-aligned columns


@dataclass
class Figure:
    filename: str
    png: bytes
    alt: str


@dataclass
class Bullets:
    items: list[tuple[int, str]]  # (depth, text)


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str (paragraph) | Table | Figure | Bullets
    source: str | None = None  # which artifact(s) the section's figures come from


@dataclass
class Document:
    title: str
    intro: str
    sections: list[Section]

    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


# -- Markdown ------------------------------------------------------------------------------
def _md_table(t: Table) -> str:
    align = ["---:" if (t.numeric[i] if i < len(t.numeric) else False) else "---" for i in range(len(t.headers))]
    cells = lambda row: "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"  # noqa: E731
    return "\n".join([cells(t.headers), "|" + "|".join(align) + "|"] + [cells(r) for r in t.rows])


def to_markdown(doc: Document) -> str:
    out = [f"# {doc.title}", "", doc.intro, ""]
    for s in doc.sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                out += [_md_table(b), ""]
            elif isinstance(b, Figure):
                out += [f"![{b.alt}]({b.filename})", ""]
            elif isinstance(b, Bullets):
                out += [f"{'  ' * d}- {text}" for d, text in b.items] + [""]
            else:
                out += [b, ""]
        if s.source:
            out += [f"*Source: {s.source}*", ""]
    return "\n".join(out).rstrip() + "\n"


# -- HTML ----------------------------------------------------------------------------------
_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1f2328}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px;background:#fff;min-height:100vh}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #e3e6ea;padding-bottom:4px}
p{line-height:1.5;margin:8px 0}.intro{color:#57606a}
table{border-collapse:collapse;font-size:13px;margin:10px 0}
th,td{border:1px solid #d8dee4;padding:5px 8px;white-space:nowrap}th{background:#f0f3f6;text-align:left}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}tr:nth-child(even) td{background:#fafbfc}
.scroll{overflow-x:auto}figure{margin:10px 0}img{max-width:100%;border:1px solid #e3e6ea}
.source{font-size:12px;color:#6e7781;margin-top:6px}code{background:#f0f3f6;padding:1px 4px;border-radius:3px;font-size:12px}
ul{margin:6px 0;padding-left:22px}li{margin:2px 0;font-size:14px}
"""


def _inline(text: str) -> str:
    """Escape, then the two bits of Markdown the reports use: `code` and **bold**."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)


def _html_table(t: Table) -> str:
    num = lambda i: i < len(t.numeric) and t.numeric[i]  # noqa: E731
    head = "".join(f'<th class="{"num" if num(i) else ""}">{_inline(h)}</th>' for i, h in enumerate(t.headers))
    body = "".join("<tr>" + "".join(f'<td class="{"num" if num(i) else ""}">{_inline(c)}</td>' for i, c in enumerate(r)) + "</tr>"
                   for r in t.rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _html_bullets(b: Bullets) -> str:
    out, depth = [], -1
    for d, text in b.items:
        while depth < d:
            out.append("<ul>")
            depth += 1
        while depth > d:
            out.append("</ul>")
            depth -= 1
        out.append(f"<li>{_inline(text)}</li>")
    out += ["</ul>"] * (depth + 1)
    return "".join(out)


def to_html(doc: Document) -> str:
    parts = [f"<h1>{_inline(doc.title)}</h1>", f'<p class="intro">{_inline(doc.intro)}</p>']
    for s in doc.sections:
        parts.append(f"<section><h2>{_inline(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, Table):
                parts.append(_html_table(b))
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                parts.append(f'<figure><img alt="{html.escape(b.alt)}" src="data:image/png;base64,{data}"></figure>')
            elif isinstance(b, Bullets):
                parts.append(_html_bullets(b))
            else:
                parts.append(f"<p>{_inline(b)}</p>")
        if s.source:
            parts.append(f'<p class="source">Source: {_inline(s.source)}</p>')
        parts.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(doc.title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")
