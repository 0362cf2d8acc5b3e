"""The few pieces of HTML and SVG treg's pages are made of (the token-reward report, its r̂ histogram and
the training curves): each page is one self-contained file, inline CSS and SVG, no script, nothing from
the network, so it opens offline and reads the same in any browser."""

from __future__ import annotations

from html import escape
from pathlib import Path

from treg_core.errors import UserError


def element(name: str, content: str = "", **attributes) -> str:
    """`<name a="v" ...>content</name>`; `class_` stands for class, `data_x` for data-x, values are escaped."""
    attrs = "".join(f' {key.rstrip("_").replace("_", "-")}="{escape(str(value))}"' for key, value in attributes.items())
    return f"<{name}{attrs}>{content}</{name}>"


def svg(width: int, height: int, content: str, **attributes) -> str:
    return element("svg", content, **attributes, viewBox=f"0 0 {width} {height}", width=width, height=height,
                   role="img")


def page(title: str, css: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{css}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>\n")


def page_path(output: str | Path) -> Path:
    """Where a page may be written: an .html file only, so that a page never replaces a file treg reads (a run's
    metrics.jsonl, a folder's manifest.json, a shard)."""
    path = Path(output)
    if path.suffix.lower() not in (".html", ".htm") or path.is_dir():
        raise UserError(f"--output {output}: give the path of an .html file; a page never replaces another file "
                        "(treg reads files such as metrics.jsonl and manifest.json)")
    return path
