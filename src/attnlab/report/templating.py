"""HTML from Jinja2 templates (report/templates/, autoescaped: every value put in a page is escaped unless it
is marked |safe) and Markdown to HTML (markdown-it-py, CommonMark, raw HTML in the source escaped)."""

from __future__ import annotations

from functools import cache

import jinja2
from markdown_it import MarkdownIt


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("attnlab.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,  # a misspelt name in a template fails, never renders as ""
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(template: str, **context) -> str:
    """The template (a file name in report/templates/) rendered with context, ending in one newline."""
    return environment().get_template(template).render(**context).rstrip("\n") + "\n"


@cache
def _markdown() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False})


def markdown_html(text: str, heading_shift: int = 0) -> str:
    """CommonMark to HTML, safe to put in a page as is (templates mark it `|safe`): raw HTML and code in the
    text come out escaped. Headings move heading_shift levels down (at most h6), so a document's # can sit
    under the page's own h2."""
    md = _markdown()
    tokens = md.parse(text)
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1:]) + heading_shift, 6)}"
    return md.renderer.render(tokens, md.options, {})
