"""Markdown with raw HTML disabled: model output, prompts and guidelines shown as formatted text.

DESIGN.md, Security defaults: a `<script>` in a response is displayed, not run. markdown-it
(CommonMark) with `html=False` escapes every raw tag as text; an image is shown as its source
text (an `<img>` would make the browser fetch a URL the model chose); link targets pass
markdown-it's check (no `javascript:`, `vbscript:`, `file:` or non-image `data:` URLs).
The result goes into gr.HTML, so its template syntax (`${}`, `{{}}`) is neutralised too.
"""
from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml

# breaks: a single newline of model output is a line break (as the raw text shows it)
_MD = MarkdownIt("commonmark", {"html": False, "breaks": True, "linkify": False,
                                "typographer": False})
_TEMPLATE_CHARS = (("{", "&#123;"), ("}", "&#125;"), ("$", "&#36;"), ("`", "&#96;"),
                   ("\\", "&#92;"))


def _link_open(renderer, tokens, idx, options, env):
    tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
    tokens[idx].attrSet("target", "_blank")
    return renderer.renderToken(tokens, idx, options, env)


def _image_as_text(renderer, tokens, idx, options, env):
    """An image is shown as its markdown source: nothing is fetched from a URL in the text."""
    tok = tokens[idx]
    return escapeHtml(f"![{tok.content}]({tok.attrGet('src') or ''})")


_MD.add_render_rule("link_open", _link_open)
_MD.add_render_rule("image", _image_as_text)


def render(text) -> str:
    """Markdown source -> HTML safe to put in gr.HTML (no tag of the source survives)."""
    out = _MD.render(str(text or ""))
    for ch, ent in _TEMPLATE_CHARS:
        out = out.replace(ch, ent)
    return out
