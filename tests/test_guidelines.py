"""Guidelines + rubric (issue 15.1) and responses as markdown without raw HTML (15.2)."""
from __future__ import annotations

import pytest

from app import guidelines, handlers, safe_markdown, ui_research
from app.context import AppContext
from rlhf_core.config import AppConfig
from rlhf_core.data.guidelines import (DEFAULT_RUBRIC, MAX_GUIDELINES_CHARS, get_guidelines,
                                       set_guidelines)
from tests.test_handlers import XSS, seed_items

IMG_XSS = '<img src=x onerror="window.__xss = 1">'


@pytest.fixture
def ctx(store, tmp_path):
    return AppContext.from_config(AppConfig(workspace=tmp_path / "ws"), store=store)


def test_guidelines_default_save_and_event(store):
    assert get_guidelines(store) == {"guidelines": "", "rubric": DEFAULT_RUBRIC}
    out = set_guidelines(store, "Prefer **short** answers.\r\n", "  Which is   safer? ",
                         actor="res")
    assert out == {"guidelines": "Prefer **short** answers.", "rubric": "Which is safer?"}
    assert get_guidelines(store) == out
    ev = store.one("SELECT * FROM events WHERE kind = 'guidelines_saved'")
    assert ev["actor"] == "res"
    assert set_guidelines(store, "x", "")["rubric"] == DEFAULT_RUBRIC  # empty: the default
    with pytest.raises(ValueError, match="at most"):
        set_guidelines(store, "x" * (MAX_GUIDELINES_CHARS + 1), "")
    assert get_guidelines(store)["guidelines"] == "x"  # a refused save changes nothing


def test_markdown_renders_formatting_and_never_html():
    out = safe_markdown.render("**bold**\n\n- one\n- two\n\n```\ncode {x}\n```\n")
    assert "<strong>bold</strong>" in out and "<li>one</li>" in out
    assert "<pre><code>code &#123;x&#125;" in out
    assert safe_markdown.render("two\nlines") == "<p>two<br />\nlines</p>\n"  # as typed
    for hostile in (XSS, IMG_XSS, '<a href="javascript:alert(1)">x</a>', "<iframe src=x>"):
        out = safe_markdown.render(hostile)
        assert "<script" not in out and "<img" not in out and "<a " not in out
        assert "<iframe" not in out and "&lt;" in out
    out = safe_markdown.render("![pic](http://x/y.png) [l](javascript:alert(1)) ${1+1} {{x}}")
    assert "<img" not in out and "![pic](http://x/y.png)" in out
    assert "javascript:" in out and 'href="javascript' not in out
    assert "${" not in out and "{{" not in out  # gr.HTML template syntax neutralised


def test_cards_render_markdown_with_raw_text_beside(ctx):
    seed_items(ctx.store, n=1, texts=["**bold** answer", XSS, IMG_XSS, "1. a\n2. b"])
    cards = handlers.start(ctx, "ada", None, {})["cards_html"]
    assert cards.count('class="rl-md"') == 4 and cards.count("rl-raw") == 4
    assert "<strong>bold</strong>" in cards and "**bold** answer" in cards  # md and raw
    assert "<script" not in cards and "<img" not in cards and "<ol>" in cards


def test_rank_page_shows_rubric_and_guidelines_as_safe_markdown(ctx):
    view = guidelines.guidelines_view(ctx)
    assert DEFAULT_RUBRIC in view["rubric_html"] and "No guidelines yet" in view["guidelines_html"]
    set_guidelines(ctx.store, f"Rule **one**.\n\n{XSS}", "Which is *kinder*?")
    view = guidelines.guidelines_view(ctx)
    assert "<strong>one</strong>" in view["guidelines_html"] and "<script" not in view["guidelines_html"]
    assert "&lt;script&gt;" in view["guidelines_html"] and "<em>kinder</em>" in view["rubric_html"]


def test_only_researchers_edit_guidelines(ctx):
    ctx.users = {"ann": {"password": "x", "role": "annotator"},
                 "res": {"password": "y", "role": "researcher"}}
    out = ui_research.save_guidelines(ctx, "hijack", "?", "ann", {"name": "res"})
    assert "only researchers" in out["guidelines_msg"] and "guidelines" not in out
    assert get_guidelines(ctx.store)["guidelines"] == ""
    assert ui_research.load_guidelines(ctx, "ann", {}) == {}
    out = ui_research.save_guidelines(ctx, "Be *brief*.", "", "res", {})
    assert out["guidelines"] == "Be *brief*." and out["rubric"] == DEFAULT_RUBRIC
    assert ui_research.load_guidelines(ctx, "res", {})["guidelines"] == "Be *brief*."
    out = ui_research.save_guidelines(ctx, "y" * (MAX_GUIDELINES_CHARS + 1), "", "res", {})
    assert out["guidelines_msg"].startswith("not saved")
