"""HTML of the report: the page, and the pieces sections are made of (tables, figures, lists), every
value escaped. Self-contained: images are inline data: URIs, no scripts, no external links."""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
from html import escape

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
/* a table with its caption below: the caption wraps at the image's width */
figure { display: inline-table; margin: .6rem 1rem .6rem 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { display: table-caption; caption-side: bottom; font-size: .85rem; color: #555; }
.wide { overflow-x: auto; }
.notes { background: #fff6e0; border: 1px solid #e8c66a; padding: .5rem 1rem; }
.meta { color: #666; font-size: .9rem; } details { margin: .4rem 0; } summary { cursor: pointer; }
"""


def page(title: str, source: str, notes: list[str], sections: list[str]) -> str:
    """The whole document: title, where it came from and when, the notes on skipped input, the sections."""
    notes_html = ""
    if notes:
        items = "".join(f"<li>{esc(n)}</li>" for n in notes)
        notes_html = f"<section id='notes' class='notes'><h2>Notes</h2><ul>{items}</ul></section>"
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
            f"<p class='meta'>{esc(source)} · generated {stamp}</p>"
            f"{notes_html}{''.join(sections)}</body></html>\n")


def section(anchor: str, title: str, body: str) -> str:
    return f"<section id='{anchor}'><h2>{esc(title)}</h2>{body}</section>"


def figure(img_html: str, caption: str) -> str:
    return f"<figure>{img_html}<figcaption>{esc(caption)}</figcaption></figure>"


def img(png: bytes, alt: str) -> str:
    return f"<img alt='{esc(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode('ascii')}'>"


def table(head: list[str], rows: list[list]) -> str:
    header = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(_td(v) for v in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>"


def _td(value) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class='num'>{esc(fmt(value))}</td>" if numeric else f"<td>{esc(fmt(value))}</td>"


def facts(named: dict) -> str:
    """A bullet list 'name: value' of the values that are not None."""
    items = "".join(f"<li>{esc(k)}: {esc(fmt(v))}</li>" for k, v in named.items() if v is not None)
    return f"<ul>{items}</ul>" if items else ""


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def interval(value):
    """A {"ratio": r, "ci95": [low, high]} score as 'r [low, high]'; anything else as it is."""
    if isinstance(value, dict) and "ratio" in value:
        low, high = (value.get("ci95") or [None, None])[:2]
        return f"{fmt(value['ratio'])} [{fmt(low)}, {fmt(high)}]"
    return value


def seconds(value) -> str:
    return "n/a" if not isinstance(value, (int, float)) else f"{value:.0f}"


def esc(text) -> str:
    return escape(str(text), quote=True)
